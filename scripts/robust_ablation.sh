#!/usr/bin/env bash
# Augmentation ablation of issue 11, on val only: fine-tune the v1 weights with each variant of
# configs/ablation/robust_*.yaml (all / no_surroundings / no_scale / no_photometric / paper_only;
# 30 epochs each, checkpoint selected on val), then score every selected checkpoint, and v1, on
# the val split under the robustness shifts (benchmarks/robustness.py --split val) in one table.
# Each run also reads test once at its end (the honest protocol's final_test): never choose on it.
#   scripts/robust_ablation.sh                 # all variants, one after the other
#   scripts/robust_ablation.sh all no_scale    # just these
#   ABLATION_SET="epochs=2 t_max=2" scripts/robust_ablation.sh all   # a smoke run
# Environment: ABLATION_OUT (runs/ablation) where runs and the table go; ABLATION_SET extra
# space-separated KEY=VALUE overrides for every run. A killed run is resumed where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${ABLATION_OUT:-runs/ablation}
variants=("$@")
[ ${#variants[@]} -gt 0 ] || variants=(all no_surroundings no_scale no_photometric paper_only)
sets=(--set "out_dir=$out" --set progress=false)
for kv in ${ABLATION_SET:-}; do sets+=(--set "$kv"); done
weights=(--weights v1=scsonet-isic2017)
for v in "${variants[@]}"; do
    config=configs/ablation/robust_$v.yaml
    [ -f "$config" ] || { echo "robust_ablation: no $config" >&2; exit 2; }
    run=$out/robust_$v
    if [ -f "$run/test/report.json" ]; then
        echo "robust_ablation: $run already trained"
    elif [ -f "$run/last.pt" ]; then
        .venv/bin/scsonet train --config "$config" "${sets[@]}" --resume "$run"
    else
        .venv/bin/scsonet train --config "$config" "${sets[@]}"
    fi
    weights+=(--weights "$v=$run/best.pt")
done
.venv/bin/python benchmarks/robustness.py "${weights[@]}" --split val --out "$out/val_robustness.md"
echo "robust_ablation: val table in $out/val_robustness.md"
