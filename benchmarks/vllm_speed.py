"""Cache-build speed of the two teacher backends side by side, in one process, on the same batches.

For each logit mode, one vLLM engine is started (its start-up is timed apart), then every batch is
captured by the hf backend (`capture_batch`: hooked `transformers` forward, then the signal) and by the
vLLM backend (`VLLMCapture.capture`), alternating, so a machine that slows down mid-run slows both; the
first pass over the batches is warm-up. Both produce the very cache fields, and the script checks that
they agree. vLLM runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), as the hf backend does.
Needs the vLLM environment (./setup_vllm.sh):

    VLLM_ENABLE_V1_MULTIPROCESSING=0 .venv-vllm/bin/python benchmarks/vllm_speed.py --teacher smollm2-135m \
        --num-sequences 32 --seq-len 256 --batch-size 8 --topk 64 --out benchmarks/results/vllm_speed
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import torch  # noqa: E402

from lrc_offline.capture.build import capture_batch  # noqa: E402
from lrc_offline.data import load_documents, pack_documents, split_heldout  # noqa: E402
from lrc_offline.capture.vllm_backend import open_vllm, vllm_version  # noqa: E402
from lrc_offline.config import BuildRunConfig, CacheConfig  # noqa: E402
from lrc_offline.teacher.load import load_teacher  # noqa: E402


def _agreement(mode: str, hf: dict, vllm: dict) -> dict[str, float]:
    if mode == "topk":
        same = hf["topk_ids"] == vllm["topk_ids"]
        diff = (hf["topk_logprobs"] - vllm["topk_logprobs"]).abs().max()
        return {"max_logprob_diff": float(diff), "id_agreement": float(same.float().mean())}
    return {"max_hidden_diff": float((hf["hidden"] - vllm["hidden"]).abs().max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--corpus", default="wiki-en")
    parser.add_argument("--num-sequences", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--topk", type=int, default=64)
    parser.add_argument("--modes", nargs="+", default=["topk", "hidden"], choices=["topk", "hidden"])
    parser.add_argument("--rounds", type=int, default=1, help="timed passes over the batches after one warm-up pass")
    parser.add_argument("--memory", type=float, default=0.2, help="cache.run.vllm_gpu_memory_utilization")
    parser.add_argument("--out", default="benchmarks/results/vllm_speed")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    teacher = load_teacher(args.teacher, dtype="float32", device="cpu")
    base = CacheConfig(teacher=args.teacher, corpus=args.corpus, seq_len=args.seq_len, max_sequences=args.num_sequences,
                       topk=args.topk, activation_mode="none",
                       run=BuildRunConfig(batch_size=args.batch_size, compute_dtype="float32", device="cpu",
                                          vllm_gpu_memory_utilization=args.memory))  # fmt: skip
    train_docs, _ = split_heldout(load_documents(args.corpus), base.heldout_docs)
    packed = pack_documents(train_docs, teacher.tokenizer, args.seq_len, args.num_sequences)
    batches = [(lo, min(lo + args.batch_size, packed.num_sequences))
               for lo in range(0, packed.num_sequences, args.batch_size)]  # fmt: skip

    results = {}
    for mode in args.modes:
        cfg_hf = dataclasses.replace(base, logit_mode=mode, run=dataclasses.replace(base.run, backend="hf"))
        cfg_vllm = dataclasses.replace(cfg_hf, run=dataclasses.replace(base.run, backend="vllm"))
        start = time.perf_counter()
        with open_vllm(cfg_vllm, teacher) as engine:
            startup_s = time.perf_counter() - start
            seconds = {"hf": 0.0, "vllm": 0.0}
            agreement: dict[str, float] = {}
            for round_index in range(args.rounds + 1):
                for lo, hi in batches:
                    ids, positions, indices = packed.input_ids[lo:hi], packed.position_ids[lo:hi], list(range(lo, hi))
                    t0 = time.perf_counter()
                    hf, _ = capture_batch(teacher, cfg_hf, ids, positions, indices, layers=[])
                    t1 = time.perf_counter()
                    vllm, _ = engine.capture(ids, positions, indices)
                    t2 = time.perf_counter()
                    if round_index > 0:
                        seconds["hf"] += t1 - t0
                        seconds["vllm"] += t2 - t1
                    for key, value in _agreement(mode, hf, vllm).items():
                        agreement[key] = (min if key == "id_agreement" else max)(agreement.get(key, value), value)
                print(f"{mode} round {round_index}: hf {t1 - t0:.2f}s vllm {t2 - t1:.2f}s (last batch)", flush=True)
        tokens = packed.num_sequences * args.seq_len * args.rounds
        tps = {name: tokens / s for name, s in seconds.items()}
        results[mode] = {"tokens_per_s": tps, "ratio_vllm_vs_hf": tps["vllm"] / tps["hf"],
                         "vllm_startup_s": startup_s, "seconds": seconds, "agreement": agreement}  # fmt: skip

    result = {
        "setup": vars(args) | {"threads": torch.get_num_threads(), "device": "cpu", "dtype": "float32",
                               "vllm": vllm_version(), "transformers": __import__("transformers").__version__},
        "modes": results,
    }  # fmt: skip
    (out / "vllm_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.38
    for offset, (backend, color) in enumerate((("hf", "tab:gray"), ("vllm", "tab:blue"))):
        ax.bar([i + (offset - 0.5) * width for i in range(len(results))],
               [results[m]["tokens_per_s"][backend] for m in results], width, label=backend, color=color)  # fmt: skip
    ax.set_xticks(range(len(results)), [f"{m}" + (f" (k={args.topk})" if m == "topk" else "") for m in results])
    ax.set_ylabel("teacher tokens/s (capture)")
    ax.set_title(f"{args.teacher}, batch {args.batch_size}x{args.seq_len}, CPU fp32")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "vllm_speed.png", dpi=120)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
