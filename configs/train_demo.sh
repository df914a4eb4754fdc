#!/usr/bin/env bash
# Builds the demo training data and trains the demo model into runs/demo (CPU; about 2-3 hours on 1 core):
# stage 1 (configs/train_demo.yaml) into runs/demo/run, stage 2 (configs/train_demo_stage2.yaml, hard negatives)
# from stage 1's best weights into runs/demo/run2. Ship with: python scripts/ship_demo_model.py --stage1
# runs/demo/run --stage2 runs/demo/run2 (after benchmarks/demo_model_quality.py --weights runs/demo/run2/best.pt).
# Usage: bash configs/train_demo.sh [LIDC_ROOT]   (LIDC_ROOT defaults to ../shared/data/LIDC-IDRI)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
LIDC=${1:-../shared/data/LIDC-IDRI}
OUT=runs/demo
mkdir -p "$OUT/data/lidc"
export OMP_NUM_THREADS=1
# 36 small phantom chests, 4 nodules each (seeds 100..135).
$PY -m nodulenet.train prepare-phantoms "$OUT/data/phantoms" --n 36 --first-seed 100 --n-nodules 4
# The two LIDC-IDRI patients, real nodules kept, 6 synthetic nodules inserted in their lungs.
for p in LIDC-IDRI-0001 LIDC-IDRI-0002; do
  series=$(dirname "$(ls "$LIDC/$p"/*/*/*.xml | head -1)")
  [ -f "$OUT/data/lidc/${p}_synthetic0/done.json" ] || \
    $PY -m nodulenet.train prepare-lidc-synthetic "$series" "$OUT/data/lidc/${p}_synthetic0" --seed 0 --n-nodules 6
done
# 6 folds by patient: fold 0 trains on 4 groups, validates on group 1, keeps group 0 as untouched test cases.
$PY -m nodulenet.train make-splits "$OUT/data/phantoms" "$OUT/data/lidc" --out "$OUT/splits" --folds 6 --seed 0
$PY -m nodulenet.train train --config configs/train_demo.yaml --data "$OUT/data/phantoms" --data "$OUT/data/lidc" \
  --split "$OUT/splits/fold_0.json" --out "$OUT/run" --no-progress
$PY -m nodulenet.train train --config configs/train_demo_stage2.yaml --data "$OUT/data/phantoms" --data "$OUT/data/lidc" \
  --split "$OUT/splits/fold_0.json" --out "$OUT/run2" --init-checkpoint "$OUT/run/best.pt" --no-progress
