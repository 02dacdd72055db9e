#!/usr/bin/env bash
# The main job: prepare the environment, then the KD-DETR demo (tools/kd_demo.py): train a teacher
# (or reuse the cached one), train the student without KD and with KD-DETR for the same
# iterations, evaluate all three, print a table and write output/kd_demo/kd_demo_results.json.
# Arguments go to tools/kd_demo.py (the demo preset of tools/kd_bench.py), e.g. `--seeds 0 1`,
# `-- SOLVER.IMS_PER_BATCH 4`, or your data instead of the synthetic demo set:
#   bash tools/run_demo.sh --train my/train.json --train-images my/train_images \
#       --test my/val.json --test-images my/val_images
#   bash tools/run_demo.sh --train path/VOCdir --train-split train --test path/VOCdir \
#       --test-split val --classes 'RBC;WBC;Platelets'
#
# With KD_DETR_DEMO_CONFIG set, trains and evaluates that one config instead (arguments are then
# config overrides), e.g.
#   KD_DETR_DEMO_CONFIG=configs/demo/faster_rcnn_efflite0_fpn_demo.yaml bash tools/run_demo.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$(bash "$ROOT/tools/bootstrap.sh" | tail -n 1)"
cd "$ROOT"
if [[ -z "${KD_DETR_DEMO_CONFIG:-}" ]]; then
  exec "$PY" tools/kd_demo.py --python "$PY" "$@"
fi
OUT="${KD_DETR_DEMO_OUTPUT:-output/demo}"
"$PY" train_net.py --config-file "$KD_DETR_DEMO_CONFIG" OUTPUT_DIR "$OUT" "$@"
"$PY" tools/print_metrics.py "$OUT/metrics_final.json"
