"""How far a clone term's scale on one batch strays from its scale over the whole cache (issue 26), per
normaliser, on a real teacher's cache.

A term's scale at a layer is the clone loss one unit of error at every element of that layer costs: the
mean over the layer's rows of 1 / (the row's normaliser). It is what the normaliser multiplies a row's
error by, so a batch whose scale is 70x the whole cache's weighs its rows' errors 70x more than they
weigh on average. The script builds one cache with every layer at every position, then masks it the
ways a cache can store less (a quarter of the layers per position, with and without the sequence start
kept in every layer; activations on a quarter of the sequences), cuts it into training batches and,
for each normaliser (MODES), reports the factor max(batch / whole, whole / batch), and the largest
ratio of a batch's scale to the median batch's (an upward spike).

The loss is `losses.clone_loss` itself, with the options the objective gives it. Its normalisers read a
row's target only through the row's mean square, so each row enters as one element whose square is that
mean square: the same normalisers and scales as the full-width targets, at a fraction of the memory.
Teacher space throughout (o and down are compared in student space in training: their scale there is
these ones times the projection's gain, which no batch changes).

    OMP_NUM_THREADS=1 python benchmarks/clone_scale.py --out benchmarks/results/clone_scale
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from lrc_offline.cache import CacheReader
from lrc_offline.cache.act_stats import act_layer_mask, act_present, activation_stats, keep_mask, sink_flags, teacher_ms
from lrc_offline.capture.build import build_cache
from lrc_offline.config import CLONE_TERMS, CacheConfig
from lrc_offline.losses import clone_loss
from lrc_offline.student.lrc import LRCStudent
from lrc_offline.teacher.load import load_teacher
from lrc_offline.training.reader import stack_samples

# name: (activation fraction, layer fraction, the sequence start in every layer)
SCENARIOS = {
    "all-layers": (1.0, 1.0, True),
    "layers25": (1.0, 0.25, True),
    "layers25-start-not-kept": (1.0, 0.25, False),
    "budget25": (0.25, 1.0, True),
    "budget25-layers25-start-not-kept": (0.25, 0.25, False),
}
MODES = ("batch", "batch_sinks_apart", "auto")
"""batch: the batch's pooled mean square (the default before issue 26, and auto's fallback without
statistics); batch_sinks_apart: sink rows and the others each by their own batch mean square (`clone_loss`
with `sink_BP` and no `target_ms`; not offered by the config, measured to show why); auto: the build's
statistics, sinks apart (= cache)."""


def row_mean_squares(cache_dir: Path, teacher) -> tuple[dict, dict[str, torch.Tensor]]:
    """The cache's fields (no activations) and term -> [L, N, P] mean square of each target row, recomputed
    from the cached residuals with the teacher's weights, as training recomputes them."""
    data = stack_samples(list(CacheReader(cache_dir).iter_sequences()))
    student = LRCStudent(teacher.model, 16, seed=0)  # only its frozen teacher layers are used
    ms = {m: [] for m in CLONE_TERMS}
    with torch.no_grad():
        for i, layer in enumerate(student.layers):
            targets = layer.teacher_targets_from_residual(data["act_input"][:, i].float(), data["act_attn"][:, i].float())
            for m in CLONE_TERMS:
                ms[m].append(targets[m].double().square().mean(-1))
    fields = {k: v for k, v in data.items() if not k.startswith("act_") or k == "act_positions"}
    return fields, {m: torch.stack(v) for m, v in ms.items()}


