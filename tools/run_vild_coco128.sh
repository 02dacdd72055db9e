#!/usr/bin/env bash
# ViLD-text (Faster R-CNN, ImageNet EfficientNet-Lite0 + FPN), end to end on coco128: train on
# the 48 COCO-OVD base classes with Detic's real CLIP text embeddings, evaluate on coco128 val
# with the 65 OVD classes and print novel / base / all AP50 (per-class means, coco_ovd).
#   bash tools/run_vild_coco128.sh                        # 600 iterations, see the config
#   bash tools/run_vild_coco128.sh SOLVER.MAX_ITER 20     # extra arguments are config overrides
# The shared data (coco128, clip_text) is read from $KD_DETR_SHARED_DATA, default ../shared/data.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export KD_DETR_OV_CONFIG="${KD_DETR_OV_CONFIG:-configs/ov/vild_efflite0_fpn_coco128_ovd.yaml}"
export KD_DETR_OV_OUTPUT="${KD_DETR_OV_OUTPUT:-output/vild_coco128}"
exec bash "$ROOT/tools/run_ov_coco128.sh" "$@"
