"""A tied head with the PCA start (lm_head^S = E^S) against the untied PCA head and the random start.

Part 1, no training: held-out CE, full-vocabulary KL(teacher || student) and top-1 agreement of each
start, before and after the head-scale fit (`student.pca_calibrate_sequences`), with the parameter
counts (trainable, and of the exported checkpoint). The tied head is measured twice: as the library
folds it (rotated basis, fitted final norm: `student.init.tied_head_rotation`) and as it was folded
before (basis U, final norm the diagonal of U^T diag(g_final) U).
Part 2 (--steps > 0): training from the same cache, tied vs untied PCA start, quality.py's p-warm60
recipe (lr 1e-4, warmup 60, batch 8 x 64, alpha 1, 16 clone positions), the cache's held-out split
evaluated every --eval-every steps.
Part 3: the parameters the untied head adds on paper-size geometries (no weights needed).

    OMP_NUM_THREADS=1 python benchmarks/tied_head.py --out benchmarks/results/tied_head --steps 60

Results go to stdout and OUT/tied_head.json as they come.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from lrc_offline.cache import CacheReader
from lrc_offline.capture.build import build_cache
from lrc_offline.config import CacheConfig, StudentConfig, TrainJobConfig, apply_overrides
from lrc_offline.evaluation import heldout_sequences
from lrc_offline.student.export import student_state_dict
from lrc_offline.student.init import init_pca, pca_basis
from lrc_offline.student.lrc import READ_TERMS, WRITE_TERMS, LRCStudent
from lrc_offline.teacher.load import load_teacher
from lrc_offline.training.heldout import heldout_metrics
from lrc_offline.training.metrics import read_metrics
from lrc_offline.training.pca import cache_head_scale_batches, cache_second_moment, fit_head_scale
from lrc_offline.training.trainer import train_from_cache

# name: (hidden, layers, heads, kv_heads, head_dim, ffn, vocab, student hidden) as in benchmarks/storage.py
GEOMETRIES = {
    "SmolLM2-135M -> 288": (576, 30, 9, 3, 64, 1536, 49152, 288),
    "Llama-3.2-3B -> 1536": (3072, 28, 24, 8, 128, 8192, 128256, 1536),
    "Qwen2.5-3B -> 1200": (2048, 36, 16, 2, 128, 11008, 151936, 1200),
}


def geometry_counts(dims) -> dict:
    """Parameters of the exported student (tied; the untied head adds vocab x d_S) and of the LRC student's
    trainable state (projections and norms; the untied head adds P_lm, d_T x d_S)."""
    d_t, layers, heads, kv, head_dim, ffn, vocab, d_s = dims
    per_layer = d_s * (heads + 2 * kv) * head_dim + heads * head_dim * d_s + 3 * ffn * d_s + 2 * d_s
    exported = layers * per_layer + vocab * d_s + d_s  # q/k/v biases (Qwen2) left out: < 0.01%
    trainable = layers * (7 * d_t * d_s + 2 * d_s) + d_t * d_s + d_s
    return {"exported_tied": exported, "exported_untied": exported + vocab * d_s,
            "untied_extra": vocab * d_s, "untied_extra_fraction": vocab * d_s / exported,
            "trainable_tied": trainable, "trainable_untied": trainable + d_t * d_s}  # fmt: skip


@torch.no_grad()
def per_channel_fold(student: LRCStudent, basis_DS: torch.Tensor) -> None:
    """The tied PCA fold without the rotation (the library's before this benchmark): basis U unrotated,
    final norm sqrt(d_T/d_S) diag(U^T diag(g_final) U)."""
    init_pca(student, basis_DS)
    u, g = basis_DS.float(), student.teacher_final_norm.float()
    for layer, frozen in zip(student.layers, student.teacher_layers):
        for m in READ_TERMS:
            layer.proj[m].copy_((frozen.input_norm if m in ("q", "k", "v") else frozen.post_norm)[:, None] * u)
        for m in WRITE_TERMS:
            layer.proj[m].copy_(u)
    student.proj_embed.copy_(u)
    student.final_norm.copy_(math.sqrt(student.d_teacher / student.d_student) * (u.square() * g[:, None]).sum(0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--corpus", default="wiki-en")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--cache-sequences", type=int, default=256)
    parser.add_argument("--heldout-docs", type=int, default=200)
    parser.add_argument("--heldout-sequences", type=int, default=32)
    parser.add_argument("--size", type=int, default=288)
    parser.add_argument("--calibrate-sequences", type=int, default=32)
    parser.add_argument("--steps", type=int, default=0, help="training steps per start (0: step 0 only)")
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--cache", default=None, help="cache to use or build (default OUT/cache)")
    parser.add_argument("--out", default="benchmarks/results/tied_head")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"setup": vars(args), "step0": {}, "curves": {}, "geometry": {}}

    def save() -> None:
        (out / "tied_head.json").write_text(json.dumps(results, indent=2) + "\n")

    for name, dims in GEOMETRIES.items():
        results["geometry"][name] = geometry_counts(dims)
        c = results["geometry"][name]
        print(f"{name}: exported {c['exported_tied'] / 1e6:.1f}M tied, {c['exported_untied'] / 1e6:.1f}M untied "
              f"(+{c['untied_extra'] / 1e6:.1f}M, +{100 * c['untied_extra_fraction']:.0f}%)", flush=True)  # fmt: skip

    teacher = load_teacher(args.teacher)
    cache = Path(args.cache) if args.cache else out / "cache"
    # Every layer at 16 positions in bf16, written out so the protocol does not move with the defaults.
    build_cache(CacheConfig(teacher=args.teacher, corpus=args.corpus, heldout_docs=args.heldout_docs,
                            heldout_sequences=args.heldout_sequences, seq_len=args.seq_len,
                            max_sequences=args.cache_sequences, sequences_per_shard=64, logprob_dtype="float16",
                            act_dtype="bfloat16", act_positions=16, act_layer_fraction=1.0),
                cache, teacher=teacher, progress=False)  # fmt: skip
    ids = heldout_sequences(args.corpus, "text", args.heldout_docs, teacher.tokenizer, args.seq_len,
                            args.heldout_sequences)  # fmt: skip
    moment = cache_second_moment(cache)
    basis = pca_basis(moment, args.size)
    job = TrainJobConfig(student=StudentConfig(hidden_size=args.size))  # the objective the head scale fits
    batches = cache_head_scale_batches(CacheReader(cache), args.calibrate_sequences, 8, "cpu")

    def teacher_logits(x):
        return teacher.model(input_ids=x).logits

    def evaluate(student) -> dict:
        with torch.no_grad():
            m = heldout_metrics(lambda x: student(x).logits_BTV, ids, teacher_fn=teacher_logits)
        return {k: m[k] for k in ("ce", "kl", "top1_agreement", "teacher_ce")}

    # ---- part 1: step 0 ------------------------------------------------------------------------------
    starts = {"random (paper)": ("random", False), "pca, untied head": ("pca", True),
              "pca, tied head (rotated basis, fitted final norm)": ("pca", False),
              "pca, tied head (per-channel fold, before)": ("per-channel", False)}  # fmt: skip
    for name, (init, untied) in starts.items():
        start = time.perf_counter()
        student = LRCStudent(teacher.model, args.size, untie_head=untied)
        if init == "pca":
            init_pca(student, basis)
        elif init == "per-channel":
            per_channel_fold(student, basis)
        row = {"folded": evaluate(student)}
        if init != "random":
            row["head_scale"] = fit_head_scale(student, batches, job)["head_scale"]
            row["fitted"] = evaluate(student)
        row["trainable_parameters"] = sum(p.numel() for p in student.parameters())
        row["exported_parameters"] = sum(t.numel() for t in student_state_dict(student).values())
        row["seconds"] = time.perf_counter() - start
        results["step0"][name] = row
        best = row.get("fitted", row["folded"])
        print(f"{name}: held-out CE {best['ce']:.3f}, KL {best['kl']:.3f}, top-1 {best['top1_agreement']:.3f}"
              + (f" (c {row['head_scale']:.3f}; folded CE {row['folded']['ce']:.3f}, KL {row['folded']['kl']:.3f})"
                 if "fitted" in row else "")
              + f"; exported {row['exported_parameters'] / 1e6:.2f}M, trainable {row['trainable_parameters'] / 1e6:.2f}M",
              flush=True)  # fmt: skip
        save()

    # ---- part 2: training, tied vs untied PCA start ----------------------------------------------------
    if args.steps <= 0:
        return
    base = apply_overrides(TrainJobConfig(teacher=args.teacher), [
        f"student.hidden_size={args.size}", "student.init=pca", "optim.lr=0.0001", "optim.warmup_steps=60",
        "train.batch_size=8", f"train.steps={args.steps}", "train.log_every=5", f"train.eval_every={args.eval_every}",
        f"train.eval_sequences={args.heldout_sequences}", "train.clone_positions=16", "loss.alpha=1.0",
        f"student.pca_calibrate_sequences={args.calibrate_sequences}"])  # fmt: skip
    for head in ("untied", "tied"):
        run = out / "runs" / head
        start = time.perf_counter()
        train_from_cache(apply_overrides(base, [f"student.head={head}"]), cache, run, resume="auto", teacher=teacher,
                         progress=False)  # fmt: skip
        records = [r for r in read_metrics(run / "metrics.jsonl") if "heldout_ce" in r]
        results["curves"][head] = {
            "heldout": [{k: r.get(k) for k in ("step", "heldout_ce", "heldout_kl", "heldout_top1")} for r in records],
            "seconds": time.perf_counter() - start,
        }
        print(f"{head}: " + ", ".join(f"step {r['step']} CE {r['heldout_ce']:.3f} KL {r.get('heldout_kl', math.nan):.3f}"
                                      for r in records), flush=True)  # fmt: skip
        save()


if __name__ == "__main__":
    main()
