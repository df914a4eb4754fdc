#!/usr/bin/env bash
# Builds the demo training data and trains the demo model in four stages, each from the last one's weights:
# stage 1 (configs/train_demo.yaml) into runs/demo/run and stage 2 (configs/train_demo_stage2.yaml, hard negatives)
# into runs/demo/run2, about 2-3 hours on one CPU core; stage 3 (configs/train_demo_gpu.yaml, 96^3 crops, one epoch)
# into runs/gpu/run and stage 4 (configs/train_demo_gpu2.yaml, 64^3 crops) into runs/gpu/run2, about 30 min on one
# GPU (the training step runs anywhere; on this 2-core CPU stage 4 takes ~2.5 s per step, 1.6 hours).
# Record and ship with scripts/ship_demo_model.py (add-stage per run, then ship --weights runs/gpu/run2/best.pt).
# Usage: bash configs/train_demo.sh [LIDC_ROOT]   (LIDC_ROOT defaults to ../shared/data/LIDC-IDRI)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
LIDC=${1:-../shared/data/LIDC-IDRI}
OUT=runs/demo
mkdir -p "$OUT/data/lidc"
export OMP_NUM_THREADS=1
# 36 small phantom chests, 4 nodules each (seeds 100..135).
$PY -m nodulenet prepare-phantoms "$OUT/data/phantoms" --n 36 --first-seed 100 --n-nodules 4
# The two LIDC-IDRI patients, real nodules kept, 6 synthetic nodules inserted in their lungs.
for p in LIDC-IDRI-0001 LIDC-IDRI-0002; do
  series=$(dirname "$(ls "$LIDC/$p"/*/*/*.xml | head -1)")
  [ -f "$OUT/data/lidc/${p}_synthetic0/done.json" ] || \
    $PY -m nodulenet prepare-lidc-synthetic "$series" "$OUT/data/lidc/${p}_synthetic0" --seed 0 --n-nodules 6
done
# 6 folds by patient: fold 0 trains on 4 groups, validates on group 1, keeps group 0 as untouched test cases.
$PY -m nodulenet make-splits "$OUT/data/phantoms" "$OUT/data/lidc" --out "$OUT/splits" --folds 6 --seed 0
$PY -m nodulenet train --config configs/train_demo.yaml --data "$OUT/data/phantoms" --data "$OUT/data/lidc" \
  --split "$OUT/splits/fold_0.json" --out "$OUT/run" --no-progress
$PY -m nodulenet train --config configs/train_demo_stage2.yaml --data "$OUT/data/phantoms" --data "$OUT/data/lidc" \
  --split "$OUT/splits/fold_0.json" --out "$OUT/run2" --init-checkpoint "$OUT/run/best.pt" --no-progress
# Stages 3-4: 44 phantoms with 8 nodules each, the same LIDC cases, 11 folds (fold 2 has both LIDC patients in training).
$PY -m nodulenet prepare-phantoms runs/gpu/data/phantoms8 --n 44 --first-seed 3000 --n-nodules 8
$PY -m nodulenet make-splits runs/gpu/data/phantoms8 "$OUT/data/lidc" --out runs/gpu/splits --folds 11 --seed 0
# Stage 3 ran one of its 6 epochs (512 steps) before the GPU session stopped it: --max-steps 512 repeats that.
$PY -m nodulenet train --config configs/train_demo_gpu.yaml --data runs/gpu/data/phantoms8 --data "$OUT/data/lidc" \
  --split runs/gpu/splits/fold_2.json --out runs/gpu/run --init-checkpoint "$OUT/run2/best.pt" --max-steps 512 --no-progress
$PY -m nodulenet train --config configs/train_demo_gpu2.yaml --data runs/gpu/data/phantoms8 --data "$OUT/data/lidc" \
  --split runs/gpu/splits/fold_2.json --out runs/gpu/run2 --init-checkpoint runs/gpu/run/last.pt --no-progress
# Operating point: 8 adult-sized phantoms (seeds 5000-5007) that no stage trains or validates on; ship the last stage.
$PY -m nodulenet prepare-phantoms runs/gpu/data/calib_adult --n 8 --first-seed 5000 --n-nodules 4 --adult
$PY scripts/ship_demo_model.py ship --weights runs/gpu/run2/best.pt --calibrate-cases runs/gpu/data/calib_adult \
  --fp-per-scan 0.25 --heldout benchmarks/results/demo_model_quality.json \
  --heldout benchmarks/results/demo_model_quality_2000.json
