# Copyright (c) kd_detr contributors.
"""The EMA teacher of a self-distillation run as a model of its own (``--source kd_ema``).

A run with ``MODEL.KD.TEACHER.EMA.ENABLED`` checkpoints the student under "model" and the
exponential moving average of the student under ``"kd_ema_teacher": {"model": state_dict,
"num_updates": n}`` (:class:`kd_detr.distill.EMATeacher`). The average is a model of the
student's architecture; this converter takes it out, so that it can be evaluated, exported or
shipped instead of the student (as RT-DETR and D-FINE ship their EMA weights):

    python tools/convert_checkpoint.py --source kd_ema --config-file STUDENT_CFG \
        OUTPUT_DIR/model_final.pth ema.pth
    python train_net.py --config-file STUDENT_CFG --eval-only MODEL.WEIGHTS ema.pth
"""
import logging
from typing import Dict

import torch

from .registry import register_checkpoint_converter

__all__ = ["convert_kd_ema"]

logger = logging.getLogger(__name__)


@register_checkpoint_converter("kd_ema")
def convert_kd_ema(path: str, cfg, coco_classes: str = "auto") -> Dict[str, torch.Tensor]:
    """The EMA teacher's weights in a kd_detr training checkpoint.

    Args:
        path (str): a checkpoint written by ``train_net.py`` (``model_*.pth``).
        cfg: the student's config (the caller checks the keys against the model it builds).
        coco_classes (str): unused (the weights are already in kd_detr's class order).

    Returns:
        dict: the teacher's state dict, name -> tensor.

    Raises:
        ValueError: the file holds no EMA teacher, naming the keys it has.
    """
    del cfg, coco_classes
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    ema = checkpoint.get("kd_ema_teacher") if isinstance(checkpoint, dict) else None
    if not isinstance(ema, dict) or not isinstance(ema.get("model"), dict):
        keys = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(
            f"{path} holds no EMA teacher ('kd_ema_teacher' with a 'model' state dict; the file "
            f"has {keys}): use a checkpoint of a run with MODEL.KD.TEACHER.EMA.ENABLED True."
        )
    logger.info(f"{path}: the EMA teacher after {ema.get('num_updates', '?')} updates")
    return dict(ema["model"])
