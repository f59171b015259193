#!/usr/bin/env bash
# CI step: a short benchmark on the shared ISIC 2017 data, end to end (issue 5's acceptance):
# prepare the split of record, train and test 2 models x 1 seed x 2 epochs, check the table and figure.
# Skips (exit 0) where ../shared/data/isic2017 is absent. CI_BENCHMARK_OUT=DIR keeps the results there.
# CI_BENCHMARK_SIZE (64) is the prepared side: at 256 two CPU cores need ~15 min for the 4 epochs,
# at 64 under 2 min, and the pipeline exercised is the same (the table's header names the size).
set -euo pipefail
cd "$(dirname "$0")/.."
src=../shared/data/isic2017
if [ ! -f "$src/split_7_3.csv" ]; then
    echo "ci_benchmark: skipped: $src/split_7_3.csv not found (the shared ISIC 2017 data sits beside the clone)"
    exit 0
fi
[ -x .venv/bin/scsonet ] || bash scripts/setup
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
out=${CI_BENCHMARK_OUT:-$tmp/bench}
size=${CI_BENCHMARK_SIZE:-64}
start=$(date +%s)
.venv/bin/scsonet data prepare --dataset isic2017 --src "$src" --split-file "$src/split_7_3.csv" \
    --out "$tmp/isic2017" --size "$size" --no-progress
echo "ci_benchmark: prepared in $(( $(date +%s) - start )) s"
.venv/bin/scsonet benchmark --data "$tmp/isic2017" --models scsonet,egeunet --seeds 42 --epochs 2 \
    --published isic2017 --set progress=false --set tensorboard=false --out "$out"
for f in table.md table.csv dsc_vs_macs.png; do
    [ -s "$out/$f" ] || { echo "ci_benchmark: $out/$f missing or empty"; exit 1; }
done
grep -q "^| Model | Params (M) | GFLOPs | mIoU (%) | DSC (%) |" "$out/table.md" \
    || { echo "ci_benchmark: $out/table.md lacks the paper's columns"; exit 1; }
echo "ci_benchmark: passed in $(( $(date +%s) - start )) s"
