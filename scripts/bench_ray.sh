#!/usr/bin/env bash
# gsloc-bench's throughput in one process vs on 2 local Ray workers (same trials), with the load average beside it.
# Usage: bash scripts/bench_ray.sh RUN/config.yml [trials per query, default 4] [output folder, default outputs/bench-ray] [gsloc-bench options...]
# e.g. lego-200: bash scripts/bench_ray.sh outputs/bench/lego-200/gsloc/it3000/config.yml 2 outputs/bench-ray-lego --query-stride 5
# Prints both runs' throughput, CPU per trial and whether every trial agrees (README, "Scaling out with Ray").
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=$1
TRIALS=${2:-4}
OUT=${3:-outputs/bench-ray}
export OMP_NUM_THREADS=1 OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
PY=${PYTHON:-.venv/bin/python}
COMMON=(--load-config "$RUN" --protocol inerf --trials "$TRIALS" --methods gsloc --threads 1 "${@:4}")
mkdir -p "$OUT"
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
t0=$(date +%s.%N)
"$PY" -m nerfstudio_gsloc.scripts.bench "${COMMON[@]}" --output-dir "$OUT/inproc" > "$OUT/inproc.log" 2>&1
t1=$(date +%s.%N)
echo "load after the in-process run: $(cut -d' ' -f1-3 /proc/loadavg); whole command $(awk "BEGIN{printf \"%.1f\", $t1 - $t0}") s"
"$PY" -m nerfstudio_gsloc.scripts.bench "${COMMON[@]}" --ray --ray-workers 2 --output-dir "$OUT/ray2" > "$OUT/ray2.log" 2>&1
t2=$(date +%s.%N)
echo "load after the Ray run: $(cut -d' ' -f1-3 /proc/loadavg); whole command $(awk "BEGIN{printf \"%.1f\", $t2 - $t1}") s"
"$PY" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
from nerfstudio_gsloc.evaluation import report
out = Path(sys.argv[1])
meta = {n: json.loads((out / n / "bench.json").read_text()) for n in ("inproc", "ray2")}
trials = {n: [{k: v for k, v in r.to_json().items() if k != "seconds"} for r in report.read_trials_jsonl(out / n / "trials.jsonl")]
          for n in meta}
n = len(trials["inproc"])
a, b = meta["inproc"]["method_seconds"]["gsloc"], meta["ray2"]["method_seconds"]["gsloc"]
print(f"{n} trials; identical per-trial results: {trials['inproc'] == trials['ray2']}")
print(f"in-process {a:.1f} s ({n / a:.3f} trials/s, {meta['inproc']['method_cpu_seconds']['gsloc'] / n:.2f} s CPU per trial); "
      f"2 Ray workers {b:.1f} s ({n / b:.3f} trials/s): {a / b:.2f}x")
print("\n".join(meta["ray2"]["ray_workers"]))
PY
