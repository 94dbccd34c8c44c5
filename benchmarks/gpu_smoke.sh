#!/usr/bin/env bash
# The chain on one CUDA GPU, in bf16, with the SmolLM2-135M teacher: the GPU test tier, a cache build
# (hf backend) against a plain teacher forward, training from the cache (DDP with one process), and the
# step speed side by side. Sized for ~10 minutes on one H100/H200-class GPU; writes everything under
# OUT (default benchmarks/results/gpu_smoke) and a summary to OUT/summary.txt.
#
#     ./setup.sh && bash benchmarks/gpu_smoke.sh [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-benchmarks/results/gpu_smoke}}
mkdir -p "$out"
py=${PYTHON:-.venv/bin/python}
log() { echo "== $*" | tee -a "$out/summary.txt"; }

$py -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0), torch.__version__)" \
    | tee "$out/device.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$out/device.txt" 2>/dev/null || true

log "GPU test tier (pytest -m gpu)"
$py -m pytest -m gpu -q -p no:cacheprovider 2>&1 | tail -5 | tee -a "$out/summary.txt"

log "cache build vs plain forward (SmolLM2-135M, 256 x 256 tokens, bf16)"
$py benchmarks/corpus_scale.py speed --out "$out/corpus_scale" --sequences 256 --batch-size 32 --rounds 2 \
    2>&1 | tail -3 | tee -a "$out/summary.txt"

log "cache build (lrc-cache build, bf16 on cuda) and verify"
rm -rf "$out/cache"
.venv/bin/lrc-cache build --out "$out/cache" --no-progress teacher=smollm2-135m corpus=wiki-en seq_len=256 \
    max_sequences=512 sequences_per_shard=128 heldout_docs=200 run.device=cuda run.compute_dtype=bfloat16 \
    run.batch_size=32 2>&1 | tail -2 | tee -a "$out/summary.txt"
.venv/bin/lrc-cache verify "$out/cache" | tail -1 | tee -a "$out/summary.txt"

log "training from the cache (d_S 288, bf16 autocast, 100 steps of 8 x 256)"
rm -rf "$out/run"
.venv/bin/lrc-train train --cache "$out/cache" --out "$out/run" --no-progress student.hidden_size=288 \
    train.steps=100 train.batch_size=8 train.eval_every=50 train.device=cuda train.mixed_precision=bf16 \
    > "$out/train_summary.json"
$py - "$out" <<'EOF' | tee -a "$out/summary.txt"
import json, sys
out = sys.argv[1]
lines = [json.loads(l) for l in open(f"{out}/run/metrics.jsonl")]
last = lines[-1]
print(f"steps {last['step']}, loss {last['loss']:.3f}, tokens/s {last.get('tokens_per_s', 0):.0f}, "
      f"held-out CE {[round(l['heldout_ce'], 3) for l in lines if 'heldout_ce' in l]}")
EOF

log "the same training sharded (train.parallelism=fsdp2, one process), 20 steps"
rm -rf "$out/run_fsdp2"
.venv/bin/lrc-train train --cache "$out/cache" --out "$out/run_fsdp2" --no-progress student.hidden_size=288 \
    train.steps=20 train.batch_size=8 train.device=cuda train.mixed_precision=bf16 train.parallelism=fsdp2 \
    > "$out/train_fsdp2_summary.json"
$py - "$out" <<'EOF' | tee -a "$out/summary.txt"
import json, sys
out = sys.argv[1]
sharded = [json.loads(l) for l in open(f"{out}/run_fsdp2/metrics.jsonl")]
whole = {r["step"]: r for r in map(json.loads, open(f"{out}/run/metrics.jsonl"))}
print("step, loss fsdp2, loss ddp (100-step schedule):", [(r["step"], round(r["loss"], 4), round(whole[r["step"]]["loss"], 4))
                                                         for r in sharded if r["step"] in whole and "loss" in r])
EOF

log "FSDP2 teacher loading: per-rank reads of the safetensors (default) vs the whole teacher per process, 20 steps"
rm -rf "$out/run_fsdp2_whole"
LRC_FSDP2_WHOLE_TEACHER=1 .venv/bin/lrc-train train --cache "$out/cache" --out "$out/run_fsdp2_whole" --no-progress \
    student.hidden_size=288 train.steps=20 train.batch_size=8 train.device=cuda train.mixed_precision=bf16 \
    train.parallelism=fsdp2 > "$out/train_fsdp2_whole_summary.json"
