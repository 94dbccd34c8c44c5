#!/usr/bin/env bash
# Behaviour fingerprint of the tiny runs: the offline run (zarr, topk + residual, PCA start), a second
# offline recipe (random init, hidden logits, webdataset, grad_accum 2), the online run and a tiny sweep.
# Run before and after a change that must not change the math, then diff the loss lines:
#   bash benchmarks/refactor_check.sh runs/check-before; bash benchmarks/refactor_check.sh runs/check-after
#   diff <(cat runs/check-before/losses.txt) <(cat runs/check-after/losses.txt)
set -euo pipefail
out=${1:?usage: refactor_check.sh OUT_DIR}
py=${PYTHON:-.venv/bin/python}
mkdir -p "$out"
export LRC_LOG_LEVEL=WARNING
$py -m lrc_offline.cli.cache build --config cache_jobs/tiny_cpu.yaml --out "$out/cache" --no-progress
$py -m lrc_offline.cli.cache build --config cache_jobs/tiny_cpu.yaml --out "$out/cache-hidden" --no-progress \
    format=webdataset logit_mode=hidden max_sequences=48
$py -m lrc_offline.cli.train train --config train/tiny_cpu.yaml --cache "$out/cache" --out "$out/offline" \
    --no-progress train.steps=30 > /dev/null
$py -m lrc_offline.cli.train train --config train/tiny_cpu.yaml --cache "$out/cache-hidden" --out "$out/offline-hidden" \
    --no-progress train.steps=20 train.grad_accum=2 student.init=random train.checkpoint_every=10 > /dev/null
$py -m lrc_offline.cli.train online --config train/tiny_cpu_online.yaml --out "$out/online" --no-progress \
    train.steps=30 > /dev/null
$py -m lrc_offline.cli.train sweep --config train/tiny_cpu.yaml --cache "$out/cache" --out "$out/sweep" \
    --hidden-sizes 16,24 --no-progress train.steps=10 > /dev/null
# every metrics line without the wall-clock fields
$py - "$out" <<'PY' > "$out/losses.txt"
import json, sys, pathlib
root = pathlib.Path(sys.argv[1])
for path in sorted(root.rglob("metrics.jsonl")):
    for line in path.read_text().splitlines():
        record = {k: v for k, v in json.loads(line).items() if k not in ("tokens_per_s", "time")}
        print(path.relative_to(root), json.dumps(record, sort_keys=True))
PY
wc -l "$out/losses.txt"
