"""Quality at equal steps on a real teacher: LRC online vs LRC from the cache (every logit mode, several
activation sampling rates), KD only and CE only. Same student size, token budget, seed and held-out text.

Each variant is resumable and its held-out curve is written to `quality.json` as soon as it ends;
`quality.png` plots them all.

    python benchmarks/quality.py --out benchmarks/results/quality

The recipe protocol (keys in RECIPE: the library's default recipe and its alternatives, every training
setting left at its default but the student's size, the batch and the run's length) runs each variant
for several seeds (`train.seed` and `student.seed`: data order and the random parts of the start),
evaluates on the cache's own held-out split, checkpoints every 40 steps so that a cut-off run continues
where it stopped when the command is run again, and writes `recipe.md` (mean and spread over seeds per
evaluated step, each run's largest rise above its running minimum after step 40, steps to reach KD
only's final held-out CE) and `recipe.png` (mean and min-max band per variant):

    python benchmarks/quality.py --recipe --only prod,kd --seeds 0,1,2 --out benchmarks/results/recipe

Runs made in several output folders are brought together with `--merge` (their recipe.json files, or the
folder of one run cut off before its last step, which is then listed apart from the means):

    python benchmarks/quality.py --recipe --out benchmarks/results/recipe --merge DIR/recipe.json DIR/runs/tied-s0
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


# The recipe protocol (issue 26): key -> (label, cache overrides, training overrides). The production cache
# is written out explicitly so that the protocol does not move with the library's defaults, and so are the
# head and the spike guard: (i)-(v) ran with the untied head and every step taken, the defaults when they
# were measured; (v) ties the head, (vi) skips the steps of gradient spikes (optim.skip_spikes).
RECIPE_PINNED = ["student.head=untied", "optim.skip_spikes=0"]
PRODUCTION_CACHE = ["logprob_dtype=float16", "act_dtype=int4g", "act_layer_fraction=0.25", "act_positions=16"]
RECIPE = {
    "prod": ("(i) default recipe, production cache", PRODUCTION_CACHE, []),
    "kd": ("(iii) KD only, same start and schedule", PRODUCTION_CACHE, ["loss.alpha=0"]),
    "bf16": ("(ii) default recipe, bf16 every-layer cache",
             ["logprob_dtype=float16", "act_dtype=bfloat16", "act_layer_fraction=1.0", "act_positions=16"], []),
    # The teacher saw each packed document alone; the student follows the cache (train.document_mask=auto),
    # and its held-out CE is measured on the cache's document-masked held-out split.
    "docmask": ("(iv) document-masked cache and student", [*PRODUCTION_CACHE, "document_mask=true"], []),
    "tied": ("(v) default recipe, tied head", PRODUCTION_CACHE, ["student.head=tied"]),
    "skip": ("(vi) default recipe, spike steps skipped", PRODUCTION_CACHE,
             ["optim.skip_spikes=4", "optim.spike_window=50"]),
    "kd-skip": ("(vi-kd) KD only, spike steps skipped", PRODUCTION_CACHE,
                ["loss.alpha=0", "optim.skip_spikes=4", "optim.spike_window=50"]),
}
RISE_AFTER_STEP = 40
REACH_PAIRS = [("prod", "kd"), ("skip", "kd-skip")]
"""(LRC variant, its KD-only baseline at the same schedule) whose steps-to-reach ratio recipe.md reports."""


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
    parser.add_argument("--sequences", type=int, default=None, help="cached sequences, epochs repeat them (320; --recipe: 1024)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (80; --recipe: 480)")
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--only", default="", help=f"comma-separated variant keys to run, in this order; keys: {','.join(VARIANTS)}")
    parser.add_argument("--out", default="benchmarks/results/quality")
    parser.add_argument("--table-only", action="store_true", help="rewrite quality.md and quality.png from quality.json and stop")
    parser.add_argument("--merge", nargs="*", default=[], metavar="JSON_OR_RUN",
                        help="first copy the variants of these quality.json files (runs made in parallel) into this one; "
                             "--recipe: recipe.json files or run folders (<variant>-s<seed>, cut off or not)")
    parser.add_argument("--recipe", action="store_true",
                        help=f"the recipe protocol: variants {','.join(RECIPE)}, library defaults, the cache's held-out split")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (train.seed and student.seed) per variant")
    parser.add_argument("overrides", nargs="*", help="training overrides for every variant, e.g. student.hidden_size=192")
    args = parser.parse_args()
    if args.recipe:
        args.steps, args.sequences = args.steps or 480, args.sequences or 1024
        return run_recipe(parser, args)
    args.steps, args.sequences = args.steps or 80, args.sequences or 320
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


def run_recipe(parser: argparse.ArgumentParser, args) -> None:
    """The recipe protocol: every RECIPE variant (or --only's) for every seed, resumable run by run."""
    out = Path(args.out)
    result_file = out / "recipe.json"
    results = json.loads(result_file.read_text()) if result_file.is_file() else {}
    for other in map(Path, args.merge):
        if other.is_dir():  # one run's folder, e.g. a run cut off before its last step
            key, _, seed = other.name.rpartition("-s")
            if key not in RECIPE or not seed.isdigit() or not (other / "metrics.jsonl").is_file():
                parser.error(f"--merge {other}: a run folder is named <variant>-s<seed> and holds metrics.jsonl")
            results.setdefault("runs", {})[other.name] = {
                "variant": key, "label": RECIPE[key][0], "seed": int(seed), "heldout": heldout_curve(other)}  # fmt: skip
            continue
        merged = json.loads(other.read_text())
        for name, run in merged.get("runs", {}).items():
            results.setdefault("runs", {})[name] = run
        if "setup" in merged:  # the protocol's settings (teacher, steps, ...), not one run's seeds or folder
            results.setdefault("setup", {k: v for k, v in merged["setup"].items() if k not in ("only", "seeds", "out")})
    if args.table_only or args.merge:
        print(write_recipe_outputs(results, out))
        return
    wanted = [key.strip() for key in args.only.split(",") if key.strip()] or list(RECIPE)
    unknown = [key for key in wanted if key not in RECIPE]
    if unknown:
        parser.error(f"unknown recipe variants {unknown}; known: {list(RECIPE)}")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    results["setup"] = {k: v for k, v in vars(args).items() if k not in ("merge", "table_only")}
    teacher = load_teacher(args.teacher)
    base_train = apply_overrides(TrainJobConfig(teacher=args.teacher), [
        "student.hidden_size=288", *RECIPE_PINNED, "train.batch_size=8", f"train.seq_len={args.seq_len}",
        f"train.steps={args.steps}", "train.log_every=5", f"train.eval_every={args.eval_every}",
        "train.eval_sequences=64", "train.checkpoint_every=40", "train.keep_checkpoints=1", *args.overrides])  # fmt: skip
    base_cache = CacheConfig(teacher=args.teacher, corpus=args.corpus, heldout_docs=args.heldout_docs,
                             seq_len=args.seq_len, max_sequences=args.sequences, sequences_per_shard=64)  # fmt: skip
    for key in wanted:
        label, cache_overrides, train_overrides = RECIPE[key]
        cache_cfg = apply_overrides(base_cache, cache_overrides)
        cache = out / "caches" / ("-".join(o.replace("=", "") for o in cache_overrides) or "default")
        build_cache(cache_cfg, cache, teacher=teacher, progress=False)
        for seed in seeds:
            run = out / "runs" / f"{key}-s{seed}"
            cfg = apply_overrides(base_train, [*train_overrides, f"train.seed={seed}", f"student.seed={seed}"])
            start = time.perf_counter()
            train_from_cache(cfg, cache, run, resume="auto", teacher=teacher, progress=False)
            results.setdefault("runs", {})[f"{key}-s{seed}"] = {
                "variant": key, "label": label, "seed": seed, "heldout": heldout_curve(run),
                "seconds_this_session": time.perf_counter() - start,
            }  # fmt: skip
            print(label, "seed", seed, results["runs"][f"{key}-s{seed}"]["heldout"], flush=True)
            write_recipe_outputs(results, out)


def heldout_curve(run: Path) -> list[tuple[int, float]]:
    """(step, held-out CE) of every evaluation in a run folder's metrics.jsonl."""
    return [(r["step"], r["heldout_ce"]) for r in read_metrics(run / "metrics.jsonl") if "heldout_ce" in r]


def max_rise(curve: list[tuple[int, float]], after: int = RISE_AFTER_STEP) -> float:
    """The largest held-out CE above the running minimum (taken over the whole curve) at steps > `after`."""
    rise, best = 0.0, float("inf")
    for step, ce in curve:
        best = min(best, ce)
        if step > after:
            rise = max(rise, ce - best)
    return rise


def write_recipe_outputs(results: dict, out: Path) -> str:
    """recipe.json, recipe.md (per variant: mean, spread and runs per evaluated step; per run: largest rise,
    final CE, steps to reach KD only's mean final CE) and recipe.png (mean line, min-max band)."""
    import statistics

    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.json").write_text(json.dumps(results, indent=2) + "\n")
    every = [run for run in results.get("runs", {}).values() if run["heldout"]]
    planned = results.get("setup", {}).get("steps") or max((run["heldout"][-1][0] for run in every), default=0)
    # A run cut off before its last step is listed on its own, out of the means, the bands and the ratio.
    groups: dict[str, list[dict]] = {}
    partial: dict[str, list[dict]] = {}
    for run in every:
        (groups if run["heldout"][-1][0] >= planned else partial).setdefault(run["variant"], []).append(run)
    kd_finals = [run["heldout"][-1][1] for run in groups.get("kd", [])]
    kd_target = statistics.mean(kd_finals) if kd_finals else None
    kd_steps = [run["heldout"][-1][0] for run in groups.get("kd", [])]  # steps KD only ran
    steps = sorted({step for runs in groups.values() for run in runs for step, _ in run["heldout"]})
    lines = ["| variant (seeds) | " + " | ".join(f"{s}" for s in steps) + " |", "|---" * (len(steps) + 1) + "|"]
    bands = {}
    for key, runs in groups.items():
        label = runs[0]["label"]
        cells, band = [], []
        for s in steps:
            values = [dict(run["heldout"])[s] for run in runs if s in dict(run["heldout"])]
            if values:
                mean = statistics.mean(values)
                cells.append(f"{mean:.3f} ±{(max(values) - min(values)) / 2:.3f}")
                band.append((s, mean, min(values), max(values)))
            else:
                cells.append("")
        bands[f"{label} ({len(runs)} seeds)"] = band
        lines.append(f"| {label} ({','.join(str(r['seed']) for r in runs)}) | " + " | ".join(cells) + " |")
    for cut_runs in partial.values():
        for run in cut_runs:
            bands[f"{run['label']}, seed {run['seed']}, cut off at {run['heldout'][-1][0]}"] = [
                (s, ce, ce, ce) for s, ce in run["heldout"]]  # fmt: skip
    lines += ["", "Cells: mean over seeds ± half the range (max - min) / 2.", "",
              f"| run | evaluated steps | final held-out CE | largest rise above running min after step {RISE_AFTER_STEP} "
              "| first step at or below KD only's mean final CE |", "|---|---|---|---|---|"]  # fmt: skip
    for name, run in sorted(results.get("runs", {}).items()):
        curve = run["heldout"]
        reach = steps_to_reach(curve, kd_target) if kd_target is not None and curve else None
        cut = f" (cut off at {curve[-1][0]} of {planned})" if curve and curve[-1][0] < planned else ""
        lines.append(f"| {run['label']}, seed {run['seed']}{cut} | {curve[-1][0] if curve else 0} | "
                     f"{curve[-1][1]:.3f} | {max_rise(curve):.3f} | {reach if reach is not None else '-'} |"
                     if curve else f"| {name} | 0 | | | |")  # fmt: skip
    if kd_target is not None:
        lines += ["", f"KD only's mean final held-out CE: {kd_target:.4f}, after {statistics.mean(kd_steps):.0f} steps."]
    for lrc, kd in REACH_PAIRS:
        lines += reach_ratio(groups, lrc, kd)
    lines += [line for key in RECIPE if key != "prod" and not key.startswith("kd") for line in [against_prod(groups, key)] if line]
    lines += [line for key in RECIPE if key != "prod"
              for line in [against_prod(partial, key, groups.get("prod", []), note=", cut off,")] if line]  # fmt: skip
    text = "\n".join(lines) + "\n"
    (out / "recipe.md").write_text(text)
    plot_bands(bands, out / "recipe.png",
               title=f"{results.get('setup', {}).get('teacher', '')}: held-out CE, mean and range over seeds")
    return text


def reach_ratio(groups: dict[str, list[dict]], lrc: str, kd: str) -> list[str]:
    """How many of KD only's (`kd`'s) steps the LRC variant `lrc` takes to reach KD only's mean final
    held-out CE (means over seeds), when both have finished runs."""
    import statistics

    if not groups.get(lrc) or not groups.get(kd):
        return []
    target = statistics.mean(run["heldout"][-1][1] for run in groups[kd])
    kd_steps = statistics.mean(run["heldout"][-1][0] for run in groups[kd])
    reach = [steps_to_reach(run["heldout"], target) for run in groups[lrc]]
    name, kd_name = groups[lrc][0]["label"].split(" ")[0], groups[kd][0]["label"].split(" ")[0]
    if not all(s is not None for s in reach):
        return [f"{name} reaches {kd_name}'s mean final CE {target:.4f} at steps {reach} (None: not within its run)."]
    lines = [f"{name} reaches {kd_name}'s mean final CE {target:.4f} at steps {reach}: "
             f"{statistics.mean(reach) / kd_steps:.2f} of {kd_name}'s {kd_steps:.0f} steps (mean over seeds)."]
    own = [steps_to_reach(run["heldout"], target) for run in groups[kd]]
    if all(s is not None for s in own):  # a noisy plateau: KD only itself touches its final early
        lines.append(f"{kd_name}'s own curves first reach it at steps {own}: {name} takes "
                     f"{statistics.mean(reach) / statistics.mean(own):.2f} of those (means over seeds).")
    return lines


def against_prod(groups: dict[str, list[dict]], key: str, prod: list[dict] | None = None, note: str = "") -> str | None:
    """`key`'s mean held-out CE against (i)'s (the runs `prod`, else groups' own) at the last step every run
    of both reached, or None when either has no run."""
    import statistics

    runs, prod = groups.get(key, []), groups.get("prod", []) if prod is None else prod
    if not runs or not prod:
        return None
    step = min(run["heldout"][-1][0] for run in runs + prod)
    if not all(step in dict(run["heldout"]) for run in runs + prod):
        return None
    mine = statistics.mean(dict(run["heldout"])[step] for run in runs)
    theirs = statistics.mean(dict(run["heldout"])[step] for run in prod)
    return (f"{runs[0]['label']}{note} at step {step}: {mine:.3f} (seeds {','.join(str(r['seed']) for r in runs)}) "
            f"against (i)'s {theirs:.3f} (seeds {','.join(str(r['seed']) for r in prod)}): "
            f"{100 * (mine - theirs) / theirs:+.1f}%.")


def plot_bands(bands: dict[str, list[tuple[int, float, float, float]]], out_png: Path, title: str) -> None:
    """One line per variant (mean over seeds) with its min-max band shaded: the whole run, and beside it
    its second half on its own scale, where the variants sit within a few hundredths of a nat."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (whole, late) = plt.subplots(1, 2, figsize=(13, 4.8))
    last = max((rows[-1][0] for rows in bands.values() if rows), default=0)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, (label, rows) in enumerate(bands.items()):
        colour = colours[index % len(colours)]
        for ax, part in ((whole, rows), (late, [row for row in rows if row[0] >= last / 2])):
            if not part:
                continue
            steps, mean, low, high = zip(*part)
            ax.plot(steps, mean, ".-", label=label, color=colour)
            ax.fill_between(steps, low, high, color=colour, alpha=0.2)
    whole.set_ylim(top=min(8.0, whole.get_ylim()[1]))
    whole.set_title(title)
    late.set_title(f"steps {last // 2}-{last}")
    for ax in (whole, late):
        ax.set_xlabel("optimizer step (8 x 64 tokens)")
        ax.set_ylabel("held-out CE (nats)")
        ax.grid(alpha=0.3)
    whole.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)


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
