#!/usr/bin/env bash
# Open-vocabulary DAB-DETR, end to end on coco128: train on the 48 COCO-OVD base classes with
# Detic's real CLIP text embeddings, evaluate on coco128 val with the 65 OVD classes and print
# novel / base / all AP50 (per-class means, TEST.EVALUATOR coco_ovd).
#   bash tools/run_ov_coco128.sh                        # about 10 minutes on one CPU core
#   bash tools/run_ov_coco128.sh SOLVER.MAX_ITER 20     # extra arguments are config overrides
# The shared data (coco128, clip_text) is read from $KD_DETR_SHARED_DATA, default ../shared/data.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$(bash "$ROOT/tools/bootstrap.sh" | tail -n 1)"
cd "$ROOT"
export KD_DETR_SHARED_DATA="${KD_DETR_SHARED_DATA:-$(cd "$ROOT/.." && pwd)/shared/data}"
# One thread per process: on shared or oversubscribed cores, two or more OpenMP threads per
# process make DETR steps several times slower. Set OMP_NUM_THREADS to use more.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
CONFIG="${KD_DETR_OV_CONFIG:-configs/ov/ov_dab_detr_efflite0_coco128_ovd.yaml}"
OUT="${KD_DETR_OV_OUTPUT:-output/ov_dab_detr_coco128}"
"$PY" train_net.py --config-file "$CONFIG" OUTPUT_DIR "$OUT" "$@"
"$PY" - "$OUT/metrics_final.json" <<'PYEOF'
import json
import sys

with open(sys.argv[1]) as f:
    metrics = json.load(f)
for dataset, tasks in metrics["results"].items():
    box = tasks["bbox"]
    print(f"{dataset}: COCO-OVD AP50 in % (per-class means; classes with ground truth)")
    for split in ("novel", "base", "all"):
        num = int(box[f"AP50-{split}-num_classes"])
        ap50 = box[f"AP50-{split}"]  # null (None) when undefined
        ap50 = "n/a" if ap50 is None else f"{ap50:7.3f}"
        print(f"  {split:5s} AP50 {ap50} %  ({num} classes)")
print(f"train + eval seconds: {metrics.get('train_and_eval_seconds')}  ({sys.argv[1]})")
PYEOF
