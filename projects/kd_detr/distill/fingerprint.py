# Copyright (c) kd_detr contributors.
"""``TeacherFingerprint``: what identifies the teacher of a KD run, stored in its checkpoints so
that ``--resume`` with another teacher (other weights or another config) stops, naming both."""
import hashlib
import os
from typing import Dict

__all__ = ["TeacherFingerprint", "file_sha256"]


def file_sha256(path: str, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


class TeacherFingerprint:
    """A checkpointable (``state_dict`` / ``load_state_dict``) of the teacher's identity: the
    sha256 of its weights file and of its config (without ``MODEL.DEVICE``), plus their names.

    Args:
        teacher_cfg: the teacher's frozen config.
        config_file (str): ``MODEL.KD.TEACHER.CONFIG_FILE``.
        weights (str): ``MODEL.KD.TEACHER.WEIGHTS`` (a local file).
    """

    def __init__(self, teacher_cfg, config_file: str, weights: str):
        cfg = teacher_cfg.clone()
        cfg.defrost()
        cfg.MODEL.DEVICE = ""
        self.config_file = config_file
        self.weights = weights
        self.config_sha256 = hashlib.sha256(cfg.dump().encode("utf-8")).hexdigest()
        self._weights_sha256 = None

    @property
    def weights_sha256(self) -> str:
        if self._weights_sha256 is None:  # hashed once, when first needed
            local = self.weights if os.path.isfile(self.weights) else ""
            self._weights_sha256 = file_sha256(local) if local else ""
        return self._weights_sha256

    def state_dict(self) -> Dict[str, str]:
        return {
            "config_file": self.config_file,
            "config_sha256": self.config_sha256,
            "weights": self.weights,
            "weights_sha256": self.weights_sha256,
        }

    def load_state_dict(self, state: Dict[str, str]) -> None:
        """Raise when the checkpoint was trained with another teacher.

        Raises:
            ValueError: naming the checkpoint's and this run's teacher config / weights.
        """
        now = self.state_dict()
        differ = [
            what
            for what, key in (("weights", "weights_sha256"), ("config", "config_sha256"))
            if state.get(key) != now[key]
        ]
        if differ:
            theirs = f"{state.get('config_file')!r} with weights {state.get('weights')!r}"
            ours = f"{now['config_file']!r} with weights {now['weights']!r}"
            raise ValueError(
                "--resume: the checkpoint was distilled from another teacher "
                f"({' and '.join(differ)} differ): checkpoint teacher {theirs}, this run's "
                f"{ours}. Resume with the original MODEL.KD.TEACHER.* settings, or start a new "
                "run in another OUTPUT_DIR."
            )