def scales(ms_LNP: dict, keep_LNP: torch.Tensor, sink_NP: torch.Tensor, mode: str, stats_ms: dict) -> torch.Tensor:
    """[terms, L] scale of each term at each layer on these rows (NaN where a layer has none)."""
    num_layers = keep_LNP.shape[0]
    out = torch.full((len(CLONE_TERMS), num_layers), float("nan"), dtype=torch.float64)
    for layer in range(num_layers):
        keep = keep_LNP[layer : layer + 1]
        if not bool(keep.any()):
            continue
        target = {m: ms_LNP[m][layer : layer + 1, ..., None].sqrt() for m in CLONE_TERMS}
        student = {m: t + 1.0 for m, t in target.items()}
        fixed = {m: stats_ms[m][layer : layer + 1].double() for m in CLONE_TERMS} if mode == "auto" else None
        _, per_term = clone_loss(student, target, keep, target_ms=fixed, sink_BP=None if mode == "batch" else sink_NP)
        out[:, layer] = torch.stack([per_term[m] for m in CLONE_TERMS])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--corpus", default="wiki-en")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--sequences", type=int, default=128)
    parser.add_argument("--positions", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default="benchmarks/results/clone_scale")
    parser.add_argument("--cache", default="/tmp/lrc-clone-scale-cache", help="where the cache is built (reused)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    teacher = load_teacher(args.teacher)
    cfg = CacheConfig(teacher=args.teacher, corpus=args.corpus, seq_len=args.seq_len, max_sequences=args.sequences,
                      act_positions=args.positions, act_layer_fraction=1.0, act_dtype="float16", topk=8)  # fmt: skip
    cache_dir = Path(args.cache)
    build_cache(cfg, cache_dir, teacher=teacher, progress=False)
    reader = CacheReader(cache_dir)
    stats_ms = teacher_ms(activation_stats([reader.shard_record(i) for i in reader.complete_shards()]))
    fields, ms_LNP = row_mean_squares(cache_dir, teacher)
    positions_NP = fields["act_positions"].long()
    sink_NP = sink_flags(positions_NP, fields["position_ids"])  # the batch's sink flags: document starts
    start_NP = positions_NP == 0
    seq_index = fields["sequence_index"].tolist()
    num_seq, num_layers, num_pos = len(seq_index), ms_LNP["q"].shape[0], positions_NP.shape[1]
    results = {"setup": vars(args) | {"cache": dataclasses.asdict(cfg)}, "scenarios": {}}
    for name, (act_fraction, layer_fraction, start_kept) in SCENARIOS.items():
        present_N = torch.tensor([act_present(cfg.seed, j, act_fraction) for j in seq_index])
        layer_mask_NLP = torch.stack([act_layer_mask(cfg.seed, j, num_layers, num_pos, layer_fraction,
                                                     (positions_NP[n] == 0) if start_kept else None)
                                      for n, j in enumerate(seq_index)])  # fmt: skip
        keep_LNP = keep_mask(present_N, layer_mask_NLP, num_layers, num_pos).transpose(0, 1)
        sinkless = 0
        report = {}
        for mode in MODES:
            whole_TL = scales(ms_LNP, keep_LNP, sink_NP, mode, stats_ms)
            factors, batch_scales = [], []
            for b0 in range(0, num_seq, args.batch_size):
                rows = slice(b0, b0 + args.batch_size)
                keep = keep_LNP[:, rows]
                if mode == MODES[0]:
                    has_rows_L = keep.any(dim=(1, 2))
                    sinkless += int((has_rows_L & ~(keep & start_NP[rows]).any(dim=(1, 2))).sum())
                got_TL = scales({m: v[:, rows] for m, v in ms_LNP.items()}, keep, sink_NP[rows], mode, stats_ms)
                factors.append(torch.maximum(got_TL / whole_TL, whole_TL / got_TL))
                batch_scales.append(got_TL)
            f_BTL = torch.stack(factors)  # NaN where a batch has no row of a layer
            s_BTL = torch.stack(batch_scales)
            up_BTL = s_BTL / s_BTL.nanmedian(dim=0).values  # a batch's scale over the typical batch's
            f_TL = torch.nan_to_num(f_BTL, nan=1.0).amax(0)
            valid = f_BTL[~f_BTL.isnan()]
            worst = torch.nonzero(f_TL == f_TL.max())[0].tolist()
            report[mode] = {
                "max": float(f_TL.max()), "p99": float(valid.quantile(0.99)), "median": float(valid.median()),
                "max_over_median_batch": float(up_BTL[~up_BTL.isnan()].max()),
                "worst": {"term": CLONE_TERMS[worst[0]], "layer": worst[1]},
                "max_per_term": {m: float(f_TL[i].max()) for i, m in enumerate(CLONE_TERMS)},
                "down_max_per_layer": [round(float(x), 2) for x in f_TL[CLONE_TERMS.index("down")]],
            }  # fmt: skip
        results["scenarios"][name] = {"batch_layers_without_sequence_start": sinkless, **report}
        print(name, f"(batch-layers without a sequence-start row: {sinkless})",
              {m: (round(r["max"], 2), round(r["p99"], 2), round(r["max_over_median_batch"], 2), r["worst"])
               for m, r in report.items()}, flush=True)  # fmt: skip
    results["sink_over_other_mean_square"] = {m: [round(float(x), 3) for x in v[:, 0] / v[:, 1]] for m, v in stats_ms.items()}
    results["seconds"] = time.perf_counter() - start
    (out / "clone_scale.json").write_text(json.dumps(results, indent=1))
    print(f"{results['seconds']:.0f} s; wrote {out / 'clone_scale.json'}")


if __name__ == "__main__":
    main()
