"""Bytes per token of every logit and activation mode and storage lever, measured on a real teacher and extrapolated.

Builds (or reuses) one small cache per mode, and per storage lever (int4 activations and log8 log-probs;
float8 activations), with the real teacher, reads each stored field's measured compression ratio, and
reports bytes per token against two naive baselines: full fp16 logits and all seven clone targets stored
at every position. The same per-field ratios, applied to the fields a cache of Llama-3.2-3B and Qwen2.5-3B
geometry holds, give their figures (compression of activations depends on the teacher, so those are
estimates; ids and log-probs compress alike across teachers). Whole-cache rows at the production shape
(2048-token sequences) show which combinations reach the 500 B/token budget of a paper-size run. The
lossy activation codecs' relative error per stored row is reported at attention-sink positions (massive
activations) and elsewhere, against the bf16 cache of the same sequences and positions. The per-field
ratios are measured and extrapolated by `lrc_offline.cache.plan` (what `lrc-cache plan` computes); the ones of
the default run are the table it carries, `SMOLLM2_RATIOS`.

    python benchmarks/storage.py --out benchmarks/results/storage
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lrc_offline.cache import CacheReader, TeacherGeometry, inspect_cache
from lrc_offline.cache.plan import CompressionRatios, measure_ratios, plan_cache, raw_bytes
from lrc_offline.capture.build import build_cache
from lrc_offline.config import CacheConfig
from lrc_offline.teacher.load import load_teacher

BUILDS = {
    "topk+residual": dict(logit_mode="topk", activation_mode="residual"),
    "sampled+none": dict(logit_mode="sampled", activation_mode="none"),
    "hidden+none": dict(logit_mode="hidden", activation_mode="none"),
    "topk+targets": dict(logit_mode="topk", activation_mode="targets"),
    "topk+residual, log8 + int4": dict(logit_mode="topk", activation_mode="residual", logprob_dtype="log8",
                                       act_dtype="int4"),
    "topk+residual, float8": dict(logit_mode="topk", activation_mode="residual", act_dtype="float8"),
    "topk+residual, 25%": dict(logit_mode="topk", activation_mode="residual", act_fraction=0.25),
    "topk+residual, log8 + int4, 25%": dict(logit_mode="topk", activation_mode="residual", logprob_dtype="log8",
                                            act_dtype="int4", act_fraction=0.25),
    "topk+residual, int4g": dict(logit_mode="topk", activation_mode="residual", act_dtype="int4g"),
    "topk+residual, int4, layers 25%": dict(logit_mode="topk", activation_mode="residual", act_dtype="int4",
                                            act_layer_fraction=0.25),
    "topk+residual, int4g, layers 25%": dict(logit_mode="topk", activation_mode="residual", act_dtype="int4g",
                                             act_layer_fraction=0.25),
    "topk+residual, log8 + int4, layers 25%": dict(logit_mode="topk", activation_mode="residual",
                                                   logprob_dtype="log8", act_dtype="int4", act_layer_fraction=0.25),
}  # fmt: skip
"""Caches built on the measured teacher (CacheConfig overrides); every other setting is shared."""
# name: (hidden, layers, heads, kv_heads, head_dim, ffn, vocab)
GEOMETRIES = {
    "SmolLM2-135M": (576, 30, 9, 3, 64, 1536, 49152),
    "Llama-3.2-3B": (3072, 28, 24, 8, 128, 8192, 128256),
    "Qwen2.5-3B": (2048, 36, 16, 2, 128, 11008, 151936),
    "Qwen2.5-7B": (3584, 28, 28, 4, 128, 18944, 152064),
}
BUDGET = 500
"""Bytes per token a paper-size run can afford in all (20B tokens in 10 TB)."""


def _geometry(dims) -> TeacherGeometry:
    d, layers, heads, kv, head_dim, ffn, vocab = dims
    return TeacherGeometry(hidden_size=d, num_layers=layers, num_heads=heads, num_kv_heads=kv, head_dim=head_dim,
                           intermediate_size=ffn, vocab_size=vocab)  # fmt: skip


def extrapolate(ratios: CompressionRatios, dims, cfg: CacheConfig, names: list[str] | None = None) -> float:
    """Bytes per token of the fields `names` (None: all) of a cache built with `cfg` for a teacher of `dims`,
    as `lrc-cache plan` computes them (`lrc_offline.cache.plan`): each field's bytes before compression over
    its measured ratio, activation fields over the rows this geometry keeps (Zarr metadata left out)."""
    plan = plan_cache(cfg, _geometry(dims), cfg.seq_len, [ratios])
    missing = [f.name for f in plan.fields if f.ratio is None]
    assert not missing, f"no cache above measured {missing} for {cfg}"
    return sum(f.bytes_per_token for f in plan.fields if names is None or f.name in names)


def codec_errors(reference: Path, coded: Path, num_massive: int = 4) -> dict[str, dict[str, float]]:
    """Mean relative L2 error per stored activation row of the cache at `coded` against the one at
    `reference` (same sequences and positions), at attention-sink positions and elsewhere: over the whole
    row, and over the row less its `num_massive` largest channels (where a sink's massive activations sit)."""
    ref_reader, coded_reader = CacheReader(reference), CacheReader(coded)
    errors: dict[str, dict[str, list]] = {}
    for index in ref_reader.complete_shards():
        ref, got = ref_reader.read_shard(index), coded_reader.read_shard(index)
        sink_BP = ref["position_ids"].gather(1, ref["act_positions"].long()) == 0
        for name in ("act_input", "act_attn"):
            x, y = ref[name].float().transpose(1, 2), got[name].transpose(1, 2)  # [B, P, layers, d]
            rest = torch.ones_like(x, dtype=torch.bool).scatter(-1, x.abs().topk(num_massive, -1).indices, False)
            relative = {
                "row": (y - x).norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-30),
                "rest": ((y - x) * rest).norm(dim=-1) / (x * rest).norm(dim=-1).clamp_min(1e-30),
            }  # each [B, P, layers]
            entry = errors.setdefault(name, {})
            for part, relative_BPL in relative.items():
                entry.setdefault(f"sink {part}", []).append(relative_BPL[sink_BP].flatten())
                entry.setdefault(f"other {part}", []).append(relative_BPL[~sink_BP].flatten())
    return {name: {where: float(torch.cat(parts).mean()) for where, parts in entry.items()}
            for name, entry in errors.items()}  # fmt: skip


