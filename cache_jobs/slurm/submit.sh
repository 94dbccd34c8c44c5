#!/usr/bin/env bash
# Usage: CONFIG=cache_jobs/qwen25_3b.yaml OUT=/scratch/cache/qwen25_3b cache_jobs/slurm/submit.sh [--array=0-127]
# Chains: tokenise array -> build array -> finalize, each afterok (the sbatch options given apply to both arrays).
set -euo pipefail
here=$(dirname "$0")
mkdir -p logs
tokenize_id=$(sbatch --parsable --export=ALL "$@" "$here/tokenize_array.sbatch")
array_id=$(sbatch --parsable --dependency="afterok:${tokenize_id}" --export=ALL "$@" "$here/build_array.sbatch")
sbatch --dependency="afterok:${array_id}" --export=ALL "$here/finalize.sbatch"
echo "submitted tokenise array $tokenize_id, build array $array_id and its finalize job"