rm -rf "$out/run_fsdp2_torchrun"
$py -m torch.distributed.run --nproc_per_node 1 -m lrc_offline.cli.train train --cache "$out/cache" \
    --out "$out/run_fsdp2_torchrun" --no-progress student.hidden_size=288 train.steps=20 train.batch_size=8 \
    train.device=cuda train.mixed_precision=bf16 train.parallelism=fsdp2 > "$out/train_fsdp2_torchrun_summary.json"
$py - "$out" <<'EOF' | tee -a "$out/summary.txt"
import json, sys
from safetensors.torch import load_file
out = sys.argv[1]
losses = {name: [json.loads(l).get("loss") for l in open(f"{out}/{name}/metrics.jsonl")]
          for name in ("run_fsdp2", "run_fsdp2_whole", "run_fsdp2_torchrun")}
ref = [x for x in losses["run_fsdp2_whole"] if x is not None]
whole = load_file(f"{out}/run_fsdp2_whole/student/model.safetensors")
for name in ("run_fsdp2", "run_fsdp2_torchrun"):
    rel = max(abs(a - b) / abs(b) for a, b in zip([x for x in losses[name] if x is not None], ref))
    mine = load_file(f"{out}/{name}/student/model.safetensors")
    diff = max((mine[k].float() - whole[k].float()).abs().max().item() for k in whole)
    print(f"{name} (per-rank teacher reads) vs whole teacher: max loss rel diff {rel:.2e}, export max abs diff {diff:.2e}")
EOF

ngpu=$($py -c "import torch; print(torch.cuda.device_count())")
if [ "$ngpu" -ge 2 ]; then
    log "tensor-parallel cache build (run.tensor_parallel_size=$ngpu under torchrun) vs one process, bf16"
    rm -rf "$out/cache_tp1" "$out/cache_tp"
    common=(teacher=smollm2-135m corpus=wiki-en seq_len=256 max_sequences=64 sequences_per_shard=32 heldout_docs=50
            run.compute_dtype=bfloat16 run.batch_size=16)
    .venv/bin/lrc-cache build --out "$out/cache_tp1" --no-progress "${common[@]}" run.device=cuda 2>&1 | tail -1
    # SmolLM2 has 9 heads and 3 KV heads: the largest size dividing both that fits the GPUs here
    tp=$( [ "$ngpu" -ge 3 ] && echo 3 || echo 1 )
    if [ "$tp" -gt 1 ]; then
        $py -m torch.distributed.run --nproc_per_node "$tp" -m lrc_offline.cli.cache build --out "$out/cache_tp" \
            --no-progress "${common[@]}" run.tensor_parallel_size=$tp 2>&1 | tail -1
        $py - "$out" <<'EOF2' | tee -a "$out/summary.txt"
import sys
import torch
from lrc_offline.cache import CacheReader, read_manifest
out = sys.argv[1]
a, b = read_manifest(f"{out}/cache_tp"), read_manifest(f"{out}/cache_tp1")
print("manifest digests equal:", a.digest() == b.digest())
worst = {}
for i in range(CacheReader(f"{out}/cache_tp1").num_shards):
    got, want = CacheReader(f"{out}/cache_tp").read_shard(i), CacheReader(f"{out}/cache_tp1").read_shard(i)
    for name, value in want.items():
        if value.is_floating_point():
            diff = ((got[name].float() - value.float()).abs() / value.float().abs().clamp_min(1)).max().item()
            worst[name] = max(worst.get(name, 0.0), diff)
        else:
            worst[name] = max(worst.get(name, 0.0), float((got[name] != value).float().mean()))
print("per field, worst relative difference (floats, bf16) or share of differing entries (ints):", worst)
EOF2
    else
        log "  SmolLM2's 9 heads / 3 KV heads need 3 GPUs for a tensor-parallel build; skipped"
    fi
else
    log "tensor-parallel cache build: needs 2+ GPUs, skipped (tests/test_tensor_parallel_build.py runs it on CPU)"
fi

log "step speed side by side (offline, online, plain) at 8x256 and 2x256 x grad_accum 4"
$py benchmarks/speed_train.py --teacher smollm2-135m --hidden-size 288 --configs 8x256x1,2x256x4 --rounds 3 \
    --out "$out/speed_train" 2>&1 | tail -12 | tee -a "$out/summary.txt"

log "done: $out/summary.txt"
