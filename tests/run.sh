#!/usr/bin/env bash
# The test command: sets up .venv (and Prometheus) if needed, then runs pytest with any arguments given.
#   bash tests/run.sh                 # everything, as CI runs it
#   bash tests/run.sh -m "not slow"   # the fast suite: no vLLM engine, Ray cluster or Prometheus
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$repo/deploy/install.sh" --with-prometheus
cd "$repo"
status=0
"$repo/.venv/bin/python" -m pytest "$@" || status=$?
if [ "$status" = 5 ]; then
  echo "tests/run.sh: pytest collected no tests; that is a failure" >&2
  exit 1
fi
exit "$status"
