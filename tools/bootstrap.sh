#!/usr/bin/env bash
# Prepare a Python environment for kd_detr; print the interpreter to use on the last line.
#
# - An active environment (VIRTUAL_ENV or CONDA_PREFIX) in which detectron2 imports is used as is:
#   only kd_detr (editable) and missing test/runtime packages are added, with ranges, so a
#   detectron2 built from source and its torch are never replaced.
# - Otherwise .venv/ is created in the repository and filled from requirements/constraints-cpu.txt
#   (torch 2.14.1, torchvision 0.29.1, numpy<1.24, Pillow<10, ...), then detectron2 v0.6 is
#   installed from the PyPI sdist by tools/install_detectron2.py. A stamp file makes reruns instant.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CONSTRAINTS="$ROOT/requirements/constraints-cpu.txt"
log() { echo "[bootstrap] $*" >&2; }

active_python() {
  local py
  if [[ -n "${VIRTUAL_ENV:-}" ]]; then py="$VIRTUAL_ENV/bin/python"
  elif [[ -n "${CONDA_PREFIX:-}" ]]; then py="$CONDA_PREFIX/bin/python"
  else return 1; fi
  [[ -x "$py" ]] && "$py" -c "import detectron2" >/dev/null 2>&1 && echo "$py"
}

if PY="$(active_python)" && [[ "$PY" != "$ROOT/.venv/bin/python" ]]; then
  log "using the active environment ($PY); detectron2 $("$PY" -c 'import detectron2; print(detectron2.__version__)')"
  if ! "$PY" -c "import kd_detr, pytest, faster_coco_eval" >/dev/null 2>&1; then
    log "installing kd_detr (editable) with its test extras into the active environment"
    "$PY" -m pip install -q -e "$ROOT[test]" >&2
  fi
  echo "$PY"
  exit 0
fi

VENV="$ROOT/.venv"
PY="$VENV/bin/python"
STAMP="$VENV/.kd_detr_bootstrap"
want="$(cat "$CONSTRAINTS" "$ROOT/setup.cfg" "$ROOT/tools/install_detectron2.py" \
  "$ROOT/projects/kd_detr/compat/detectron2_c_standin.py" | sha256sum | cut -d' ' -f1)"
if [[ -x "$PY" && -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
  echo "$PY"
  exit 0
fi

PYTHON="${PYTHON:-python3}"
if [[ ! -x "$PY" ]]; then
  log "creating $VENV with $("$PYTHON" --version 2>&1)"
  "$PYTHON" -m venv "$VENV"
fi
log "installing pinned packages from requirements/constraints-cpu.txt (first run: a few minutes)"
# Every pinned name except pip's own tooling; the constraints file fixes the versions.
mapfile -t pkgs < <(grep -vE '^\s*(#|$)' "$CONSTRAINTS" | sed -E 's/[=<>!~ ].*$//')
"$PY" -m pip install -q --disable-pip-version-check -c "$CONSTRAINTS" "${pkgs[@]}" >&2
"$PY" "$ROOT/tools/install_detectron2.py" --force >&2
"$PY" -m pip install -q --disable-pip-version-check --no-deps -e "$ROOT" >&2
"$PY" -c "import kd_detr, detectron2.layers" >&2  # kd_detr first: it silences a jit FutureWarning
echo "$want" > "$STAMP"
log "environment ready: $PY"
echo "$PY"
