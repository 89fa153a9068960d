#!/usr/bin/env bash
# Parity on Grazzi et al. (ICLR 2025)'s length split -- train and valid on lengths 3-40, test on 40-256 -- for
# DeltaNet (2), DeltaNet [-1,1] (20) and its two ablations (21: L2 keys only, 22: beta in (0, 2) only), with one
# shared small configuration. Usage: bash scripts/grazzi_parity.sh [SEED [MODEL_TYPE ...]] (default: 1, 2 20 21 22).
# Runs go to results/grazzi/runs/ (one main.py run directory each), one after the other.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
seed="${1:-1}"
shift || true
models=("${@:-2 20 21 22}")
data=data/parity_grazzi
[ -d "$data" ] || "${PYTHON:-python}" data.py --task parity --out_dir "$data" --train_lengths 3 40 --test_lengths 40 256
for model in ${models[@]}; do
    bash scripts/train.sh parity_grazzi "$model" 2 64 4 4 64 1e-3 --work_dir results/grazzi/runs \
        --num_epoch "${NUM_EPOCH:-12}" --seed "$seed"
done
