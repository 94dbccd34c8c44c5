#!/usr/bin/env bash
# The main job end to end on the built-in tiny teacher: build a teacher cache once, inspect and verify
# it, train an LRC student with the online reference trainer, export it. Outputs go to runs/demo/.
set -euo pipefail
cd "$(dirname "$0")"
./setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
out=${1:-runs/demo}
mkdir -p "$out"
lrc-cache build --config cache_jobs/tiny_cpu.yaml --out "$out/cache"
lrc-cache inspect "$out/cache"
lrc-cache verify "$out/cache"
lrc-train online --config train/tiny_cpu_online.yaml --out "$out/online"
echo "done: cache in $out/cache, student in $out/online/student, metrics in $out/online/metrics.jsonl"
