#!/usr/bin/env bash
# Submit a cache build: the tokenise array, then the build array, then the finalize job that verifies the
# cache, each afterok the one before (the sbatch options given apply to both arrays).
#   CONFIG=cache_jobs/qwen25_3b.yaml OUT=/scratch/cache/qwen25_3b cache_jobs/slurm/submit.sh [--array=0-127]
#   TEMPLATE=build_array_vllm8.sbatch CONFIG=cache_jobs/llama31_70b_vllm.yaml OUT=/scratch/cache/llama31_70b \
#       cache_jobs/slurm/submit.sh --array=0-15         # one 8-GPU node per build task (vLLM, tensor parallel 8)
# Slurm opens the logs/ files before a job starts, so logs/ is made here, in the submission directory.
set -euo pipefail
here=$(dirname "$0")
template=${TEMPLATE:-build_array.sbatch}
[ -f "$here/$template" ] || { echo "no template $here/$template" >&2; exit 2; }
mkdir -p logs
tokenize_id=$(sbatch --parsable --export=ALL "$@" "$here/tokenize_array.sbatch")
tokenize_id=${tokenize_id%%;*}  # --parsable prints "id;cluster" on federated clusters
# A failed task makes an afterok dependency unsatisfiable: cancel the jobs after it then, rather than
# leave them pending forever. Resubmit with this script; reruns skip complete parts and shards.
array_id=$(sbatch --parsable --dependency="afterok:${tokenize_id}" --kill-on-invalid-dep=yes --export=ALL "$@" \
    "$here/$template")
array_id=${array_id%%;*}
sbatch --dependency="afterok:${array_id}" --kill-on-invalid-dep=yes --export=ALL "$here/finalize.sbatch"
echo "submitted tokenise array $tokenize_id, build array $array_id ($template) and its finalize job"
