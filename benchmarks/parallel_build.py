"""Parallel stage-1 builds started together: how often both workers succeed and leave the cache a
one-worker build makes.

Each run starts two `lrc-cache build` processes at the same moment into a fresh directory: the
documented split (``--worker-index 0|1 --num-workers 2``, mode ``split``) or two identical builds of every
shard (mode ``identical``). A run counts as good when both exit 0, `lrc-cache verify` passes, no
temporary is left, and every file but the manifest is byte-identical to a one-worker build's (shard
data, completion records with their checksums, index parts), the manifest differing only in its
``created`` time. The workers run the code of the checkout this script lives in (PYTHONPATH), so a
copy of the script in another worktree measures that worktree's code.

    python benchmarks/parallel_build.py --runs 20 --out benchmarks/results/parallel_build
    python benchmarks/parallel_build.py --runs 20 --wide-corpus 6 --modes split,identical \\
        --out benchmarks/results/parallel_build

``--wide-corpus K`` swaps the config's corpus for K text files (the packaged tiny text, 20 times
each): tokenising then takes long enough for the two workers to overlap in the tokenise phase.
Writes `<out>/<corpus>_<label>.json` (label: --label, else the checkout's commit) and prints a Markdown
table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


def _build_cmd(config: str, out: Path, overrides: list[str], *extra: str) -> list[str]:
    return [sys.executable, "-m", "lrc_offline.cli.cache", "build", "--config", config, "--out", str(out),
            "--no-progress", *extra, *overrides]  # fmt: skip


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _manifest_without_time(data: bytes) -> dict:
    manifest = json.loads(data)
    manifest.pop("created", None)
    return manifest


def compare(cache: Path, reference: dict[str, bytes]) -> str | None:
    """None when `cache` equals the reference build's files (the manifest up to its time); else why not."""
    files = _files(cache)
    leftovers = [name for name in files if any(part.startswith(".tmp-") for part in name.split("/"))]
    if leftovers:
        return f"temporaries left: {leftovers[:3]}"
    if set(files) != set(reference):
        missing, extra = sorted(set(reference) - set(files)), sorted(set(files) - set(reference))
        return f"files differ: missing {missing[:3]}, extra {extra[:3]}"
    for name, data in reference.items():
        if name == "manifest.json":
            if _manifest_without_time(files[name]) != _manifest_without_time(data):
                return "manifest differs beyond its time"
        elif files[name] != data:
            return f"{name} differs"
    return None


def run_once(config: str, out: Path, overrides: list[str], mode: str, reference: dict[str, bytes]) -> dict:
    """Both workers started together into `out`; what each did and whether the cache is the reference's."""
    split = [["--worker-index", str(w), "--num-workers", "2"] for w in range(2)] if mode == "split" else [[], []]
    start = time.perf_counter()
    procs = [subprocess.Popen(_build_cmd(config, out, overrides, *args), env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for args in split]  # fmt: skip
    logs = [p.communicate()[0] for p in procs]
    row = {"seconds": round(time.perf_counter() - start, 2), "exit_codes": [p.returncode for p in procs]}
    errors = [line for log in logs for line in log.splitlines() if line.startswith("error:") or "Error" in line]
    if errors:
        row["errors"] = errors[:4]
    row["both_exit_0"] = all(p.returncode == 0 for p in procs)
    verify = subprocess.run([sys.executable, "-m", "lrc_offline.cli.cache", "verify", str(out)], env=_env(),
                            capture_output=True, text=True)  # fmt: skip
    row["verify_ok"] = verify.returncode == 0
    row["difference"] = compare(out, reference) if out.exists() else "no cache"
    row["identical"] = row["difference"] is None
    row["good"] = row["both_exit_0"] and row["verify_ok"] and row["identical"]
    return row


def _commit() -> str:
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()  # fmt: skip
        return head.stdout.strip() + ("+changes" if dirty else "")
    except OSError:
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "cache_jobs/tiny_cpu.yaml"), help="cache config")
    parser.add_argument("--runs", type=int, default=20, help="runs per mode")
    parser.add_argument("--modes", default="split", help="comma-separated: split, identical")
    parser.add_argument("--wide-corpus", type=int, default=0, metavar="K",
                        help="use K text files instead of the config's corpus (0: the config's)")  # fmt: skip
    parser.add_argument("--label", help="names the results file (default: the checkout's commit)")
    parser.add_argument("--out", default="benchmarks/results/parallel_build")
    args = parser.parse_args()
    modes = args.modes.split(",")
    unknown = sorted(set(modes) - {"split", "identical"})
    if unknown:
        parser.error(f"--modes: unknown {unknown}; use split and/or identical")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="parallel-build-") as scratch:
        scratch = Path(scratch)
        overrides = []
        if args.wide_corpus:
            corpus = scratch / "corpus"
            corpus.mkdir()
            text = (ROOT / "lrc_offline/data/tiny.txt").read_text("utf-8")
            for f in range(args.wide_corpus):
                (corpus / f"f{f}.txt").write_text((text + "\n\n") * 20, "utf-8")
            overrides.append(f"corpus={corpus}")
        subprocess.run(_build_cmd(args.config, scratch / "one", overrides), env=_env(), check=True, capture_output=True)
        reference = _files(scratch / "one")
        corpus_name = f"{args.wide_corpus} text files" if args.wide_corpus else "config's"
        results = {"config": args.config, "corpus": corpus_name, "code": _commit(), "runs_per_mode": args.runs,
                   "modes": {}}  # fmt: skip
        for mode in modes:
            rows = []
            for r in range(args.runs):
                row = run_once(args.config, scratch / f"{mode}-{r}", overrides, mode, reference)
                rows.append(row)
                print(f"{mode} run {r}: exit {row['exit_codes']}, verify {'ok' if row['verify_ok'] else 'FAILED'}, "
                      f"{'identical' if row['identical'] else row['difference']} ({row['seconds']:.0f} s)"
                      + (f"; {row['errors'][0]}" if "errors" in row else ""), flush=True)  # fmt: skip
            results["modes"][mode] = {
                "both_exit_0": sum(r["both_exit_0"] for r in rows),
                "verified_and_identical": sum(r["verify_ok"] and r["identical"] for r in rows),
                "good": sum(r["good"] for r in rows),
                "runs": rows,
            }
    name = f"{'wide' + str(args.wide_corpus) if args.wide_corpus else 'config_corpus'}_{args.label or results['code']}"
    (out / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\ncode {results['code']}, corpus: {results['corpus']}\n")
    print("| mode | runs | both workers exit 0 | verified, byte-identical to one worker |\n|---|---|---|---|")
    for mode, summary in results["modes"].items():
        print(f"| {mode} | {args.runs} | {summary['both_exit_0']} | {summary['verified_and_identical']} |")


if __name__ == "__main__":
    main()
