"""Peak host memory per process of FSDP2 training (`train.parallelism=fsdp2`) on SmolLM2-135M, 1, 2 and 3
processes, with each process reading only its shards of the teacher (`teacher.slices`) against every
process loading the whole teacher first (``LRC_FSDP2_WHOLE_TEACHER=1``, the path before the per-rank reads).

    python benchmarks/fsdp_rss.py --work /tmp/fsdp_rss [--processes 1,2,3] [--steps 2]

Builds a small cache once (SmolLM2-135M, wiki-en, 12 sequences of 256 tokens, residual activations, hidden
logit signal), then runs `lrc-train train` through torchrun (gloo, OMP_NUM_THREADS=1), one run at a time,
with the teacher given to `train_from_cache` by name (the command line loads it whole before training):
PCA start with the head-scale fit, a few steps, the export. Every process records its own high-water
resident memory (`getrusage(RUSAGE_SELF).ru_maxrss`) after the imports, after setup (teacher, student,
PCA start, sharding), before the export and at the end, and the teacher bytes it holds in the student.
The fit peak = constant + teacher share / N (least squares over N, the processes' largest peak before
the export) gives the constant part and the teacher's share. Both paths' losses and exported students
are compared run for run.

Results: benchmarks/results/fsdp_rss/results.json and results.md (`--results`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CACHE = ["teacher=smollm2-135m", "corpus=wiki-en", "seq_len=256", "max_sequences=12", "sequences_per_shard=4",
         "heldout_docs=0", "logit_mode=hidden", "activation_mode=residual", "act_positions=16"]  # fmt: skip

# Runs in every training process: records its memory at the milestones of a run, then trains.
_PROBE = r"""
import json, os, resource, sys
def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
def now_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
marks = {}
def mark(name):
    marks[name] = peak_mib()
    marks["now_" + name] = now_mib()
import torch
import lrc_offline.training.loop as loop
import lrc_offline.training.trainer as trainer
from lrc_offline.training.fsdp import teacher_bytes_held
mark("imports")
setup, finish, teacher = loop.setup, loop.finish, trainer._teacher
def timed_teacher(*args, **kwargs):
    out = teacher(*args, **kwargs)
    mark("teacher")
    return out
def timed_setup(*args, **kwargs):
    run = setup(*args, **kwargs)
    mark("setup")
    marks["teacher_bytes_held"] = teacher_bytes_held(run.student)
    return run
def timed_finish(run):
    mark("before_export")
    return finish(run)
loop.setup, loop.finish, trainer._teacher = timed_setup, timed_finish, timed_teacher
import lrc_offline.cli.train as cli
# The teacher by name, as `train_from_cache` loads it (the command line loads it whole itself first).
cli._teacher_and_heldout = lambda cfg, cache: (None, None)
main = cli.main
out = sys.argv[1]
if main(sys.argv[2:]):
    sys.exit("lrc-train failed")
mark("end")
rank = int(os.environ.get("RANK", 0))
with open(os.path.join(out, f"rss-rank{rank}.json"), "w") as f:
    json.dump(marks, f)
"""


def _build_cache(cache: Path) -> None:
    if (cache / "manifest.json").is_file():
        return
    shutil.rmtree(cache, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "lrc_offline.cli.cache", "build", "--out", str(cache), "--no-progress", *CACHE],
                   check=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))  # fmt: skip


def _train(work: Path, cache: Path, name: str, processes: int, whole: bool, steps: int) -> dict:
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    probe = work / "probe.py"
    probe.write_text(_PROBE)
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))
    env.pop("LRC_FSDP2_WHOLE_TEACHER", None)
    if whole:
        env["LRC_FSDP2_WHOLE_TEACHER"] = "1"
    args = [str(out), "train", "--cache", str(cache), "--out", str(out / "run"), "--no-progress",
            "train.parallelism=fsdp2", "train.device=cpu", f"train.steps={steps}", "train.batch_size=1",
            "train.log_every=1", "train.checkpoint_every=0", "student.hidden_size=288",
            "student.pca_calibrate_sequences=2"]  # fmt: skip
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
               str(29500 + processes + 10 * whole), str(probe), *args]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-4000:]}")
    ranks = [json.loads((out / f"rss-rank{r}.json").read_text()) for r in range(processes)]
    metrics = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    return {"name": name, "processes": processes, "path": "whole teacher per process" if whole else "per-rank reads",
            "seconds": time.perf_counter() - start, "ranks": ranks,
            "losses": [r["loss"] for r in metrics if "loss" in r], "export": str(out / "run" / "student")}  # fmt: skip


def _fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least squares of peak = constant + share / N."""
    import numpy as np

    x = np.array([[1.0, 1.0 / n] for n, _ in points])
    y = np.array([p for _, p in points])
    (constant, share), *_ = np.linalg.lstsq(x, y, rcond=None)
    return float(constant), float(share)


