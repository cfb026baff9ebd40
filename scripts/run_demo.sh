#!/usr/bin/env bash
# The main job on the embedded default scene, from nothing: set up .venv, generate the procedural room,
# train `ns-train gsloc` on it (short CPU schedule), then localize its held-out views from perturbed poses
# with `ns-localize` and print the accuracy table. Usage: bash scripts/run_demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# idle OpenMP threads sleep rather than spin: on a busy 2-core machine spinning makes torch 10-30x slower
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
bash scripts/setup_env.sh
BIN=.venv/bin
DATA=data/gsloc-room
RUN=outputs/gsloc-room/gsloc/demo
ITERS=${GSLOC_DEMO_ITERS:-2000}

echo "[demo] 1/3 generating the embedded scene in $DATA"
"$BIN/gsloc-make-scene" --output-dir "$DATA" --seed 0

echo "[demo] 2/3 training gsloc for $ITERS iterations on the CPU (a few minutes)"
"$BIN/ns-train" gsloc --data "$DATA" --output-dir outputs --experiment-name gsloc-room --timestamp demo \
  --max-num-iterations "$ITERS" --optimizers.means.scheduler.max-steps "$ITERS" \
  --pipeline.model.stop-split-at "$((ITERS / 2))" --vis tensorboard --steps-per-eval-image 500 \
  --logging.local-writer.max-log-size 0

echo "[demo] 3/3 localizing the held-out views from poses perturbed by 10 deg and 0.1 scene units"
"$BIN/ns-localize" --load-config "$RUN/config.yml" --output-dir outputs/gsloc-room/localize \
  --init perturb --perturb-deg 10 --perturb-trans 0.1
echo "[demo] done: poses in outputs/gsloc-room/localize/poses.json, plot in outputs/gsloc-room/localize/trace.png"
