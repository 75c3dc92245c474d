#!/usr/bin/env bash
# Every dev-set figure of the README's Results section, from one command:
#   bash benchmarks/dev_results.sh [DATA_DIR]
# Writes benchmarks/out/eval_<dataset>_<variant>.json and prints the tables.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data}
OUT=benchmarks/out
mkdir -p "$OUT"
for ds in cocostuff ade20k; do
  root="$DATA/$ds-val-dev"
  clasp eval --dataset "$ds" --root "$root" --backbone efficientnet_lite0 --device cpu --quiet \
    --json "$OUT/eval_${ds}_adaptive.json"
  clasp eval --dataset "$ds" --root "$root" --backbone efficientnet_lite0 --device cpu --quiet \
    --fixed-k 9 --json "$OUT/eval_${ds}_fixed9.json"
done
python -m benchmarks.compare_selectors --data "$DATA" --json "$OUT/compare_selectors.json"
for ds in cocostuff ade20k; do python -m benchmarks.compare_crf_pipeline --dataset "$ds" --root "$DATA/$ds-val-dev" --threads 1 --json "$OUT/compare_crf_$ds.json"; done
python -m benchmarks.compare_reference --dataset cocostuff --root "$DATA/cocostuff-val-dev" \
  --json "$OUT/compare_reference_cocostuff.json"
