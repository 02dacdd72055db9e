#!/usr/bin/env bash
# flake8 and an isort check (line length 100, settings in setup.cfg) over the project's Python.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$(bash "$ROOT/tools/bootstrap.sh" | tail -n 1)"
cd "$ROOT"
paths=(projects tests tools train_net.py setup.py)
[[ -d benchmarks ]] && paths+=(benchmarks)
"$PY" -m flake8 "${paths[@]}"
"$PY" -m isort --check-only --diff "${paths[@]}"
echo "lint: flake8 and isort clean"
