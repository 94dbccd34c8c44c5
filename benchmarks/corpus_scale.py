"""Stage 1 at corpus scale: a build worker's memory and start-up against the corpus size, the peak
memory against sequences_per_shard, and a build's speed against a plain teacher forward.

    python benchmarks/corpus_scale.py memory --out /tmp/corpus_scale      # >= 200 MB in 24 files, and 10x smaller
    python benchmarks/corpus_scale.py shard-size --out /tmp/corpus_scale  # sequences_per_shard 32 vs 512
    python benchmarks/corpus_scale.py speed --out /tmp/corpus_scale       # SmolLM2-135M, 32 x 256 tokens
    python benchmarks/corpus_scale.py signals --out /tmp/corpus_scale     # top-k math alone, 8 x 256 x 49152

`memory` generates synthetic gzip JSON Lines corpora (never committed), tokenises each once into the
cache's index (`lrc-cache tokenize`, timed apart: the tokenise phase of the Slurm chain), then starts
build worker 0 of 64 (tiny random teacher, seq_len 256) and records its peak RSS (sampled every 20 ms)
and its time until shard 0's completion record appears. `speed` runs, in one process and alternating,
a plain `model(input_ids)` forward and `build_cache` over the same sequences (start-up included:
opening the index, fingerprinting the teacher, creating the cache). `signals` times the build's teacher-signal
math alone (`logit_fields`, default top-64) against the plain log_softmax path it replaced, alternating, in
one process, on random fp32 logits of SmolLM2's shape (8 sequences x 256 tokens x 49152).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the of and to in is was for on with as by at from that this it be are an or which his her their "
         "city river year war king music film school team water light system game north south").split()  # fmt: skip


def make_corpus(folder: Path, megabytes: float, num_files: int, seed: int = 0) -> int:
    """gzip JSON Lines files holding about `megabytes` MB compressed in all; returns the bytes written."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    target = megabytes * 1e6 / num_files
    for f in range(num_files):
        path = folder / f"part-{f:03d}.jsonl.gz"
        if path.exists():
            continue
        tmp = path.with_name(".partial-" + path.name)
        with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1) as out:
            while raw.tell() < target:
                lines = []
                for _ in range(200):
                    text = " ".join(rng.choice(WORDS) + str(rng.randrange(100000)) for _ in range(rng.randrange(50, 400)))
                    lines.append(json.dumps({"id": rng.randrange(1 << 30), "text": text}))
                out.write(("\n".join(lines) + "\n").encode())
        tmp.replace(path)
    return sum(p.stat().st_size for p in folder.glob("*.jsonl.gz"))


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "lrc_offline.cli.cache", *args]


