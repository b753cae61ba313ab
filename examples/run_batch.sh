#!/usr/bin/env bash
# Upsample every volume in examples/data/ into examples/data/out/, resuming if interrupted.
set -euo pipefail
cd "$(dirname "$0")"
python make_phantom.py
conv3dt upsample data/*.nii.gz --spec upsample2x.yaml --output-dir data/out \
    --name '{stem}_2x{ext}' --skip-existing --json
conv3dt info data/out/phantom_2x.nii.gz
