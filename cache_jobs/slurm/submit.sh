#!/usr/bin/env bash
# Submit a cache build as a Slurm array plus the finalize job that verifies it.
#   CONFIG=cache_jobs/qwen25_3b.yaml OUT=/scratch/cache/qwen25_3b cache_jobs/slurm/submit.sh [--array=0-127]
#   TEMPLATE=build_array_vllm8.sbatch CONFIG=cache_jobs/llama31_70b_vllm.yaml OUT=/scratch/cache/llama31_70b \
#       cache_jobs/slurm/submit.sh --array=0-15         # one 8-GPU node per task (vLLM, tensor parallel 8)
# Extra arguments go to the array's sbatch. Slurm opens the logs/ files before a job starts, so logs/ is
# made here, in the submission directory.
set -euo pipefail
here=$(dirname "$0")
template=${TEMPLATE:-build_array.sbatch}
[ -f "$here/$template" ] || { echo "no template $here/$template" >&2; exit 2; }
mkdir -p logs
array_id=$(sbatch --parsable --export=ALL "$@" "$here/$template")
array_id=${array_id%%;*}  # --parsable prints "id;cluster" on federated clusters
# A failed array task makes the afterok dependency unsatisfiable: cancel the finalize job then, rather
# than leave it pending forever. Resubmit with this script; reruns skip complete shards.
sbatch --dependency="afterok:${array_id}" --kill-on-invalid-dep=yes --export=ALL "$here/finalize.sbatch"
echo "submitted array $array_id ($template) and its finalize job"