def watch(cmd: list[str], done: Path | None = None) -> dict[str, float]:
    """Run `cmd`; its peak RSS (MiB) and seconds until `done` exists (or it exits); then stop it."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ps, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            peak = max(peak, sum(p.memory_info().rss for p in [ps, *ps.children(recursive=True)]))
        except psutil.NoSuchProcess:
            break
        if done is not None and done.exists():
            proc.kill()
            break
        time.sleep(0.02)
    seconds = time.perf_counter() - start
    proc.wait()
    if done is not None and not done.exists():
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.read().decode()[-2000:]}")
    return {"peak_rss_mib": peak / 2**20, "seconds": seconds}


def bench_memory(args) -> dict:
    out, results = Path(args.out), {}
    for name, mb in (("large", args.megabytes), ("small", args.megabytes / 10)):
        corpus = out / f"corpus-{name}"
        size = make_corpus(corpus, mb, args.files)
        cache = out / f"cache-{name}"
        config = ["teacher=tiny-random:llama", f"corpus={corpus}", "seq_len=256", "sequences_per_shard=64"]
        tok = watch(_cli("tokenize", "--out", str(cache), *config)) if not (cache / "index").exists() else None
        for p in (cache / "shards").glob("*"):
            subprocess.run(["rm", "-rf", str(p)], check=True)
        build = watch(_cli("build", "--out", str(cache), "--no-progress", "--worker-index", "0", "--num-workers", "64",
                           *config), done=cache / "shards" / "shard-00000.done.json")  # fmt: skip
        index_bytes = sum(p.stat().st_size for p in (cache / "index").glob("part-*.tokens"))
        results[name] = {"compressed_mb": size / 1e6, "files": args.files, "index_tokens": index_bytes // 4,
                         "tokenize": tok, "worker0_first_shard": build}  # fmt: skip
        print(name, json.dumps(results[name]), flush=True)
    large, small = results["large"]["worker0_first_shard"], results["small"]["worker0_first_shard"]
    results["ratio_rss_large_vs_small"] = large["peak_rss_mib"] / small["peak_rss_mib"]
    results["ratio_time_large_vs_small"] = large["seconds"] / small["seconds"]
    return results


def bench_shard_size(args) -> dict:
    out, results = Path(args.out), {}
    corpus = out / "corpus-small"
    make_corpus(corpus, args.megabytes / 10, args.files)
    for per_shard in (32, 512):
        cache = out / f"cache-sps{per_shard}"
        subprocess.run(["rm", "-rf", str(cache)], check=True)
        config = ["teacher=tiny-random:llama", f"corpus={corpus}", "seq_len=256", f"sequences_per_shard={per_shard}",
                  "act_positions=64", "act_dtype=float32"]  # fmt: skip
        watch(_cli("tokenize", "--out", str(cache), *config))
        results[per_shard] = watch(_cli("build", "--out", str(cache), "--no-progress", "--worker-index", "0", *config),
                                   done=cache / "shards" / "shard-00000.done.json")  # fmt: skip
        print(per_shard, json.dumps(results[per_shard]), flush=True)
    results["ratio_rss_512_vs_32"] = results[512]["peak_rss_mib"] / results[32]["peak_rss_mib"]
    return results


def bench_speed(args) -> dict:
    import shutil

    import torch

    from lrc_offline.capture.build import build_cache, tokenize_corpus
    from lrc_offline.config import BuildRunConfig, CacheConfig
    from lrc_offline.data.index import open_index
    from lrc_offline.teacher.load import load_teacher

    torch.manual_seed(0)
    teacher = load_teacher(args.teacher)
    cfg = CacheConfig(teacher=args.teacher, corpus=args.corpus, seq_len=args.seq_len, max_sequences=args.sequences,
                      sequences_per_shard=args.sequences, run=BuildRunConfig(batch_size=args.batch_size))  # fmt: skip
    out = Path(args.out) / "speed-cache"
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    index = tokenize_corpus(cfg, out, teacher.tokenizer)
    tokenize_s = time.perf_counter() - start
    ids, _ = open_index(index, cfg.seq_len, cfg.heldout_docs, cfg.max_sequences).sequences(0, args.sequences)
    plain, build = [], []
    for _ in range(args.rounds):
        start = time.perf_counter()
        with torch.no_grad():
            for lo in range(0, args.sequences, args.batch_size):
                teacher.model(ids[lo : lo + args.batch_size].long(), use_cache=False)  # as the build runs it
        plain.append(time.perf_counter() - start)
        shutil.rmtree(out / "shards", ignore_errors=True)
        (out / "manifest.json").unlink(missing_ok=True)
        start = time.perf_counter()
        build_cache(cfg, out, progress=False, teacher=teacher)
        build.append(time.perf_counter() - start)
        print(f"plain {plain[-1]:.1f}s build {build[-1]:.1f}s", flush=True)
    return {"tokens": args.sequences * args.seq_len, "plain_s": plain, "build_s": build, "tokenize_once_s": tokenize_s,
            "ratio_build_vs_plain": min(plain) / min(build)}  # fmt: skip


def bench_signals(args) -> dict:
    import torch

    from lrc_offline.capture.signals import entropy, logit_fields, logprobs_at, topk_signal
    from lrc_offline.config import CacheConfig

    cfg = CacheConfig()
    logits_BTV = torch.randn(args.batch_size, args.seq_len, args.vocab, generator=torch.Generator().manual_seed(0)) * 3

    def plain() -> None:  # what logit_fields computed before `topk_entropy`
        for logits_TV in logits_BTV:
            logprobs = logprobs_at(logits_TV, cfg.temperature)
            ids, values, tail = topk_signal(logprobs, cfg.topk)
            entropy(logprobs).sum()

    def fused() -> None:
        logit_fields(cfg, logits_BTV, list(range(args.batch_size)))

    times: dict[str, list[float]] = {"plain_s": [], "fused_s": []}
    for _ in range(args.rounds):
        for name, fn in (("plain_s", plain), ("fused_s", fused)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
        print(f"plain {times['plain_s'][-1]:.3f}s fused {times['fused_s'][-1]:.3f}s", flush=True)
    return {"rows": args.batch_size * args.seq_len, "vocab": args.vocab, "topk": cfg.topk,
            "threads": torch.get_num_threads(), **times,
            "ratio_plain_vs_fused": min(times["plain_s"]) / min(times["fused_s"])}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["memory", "shard-size", "speed", "signals"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--megabytes", type=float, default=200.0, help="compressed size of the large corpus")
    parser.add_argument("--files", type=int, default=24)
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--corpus", default="wiki-en")
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=49152, help="signals: vocabulary of the random logits")
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    benches = {"memory": bench_memory, "shard-size": bench_shard_size, "speed": bench_speed, "signals": bench_signals}
    result = benches[args.what](args)
    (Path(args.out) / f"corpus_scale_{args.what}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
