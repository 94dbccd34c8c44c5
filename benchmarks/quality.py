"""Quality at equal steps on a real teacher: LRC online vs LRC from the cache (every logit mode, several
activation sampling rates), KD only and CE only. Same student size, token budget, seed and held-out text.

Each variant is resumable and its held-out curve is written to `quality.json` as soon as it ends;
`quality.png` plots them all.

    python benchmarks/quality.py --out benchmarks/results/quality
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from lrc_offline.capture.build import build_cache
from lrc_offline.config import CacheConfig, TrainJobConfig, apply_overrides
from lrc_offline.evaluation import heldout_sequences
from lrc_offline.online import train_online
from lrc_offline.teacher.load import load_teacher
from lrc_offline.training.metrics import read_metrics
from lrc_offline.training.plots import plot_curves
from lrc_offline.training.trainer import train_from_cache

# key: (label, cache overrides or None for online, training overrides)
VARIANTS = {
    "a": ("(a) LRC online", None, []),
    "b": ("(b) LRC cache topk+residual P=16", [], []),
    "c-sampled": ("(c) LRC cache sampled+residual P=16", ["logit_mode=sampled"], []),
    "c-hidden": ("(c) LRC cache hidden+residual P=16", ["logit_mode=hidden"], []),
    "d-p4": ("(d) LRC cache topk+residual P=4", ["act_positions=4"], []),
    "d-all": ("(d) LRC cache topk+residual all positions", ["act_positions=100000"], []),
    "e": ("(e) KD only (cache topk)", [], ["loss.alpha=0"]),
    "f": ("(f) CE only", [], ["loss.alpha=0", "loss.kd_weight=0"]),
    # Clone-loss formulations (issue 7).
    "g-raw": ("(g) paper's raw clone loss (sum of MSEs, alpha 0.5)", [],
              ["loss.alpha=0.5", "loss.clone_normalize=false", "loss.clone_reduce=sum"]),
    "g-raw-all": ("(g) paper's raw clone loss, all positions", ["act_positions=100000"],
                  ["loss.alpha=0.5", "loss.clone_normalize=false", "loss.clone_reduce=sum"]),
    "h-huber": ("(h) huber clone loss (delta 1 target RMS)", [], ["loss.clone_fn=huber"]),
    "h-nosink": ("(h) clone loss without the sink positions", [], ["loss.sink_weight=0"]),
    "i-budget25": ("(i) activation budget: 25% of the sequences", ["act_fraction=0.25"], []),
    # PCA initialisation (issue 8): a gentler learning rate keeps the PCA start.
    "p": ("(p) PCA init (untied), LRC cache P=16, lr 1e-4", [],
          ["student.init=pca", "student.head=untied", "optim.lr=0.0001"]),
    "p-warm60": ("(p) PCA init (untied), LRC cache P=16, lr 1e-4, warmup 60", [],
                 ["student.init=pca", "student.head=untied", "optim.lr=0.0001", "optim.warmup_steps=60"]),
    # Storage levers (issue 16): the same run from a cache with 4-bit activations and 8-bit log-probs.
    "p16-int4-log8": ("(p) PCA init, warmup 60, cache int4 activations + log8 log-probs",
                      ["act_dtype=int4", "logprob_dtype=log8"],
                      ["student.init=pca", "student.head=untied", "optim.lr=0.0001", "optim.warmup_steps=60"]),
    "p16-log8": ("(p) PCA init, warmup 60, cache log8 log-probs", ["logprob_dtype=log8"],
                 ["student.init=pca", "student.head=untied", "optim.lr=0.0001", "optim.warmup_steps=60"]),
    # Activations on a quarter of the sequences (act_fraction), alone and with the int4 + log8 codecs.
    "p16-budget25": ("(p) PCA init, warmup 60, activations on 25% of the sequences", ["act_fraction=0.25"],
                     ["student.init=pca", "student.head=untied", "optim.lr=0.0001", "optim.warmup_steps=60"]),
    "p16-int4-log8-budget25": ("(p) PCA init, warmup 60, int4 + log8, activations on 25% of the sequences",
                               ["act_dtype=int4", "logprob_dtype=log8", "act_fraction=0.25"],
                               ["student.init=pca", "student.head=untied", "optim.lr=0.0001", "optim.warmup_steps=60"]),
    "p16-int4-budget25": ("(p) PCA init, warmup 60, int4 (fp16 log-probs), activations on 25% of the sequences",
                          ["act_dtype=int4", "act_fraction=0.25"],
                          ["student.init=pca", "student.head=untied", "optim.lr=0.0001", "optim.warmup_steps=60"]),
    # A per-position layer subset (act_layer_fraction): every sequence keeps activations, each position a
    # quarter of the layers (8 of SmolLM2's 30), the same bytes as a quarter of the sequences.
    "p16-int4-layers25": ("(p) PCA init, warmup 60, int4 (fp16 log-probs), a quarter of the layers per position",
                          ["act_dtype=int4", "act_layer_fraction=0.25"],
                          ["student.init=pca", "student.head=untied", "optim.lr=0.0001", "optim.warmup_steps=60"]),
    "p16-layers25": ("(p) PCA init, warmup 60, a quarter of the layers per position", ["act_layer_fraction=0.25"],
                     ["student.init=pca", "student.head=untied", "optim.lr=0.0001", "optim.warmup_steps=60"]),
    # int4 with a scale per 64 rotated elements (int4g), alone and with a quarter of the layers per position.
    "p16-int4g": ("(p) PCA init, warmup 60, int4g activations (fp16 log-probs)", ["act_dtype=int4g"],
                  ["student.init=pca", "student.head=untied", "optim.lr=0.0001", "optim.warmup_steps=60"]),
    "p16-int4g-layers25": ("(p) PCA init, warmup 60, int4g (fp16 log-probs), a quarter of the layers per position",
                           ["act_dtype=int4g", "act_layer_fraction=0.25"],
                           ["student.init=pca", "student.head=untied", "optim.lr=0.0001", "optim.warmup_steps=60"]),
    # The same cache with fixed clone normalisers from the build's statistics (loss.clone_normalize=cache):
    # a batch whose positions carry no sink for some layer no longer shrinks that layer's normaliser.
    "p16-int4g-layers25-msc": ("(p) PCA init, warmup 60, int4g, a quarter of the layers per position, cache normalisers",
                               ["act_dtype=int4g", "act_layer_fraction=0.25"],
                               ["student.init=pca", "student.head=untied", "optim.lr=0.0001", "optim.warmup_steps=60",
                                "loss.clone_normalize=cache"]),
    "q": ("(q) PCA init (untied), KD only, lr 1e-4", [],
          ["student.init=pca", "student.head=untied", "optim.lr=0.0001", "loss.alpha=0"]),
}


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> int | None:
    """The first evaluated step whose held-out CE is at or below `target` (None if none is)."""
    return next((step for step, ce in curve if ce <= target), None)


def write_table(results: dict, out: Path, baseline: str = "(e) KD only (cache topk)") -> str:
    """`quality.md`: held-out CE per variant at every evaluated step, and the steps each variant needs to
    reach the baseline's final held-out CE (the paper's "x times faster" measure)."""
    variants = results.get("variants", {})
    steps = sorted({step for v in variants.values() for step, _ in v["heldout"]})
    target = variants.get(baseline, {}).get("final_heldout_ce")
    head = "| variant | " + " | ".join(f"step {s}" for s in steps) + " | steps to KD-only's final |"
    lines = [head, "|---" * (len(steps) + 2) + "|"]
    for name, v in variants.items():
        curve = dict(v["heldout"])
        reach = steps_to_reach(v["heldout"], target) if target is not None else None
        cells = [f"{curve[s]:.3f}" if s in curve else "" for s in steps]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {reach if reach is not None else '-'} |")
    text = "\n".join(lines) + "\n"
    (out / "quality.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--corpus", default="wiki-en")
    parser.add_argument("--heldout-docs", type=int, default=200)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--sequences", type=int, default=320, help="cached sequences (epochs repeat them)")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--only", default="", help=f"comma-separated variant keys to run, in this order; keys: {','.join(VARIANTS)}")
    parser.add_argument("--out", default="benchmarks/results/quality")
    parser.add_argument("--table-only", action="store_true", help="rewrite quality.md and quality.png from quality.json and stop")
    parser.add_argument("--merge", nargs="*", default=[], metavar="JSON",
                        help="first copy the variants of these quality.json files (runs made in parallel) into this one")
    parser.add_argument("overrides", nargs="*", help="training overrides for every variant, e.g. student.hidden_size=192")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result_file = out / "quality.json"
    results = json.loads(result_file.read_text()) if result_file.is_file() else {}
    for other in args.merge:
        results.setdefault("variants", {}).update(json.loads(Path(other).read_text()).get("variants", {}))
    if args.table_only or args.merge:
        write_outputs(results, out, args)
        print(write_table(results, out))
        return
    results["setup"] = {k: v for k, v in vars(args).items() if k not in ("merge", "table_only")}

    teacher = load_teacher(args.teacher)
    heldout = heldout_sequences(args.corpus, "text", args.heldout_docs, teacher.tokenizer, args.seq_len, 32)
    base_train = apply_overrides(TrainJobConfig(teacher=args.teacher, corpus=args.corpus, heldout_docs=args.heldout_docs), [
        "student.hidden_size=288", "student.init=random", "optim.lr=0.001", "optim.warmup_steps=10", "train.batch_size=8",
        f"train.seq_len={args.seq_len}", f"train.steps={args.steps}", "train.log_every=5",
        f"train.eval_every={args.eval_every}", "train.eval_sequences=32", "train.clone_positions=16",
        "loss.alpha=1.0", *args.overrides])  # fmt: skip
    base_cache = CacheConfig(teacher=args.teacher, corpus=args.corpus, heldout_docs=args.heldout_docs,
                             seq_len=args.seq_len, max_sequences=args.sequences, sequences_per_shard=64,
                             logprob_dtype="float16", act_positions=16)  # fmt: skip
    wanted = [key.strip() for key in args.only.split(",") if key.strip()] or list(VARIANTS)
    unknown = [key for key in wanted if key not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    for key in wanted:
        name, cache_overrides, train_overrides = VARIANTS[key]
        run = out / "runs" / key
        cfg = apply_overrides(base_train, train_overrides)
        start = time.perf_counter()
        if cache_overrides is None:
            if not (run / "summary.json").is_file():
                train_online(cfg, run, progress=False)
        else:
            cache_cfg = apply_overrides(base_cache, cache_overrides)
            tag = "-".join(o.replace("=", "") for o in cache_overrides) or "default"
            build_cache(cache_cfg, out / "caches" / tag, teacher=teacher, progress=False)
            train_from_cache(cfg, out / "caches" / tag, run, resume="auto", teacher=teacher, heldout_ids=heldout,
                             progress=False)  # fmt: skip
        records = read_metrics(run / "metrics.jsonl")
        results.setdefault("variants", {})[name] = {
            "heldout": [(r["step"], r["heldout_ce"]) for r in records if "heldout_ce" in r],
            "final_heldout_ce": next((r["heldout_ce"] for r in reversed(records) if "heldout_ce" in r), None),
            "seconds": time.perf_counter() - start,
        }
        print(name, results["variants"][name]["heldout"], flush=True)
        write_outputs(results, out, args)


def write_outputs(results: dict, out: Path, args) -> None:
    """quality.json, quality.md and quality.png (every variant's held-out curve) from `results`."""
    (out / "quality.json").write_text(json.dumps(results, indent=2) + "\n")
    write_table(results, out)
    setup = results.get("setup", {})
    tokens_per_step = 8 * setup.get("seq_len", args.seq_len)  # train.batch_size=8 in every variant
    curves = {name: [{"tokens": step * tokens_per_step, "heldout_ce": ce} for step, ce in v["heldout"]]
              for name, v in results.get("variants", {}).items()}  # fmt: skip
    plot_curves(curves, out / "quality.png", key="heldout_ce",
                title=f"{setup.get('teacher', args.teacher)}: held-out CE at equal steps")  # fmt: skip


if __name__ == "__main__":
    main()
