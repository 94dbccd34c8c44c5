"""Random (paper) vs PCA initialisation of the LRC projections, on a real teacher.

Part 1, no training: held-out CE at step 0 for several student sizes and inits.
Part 2, training from the same cache at equal steps: held-out CE curves of chosen variants.
Results are written as they come (JSON), then a PNG.

    python benchmarks/pca_init.py --out benchmarks/results/pca_init            # SmolLM2-135M, wiki-en
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lrc_offline.capture.build import build_cache
from lrc_offline.config import (
    CacheConfig,
    LossConfig,
    OptimConfig,
    StudentConfig,
    TrainConfig,
    TrainJobConfig,
)
from lrc_offline.evaluation import heldout_sequences
from lrc_offline.student.init import init_pca, pca_basis
from lrc_offline.student.lrc import LRCStudent
from lrc_offline.teacher.load import load_teacher
from lrc_offline.training.heldout import heldout_metrics
from lrc_offline.training.metrics import read_metrics
from lrc_offline.training.pca import cache_second_moment
from lrc_offline.training.plots import plot_curves
from lrc_offline.training.trainer import train_from_cache

STEP0_VARIANTS = {
    "random (paper)": dict(init="random", head="auto"),
    "pca, untied head": dict(init="pca", head="untied"),
    "pca, tied head": dict(init="pca", head="auto"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--corpus", default="wiki-en")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--cache-sequences", type=int, default=512)
    parser.add_argument("--heldout-docs", type=int, default=200)
    parser.add_argument("--heldout-sequences", type=int, default=32)
    parser.add_argument("--sizes", default="192,288,432,576")
    parser.add_argument("--train-size", type=int, default=192)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--variants", default="random,pca-untied,random-kd,pca-untied-kd",
                        help="training variants: <init>[-untied][-kd] (-kd: no clone loss)")
    parser.add_argument("--out", default="benchmarks/results/pca_init")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"setup": vars(args), "step0": {}, "curves": {}}

    def save() -> None:
        (out / "pca_init.json").write_text(json.dumps(results, indent=2) + "\n")

    teacher = load_teacher(args.teacher)
    cache = out / "cache"
    build_cache(CacheConfig(teacher=args.teacher, corpus=args.corpus, heldout_docs=args.heldout_docs,
                            seq_len=args.seq_len, max_sequences=args.cache_sequences, sequences_per_shard=64,
                            logprob_dtype="float16", act_positions=16), cache, teacher=teacher)  # fmt: skip
    ids = heldout_sequences(args.corpus, "text", args.heldout_docs, teacher.tokenizer, args.seq_len,
                            args.heldout_sequences)  # fmt: skip
    results["teacher_heldout_ce"] = heldout_metrics(lambda x: teacher.model(input_ids=x).logits, ids)["ce"]
    moment = cache_second_moment(cache)
    results["pca_vectors"] = moment.count
    print(f"teacher held-out CE {results['teacher_heldout_ce']:.3f}; PCA over {moment.count} vectors", flush=True)

    # ---- part 1: step 0 ----------------------------------------------------------------------------
    for size in [int(s) for s in args.sizes.split(",")]:
        row = {}
        for name, options in STEP0_VARIANTS.items():
            # LRCStudent directly: step 0 needs no export, so sizes transformers cannot save are measured too
            student = LRCStudent(teacher.model, size, untie_head=options["head"] == "untied")
            if options["init"] == "pca":
                init_pca(student, pca_basis(moment, size))
            with torch.no_grad():
                row[name] = heldout_metrics(lambda x: student(x).logits_BTV, ids)["ce"]
            row[f"{name} params"] = sum(p.numel() for p in student.parameters())
        results["step0"][str(size)] = row
        print(f"d_S {size}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if "params" not in k), flush=True)
        save()

    # ---- part 2: training curves at equal steps -------------------------------------------------------
    for variant in args.variants.split(","):
        init = variant.split("-")[0]
        student_cfg = StudentConfig(hidden_size=args.train_size, init=init,
                                    head="untied" if "-untied" in variant else "auto")  # fmt: skip
        loss_cfg = LossConfig(alpha=0.0 if variant.endswith("-kd") else 1.0)
        cfg = TrainJobConfig(student=student_cfg, loss=loss_cfg, optim=OptimConfig(lr=1e-3, warmup_steps=10),
                             train=TrainConfig(steps=args.steps, batch_size=8, log_every=5,
                                               eval_every=args.eval_every, eval_sequences=args.heldout_sequences))  # fmt: skip
        start = time.perf_counter()
        train_from_cache(cfg, cache, out / "runs" / variant, resume="auto", teacher=teacher, heldout_ids=ids,
                         progress=False)  # fmt: skip
        records = read_metrics(out / "runs" / variant / "metrics.jsonl")
        step0 = {"random": "random (paper)", "pca": "pca, untied head" if "-untied" in variant else "pca, tied head"}
        results["curves"][variant] = {
            "step0_heldout_ce": results["step0"].get(str(args.train_size), {}).get(step0[init]),
            "heldout": [(r["step"], r["heldout_ce"]) for r in records if "heldout_ce" in r],
            "seconds": time.perf_counter() - start,
        }
        print(variant, results["curves"][variant]["heldout"], flush=True)
        save()
        plot_curves({v: read_metrics(out / "runs" / v / "metrics.jsonl") for v in results["curves"]},
                    out / "pca_init_curves.png", key="ce", title=f"{args.teacher} -> d_S {args.train_size}: train CE and held-out CE")  # fmt: skip


if __name__ == "__main__":
    main()
