#!/usr/bin/env bash
# The whole test suite: prepares the environment (tools/bootstrap.sh), then runs pytest.
# Extra arguments go to pytest, e.g. `bash tools/run_tests.sh -k coco -x`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$(bash "$ROOT/tools/bootstrap.sh" | tail -n 1)"
cd "$ROOT"
set +e
"$PY" -m pytest tests "$@"
rc=$?
set -e
# pytest exits 5 when it collected no test: that is a failure of the suite, not a pass.
exit $rc
