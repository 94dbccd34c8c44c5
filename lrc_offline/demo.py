"""The main job end to end, in one process: cache -> train from the cache -> export -> evaluate -> sample.

    python -m lrc_offline.cli.demo --out runs/demo                   # SmolLM2-135M on wiki-en (default)
    python -m lrc_offline.cli.demo --out runs/tiny --preset tiny     # the tiny random teacher, seconds

Safe to rerun: a complete cache is reused (only missing shards are built) and training resumes from
its latest checkpoint. Writes `summary.json` and `loss_curve.png` into the output folder.

Training evaluates on the cache's held-out split alone (CE, KL and top-1 agreement from the stored teacher
signal; no corpus, no teacher forward). The final side-by-side runs the teacher's forward on the same
held-out sequences, read from the cache, for the teacher's own perplexity: an evaluation after training,
outside stage 2.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

from .cache import inspect_cache, read_manifest, verify_cache
from .cache.plan import plan_cache
from .capture.build import build_cache
from .config import CacheConfig, TrainJobConfig, load_config, to_dict
from .evaluation import compare_models, format_table
from .teacher.load import load_teacher
from .training.heldout import CacheHeldout
from .training.metrics import read_metrics
from .training.plots import plot_curves
from .training.trainer import train_from_cache

__all__ = ["PRESETS", "run_demo"]

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {
    "smollm2": (ROOT / "cache_jobs" / "smollm2_demo.yaml", ROOT / "train" / "smollm2_demo.yaml"),
    "tiny": (ROOT / "cache_jobs" / "tiny_cpu.yaml", ROOT / "train" / "tiny_cpu.yaml"),
}
PROMPT = "The history of the Roman Empire"


def _generate(student_dir: Path, tokenizer, device, max_new_tokens: int = 40) -> str:
    """A greedy continuation of PROMPT by the exported student, loaded with plain `transformers`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32, use_safetensors=True)
    model = model.to(device).eval()
    ids = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids = torch.tensor([ids + tokenizer(PROMPT, add_special_tokens=False).input_ids], device=device)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, repetition_penalty=1.3,
                             pad_token_id=tokenizer.eos_token_id)  # fmt: skip
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def run_demo(out: Path, cache_cfg: CacheConfig, train_cfg: TrainJobConfig, progress: bool = True) -> dict:
    """Every stage of the job; returns (and writes) the summary."""
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    timings = {}

    print(f"[1/5] loading teacher {cache_cfg.teacher}", flush=True)
    teacher = load_teacher(cache_cfg.teacher, dtype=cache_cfg.run.compute_dtype, device=cache_cfg.run.device)
    device = next(teacher.model.parameters()).device

    print(f"[2/5] building the teacher cache in {out / 'cache'} (complete shards are reused)", flush=True)
    t0 = time.perf_counter()
    report = build_cache(cache_cfg, out / "cache", progress=progress, teacher=teacher)
    timings["cache_build_s"] = time.perf_counter() - t0
    assert verify_cache(out / "cache").ok, "the cache failed verification"

    print(f"[3/5] training a d_S={train_cfg.student.hidden_size} student from the cache", flush=True)
    t0 = time.perf_counter()
    summary = train_from_cache(train_cfg, out / "cache", out / "train", resume="auto", progress=progress,
                               teacher=teacher)  # fmt: skip
    timings["train_s"] = time.perf_counter() - t0
    records = read_metrics(out / "train" / "metrics.jsonl")
    plot_curves({"LRC from cache": records}, out / "loss_curve.png", key="loss",
                title=f"{cache_cfg.teacher} -> d_S {train_cfg.student.hidden_size}: training loss and held-out CE")  # fmt: skip

    print("[4/5] evaluating the exported student against the teacher on held-out text", flush=True)
    from transformers import AutoModelForCausalLM

    # the sequences training evaluated on, from the cache's held-out split; the teacher runs on them here
    held = CacheHeldout(out / "cache", train_cfg.train.eval_sequences)
    heldout = torch.cat([batch.input_ids for batch in held.batches(0, held.num_sequences, 64)])

    student_dir = out / "train" / "student"
    exported = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32, use_safetensors=True)
    exported = exported.to(device).eval()
    metrics = compare_models(lambda x: exported(input_ids=x).logits, lambda x: teacher.model(input_ids=x).logits,
                             heldout, train_cfg.train.batch_size, device)  # fmt: skip
    print(format_table(metrics), flush=True)

    print("[5/5] sampling from the exported student (plain transformers)", flush=True)
    sample = _generate(student_dir, teacher.tokenizer, device)
    print(f"  {PROMPT}{sample}", flush=True)

    result = _summary(out, cache_cfg.resolved(), load_config(TrainJobConfig, out / "train" / "config.json"), report,
                      summary, records, metrics, sample)  # fmt: skip
    result["train"]["heldout_from_cache"] = summary.get("student_heldout")
    result["timings_s"] = timings | {"total": time.perf_counter() - start}
    (out / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _bf16_reference(out: Path) -> dict:
    """Bytes per token the same cache would store with bfloat16 activations at every layer (the defaults
    before the compact codec), from `lrc-cache plan`'s size model, and what that model says of the cache
    as built (to read beside its measured bytes)."""
    manifest = read_manifest(out / "cache")
    tokens = manifest.num_sequences * manifest.config.seq_len
    bf16 = dataclasses.replace(manifest.config, act_dtype="bfloat16", act_layer_fraction=1.0)
    return {"bytes_per_token": plan_cache(bf16, manifest.geometry, tokens).bytes_per_token,
            "planned_bytes_per_token_as_built": plan_cache(manifest.config, manifest.geometry, tokens).bytes_per_token,
            "basis": "lrc-cache plan (compression ratios measured on SmolLM2-135M)"}  # fmt: skip


def _summary(out: Path, cache_cfg: CacheConfig, ran: TrainJobConfig, report, summary: dict, records: list[dict],
             metrics: dict, sample: str) -> dict:  # fmt: skip
    """The demo's summary.json (`cache_cfg`, `ran`: the cache and training configs with their auto choices
    made)."""
    info = inspect_cache(out / "cache")
    timed = [r["tokens_per_s"] for r in records if r["step"] > summary["start_step"]]
    return {
        "teacher": cache_cfg.teacher,
        "student_hidden_size": ran.student.hidden_size,
        "student_init": ran.student.init,
        "student_head": ran.student.head,
        "heldout": metrics,
        "student_heldout_ppl": metrics["student_ppl"],
        "teacher_heldout_ppl": metrics["teacher_ppl"],
        "cache": {"path": str(out / "cache"), "bytes": info["stored_bytes"], "tokens": info["tokens"],
                  "bytes_per_token": info["bytes_per_token"],
                  "fields_bytes_per_token": {k: v["bytes_per_token"] for k, v in info["fields"].items()},
                  "bf16_every_layer": _bf16_reference(out),
                  "built_shards_this_run": len(report.built), "reused_shards": len(report.skipped)},
        "train": {"steps": ran.train.steps, "tokens": records[-1]["tokens"],
                  "tokens_per_s": sum(timed) / len(timed) if timed else None,
                  "final_loss": records[-1]["loss"], "resumed_from_step": summary["start_step"]},
        "sample": {"prompt": PROMPT, "continuation": sample},
        "export": str(out / "train" / "student"),
        "loss_curve": str(out / "loss_curve.png"),
        "config": {"cache": to_dict(cache_cfg), "train": to_dict(ran)},
    }  # fmt: skip
