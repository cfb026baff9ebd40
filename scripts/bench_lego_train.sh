#!/usr/bin/env bash
# Train gsloc on the NeRF-synthetic lego scene at 200x200 (../shared/data/lego-200, not part of this repo)
# and evaluate the test split with ns-eval. Prints training wall time and the test PSNR.
# Usage: bash scripts/bench_lego_train.sh [iterations] [output-dir]
set -euo pipefail
cd "$(dirname "$0")/.."
# idle OpenMP threads sleep rather than spin: on a busy 2-core machine spinning makes torch 10-30x slower
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
ITERS=${1:-3000}
OUT=${2:-outputs/bench}
DATA=${GSLOC_LEGO:-../shared/data/lego-200}
[ -d "$DATA" ] || { echo "error: lego-200 not found at $DATA (set GSLOC_LEGO)" >&2; exit 1; }
bash scripts/setup_env.sh
start=$(date +%s)
.venv/bin/ns-train gsloc --data "$DATA" --output-dir "$OUT" --experiment-name lego-200 --timestamp "it$ITERS" \
  --max-num-iterations "$ITERS" --optimizers.means.scheduler.max-steps "$ITERS" \
  --pipeline.model.stop-split-at "$((ITERS / 2))" --pipeline.model.background-color white \
  --vis tensorboard --steps-per-eval-image 500 blender-data
end=$(date +%s)
.venv/bin/ns-eval --load-config "$OUT/lego-200/gsloc/it$ITERS/config.yml" --output-path "$OUT/lego-200/eval-it$ITERS.json"
python3 - "$OUT/lego-200/eval-it$ITERS.json" "$((end - start))" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))["results"]
print(f"lego-200 test split: PSNR {r['psnr']:.2f} dB, SSIM {r['ssim']:.3f}; training wall time {int(sys.argv[2]) / 60:.1f} min")
PY
