#!/usr/bin/env bash
# The paper's budget for the disputed cells (docs/reproducing.md#the-papers-budget) on a machine with one CUDA GPU
# and many CPU cores but no Ray: every cell's chosen configuration (scripts/hparams_searched.csv), seed 1, up to
# 300 epochs with --patience 100, all at once on the GPU (sweep.py --no_ray). At BUDGET_S seconds (default 480)
# the runs get SIGTERM and save their checkpoints; then results/paper_budget, checkpoints included, is packed
# into $OUT/paper_budget.tar.gz (or ./paper_budget.tar.gz). Unpacked at the repository root, a second call
# resumes what has not finished and skips what has. DEVICE=cpu runs the same on the CPU (a smoke test).
#   bash scripts/paper_budget_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
budget=${BUDGET_S:-480}
out_dir=${OUT:-.}
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

common=(--no_ray --parallel 16 --csv scripts/hparams_searched.csv --work_dir results/paper_budget
        --extra="--num_epoch 300 --patience 100 --device ${DEVICE:-cuda}")
# Both sweeps at once; timeout signals sweep.py itself, which lets its runs save and exits with 130.
timeout --preserve-status -s TERM "$budget" "$PYTHON" scripts/sweep.py "${common[@]}" \
    --tasks counter-2 counter-3 shuffle-2 dyck-1 reset_dyck --models 12 7 &
first=$!
timeout --preserve-status -s TERM "$budget" "$PYTHON" scripts/sweep.py "${common[@]}" --tasks reset_dyck --models 2 &
second=$!
wait "$first"; status_first=$?
wait "$second"; status_second=$?
echo "sweeps ended with status $status_first and $status_second (130: stopped at the budget, runs saved)"
tar czf "$out_dir/paper_budget.tar.gz" results/paper_budget
ls -l "$out_dir/paper_budget.tar.gz"
