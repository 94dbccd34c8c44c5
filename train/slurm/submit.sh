#!/usr/bin/env bash
# Submit multi-node training: makes logs/ (Slurm opens logs/%x-%j.out before the job starts, and a missing
# folder fails the job with no log at all), then submits multinode.sbatch. Extra arguments go to sbatch.
#   CONFIG=train/qwen25_3b_to_1200.yaml CACHE=/scratch/cache/qwen25_3b OUT=/scratch/runs/qwen25_3b_to_1200 \
#       train/slurm/submit.sh --nodes=4
set -euo pipefail
: "${CONFIG:?}" "${CACHE:?}" "${OUT:?}"
mkdir -p logs
sbatch --export=ALL "$@" "$(dirname "$0")/multinode.sbatch"