def _compare(a: dict, b: dict) -> dict:
    import torch
    from safetensors.torch import load_file

    rel = max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a["losses"], b["losses"]))
    wa, wb = (load_file(Path(r["export"]) / "model.safetensors") for r in (a, b))
    same_names = set(wa) == set(wb)
    diff = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa) if same_names else float("nan")
    return {"max_loss_rel_diff": rel, "export_max_abs_diff": diff,
            "export_equal": same_names and all(torch.equal(wa[k], wb[k]) for k in wa)}  # fmt: skip


def _markdown(results: dict) -> str:
    rows = ["| path | processes | resident after setup | peak: teacher loaded | setup (+ PCA start) | training | end (rank 0 exports) | teacher held | losses vs whole path (max rel) | export equal |",
            "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for run in results["runs"]:
        ranks = run["ranks"]
        fmt = lambda key: " / ".join(f"{r[key]:.0f}" for r in ranks)  # noqa: E731
        held = " / ".join(f"{r['teacher_bytes_held'] / 2**20:.0f}" for r in ranks)
        cmp = run.get("vs_whole", {})
        rows.append(f"| {run['path']} | {run['processes']} | {fmt('now_setup')} | {fmt('teacher')} | {fmt('setup')} | {fmt('before_export')} | {fmt('end')} | {held} | "
                    f"{cmp.get('max_loss_rel_diff', '-') if cmp else '-'} | {cmp.get('export_equal', '-') if cmp else '-'} |")  # fmt: skip
    lines = ["# FSDP2 training: peak host memory per process (SmolLM2-135M, fp32 on CPU)", "",
             "`python benchmarks/fsdp_rss.py`. MiB per process, rank 0 first: resident memory right after setup "
             "(/proc/self/statm), and the high-water mark (ru_maxrss) once the teacher is loaded (per-rank: its "
             "files opened and fingerprinted), after setup, after the training steps and at the end.", "",
             *rows, ""]  # fmt: skip
    for path, fit in results["fits"].items():
        lines.append(f"- {path} (largest over the processes) = {fit['constant_mib']:.0f} MiB + "
                     f"{fit['share_mib']:.0f} MiB / N (least squares over N = {fit['processes']}; residual "
                     f"{fit['max_residual_mib']:.0f} MiB)")  # fmt: skip
    lines += ["", f"Imports alone (python, torch, transformers, lrc_offline): {results['imports_mib']:.0f} MiB per process.",
              f"Teacher in the training dtype (float32): {results['teacher_mib']:.0f} MiB.", ""]  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/fsdp_rss"))
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "fsdp_rss")
    parser.add_argument("--processes", default="1,2,3")
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    cache = args.work / "cache"
    _build_cache(cache)
    counts = [int(n) for n in args.processes.split(",")]
    runs = []
    for n in counts:  # one run at a time: the machine is shared
        whole = _train(args.work, cache, f"whole-{n}", n, True, args.steps)
        rank = _train(args.work, cache, f"per-rank-{n}", n, False, args.steps)
        rank["vs_whole"] = _compare(rank, whole)
        runs += [whole, rank]
        print(json.dumps({k: v for k, v in rank.items() if k != "ranks"}), flush=True)
    fits = {}
    for key, what in (("now_setup", "resident after setup"), ("before_export", "peak before the export")):
        for path in ("whole teacher per process", "per-rank reads"):
            points = [(r["processes"], max(x[key] for x in r["ranks"])) for r in runs if r["path"] == path]
            constant, share = _fit(points)
            residual = max(abs(p - constant - share / n) for n, p in points)
            fits[f"{path}, {what}"] = {"constant_mib": constant, "share_mib": share, "max_residual_mib": residual,
                                       "processes": [n for n, _ in points]}  # fmt: skip
    held_one = next(r for r in runs if r["processes"] == min(counts) and r["path"] == "per-rank reads")
    results = {"cache": CACHE, "steps": args.steps, "runs": runs, "fits": fits,
               "imports_mib": max(x["imports"] for r in runs for x in r["ranks"]),
               "teacher_mib": sum(x["teacher_bytes_held"] for x in held_one["ranks"]) / 2**20}  # fmt: skip
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.results / "results.md").write_text(_markdown(results))
    print(_markdown(results))


if __name__ == "__main__":
    main()
