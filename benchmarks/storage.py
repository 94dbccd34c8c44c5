"""Bytes per token of every logit and activation mode, measured on a real teacher and extrapolated.

Builds (or reuses) one small cache per mode with the real teacher, reads each field's measured
compression ratio, and reports bytes per token against two naive baselines: full fp16 logits and all
seven clone targets stored at every position. The same per-field ratios, applied to the geometry of
Llama-3.2-3B and Qwen2.5-3B, give their figures (compression of activations depends on the teacher, so
those are estimates; ids and log-probs compress alike across teachers).

    python benchmarks/storage.py --out benchmarks/results/storage
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lrc_offline.cache import inspect_cache
from lrc_offline.capture.build import build_cache
from lrc_offline.config import CacheConfig
from lrc_offline.teacher.load import load_teacher

MODES = [("topk", "residual"), ("sampled", "none"), ("hidden", "none"), ("topk", "targets")]
# name: (hidden, layers, heads, kv_heads, head_dim, ffn, vocab)
GEOMETRIES = {
    "SmolLM2-135M": (576, 30, 9, 3, 64, 1536, 49152),
    "Llama-3.2-3B": (3072, 28, 24, 8, 128, 8192, 128256),
    "Qwen2.5-3B": (2048, 36, 16, 2, 128, 11008, 151936),
}


def _widths(geometry) -> dict[str, int]:
    d, _, heads, kv, head_dim, ffn, _ = geometry
    return {"act_q": heads * head_dim, "act_k": kv * head_dim, "act_v": kv * head_dim, "act_o": d,
            "act_gate": ffn, "act_up": ffn, "act_down": d, "act_input": d, "act_attn": d, "hidden": d}  # fmt: skip


def extrapolate(fields: dict, geometry, cfg: CacheConfig) -> dict[str, float]:
    """Bytes per token of each stored field for `geometry`, with the measured compression ratios."""
    d, layers, *_ , vocab = geometry
    widths = _widths(geometry)
    fraction = min(cfg.act_positions, cfg.seq_len) / cfg.seq_len
    out = {}
    for name, field in fields.items():
        itemsize = {"int32": 4, "uint16": 2, "float32": 4, "float16": 2, "bfloat16": 2}[field["dtype"]]
        if name in widths and name != "hidden":
            logical = layers * fraction * widths[name] * itemsize
        elif name == "hidden":
            logical = d * itemsize
        else:  # per-token ids, log-probs, counts, positions: geometry-independent shapes
            logical = field["logical_bytes_per_token"]
        out[name] = logical / field["compression_ratio"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--corpus", default="wiki-en")
    parser.add_argument("--heldout-docs", type=int, default=200)
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--act-positions", type=int, default=16)
    parser.add_argument("--out", default="benchmarks/results/storage")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher = load_teacher(args.teacher)
    measured, per_field = {}, {}
    base = dict(teacher=args.teacher, corpus=args.corpus, heldout_docs=args.heldout_docs, seq_len=args.seq_len,
                max_sequences=args.sequences,
                sequences_per_shard=args.sequences, topk=64, num_draws=64, logprob_dtype="float16",
                act_positions=args.act_positions, act_dtype="bfloat16")  # fmt: skip
    for logit_mode, act_mode in MODES:
        cfg = CacheConfig(logit_mode=logit_mode, activation_mode=act_mode, **base)
        build_cache(cfg, out / f"cache-{logit_mode}-{act_mode}", teacher=teacher)
        info = inspect_cache(out / f"cache-{logit_mode}-{act_mode}")
        for name, field in info["fields"].items():
            field["logical_bytes_per_token"] = field["logical_bytes"] / info["tokens"]
            per_field[name] = field
        measured[f"{logit_mode}+{act_mode}"] = info["bytes_per_token"]
        print(f"{logit_mode}+{act_mode}: {info['bytes_per_token']:.1f} B/token", flush=True)

    cfg = CacheConfig(**base)
    groups = {
        "logits: topk k=64 (fp16 log-probs)": ["topk_ids", "topk_logprobs"],
        "logits: sampled N=64": ["sampled_ids", "sampled_counts"],
        "logits: hidden (bf16)": ["hidden"],
        f"activations: residual, {args.act_positions}/{args.seq_len} positions": ["act_input", "act_attn", "act_positions"],
        f"activations: targets, {args.act_positions}/{args.seq_len} positions": [
            "act_q", "act_k", "act_v", "act_o", "act_gate", "act_up", "act_down", "act_positions"],
        "tokens (input_ids + position_ids)": ["input_ids", "position_ids"],
    }  # fmt: skip
    table = {}
    for model, geometry in GEOMETRIES.items():
        fields = extrapolate(per_field, geometry, cfg)
        row = {group: sum(fields[f] for f in names) for group, names in groups.items()}
        d, layers, heads, kv, head_dim, ffn, vocab = geometry
        row["baseline: full fp16 logits"] = vocab * 2
        row["baseline: 7 targets at every position (bf16, raw)"] = layers * 2 * (heads * head_dim + 2 * kv * head_dim + 2 * d + 2 * ffn)
        table[model] = row
    result = {"setup": vars(args), "measured_total_bytes_per_token": measured, "fields": per_field, "table": table}
    (out / "storage.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["| bytes per token | " + " | ".join(GEOMETRIES) + " |", "|---" * (len(GEOMETRIES) + 1) + "|"]
    for group in table["SmolLM2-135M"]:
        lines.append(f"| {group} | " + " | ".join(f"{table[m][group]:,.0f}" for m in GEOMETRIES) + " |")
    (out / "storage.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    groups_all = list(table["SmolLM2-135M"])
    width = 0.8 / len(GEOMETRIES)
    for i, model in enumerate(GEOMETRIES):
        ax.barh([y + i * width for y in range(len(groups_all))], [table[model][g] for g in groups_all], width, label=model)
    ax.set_yticks([y + width for y in range(len(groups_all))], groups_all, fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("bytes per token (log scale)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "storage.png", dpi=120)


if __name__ == "__main__":
    main()
