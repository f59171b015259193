#!/usr/bin/env bash
# How the shipped ISIC 2017 weights were trained, on one GPU machine, from the raw archive layout:
# prepare the data, train SCSONet with the honest protocol and the paper's recipe, test once.
# Usage: bash scripts/gpu_train.sh RAW_ISIC2017_DIR OUT_DIR [MAX_MINUTES]
set -uo pipefail
raw=$1
out=$2
minutes=${3:-0}
export PYTHONPATH=${PYTHONPATH:-src} PYTHONUNBUFFERED=1
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
start=$(date +%s)
python3 -m scsonet.cli.main data prepare --dataset isic2017 --src "$raw" --split-file "$raw/split_7_3.csv" \
    --out /tmp/isic2017 --no-progress || exit 1
echo "prepared in $(( $(date +%s) - start )) s"
python3 -m scsonet.cli.main train --config configs/isic2017_scsonet.yaml --set data=/tmp/isic2017 \
    --set out_dir=/tmp/runs --set run_name=scsonet-isic2017 --set max_minutes="$minutes" \
    --set progress=false --set tensorboard=false
status=$?
echo "train exit $status after $(( $(date +%s) - start )) s"
mkdir -p "$out"
cp /tmp/runs/scsonet-isic2017/{best.pt,log.csv,config.yaml} "$out"/ 2>/dev/null
cp /tmp/runs/scsonet-isic2017/test/report.json "$out"/test_report.json 2>/dev/null
cp /tmp/runs/scsonet-isic2017/test/per_image.csv "$out"/test_per_image.csv 2>/dev/null
cp /tmp/runs/scsonet-isic2017/last.pt "$out"/ 2>/dev/null
exit $status
