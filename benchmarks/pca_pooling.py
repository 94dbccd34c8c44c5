"""Which PCA start is best before any training: step-0 held-out CE of PCA-initialised students whose
basis pools the layer inputs h, the post-attention streams h + a, or both, and, on the pooled basis,
how the head's scale is set (folded, per-layer captured energy, or fitted to CE or to KD + CE).

Reads an existing residual cache (for example the one `quality.py` builds) and prints one line per
(size, variant); no training.

    python benchmarks/pca_pooling.py --cache benchmarks/results/quality/caches/default --sizes 192,288
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lrc_offline import losses
from lrc_offline.batch import Batch
from lrc_offline.cache import CacheReader
from lrc_offline.config import TrainJobConfig, apply_overrides
from lrc_offline.evaluation import heldout_sequences
from lrc_offline.student.init import SecondMoment, calibrate_head_scale, init_pca, pca_basis
from lrc_offline.student.lrc import LRCStudent
from lrc_offline.teacher.load import load_teacher
from lrc_offline.training.heldout import heldout_metrics
from lrc_offline.training.pca import cache_head_scale_batches, fit_head_scale, head_scale_sequences


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-12)


def _captured_energy(reader: CacheReader, basis_DS: torch.Tensor, num_shards: int = 4) -> torch.Tensor:
    """[layers, 2]: mean fraction of each layer's normalised h (0) and h + a (1) inside span(basis)."""
    sums, count = 0.0, 0
    for index in reader.complete_shards()[:num_shards]:
        shard = reader.read_shard(index, ["act_input", "act_attn"])
        h = shard["act_input"].float()
        streams = [_unit(x) for x in (h, h + shard["act_attn"].float())]  # [N, L, P, D] each
        frac = torch.stack([(x @ basis_DS).pow(2).sum(-1) / x.pow(2).sum(-1) for x in streams], -1)
        sums, count = sums + frac.sum((0, 2)), count + frac.shape[0] * frac.shape[2]
    return sums / count


def _ce_score(logits, batch):
    ids = batch.input_ids.long()
    return losses.cross_entropy_next(logits, ids, torch.ones_like(ids, dtype=torch.bool))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", required=True)
    parser.add_argument("--corpus", default="wiki-en")
    parser.add_argument("--heldout-docs", type=int, default=200)
    parser.add_argument("--heldout-sequences", type=int, default=32)
    parser.add_argument("--sizes", default="192,288")
    parser.add_argument("--out", default=None, help="optional JSON file for the results")
    args = parser.parse_args()
    reader = CacheReader(args.cache)
    teacher = load_teacher(reader.manifest.teacher_name)
    seq_len = reader.manifest.config.seq_len
    ids = heldout_sequences(args.corpus, "text", args.heldout_docs, teacher.tokenizer, seq_len, args.heldout_sequences)
    width = reader.manifest.geometry.hidden_size
    inputs, after_attention = SecondMoment(width), SecondMoment(width)
    for index in reader.complete_shards():
        shard = reader.read_shard(index, ["act_input", "act_attn"])
        h = shard["act_input"].float()
        inputs.update(h)
        after_attention.update(h + shard["act_attn"].float())
    both = SecondMoment(width)
    both.matrix_DD, both.count = inputs.matrix_DD + after_attention.matrix_DD, inputs.count + after_attention.count
    calibration_ids = reader.read_shard(reader.complete_shards()[0], ["input_ids"])["input_ids"][:32]
    results = []

    def report(size: int, name: str, student: LRCStudent, **extra) -> None:
        with torch.no_grad():
            ce = heldout_metrics(lambda x: student(x).logits_BTV, ids)["ce"]
        results.append({"hidden_size": size, "variant": name, "heldout_ce": ce, **extra})
        print(f"d_S {size}  {name:<58} held-out CE {ce:.3f}  {extra or ''}", flush=True)

    for size in (int(s) for s in args.sizes.split(",")):
        for name, moment in (("h", inputs), ("h + a", after_attention), ("both", both)):
            student = LRCStudent(teacher.model, size, untie_head=True)
            init_pca(student, pca_basis(moment, size))
            report(size, f"basis from {name}, folded head scale", student, vectors=moment.count)
        basis = pca_basis(both, size)
        energy = _captured_energy(reader, basis)
        print(f"d_S {size}  captured energy per layer, h: {[round(v, 3) for v in energy[:, 0].tolist()]}")
        for final_too in (False, True):
            student = LRCStudent(teacher.model, size, untie_head=True)
            init_pca(student, basis)
            with torch.no_grad():
                for layer, scale in zip(student.layers, energy.sqrt()):
                    layer.input_norm.mul_(scale[0]), layer.post_norm.mul_(scale[1])
                if final_too:
                    student.final_norm.mul_(energy[-1, 1].sqrt())
            report(size, "norms scaled by captured energy" + (", final norm too" if final_too else ""), student)
        cfg = apply_overrides(TrainJobConfig(), [f"student.hidden_size={size}", "train.batch_size=8"])
        for untie in (True, False):
            student = LRCStudent(teacher.model, size, untie_head=untie)
            init_pca(student, basis)
            if untie:
                scale = calibrate_head_scale(student, [Batch(b) for b in calibration_ids.split(8)], _ce_score)
                report(size, "head scale fitted to CE (32 cached sequences)", student, head_scale=scale)
                student = LRCStudent(teacher.model, size, untie_head=True)
                init_pca(student, basis)
            batches = cache_head_scale_batches(reader, head_scale_sequences(student, cfg), 8, "cpu")
            info = fit_head_scale(student, batches, cfg)
            report(size, f"head scale fitted to KD + CE, {'untied' if untie else 'tied'}", student, **info)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
