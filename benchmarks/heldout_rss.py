"""Held-out evaluation in stage 2: a training process's memory against the corpus size, and the spread
that sizes the held-out split.

    python benchmarks/heldout_rss.py rss --work /tmp/heldout_rss        # 200 MB corpus vs 20 MB
    python benchmarks/heldout_rss.py spread --work /tmp/heldout_spread  # SmolLM2-135M, wiki-en

`rss` generates two synthetic gzip JSON Lines corpora (`corpus_scale.make_corpus`, never committed), 10x
apart, builds a small cache of each (tiny random teacher, seq_len 256, a few training sequences, the last
200 documents held out as the cache's held-out split), then trains from each in its own process with
held-out evaluation on (every 2 steps) and records the process's peak RSS (`wait4`'s ru_maxrss: the
kernel's high-water mark). With `--legacy` it also trains from a copy of each cache rewritten as caches
were before held-out splits, whose evaluation re-reads the corpus (`--legacy-code`: with another
checkout's lrc_offline, e.g. the version before held-out splits).

`spread` builds a SmolLM2-135M cache of wiki-en with a held-out split and measures the per-sequence spread
of the held-out metrics (the teacher's CE from its forward; CE, KL and top-1 agreement of a PCA-initialised
student at d_S 288 from the cached signal), hence the standard error of their mean over N sequences.

Results go to benchmarks/results/heldout_rss/ (`--results`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from corpus_scale import make_corpus  # noqa: E402

CACHE = ["teacher=tiny-random:llama", "seq_len=256", "max_sequences=32", "sequences_per_shard=16", "heldout_docs=200",
         "heldout_sequences=64", "topk=32", "act_positions=16"]  # fmt: skip
TRAIN = ["--no-progress", "train.steps=6", "train.batch_size=8", "train.log_every=2", "train.eval_every=2",
         "student.hidden_size=32"]  # fmt: skip


def _run(args: list[str], code: Path = ROOT) -> dict:
    """Run `python -m ...args` (with the lrc_offline at `code`) to the end; its peak RSS (MiB) and seconds."""
    env = dict(os.environ, PYTHONPATH=str(code), OMP_NUM_THREADS="1")
    start = time.perf_counter()
    # run from `code`: `python -m` puts the working directory first on sys.path
    proc = subprocess.Popen([sys.executable, "-m", *args], env=env, cwd=code, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)  # fmt: skip
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(args)} failed: {stderr.decode()[-3000:]}")
    return {"peak_rss_mib": usage.ru_maxrss / 1024, "seconds": time.perf_counter() - start}


def _as_before_heldout_splits(cache: Path, copy: Path) -> None:
    """A copy of `cache` (shards and manifest; its index is not needed to train) as caches were written
    before held-out splits: no heldout section or keys, no held-out shards, records under that manifest."""
    from lrc_offline.cache import Manifest

    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(cache, copy, ignore=shutil.ignore_patterns("index", "heldout-*", "pca"))
    data = json.loads((copy / "manifest.json").read_text())
    del data["heldout"]
    for key in ("heldout_sequences", "heldout_activations"):
        del data["config"][key]
    (copy / "manifest.json").write_text(json.dumps(data, indent=2))
    digest = Manifest.from_dict(data).digest()
    for record in (copy / "shards").glob("*.done.json"):
        record.write_text(json.dumps(json.loads(record.read_text()) | {"manifest": digest}))


def bench_rss(args) -> dict:
    work, results = Path(args.work), {"megabytes": {}, "new": {}, "legacy": {}}
    for name, mb in (("large", args.megabytes), ("small", args.megabytes / 10)):
        corpus = work / f"corpus-{name}"
        results["megabytes"][name] = make_corpus(corpus, mb, args.files) / 1e6
        cache = work / f"cache-{name}"
        if not (cache / "manifest.json").exists():
            results.setdefault("build", {})[name] = _run(["lrc_offline.cli.cache", "build", "--out", str(cache),
                                                          "--no-progress", f"corpus={corpus}", *CACHE])  # fmt: skip
        run = work / f"run-{name}"
        shutil.rmtree(run, ignore_errors=True)
        results["new"][name] = _run(["lrc_offline.cli.train", "train", "--cache", str(cache), "--out", str(run),
                                     *TRAIN])  # fmt: skip
        last = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "heldout_kl" in r][-1]
        results["new"][name]["last_heldout"] = {k: v for k, v in last.items() if k.startswith("heldout_")}
        print(name, "new", json.dumps(results["new"][name]), flush=True)
        if args.legacy:
            old = work / f"cache-{name}-legacy"
            _as_before_heldout_splits(cache, old)
            shutil.rmtree(run, ignore_errors=True)
            results["legacy"][name] = _run(["lrc_offline.cli.train", "train", "--cache", str(old), "--out", str(run),
                                            *TRAIN], Path(args.legacy_code or ROOT))  # fmt: skip
            print(name, "legacy", json.dumps(results["legacy"][name]), flush=True)
    for kind in ("new", "legacy"):
        if results[kind]:
            results[kind]["ratio_rss_large_vs_small"] = (results[kind]["large"]["peak_rss_mib"]
                                                         / results[kind]["small"]["peak_rss_mib"])  # fmt: skip
    return results


def bench_spread(args) -> dict:
    import torch

    from lrc_offline.capture.build import build_cache
    from lrc_offline.config import CacheConfig, StudentConfig, TrainJobConfig, load_config
    from lrc_offline.student.init import init_pca, pca_basis
    from lrc_offline.student.lrc import build_student
    from lrc_offline.teacher.load import load_teacher
    from lrc_offline.training.heldout import CacheHeldout, heldout_results, heldout_sums, student_head_fn
    from lrc_offline.training.pca import cache_second_moment

    torch.manual_seed(0)
    teacher = load_teacher("smollm2-135m")
    cfg = load_config(CacheConfig, ROOT / "cache_jobs" / "smollm2_demo.yaml")
    cfg.heldout_docs, cfg.heldout_sequences, cfg.max_sequences = args.heldout_docs, args.sequences, 32
    cache = Path(args.work) / "cache"
    build_cache(cfg, cache, progress=False, teacher=teacher)
    heldout = CacheHeldout(cache)
    job = TrainJobConfig(student=StudentConfig(hidden_size=288, init="pca")).resolved(residual_available=True)
    student = build_student(teacher.model, job.student)
    init_pca(student, pca_basis(cache_second_moment(cache, False, 1024), 288))
    ids = torch.cat([batch.input_ids for batch in heldout.batches(0, heldout.num_sequences, 16)]).long()
    per_seq: dict[str, list[float]] = {"teacher_ce": [], "student_ce": [], "student_kl": [], "student_top1": []}
    with torch.no_grad():
        for row in ids:
            logits = teacher.model(input_ids=row[None]).logits.float()
            per_seq["teacher_ce"].append(torch.nn.functional.cross_entropy(logits[0, :-1], row[1:]).item())
        for j in range(heldout.num_sequences):  # one sequence a "rank": its own metrics
            result = heldout_results(heldout_sums(student_head_fn(student), heldout, 1, rank=j,
                                                  world_size=heldout.num_sequences), True)  # fmt: skip
            per_seq["student_ce"].append(result["ce"])
            per_seq["student_kl"].append(result["kl"])
            per_seq["student_top1"].append(result["top1"])
    out = {"sequences": heldout.num_sequences, "seq_len": cfg.seq_len, "student": "PCA init, d_S 288, no training",
           "metrics": {}}  # fmt: skip
    for name, values in per_seq.items():
        t = torch.tensor(values, dtype=torch.float64)
        std = t.std().item()
        out["metrics"][name] = {"mean": t.mean().item(), "std_per_sequence": std,
                                "standard_error": {n: std / math.sqrt(n) for n in (32, 64, 128, 256, 512)}}  # fmt: skip
        print(name, json.dumps(out["metrics"][name]), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["rss", "spread"])
    parser.add_argument("--work", required=True, help="scratch folder: corpora, caches, runs")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "heldout_rss"))
    parser.add_argument("--megabytes", type=float, default=200.0, help="rss: compressed size of the large corpus")
    parser.add_argument("--files", type=int, default=24)
    parser.add_argument("--legacy", action="store_true", help="rss: also train from the caches as built before "
                        "held-out splits (their evaluation re-reads the corpus)")  # fmt: skip
    parser.add_argument("--legacy-code", help="rss --legacy: train with the lrc_offline in this folder (e.g. a git "
                        "worktree of a version before held-out splits) instead of this one")  # fmt: skip
    parser.add_argument("--heldout-docs", type=int, default=1000, help="spread: held-out wiki-en documents")
    parser.add_argument("--sequences", type=int, default=128, help="spread: held-out sequences")
    args = parser.parse_args()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    result = {"rss": bench_rss, "spread": bench_spread}[args.what](args)
    Path(args.results).mkdir(parents=True, exist_ok=True)
    name = args.what if not (args.what == "rss" and args.legacy_code) else "rss_legacy_code"
    (Path(args.results) / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
