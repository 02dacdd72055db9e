# Copyright (c) kd_detr contributors.
"""``kd_detr.engine.launch`` runs several CPU processes (gloo) on detectron2 v0.6 and main."""
import json
import os
import tempfile
import unittest

import pytest
import torch
import torch.distributed as dist

from detectron2.utils import comm

from kd_detr.compat.ddp import create_ddp_model
from kd_detr.engine.launch import launch


def _worker(out_dir):
    rank = comm.get_rank()
    total = torch.tensor([float(rank + 1)])
    dist.all_reduce(total)
    model = create_ddp_model(torch.nn.Linear(3, 1))
    loss = model(torch.full((2, 3), float(rank))).sum()
    loss.backward()
    grad = model.module.weight.grad.clone()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(
            {
                "world": comm.get_world_size(),
                "local_rank": comm.get_local_rank(),
                "local_size": comm.get_local_size(),
                "sum": total.item(),
                "ddp": type(model).__name__,
                "grad": grad.tolist(),
            },
            f,
        )


@unittest.skipIf(torch.cuda.is_available(), "the CPU path is only taken without CUDA")
@pytest.mark.slow
class TestCPULaunch(unittest.TestCase):
    def test_two_cpu_processes(self):
        with tempfile.TemporaryDirectory() as tmp:
            launch(_worker, 2, dist_url="auto", args=(tmp,))
            results = [json.load(open(os.path.join(tmp, f"rank{r}.json"))) for r in range(2)]
        self.assertEqual([r["local_rank"] for r in results], [0, 1])
        for r in results:
            self.assertEqual((r["world"], r["local_size"], r["sum"]), (2, 2, 3.0))
            self.assertEqual(r["ddp"], "DistributedDataParallel")
            # DDP averages gradients: d(sum(w.x))/dw = 2*rank per process -> mean over ranks = 1.
            self.assertEqual(r["grad"], [[1.0, 1.0, 1.0]])

    def test_multi_machine_needs_url(self):
        with self.assertRaisesRegex(ValueError, "dist-url"):
            launch(_worker, 2, num_machines=2, dist_url="auto", args=("/nonexistent",))


if __name__ == "__main__":
    unittest.main()
