"""Training speed side by side, in one process, on the same batches: LRC from the cache, the online
reference (teacher forward in the step), and plain training of the exported student shape; plus the
cache reader's decode rate.

The three step kinds are interleaved round by round (offline, online, plain, offline, ...), so a
machine that slows down or speeds up mid-run affects all three alike; the first round is warm-up.

    python benchmarks/speed_train.py --teacher smollm2-135m --hidden-size 288 --batch-size 8 --seq-len 256 \
        --rounds 4 --out benchmarks/results/speed_train
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lrc_offline.cache import CacheReader, verify_cache
from lrc_offline.capture.build import build_cache
from lrc_offline.config import CLONE_TERMS, BuildRunConfig, CacheConfig, LossConfig, OptimConfig
from lrc_offline.student.export import student_config
from lrc_offline.student.lrc import LRCStudent
from lrc_offline.teacher.hooks import capture_teacher
from lrc_offline.teacher.load import load_teacher
from lrc_offline.training.objective import lrc_loss
from lrc_offline.training.optim import build_optimizer
from lrc_offline.training.reader import CacheDataset, iter_batches


def _step(model_params, optimizer, loss: torch.Tensor) -> None:
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model_params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--corpus", default="wiki-en")
    parser.add_argument("--hidden-size", type=int, default=288)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--act-positions", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=4, help="timed rounds after one warm-up round")
    parser.add_argument("--out", default="benchmarks/results/speed_train")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    teacher = load_teacher(args.teacher)
    cache_cfg = CacheConfig(teacher=args.teacher, corpus=args.corpus, seq_len=args.seq_len,
                            max_sequences=args.batch_size * (args.rounds + 1), sequences_per_shard=args.batch_size,
                            act_positions=args.act_positions, run=BuildRunConfig(batch_size=args.batch_size))  # fmt: skip
    build_cache(cache_cfg, out / "cache", teacher=teacher)
    assert verify_cache(out / "cache").ok

    # reader decode rate: every shard read whole, as the trainer reads them
    reader = CacheReader(out / "cache")
    start = time.perf_counter()
    for index in reader.complete_shards():
        reader.read_shard(index)
    decode_s = time.perf_counter() - start
    decode_tps = reader.manifest.num_sequences * args.seq_len / decode_s

    loss_cfg = LossConfig()
    optim_cfg = OptimConfig(lr=1e-3, warmup_steps=0)
    offline = LRCStudent(teacher.model, args.hidden_size, seed=0)
    online = LRCStudent(teacher.model, args.hidden_size, seed=0)
    opt_off, _ = build_optimizer(offline, optim_cfg, 100)
    opt_on, _ = build_optimizer(online, optim_cfg, 100)
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_config(student_config(offline))
    plain.train()
    opt_plain = torch.optim.AdamW(plain.parameters(), lr=1e-3)

    times = {"offline": [], "online": [], "plain": []}
    batches = iter_batches(CacheDataset(out / "cache", seed=0, num_epochs=1), args.batch_size)
    for round_index in range(args.rounds + 1):
        cached = next(batches)
        # offline: everything the trainer does per step, including moving the cache batch
        t0 = time.perf_counter()
        batch = {k: v for k, v in cached.items() if k != "sequence_index"}
        loss, _ = lrc_loss(offline, batch, loss_cfg)
        _step(offline.parameters(), opt_off, loss)
        t1 = time.perf_counter()
        # online: the teacher forward with hooks replaces the cache, on the same sequences and positions
        ids = cached["input_ids"].long()
        captured = capture_teacher(teacher.model, ids, positions_BP=cached["act_positions"], terms=CLONE_TERMS)
        online_batch = {"input_ids": ids, "teacher_logits": captured.logits_BTV, "act_positions": cached["act_positions"],
                        **{f"act_{m}": captured.acts[m].transpose(0, 1) for m in CLONE_TERMS}}  # fmt: skip
        loss, _ = lrc_loss(online, online_batch, loss_cfg)
        _step(online.parameters(), opt_on, loss)
        t2 = time.perf_counter()
        # plain: next-token CE training of a model of the exported student's shape
        loss = plain(input_ids=ids, labels=ids).loss
        _step(plain.parameters(), opt_plain, loss)
        t3 = time.perf_counter()
        if round_index > 0:
            times["offline"].append(t1 - t0)
            times["online"].append(t2 - t1)
            times["plain"].append(t3 - t2)
        print(f"round {round_index}: offline {t1 - t0:.2f}s online {t2 - t1:.2f}s plain {t3 - t2:.2f}s", flush=True)

    tokens = args.batch_size * args.seq_len
    tps = {k: tokens * len(v) / sum(v) for k, v in times.items()}
    result = {
        "setup": vars(args) | {"threads": torch.get_num_threads(), "device": "cpu", "dtype": "float32"},
        "tokens_per_s": tps,
        "ratio_offline_vs_online": tps["offline"] / tps["online"],
        "ratio_offline_vs_plain": tps["offline"] / tps["plain"],
        "reader_decode_tokens_per_s": decode_tps,
        "ratio_reader_vs_offline_consumption": decode_tps / tps["offline"],
        "step_seconds": times,
    }
    (out / "speed_train.json").write_text(json.dumps(result, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = ["online", "offline", "plain"]
    ax.bar(["LRC online\n(teacher in step)", "LRC from cache", "plain training\n(student shape)"],
           [tps[n] for n in names], color=["tab:red", "tab:blue", "tab:gray"])  # fmt: skip
    ax.set_ylabel("training tokens/s")
    ax.set_title(f"{args.teacher}, d_S={args.hidden_size}, batch {args.batch_size}x{args.seq_len}, CPU fp32")
    fig.tight_layout()
    fig.savefig(out / "speed_train.png", dpi=120)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
