#!/usr/bin/env bash
# Set up the environment if needed, then run the whole test suite. Usage: bash scripts/run_tests.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
# idle OpenMP threads sleep rather than spin: on a busy 2-core machine spinning makes torch 10-30x slower
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest -q "$@"
