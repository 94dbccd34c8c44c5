"""Cache reader throughput from S3 (moto's S3 server, a separate process on localhost) against the local
disk, side by side on the same cache, with the requests and bytes each shard read costs; and, for scale,
the tokens per second the trainer consumes from the same cache at batch 8 x seq_len.

Each round reads every complete shard of the cache once from the local directory and once from the
bucket (a fresh `CacheReader` each, so nothing is cached between them), alternating which goes first;
the first round is warm-up. Requests are counted from the server's request log, bytes from the records.

    python benchmarks/object_storage.py --cache runs/demo/cache --rounds 3 --train-steps 3 \\
        --out benchmarks/results/object_storage

Writes `<out>/results.json` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3

from lrc_offline.cache import CacheReader


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(log_path: Path) -> tuple[subprocess.Popen, str]:
    """moto's S3 server in its own process (so it does not share this process's interpreter lock)."""
    port = _free_port()
    log = open(log_path, "w")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server, endpoint
        except OSError:
            time.sleep(0.2)
    server.kill()
    raise RuntimeError("moto server did not start")


def upload(cache: Path, bucket: str) -> None:
    client = boto3.client("s3")
    client.create_bucket(Bucket=bucket)
    for path in sorted(cache.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"cache/{path.relative_to(cache).as_posix()}")


def count_requests(log_path: Path) -> int:
    return sum(1 for line in log_path.read_text(errors="replace").splitlines() if '"GET /' in line or '"HEAD /' in line)


def read_all(root: str) -> tuple[float, int]:
    """Seconds to read every complete shard (decoded, checksummed) and the tokens read."""
    start = time.perf_counter()
    reader = CacheReader(root)
    tokens = 0
    for index in reader.complete_shards():
        data = reader.read_shard(index)
        tokens += data["input_ids"].numel()
    return time.perf_counter() - start, tokens


def trainer_tokens_per_s(cache: Path, steps: int, hidden_size: int, batch_size: int) -> float:
    """The trainer's consumption: `lrc-train train` on the local cache, mean tokens/s of steps after the first."""
    from lrc_offline.config import StudentConfig, TrainConfig, TrainJobConfig
    from lrc_offline.training.metrics import read_metrics
    from lrc_offline.training.trainer import train_from_cache

    with tempfile.TemporaryDirectory() as run:
        cfg = TrainJobConfig(student=StudentConfig(hidden_size=hidden_size, init="random"),
                             train=TrainConfig(steps=steps, batch_size=batch_size, log_every=1, checkpoint_every=0))  # fmt: skip
        train_from_cache(cfg, cache, Path(run) / "r", progress=False)
        records = read_metrics(Path(run) / "r" / "metrics.jsonl")
    rates = [r["tokens_per_s"] for r in records[1:]] or [records[-1]["tokens_per_s"]]
    return sum(rates) / len(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", required=True, help="a local cache directory (e.g. the demo's runs/demo/cache)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the first is warm-up")
    parser.add_argument("--train-steps", type=int, default=3, help="trainer steps to time (0: skip)")
    parser.add_argument("--hidden-size", type=int, default=288, help="student width for the trainer row")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default="benchmarks/results/object_storage")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    log_path = out / "server.log"
    server, endpoint = start_server(log_path)
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    try:
        upload(Path(args.cache), "bench")
        url = "s3://bench/cache"
        reader = CacheReader(args.cache)
        shards = reader.complete_shards()
        records = [reader.shard_record(i) for i in shards]
        results = {"cache": str(args.cache), "shards": len(shards), "rounds": []}
        for r in range(args.rounds):
            row = {}
            order = [("local", str(args.cache)), ("s3", url)]
            for name, root in order if r % 2 == 0 else order[::-1]:
                before = count_requests(log_path)
                seconds, tokens = read_all(root)
                row[name] = {"seconds": seconds, "tokens": tokens, "requests": count_requests(log_path) - before}
            results["rounds"].append(row)
            print(f"round {r}: " + ", ".join(f"{k} {v['tokens'] / v['seconds']:.0f} tok/s" for k, v in row.items()), flush=True)
    finally:
        server.kill()
    measured = results["rounds"][1:] or results["rounds"]
    for name in ("local", "s3"):
        seconds = sum(row[name]["seconds"] for row in measured)
        tokens = sum(row[name]["tokens"] for row in measured)
        results[name] = {"tokens_per_s": tokens / seconds,
                         "mb_per_s": sum(sum(f["bytes"] for f in rec["files"].values()) for rec in records)
                         * len(measured) / seconds / 1e6}  # fmt: skip
    results["requests_per_shard"] = measured[-1]["s3"]["requests"] / len(shards)
    results["objects_per_shard"] = sum(len(rec["files"]) for rec in records) / len(shards) + 1  # + its record
    results["mb_per_shard"] = sum(f["bytes"] for rec in records for f in rec["files"].values()) / len(shards) / 1e6
    if args.train_steps:
        results["trainer_tokens_per_s"] = trainer_tokens_per_s(Path(args.cache), args.train_steps, args.hidden_size, args.batch_size)
        results["s3_over_trainer"] = results["s3"]["tokens_per_s"] / results["trainer_tokens_per_s"]
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n| reader | tokens/s | MB/s |\n|---|---|---|")
    for name in ("local", "s3"):
        print(f"| {name} | {results[name]['tokens_per_s']:,.0f} | {results[name]['mb_per_s']:.1f} |")
    print(f"\ns3/local {results['s3']['tokens_per_s'] / results['local']['tokens_per_s']:.2f}; per shard: "
          f"{results['mb_per_shard']:.1f} MB in {results['objects_per_shard']:.0f} objects, "
          f"{results['requests_per_shard']:.1f} requests (listing and records included)")  # fmt: skip
    if "trainer_tokens_per_s" in results:
        print(f"trainer at batch {args.batch_size}: {results['trainer_tokens_per_s']:.0f} tokens/s; "
              f"S3 reader / trainer = {results['s3_over_trainer']:.1f}x")


if __name__ == "__main__":
    main()
