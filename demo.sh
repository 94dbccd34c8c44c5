#!/usr/bin/env bash
# The main job end to end on the built-in tiny teacher: build a teacher cache once, inspect and verify
# it, train an LRC student from the cache (the teacher's forward never runs again), evaluate it against
# the teacher on held-out text, export it. Safe to rerun: a complete cache is reused, training resumes.
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
lrc-train train --config train/tiny_cpu.yaml --cache "$out/cache" --out "$out/train"
lrc-train eval --student "$out/train/student" --cache "$out/cache"
echo "done: cache in $out/cache, student in $out/train/student, metrics in $out/train/metrics.jsonl"
