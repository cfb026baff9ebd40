#!/usr/bin/env bash
# Set up the environment if needed, then run the whole test suite. Usage: bash scripts/run_tests.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
# idle OpenMP threads sleep rather than spin: on a busy 2-core machine spinning makes torch 10-30x slower
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
bash scripts/setup_env.sh
# Two workers, one per core (every test runs torch on one thread); a file's tests stay on one worker, so the
# fixtures they share (trained models, Ray clusters) are built once per worker. 568 s on one worker, 330 s on two (2026-12-07).
exec .venv/bin/python -m pytest -q -n 2 --dist loadfile "$@"
