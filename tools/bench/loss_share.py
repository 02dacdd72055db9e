# Copyright (c) kd_detr contributors.
"""How much of a run's training loss is distillation: from Detectron2's ``metrics.json`` (one
JSON line per logged iteration), the detection losses (``loss_*``) and the KD losses
(``loss_kd*``, already weighted as they enter the step) late in training. A KD arm whose terms
are a negligible or an overwhelming part of the loss is read differently from one in balance."""
import json
import os

__all__ = ["kd_loss_share"]


def kd_loss_share(out_dir, max_iter, last_fraction=0.2):
    """Means over the iterations logged after ``(1 - last_fraction) * max_iter``.

    Returns:
        dict or None: ``{"detection", "kd", "share"}`` (share = kd / (detection + kd)), or None
        when ``out_dir`` has no ``metrics.json`` or no iteration in that range.
    """
    path = os.path.join(out_dir or "", "metrics.json")
    try:
        with open(path) as f:
            lines = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        return None
    start = (1 - last_fraction) * max_iter
    det, kd = [], []
    for record in lines:
        # Detectron2 counts iterations from 0; the last logged one is max_iter - 1.
        if record.get("iteration", -1) + 1 <= start:
            continue
        losses = {k: v for k, v in record.items() if k.startswith("loss_")}
        if not losses:
            continue  # an evaluation line
        kd.append(sum(v for k, v in losses.items() if k.startswith("loss_kd")))
        det.append(sum(v for k, v in losses.items() if not k.startswith("loss_kd")))
    if not det:
        return None
    detection, distill = sum(det) / len(det), sum(kd) / len(kd)
    return {"detection": detection, "kd": distill, "share": distill / (detection + distill)}
