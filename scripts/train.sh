#!/usr/bin/env bash
# Train one model on one task with the paper's fixed settings: the generic script of the original
# repository, with its hyper-parameters as arguments. Extra flags go to main.py after the fixed ones,
# so they override them (argparse keeps the last value), e.g. `--num_epoch 30 --seed 2`.
# `--resume RUN_DIR` continues an unfinished run in the same environment (main.py reads the run's flags).
# It runs from the repository root wherever it is called from: relative paths in extra flags are
# relative to the repository root. PYTHON picks the interpreter (default: python).
set -euo pipefail

resume=0
if [ "$#" -eq 2 ] && [ "$1" = "--resume" ]; then
    resume=1
elif [ "$#" -lt 8 ]; then
    echo "usage: bash scripts/train.sh TASK MODEL_TYPE LAYERS SIZE HEADS FF BATCH LR [extra main.py flags]" >&2
    echo "       bash scripts/train.sh --resume RUN_DIR" >&2
    exit 2
fi

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# The original pinned GPU 0; keep a choice made by the caller (or by a scheduler such as Ray).
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES-0}"
# Compiled kernels are cached here, so they build once, not once per run.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/torch_extensions/formal_lang}"

if [ "$resume" -eq 1 ]; then
    exec "${PYTHON:-python}" main.py --resume "$2"
fi
task=$1 modeltype=$2 lay=$3 size=$4 head=$5 ff=$6 batch=$7 lr=$8
shift 8

exec "${PYTHON:-python}" main.py \
    --data_dir "data/${task}" \
    --level 50 \
    --model_type "${modeltype}" \
    --num_layer "${lay}" \
    --hidden_size "${size}" \
    --n_head "${head}" \
    --ff_factor "${ff}" \
    --dropout 0.0 \
    --batch_size "${batch}" \
    --learning_rate "${lr}" \
    --seed 1 \
    --grad_cummulate 1 \
    --num_epoch 300 \
    --report_every 50 \
    --project_name "2023--formal-lang" \
    --remove_pos_enc \
    "$@"
