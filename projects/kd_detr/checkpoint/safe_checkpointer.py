# Copyright (c) kd_detr contributors.
"""``SafeCheckpointer``: Detectron2's ``DetectionCheckpointer`` that never loses a trained model.

* Every checkpoint is written atomically (a temporary file in the same folder, flushed and
  fsynced, then renamed); ``last_checkpoint`` is updated only afterwards, also atomically. A crash
  during a save leaves the previous checkpoint and ``last_checkpoint`` intact.
* Resuming from a folder whose newest checkpoint is unreadable (truncated, empty) falls back to
  the newest readable one, with a warning naming both.
* A file that is not a checkpoint (e.g. a text file given as ``MODEL.WEIGHTS``) is an error naming
  the file, not a bare ``IndexError``.
* ``load_policy(incompatible, path)`` (see :mod:`.load_policy`) may stop a load whose keys do not
  fit the model, before any optimizer state is touched.
"""
import logging
import os
import re
import zipfile
from typing import Callable, List, Optional

import torch

from detectron2.checkpoint import DetectionCheckpointer

__all__ = ["SafeCheckpointer", "atomic_torch_save", "atomic_write_text", "is_readable_checkpoint"]

logger = logging.getLogger(__name__)


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. a platform without directory descriptors
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: str, write: Callable, mode: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(directory)


def atomic_torch_save(data, path: str) -> None:
    """``torch.save(data, path)`` that either writes the whole file or leaves ``path`` as it was."""
    _atomic_write(path, lambda f: torch.save(data, f), "wb")


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    _atomic_write(path, lambda f: f.write(text), "w")


def is_readable_checkpoint(path: str) -> bool:
    """Cheap check that ``path`` holds a whole checkpoint: a non-empty file and, for torch's zip
    format (every ``torch.save`` since 1.6), an intact zip directory (a truncated file fails)."""
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return False
    if path.endswith(".pkl"):
        return True
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as z:
                return z.testzip() is None if os.path.getsize(path) < 2**20 else bool(z.namelist())
        except (zipfile.BadZipFile, OSError, EOFError):
            return False
    return True  # the legacy (pre-1.6) pickle format: only a load can tell


def _iteration(path: str) -> float:
    """Order of checkpoints: model_final last, then by the iteration in model_XXXXXXX."""
    name = os.path.basename(path)
    if name == "model_final.pth":
        return float("inf")
    match = re.search(r"(\d+)", name)
    return float(match.group(1)) if match else -1.0


class SafeCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer with atomic saves, fallback on an unreadable last checkpoint, clear
    errors for non-checkpoint files and an optional ``load_policy``.

    Args:
        model, save_dir, save_to_disk, checkpointables: as ``DetectionCheckpointer``.
        load_policy: ``policy(incompatible, path)`` called after the model's state is loaded
            and before the checkpointables (optimizer, scheduler, ...); it raises to stop.
    """

    def __init__(self, model, save_dir="", *, load_policy: Optional[Callable] = None, **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.load_policy = load_policy
        self._loading: str = ""

    # ------------------------------------------------------------------ saving
    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        atomic_torch_save(data, save_file)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        atomic_write_text(os.path.join(self.save_dir, "last_checkpoint"), last_filename_basename)

    # ------------------------------------------------------------------ resuming
    def _checkpoint_files(self) -> List[str]:
        if not self.save_dir or not os.path.isdir(self.save_dir):
            return []
        names = [n for n in os.listdir(self.save_dir) if n.endswith(".pth")]
        return sorted((os.path.join(self.save_dir, n) for n in names), key=_iteration)

    def get_checkpoint_file(self) -> str:
        """The checkpoint named by ``last_checkpoint``, or, when it is unreadable, the newest
        readable checkpoint of the folder (with a warning naming both).

        Raises:
            RuntimeError: no readable checkpoint is left.
        """
        path = super().get_checkpoint_file()
        if not path or is_readable_checkpoint(path):
            return path
        good = [p for p in self._checkpoint_files() if p != path and is_readable_checkpoint(p)]
        if not good:
            raise RuntimeError(
                f"{path} (named by {self.save_dir}/last_checkpoint) is unreadable (empty or "
                "truncated) and the folder holds no other readable checkpoint: start without "
                "--resume, or in another OUTPUT_DIR."
            )
        logger.warning(
            f"{path} (named by last_checkpoint) is unreadable (empty or truncated); resuming from "
            f"the newest readable checkpoint {good[-1]} instead."
        )
        return good[-1]

    # ------------------------------------------------------------------ loading
    def _load_file(self, filename: str):
        try:
            return super()._load_file(filename)
        except Exception as e:
            raise ValueError(
                f"{filename} is not a checkpoint kd_detr can read ({type(e).__name__}: {e}). "
                "Give a .pth written by Detectron2 / torch.save, or a Detectron2 .pkl "
                "(tools/convert_checkpoint.py converts other formats)."
            ) from e

    def load(self, path: str, *args, **kwargs):
        self._loading = path
        try:
            return super().load(path, *args, **kwargs)
        finally:
            self._loading = ""

    def _load_model(self, checkpoint):
        incompatible = super()._load_model(checkpoint)
        if self.load_policy is not None and incompatible is not None:
            self.load_policy(incompatible, self._loading)
        return incompatible
