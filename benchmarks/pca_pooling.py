"""Which residual vectors make the best PCA basis: step-0 held-out CE of PCA-initialised students (untied
head) whose basis pools the layer inputs h, the post-attention streams h + a, or both.

Reads an existing residual cache (for example the one `quality.py` builds) and prints one line per
(size, pooling); no training.

    python benchmarks/pca_pooling.py --cache benchmarks/results/quality/caches/default --sizes 192,288
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lrc_offline.cache import CacheReader
from lrc_offline.evaluation import heldout_sequences
from lrc_offline.student.init import SecondMoment, init_pca, pca_basis
from lrc_offline.student.lrc import LRCStudent
from lrc_offline.teacher.load import load_teacher
from lrc_offline.training.evaluate import heldout_ce


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
    teacher = load_teacher(reader.manifest["extra"]["teacher_name"])
    seq_len = reader.manifest["config"]["seq_len"]
    ids = heldout_sequences(args.corpus, "text", args.heldout_docs, teacher.tokenizer, seq_len, args.heldout_sequences)
    width = reader.manifest["geometry"]["hidden_size"]
    inputs, after_attention = SecondMoment(width), SecondMoment(width)
    for index in reader.complete_shards():
        shard = reader.read_shard(index, ["act_input", "act_attn"])
        h = shard["act_input"].float()
        inputs.update(h)
        after_attention.update(h + shard["act_attn"].float())
    both = SecondMoment(width)
    both.matrix_DD, both.count = inputs.matrix_DD + after_attention.matrix_DD, inputs.count + after_attention.count
    results = []
    for size in (int(s) for s in args.sizes.split(",")):
        for name, moment in (("h", inputs), ("h + a", after_attention), ("both", both)):
            student = LRCStudent(teacher.model, size, untie_head=True)
            init_pca(student, pca_basis(moment, size))
            with torch.no_grad():
                ce = heldout_ce(lambda x: student(x).logits_BTV, ids)["ce"]
            results.append({"hidden_size": size, "pooling": name, "vectors": moment.count, "heldout_ce": ce})
            print(f"d_S {size}  {name:<6} {moment.count:>9} vectors  held-out CE {ce:.3f}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
