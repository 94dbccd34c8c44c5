"""Training speed side by side, in one process, on the same batches: LRC from the cache, the online
reference (teacher forward in the step), and plain training of the exported student; plus the cache
reader's decode rate and each step kind's peak memory.

Step kinds (all with AdamW, gradient clipping and `set_to_none` zeroing, at the same batch shape):
  offline        `training.loop.step` on cache batches, as `lrc-train train` runs it (weights generated
                 once per optimizer step, fused chunked head + loss)
  offline-ref    the same step with the levers off (weights generated per micro-batch, full logits)
  online         `training.loop.step` on batches whose teacher signal comes from a hooked teacher
                 forward in the step (full teacher logits, the seven targets at the same positions)
  plain          the exported HF student (`AutoModelForCausalLM`), next-token CE through the stock
                 `transformers` loss (`labels=`)
  plain-fused    the same model and batches, CE through `losses.fused_head_loss` from its last hidden state

Each configuration is batch x seq_len x grad_accum; the step kinds are interleaved round by round (so a
machine that slows down mid-run slows all alike) and the first round is warm-up, run under
`torch.utils.flop_counter.FlopCounterMode`: the floating-point operations of each step kind, the speed
ratio the arithmetic alone allows (`flop_ratio_*`: plain's FLOPs over offline's), beside what
`lrc-train plan` counts for the two LRC kinds (`gflop_per_step_planned`, `training.plan.step_flops`; on a
CPU without attention, which FlopCounterMode does not count there). Peak memory: the
process's peak RSS during the step minus its RSS before it (CPU), or `max_memory_allocated` (CUDA).

    python benchmarks/speed_train.py --teacher smollm2-135m --hidden-size 288 --configs 8x256x1,2x256x4 \
        --rounds 3 --out benchmarks/results/speed_train
"""

from __future__ import annotations

import argparse
import contextlib
import json
import threading
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.flop_counter import FlopCounterMode

from lrc_offline import losses
from lrc_offline.batch import Batch
from lrc_offline.cache import CacheReader, verify_cache
from lrc_offline.capture.build import build_cache
from lrc_offline.config import (
    BuildRunConfig,
    CacheConfig,
    LossConfig,
    OptimConfig,
    StudentConfig,
    TrainConfig,
    TrainJobConfig,
)
from lrc_offline.online import teacher_batch
from lrc_offline.student.export import student_config
from lrc_offline.student.lrc import LRCStudent
from lrc_offline.teacher.load import load_teacher
from lrc_offline.training import loop
from lrc_offline.training.optim import build_optimizer
from lrc_offline.training.plan import Geometry, step_flops
from lrc_offline.training.reader import CacheDataset, iter_batches

KINDS = ("offline", "offline-ref", "online", "plain", "plain-fused")