def log8_clipped(reference: Path) -> float:
    """Fraction of the top-k log-probs in the cache at `reference` more than 15.94 nats below their row's
    max, which log8 clips."""
    reader = CacheReader(reference)
    clipped = total = 0
    for index in reader.complete_shards():
        logprobs = reader.read_shard(index, fields=["topk_logprobs"])["topk_logprobs"].float()
        below = logprobs.amax(-1, keepdim=True) - logprobs
        clipped += int((below > 255.5 / 16).sum())
        total += below.numel()
    return clipped / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--corpus", default="wiki-en")
    parser.add_argument("--heldout-docs", type=int, default=200)
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--act-positions", type=int, default=16)
    parser.add_argument("--production-seq-len", type=int, default=2048,
                        help="sequence length of the whole-cache rows (the paper's LRC-1.7B run)")
    parser.add_argument("--out", default="benchmarks/results/storage")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher = load_teacher(args.teacher)
    measured, per_field = {}, {}
    ratios: CompressionRatios | None = None
    # every setting a build depends on is given here, so the library's defaults never change what is measured
    base = dict(teacher=args.teacher, corpus=args.corpus, heldout_docs=args.heldout_docs, seq_len=args.seq_len,
                max_sequences=args.sequences, sequences_per_shard=args.sequences, format="zarr", topk=64,
                num_draws=64, logprob_dtype="float16", act_positions=args.act_positions, include_sink=True,
                act_dtype="bfloat16", act_fraction=1.0, act_layer_fraction=1.0)  # fmt: skip
    caches = {}
    for build, overrides in BUILDS.items():
        cfg = CacheConfig(**{**base, **overrides})
        caches[build] = out / ("cache-" + build.replace(", ", "-").replace(" + ", "-").replace("+", "-").replace("%", "pct"))
        build_cache(cfg, caches[build], teacher=teacher)
        info = inspect_cache(caches[build])
        # Ratios per row holding values: with act_fraction < 1 a small cache carries activations on a seeded
        # draw of its sequences that may be far from the fraction (15 of 32 for 0.25), and a layer subset
        # keeps ceil(f L) / L of the rows; `lrc-cache plan` scales them to each geometry's kept fraction.
        table = measure_ratios(caches[build], name=f"{args.teacher} {build}")
        ratios = table if ratios is None else ratios.merged(table)
        for spec in CacheReader(caches[build]).fields:
            field = info["fields"][spec.name]
            field["raw_bytes_per_token"] = raw_bytes(spec) / cfg.seq_len
            field["compression_ratio"] = raw_bytes(spec) * info["complete_sequences"] / field["stored_bytes"]
            field["ratio_per_row_with_values"] = table.lookup(spec.name, spec.dtype, cfg.act_layer_fraction < 1,
                                                              cfg.act_fraction < 1)  # fmt: skip
            per_field[f"{build}: {spec.name} ({spec.dtype})"] = field
        measured[build] = info["bytes_per_token"]
        print(f"{build}: {info['bytes_per_token']:.1f} B/token", flush=True)

    span = f"{args.act_positions}/{args.seq_len} positions"
    residual, ids = ["act_input", "act_attn", "act_positions"], ["input_ids", "position_ids"]
    rows = {  # label: (CacheConfig overrides, fields counted; None: the whole cache)
        "logits: topk k=64 (fp16 log-probs)": (BUILDS["topk+residual"], ["topk_ids", "topk_logprobs"]),
        "logits: topk k=64 (log8 log-probs)": (BUILDS["topk+residual, log8 + int4"], ["topk_ids", "topk_logprobs"]),
        "logits: sampled N=64": (BUILDS["sampled+none"], ["sampled_ids", "sampled_counts"]),
        "logits: hidden (bf16)": (BUILDS["hidden+none"], ["hidden"]),
        f"activations: residual, {span}": (BUILDS["topk+residual"], residual),
        f"activations: residual, {span}, float8": (BUILDS["topk+residual, float8"], residual),
        f"activations: residual, {span}, int4": (BUILDS["topk+residual, log8 + int4"], residual),
        f"activations: residual, {span}, int4g": (BUILDS["topk+residual, int4g"], residual),
        f"activations: targets, {span}": (BUILDS["topk+targets"], [
            "act_q", "act_k", "act_v", "act_o", "act_gate", "act_up", "act_down", "act_positions"]),
        "tokens (input_ids + position_ids)": (BUILDS["topk+residual"], ids),
    }  # fmt: skip
    production = dict(seq_len=args.production_seq_len)
    for positions, logprobs, acts in [(32, "float16", "bfloat16"), (32, "log8", "float8"), (32, "log8", "int4"),
                                      (32, "float16", "int4"), (32, "float16", "int4g"), (16, "log8", "int4"),
                                      (8, "log8", "int4")]:  # fmt: skip
        label = f"cache: top-64 {logprobs} + residual {acts} at {positions}/{args.production_seq_len}"
        rows[label] = (dict(BUILDS["topk+residual"], logprob_dtype=logprobs, act_dtype=acts, **production,
                            act_positions=positions), None)  # fmt: skip
    for logprobs, acts, build in [("float16", "bfloat16", "topk+residual, 25%"),
                                  ("log8", "int4", "topk+residual, log8 + int4, 25%")]:  # fmt: skip
        label = f"cache: top-64 {logprobs} + residual {acts} at 32/{args.production_seq_len}, 25% of sequences"
        rows[label] = (dict(BUILDS[build], **production, act_positions=32), None)
    for logprobs, acts, build in [("float16", "int4", "topk+residual, int4, layers 25%"),
                                  ("log8", "int4", "topk+residual, log8 + int4, layers 25%"),
                                  ("float16", "int4g", "topk+residual, int4g, layers 25%")]:  # fmt: skip
        label = f"cache: top-64 {logprobs} + residual {acts} at 32/{args.production_seq_len}, a quarter of the layers a position"
        rows[label] = (dict(BUILDS[build], **production, act_positions=32), None)
    table = {}
    for model, dims in GEOMETRIES.items():
        row = {label: extrapolate(ratios, dims, CacheConfig(**{**base, **overrides}), names)
               for label, (overrides, names) in rows.items()}  # fmt: skip
        d, layers, heads, kv, head_dim, ffn, vocab = dims
        row["baseline: full fp16 logits"] = vocab * 2
        row["baseline: 7 targets at every position (bf16, raw)"] = layers * 2 * (heads * head_dim + 2 * kv * head_dim + 2 * d + 2 * ffn)
        table[model] = row
    coded = {"int4": "topk+residual, log8 + int4", "int4g": "topk+residual, int4g", "float8": "topk+residual, float8"}
    errors = {codec: codec_errors(caches["topk+residual"], caches[build]) for codec, build in coded.items()}
    clipped = log8_clipped(caches["topk+residual"])
    result = {"setup": vars(args), "measured_total_bytes_per_token": measured, "fields": per_field, "table": table,
              "relative_error_vs_bf16": errors, "log8_clipped_fraction": clipped}  # fmt: skip
    (out / "storage.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["| bytes per token | " + " | ".join(GEOMETRIES) + " |", "|---" * (len(GEOMETRIES) + 1) + "|"]
    for group in table["SmolLM2-135M"]:
        cells = [f"{table[m][group]:,.0f}" for m in GEOMETRIES]
        if group.startswith("cache:"):
            cells = [c + (" (ok)" if table[m][group] <= BUDGET else "") for c, m in zip(cells, GEOMETRIES)]
        lines.append(f"| {group} | " + " | ".join(cells) + " |")
    lines += ["", f"(ok): within the {BUDGET} B/token budget.", "",
              "| relative L2 error per stored row vs bf16 | at sinks: row | less its 4 largest | "
              "elsewhere: row | less its 4 largest |", "|---|---|---|---|---|"]  # fmt: skip
    for codec, per_name in errors.items():
        for name, e in per_name.items():
            lines.append(f"| {codec} {name} | {e['sink row']:.3f} | {e['sink rest']:.3f} | {e['other row']:.3f} | "
                         f"{e['other rest']:.3f} |")  # fmt: skip
    lines += ["", f"log8: {clipped:.2%} of the top-64 log-probs lie over 15.94 nats below their row max (clipped)."]
    (out / "storage.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 7))
    groups_all = list(table["SmolLM2-135M"])
    width = 0.8 / len(GEOMETRIES)
    for i, model in enumerate(GEOMETRIES):
        ax.barh([y + i * width for y in range(len(groups_all))], [table[model][g] for g in groups_all], width,
                label=model)  # fmt: skip
    ax.set_yticks([y + width for y in range(len(groups_all))], groups_all, fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("bytes per token (log scale)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "storage.png", dpi=120)


if __name__ == "__main__":
    main()
