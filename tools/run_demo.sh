#!/usr/bin/env bash
# The main job: prepare the environment, train and evaluate on the built-in demo dataset, print the
# results and write a metrics JSON. Extra arguments are config overrides, e.g. SOLVER.MAX_ITER 100.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$(bash "$ROOT/tools/bootstrap.sh" | tail -n 1)"
cd "$ROOT"
CONFIG="${KD_DETR_DEMO_CONFIG:-configs/demo/dab_detr_efflite0_demo.yaml}"
OUT="${KD_DETR_DEMO_OUTPUT:-output/demo_dab_detr}"
"$PY" train_net.py --config-file "$CONFIG" OUTPUT_DIR "$OUT" "$@"
"$PY" tools/print_metrics.py "$OUT/metrics_final.json"
