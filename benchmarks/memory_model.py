"""Memory per GPU at paper scale (docs/scaling.md's table), and the measurement that checks the model.

The model is `lrc_offline.training.plan` (`lrc-train plan`); this script evaluates it for the production
configs (train/*.yaml at the teachers' geometries, written here since their weights are not on this
machine) at micro-batches of 8 and 1, and measures what a real run holds on a CPU (`measure`).

    python benchmarks/memory_model.py                 # the docs/scaling.md table
    python benchmarks/memory_model.py --json out.json
    python benchmarks/memory_model.py --measure --teacher tiny-random:llama --cache DIR --out DIR [k=v ...]

`measure` runs `lrc-train train`'s own code (`train_from_cache`) for three steps and measures step 1 (Adam
states exist, gradients do not): the bytes of the tensors the run keeps between steps (teacher, student,
optimizer state; each storage once, FSDP2's local shards) plus the highest rise of allocated bytes during
it (the profiler's allocation events); step 2's FLOPs under FlopCounterMode. Under torchrun every rank writes its
own `measured-<rank>.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from lrc_offline.config import TrainJobConfig, load_config
from lrc_offline.training.plan import MODES, Geometry, format_plan, plan

ROOT = Path(__file__).resolve().parents[1]

RUNS = [  # the teacher geometry of each production config (config.json of the Hub checkpoint)
    (Geometry("Llama-3.2-3B", 3072, 28, 24, 8, 128, 8192, 128256, True), "train/llama32_3b_to_1536.yaml"),
    (Geometry("Qwen2.5-7B", 3584, 28, 28, 4, 128, 18944, 152064, False), "train/qwen25_7b_to_2048.yaml"),
    (Geometry("Llama-3.1-70B", 8192, 80, 64, 8, 128, 28672, 128256, False), "train/llama31_70b_to_4096.yaml"),
]
SEQ_LEN, NUM_GPUS, MICRO_BATCHES = 2048, 8, (8, 1)
COLUMNS = ("teacher_weights", "trainable_states", "generated_weights", "activations", "logits", "total")


def doc_rows(num_gpus: int = NUM_GPUS) -> list[dict]:
    """docs/scaling.md's rows: every production config at micro-batches of 8 and 1, every mode."""
    rows = []
    for geo, config in RUNS:
        for batch in MICRO_BATCHES:
            cfg = load_config(TrainJobConfig, ROOT / config, [f"train.batch_size={batch}"])
            for row in plan(cfg, geo, SEQ_LEN, num_gpus):
                rows.append({"teacher": geo.name, "d_S": cfg.student.hidden_size, **row})
    return rows


def markdown(rows: list[dict]) -> str:
    """The rows as docs/scaling.md's table."""
    lines = ["| teacher -> d_S | micro-batch | mode | teacher | trainable | generated W^S | activations | logits | "
             "total GiB | host GiB | TFLOP/step |", "|---" * 11 + "|"]  # fmt: skip
    for row in rows:
        mode = ("FSDP2" if row["parallelism"] == "fsdp2" else "DDP") + f"/{row['num_gpus']}"
        mode += "+ckpt" if row["activation_checkpointing"] else ""
        gib = row["gpu_gib"]
        lines.append(f"| {row['teacher']} -> {row['d_S']} | {row['micro_batch']} x {row['seq_len']} | {mode} | "
                     + " | ".join(f"{gib[k]:.1f}" for k in COLUMNS)
                     + f" | {row['host_gib']['total']:.1f} | {row['flops_per_step'] / 1e12:,.0f} |")  # fmt: skip
    return "\n".join(lines)


# ---- measured on a CPU ----------------------------------------------------------------------------


def resident_bytes(run) -> int:
    """Bytes of the tensors a run keeps between steps: the teacher's, the student's (a sharded one's
    local shards) and the optimizer's state, each storage once. The reader's prefetched shards are left
    out, as the model leaves them out."""
    from torch.distributed.tensor import DTensor

    tensors = [*run.teacher_model.parameters(), *run.teacher_model.buffers(), *run.student.parameters(),
               *run.student.buffers()]  # fmt: skip
    tensors += [t for state in run.optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
    storages = {}
    for tensor in tensors:
        tensor = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return sum(storages.values())


def peak_rise(fn) -> int:
    """The highest rise of allocated (CPU) bytes over their level at the start while `fn()` runs."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def measure(cache: str, out: str, teacher: str, overrides: list[str]) -> dict:
    """Step 1's peak bytes (live at its start + its highest rise) and step 2's FLOPs of a real run."""
    from torch.utils.flop_counter import FlopCounterMode

    from lrc_offline.training import loop
    from lrc_offline.training.trainer import train_from_cache

    cfg = load_config(TrainJobConfig, None, ["train.steps=3", "train.device=cpu", "train.eval_every=0",
                                             "train.checkpoint_every=0", *overrides])  # fmt: skip
    result: dict = {}
    step = loop.step

    def measured(run, index):
        if index == 1:
            result["resident"] = resident_bytes(run)
            outputs = []
            result["peak_rise"] = peak_rise(lambda: outputs.append(step(run, index)))
            return outputs[0]
        if index == 2:
            with FlopCounterMode(display=False) as counter:
                outputs = step(run, index)
            result["flops"] = counter.get_total_flops()
            result["flops_by_op"] = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
            return outputs
        return step(run, index)

    loop.step = measured  # train() looks the step up in its module each time
    try:
        train_from_cache(cfg, cache, out, progress=False, teacher=teacher)
    finally:
        loop.step = step
    result["peak"] = result["resident"] + result["peak_rise"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the table here")
    parser.add_argument("--measure", action="store_true", help="measure a real run on the CPU instead")
    parser.add_argument("--teacher", help="--measure: the cache's teacher")
    parser.add_argument("--cache", help="--measure: a cache built by lrc-cache build")
    parser.add_argument("--out", help="--measure: run directory; measured-<rank>.json is written there")
    parser.add_argument("overrides", nargs="*", help="--measure: dotted config overrides")
    args = parser.parse_args()
    if args.measure:
        import os

        result = measure(args.cache, args.out, args.teacher, args.overrides)
        (Path(args.out) / f"measured-{os.environ.get('RANK', '0')}.json").write_text(json.dumps(result))
        return
    rows = doc_rows()
    for geo, _ in RUNS:
        first = [r for r in rows if r["teacher"] == geo.name][: len(MODES)]
        print(format_plan(first, geo, first[0]["d_S"]))
    print(markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