class PeakRSS:
    """Peak resident set size during a `with` block, sampled every 2 ms, minus the RSS at its start."""

    def __init__(self):
        self.peak_increase = 0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    def __enter__(self):
        self._start, self._peak, self._stop = self._rss(), 0, False
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop:
            self._peak = max(self._peak, self._rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop = True
        self._thread.join()
        self.peak_increase = max(self._peak, self._rss()) - self._start


def _memory(device: torch.device):
    if device.type == "cuda":
        class _Cuda:
            def __enter__(self):
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                self._start = torch.cuda.memory_allocated()
                return self

            def __exit__(self, *exc):
                torch.cuda.synchronize()
                self.peak_increase = torch.cuda.max_memory_allocated() - self._start

        return _Cuda()
    return PeakRSS()


class _Batches:
    """A `BatchSource` stand-in feeding `loop.step` the batches this benchmark hands it."""

    name = "speed"
    document_mask = False

    def __init__(self):
        self.pending = []

    def __iter__(self):
        while True:
            yield self.pending.pop(0)


def _lrc_run(teacher, args, accelerator, batch_size: int, grad_accum: int, levers: bool) -> loop.Run:
    cfg = TrainJobConfig(
        student=StudentConfig(hidden_size=args.hidden_size, init="random"),
        loss=LossConfig(),
        optim=OptimConfig(lr=1e-3, warmup_steps=0),
        train=TrainConfig(steps=10_000, batch_size=batch_size, grad_accum=grad_accum, generate_once=levers,
                          loss_chunk_tokens=args.chunk_tokens if levers else 0, compile=args.compile),  # fmt: skip
    )
    student = LRCStudent(teacher.model, args.hidden_size, seed=0).to(accelerator.device)
    optimizer, scheduler = build_optimizer(student, cfg.optim, cfg.train.steps)
    if args.compile:
        student.compile_layers()
    source = _Batches()
    run = loop.Run(cfg, accelerator, source, student, student, optimizer, scheduler, Path(args.out), None, None, None,
                   None, {}, 0, cfg.train.steps, None)  # fmt: skip
    run.batches = iter(source)
    return run


def _online_batch(teacher, cached: Batch) -> Batch:
    """What `online.OnlineSource` yields for these sequences: a hooked teacher forward's full logits and
    the seven targets at the same positions."""
    return teacher_batch(teacher.model, cached.input_ids.long(), cached.clone.positions_BP)


def _plain_step(model, optimizer, micro_batches: list[Batch], fused_chunk: int | None, grad_clip: float) -> None:
    for batch in micro_batches:
        ids = batch.input_ids.long()
        if fused_chunk is None:
            loss = model(input_ids=ids, labels=ids).loss
        else:
            hidden = model.model(input_ids=ids).last_hidden_state
            loss = losses.fused_head_loss(hidden, model.get_output_embeddings().weight, ids,
                                          torch.ones_like(ids, dtype=torch.bool), kd_weight=0.0, beta=1.0,
                                          chunk_tokens=fused_chunk)[0]  # fmt: skip
        (loss / len(micro_batches)).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _bench_config(teacher, args, accelerator, cache_dir: Path, batch_size: int, seq_len: int, grad_accum: int,
                  on_round=None) -> dict:  # fmt: skip
    from transformers import AutoModelForCausalLM

    runs = {"offline": _lrc_run(teacher, args, accelerator, batch_size, grad_accum, levers=True),
            "offline-ref": _lrc_run(teacher, args, accelerator, batch_size, grad_accum, levers=False),
            "online": _lrc_run(teacher, args, accelerator, batch_size, grad_accum, levers=True)}  # fmt: skip
    plains = {}
    for kind in ("plain", "plain-fused"):
        model = AutoModelForCausalLM.from_config(student_config(runs["offline"].student)).to(accelerator.device)
        model.train()
        plains[kind] = (model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    kinds = [k for k in KINDS if k in args.kinds]
    geo = Geometry.from_config(args.teacher, teacher.model.config)
    planned = {kind: step_flops(geo, args.hidden_size, batch_size, seq_len, grad_accum, args.act_positions, fsdp=False,
                                generate_once=kind == "offline", attention=accelerator.device.type == "cuda") / 1e9
               for kind in ("offline", "offline-ref") if kind in kinds}  # fmt: skip
    times = {k: [] for k in kinds}
    memory = {k: 0 for k in kinds}
    flops = {}
    batches = iter_batches(CacheDataset(cache_dir, seed=0, num_epochs=None), batch_size)
    for round_index in range(args.rounds + 1):
        micro = [next(batches) for _ in range(grad_accum)]
        line = []
        for kind in kinds:
            counter = FlopCounterMode(display=False) if round_index == 0 else contextlib.nullcontext()
            with _memory(accelerator.device) as mem, counter:
                start = time.perf_counter()
                if kind in runs:
                    run = runs[kind]
                    # online: the teacher forward is part of the step, as in OnlineSource.batches
                    run.source.pending = [_online_batch(teacher, b) for b in micro] if kind == "online" else list(micro)
                    parts, _, _ = loop.step(run, round_index)
                    parts["loss"].item()  # the step's work is done (CUDA is asynchronous)
                else:
                    model, optimizer = plains[kind]
                    _plain_step(model, optimizer, micro, args.chunk_tokens if kind == "plain-fused" else None, 1.0)
                if accelerator.device.type == "cuda":
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - start
            line.append(f"{kind} {elapsed:.2f}s {mem.peak_increase / 2**20:.0f}MB")
            if round_index > 0:
                times[kind].append(elapsed)
                memory[kind] = max(memory[kind], mem.peak_increase)
            else:
                flops[kind] = counter.get_total_flops()
        print(f"{batch_size}x{seq_len}x{grad_accum} round {round_index}: " + ", ".join(line), flush=True)
        if round_index > 0 and on_round is not None:  # results as they come
            on_round(_summary(times, memory, flops, batch_size, seq_len, grad_accum, planned))
    return _summary(times, memory, flops, batch_size, seq_len, grad_accum, planned)


def _summary(times: dict, memory: dict, flops: dict, batch_size: int, seq_len: int, grad_accum: int,
             planned: dict) -> dict:  # fmt: skip
    tokens = batch_size * seq_len * grad_accum
    tps = {k: tokens * len(v) / sum(v) for k, v in times.items() if v}
    result = {"batch_size": batch_size, "seq_len": seq_len, "grad_accum": grad_accum, "tokens_per_s": tps,
              "peak_memory_mb": {k: v / 2**20 for k, v in memory.items()}, "gflop_per_step": {
                  k: v / 1e9 for k, v in flops.items()}, "gflop_per_step_planned": planned,
              "step_seconds": times}  # fmt: skip
    for a, b in (("offline", "plain"), ("offline", "online"), ("offline", "plain-fused"), ("offline", "offline-ref")):
        if a in tps and b in tps:
            result[f"ratio_{a}_vs_{b}"] = tps[a] / tps[b]
        if flops.get(a) and b in flops:
            result[f"flop_ratio_{a}_vs_{b}"] = flops[b] / flops[a]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--corpus", default="wiki-en")
    parser.add_argument("--hidden-size", type=int, default=288)
    parser.add_argument("--configs", default="8x256x1,2x256x4", help="batch x seq_len x grad_accum, comma-separated")
    parser.add_argument("--act-positions", type=int, default=16)
    parser.add_argument("--chunk-tokens", type=int, default=TrainConfig.loss_chunk_tokens)
    parser.add_argument("--compile", action="store_true", help="train.compile for the LRC step kinds")
    parser.add_argument("--kinds", default=",".join(KINDS), help="step kinds to run, comma-separated")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up round")
    parser.add_argument("--out", default="benchmarks/results/speed_train")
    args = parser.parse_args()
    args.kinds = args.kinds.split(",")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    configs = [tuple(int(x) for x in c.split("x")) for c in args.configs.split(",")]
    seq_lens = {c[1] for c in configs}
    assert len(seq_lens) == 1, "one seq_len per run (one cache)"
    seq_len = seq_lens.pop()
    num_sequences = max(b * a for b, _, a in configs) * (args.rounds + 1)

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    teacher = load_teacher(args.teacher)
    teacher.model.to(accelerator.device)
    cache_cfg = CacheConfig(teacher=args.teacher, corpus=args.corpus, seq_len=seq_len, max_sequences=num_sequences,
                            sequences_per_shard=8, act_positions=args.act_positions,
                            run=BuildRunConfig(batch_size=8))  # fmt: skip
    if not (out / "cache" / "manifest.json").is_file():
        build_cache(cache_cfg, out / "cache", teacher=teacher)
    assert verify_cache(out / "cache").ok

    # reader decode rate: every shard read whole, as the trainer reads them
    reader = CacheReader(out / "cache")
    start = time.perf_counter()
    for index in reader.complete_shards():
        reader.read_shard(index)
    decode_tps = reader.manifest.num_sequences * seq_len / (time.perf_counter() - start)

    setup = vars(args) | {"threads": torch.get_num_threads(), "device": accelerator.device.type,
                          "dtype": "float32" if accelerator.device.type == "cpu" else "bf16 autocast"}  # fmt: skip
    result = {"setup": setup, "reader_decode_tokens_per_s": decode_tps, "configs": []}
    for batch_size, seq, grad_accum in configs:
        done = list(result["configs"])

        def write(row, done=done):
            result["configs"] = done + [row]
            (out / "speed_train.json").write_text(json.dumps(result, indent=2) + "\n")

        row = _bench_config(teacher, args, accelerator, out / "cache", batch_size, seq, grad_accum, on_round=write)
        write(row)
        print(json.dumps({k: v for k, v in row.items() if k != "step_seconds"}, indent=2), flush=True)
    _plot(result, out / "speed_train.png", args)


def _plot(result: dict, path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"online": "tab:red", "offline-ref": "tab:cyan", "offline": "tab:blue", "plain": "tab:gray",
              "plain-fused": "silver"}  # fmt: skip
    rows = result["configs"]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    width = 0.8 / len(colors)
    for i, kind in enumerate(colors):
        values = [row["tokens_per_s"].get(kind, 0.0) for row in rows]
        ax.bar([j + i * width for j in range(len(rows))], values, width, label=kind, color=colors[kind])
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))])
    ax.set_xticklabels([f"batch {r['batch_size']}x{r['seq_len']}, accum {r['grad_accum']}" for r in rows])
    ax.set_ylabel("training tokens/s")
    ax.set_title(f"{args.teacher}, d_S={args.hidden_size}, {result['setup']['device']} {result['setup']['dtype']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
