#!/usr/bin/env bash
# Usage: CONFIG=cache_jobs/qwen25_3b.yaml OUT=/scratch/cache/qwen25_3b cache_jobs/slurm/submit.sh [--array=0-127]
set -euo pipefail
here=$(dirname "$0")
mkdir -p logs
array_id=$(sbatch --parsable --export=ALL "$@" "$here/build_array.sbatch")
sbatch --dependency="afterok:${array_id}" --export=ALL "$here/finalize.sbatch"
echo "submitted array $array_id and its finalize job"
