# Copyright (c) kd_detr contributors.
"""``launch()`` that also runs several processes on CPU (gloo).

Detectron2 v0.6's ``launch`` asserts CUDA as soon as more than one process is asked for; upstream
main falls back to gloo. This wrapper uses Detectron2's own ``launch`` whenever CUDA is available
(or a single process is asked for) and otherwise spawns the CPU workers itself, so multi-process
CPU runs behave the same on both versions.
"""
import logging
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from detectron2.engine import launch as d2_launch
from detectron2.utils import comm

__all__ = ["launch", "DEFAULT_TIMEOUT"]

DEFAULT_TIMEOUT = timedelta(minutes=30)
logger = logging.getLogger(__name__)


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(
    main_func,
    num_gpus_per_machine,
    num_machines=1,
    machine_rank=0,
    dist_url=None,
    args=(),
    timeout=DEFAULT_TIMEOUT,
):
    """Run ``main_func(*args)`` in ``num_machines * num_gpus_per_machine`` processes.

    Same arguments as :func:`detectron2.engine.launch`; ``num_gpus_per_machine`` counts processes
    per machine, which on a machine without CUDA are CPU processes joined by gloo.
    """
    world_size = num_machines * num_gpus_per_machine
    if world_size <= 1 or torch.cuda.is_available():
        return d2_launch(
            main_func,
            num_gpus_per_machine,
            num_machines=num_machines,
            machine_rank=machine_rank,
            dist_url=dist_url,
            args=args,
            timeout=timeout,
        )
    if dist_url in (None, "auto"):
        if num_machines > 1:
            raise ValueError(
                "dist_url='auto' only works on one machine; pass --dist-url tcp://HOST:PORT "
                "reachable from every machine."
            )
        dist_url = f"tcp://127.0.0.1:{_free_port()}"
    logger.info(f"Launching {num_gpus_per_machine} CPU processes per machine (gloo, {dist_url})")
    mp.spawn(
        _cpu_worker,
        nprocs=num_gpus_per_machine,
        args=(main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, args, timeout),
        daemon=False,
    )


def _cpu_worker(
    local_rank, main_func, world_size, num_per_machine, machine_rank, dist_url, args, timeout
):
    rank = machine_rank * num_per_machine + local_rank
    dist.init_process_group(
        backend="gloo", init_method=dist_url, world_size=world_size, rank=rank, timeout=timeout
    )
    _setup_local_process_group(num_per_machine, machine_rank, world_size)
    comm.synchronize()
    main_func(*args)
    dist.destroy_process_group()


def _setup_local_process_group(num_per_machine, machine_rank, world_size):
    """Create the group of ranks on this machine (``comm.get_local_rank`` needs it)."""
    if hasattr(comm, "create_local_process_group"):  # upstream main
        comm.create_local_process_group(num_per_machine)
        return
    # detectron2 v0.6 keeps the group in a module global; every rank must create every group.
    for machine in range(world_size // num_per_machine):
        ranks = list(range(machine * num_per_machine, (machine + 1) * num_per_machine))
        group = dist.new_group(ranks)
        if machine == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group
