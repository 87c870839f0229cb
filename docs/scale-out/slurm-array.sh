#!/usr/bin/env bash
# A one-off migration split over the 8 tasks of a Slurm job array. Each task runs
# `trackbridge sync --shard auto`, which takes its shard from SLURM_ARRAY_TASK_ID,
# SLURM_ARRAY_TASK_COUNT and SLURM_ARRAY_TASK_MIN (so --array=1-8 works as well as 0-7).
# The array must be a range, optionally with a step; a list such as --array=1,4,9 is
# refused, since its ids say nothing about the count. Afterwards, one
# `trackbridge verify "$SRC" "$DEST"` checks it all.
#   sbatch slurm-array.sh
#SBATCH --job-name=trackbridge-migrate
#SBATCH --array=0-7
#SBATCH --cpus-per-task=2
#SBATCH --mem=4G
#SBATCH --time=04:00:00
#SBATCH --output=trackbridge-%A_%a.log
set -euo pipefail

: "${SRC:=wandb://acme/research}"
: "${DEST:=mlflow+https://mlflow.acme.internal}"
# credentials (WANDB_API_KEY, MLFLOW_TRACKING_TOKEN) come from the submitting shell's
# environment, which sbatch passes on; never write them into this file

exec trackbridge sync "$SRC" "$DEST" --shard auto \
    --state-dir "${TRACKBRIDGE_STATE_DIR:-$HOME/.local/state/trackbridge}"
