"""How well each cached logit signal reproduces the full-vocabulary KD gradient, on a real teacher.

For held-out sequences: the teacher's full logits give the reference gradient of KL(p_T || p_S) with
respect to the student's logits. Each cached signal is produced exactly as `lrc-cache build` stores it
(top-k log-probs in float16 or as log8 codes, N sampled draws, the bf16 final hidden state) and its KD
loss's gradient is compared: the angle between the two gradients and the ratio of their norms, over all
tokens (flattened), for two students: the random init of the paper and the PCA init (near the teacher).

    python benchmarks/fidelity.py --out benchmarks/results/fidelity
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from lrc_offline import losses
from lrc_offline.cache import dequantize_log8, quantize_log8
from lrc_offline.capture.signals import logprobs_at, sampled_signal, topk_signal
from lrc_offline.config import StudentConfig
from lrc_offline.evaluation import heldout_sequences
from lrc_offline.student.init import SecondMoment, init_pca, pca_basis
from lrc_offline.student.lrc import build_student
from lrc_offline.teacher.hooks import capture_teacher
from lrc_offline.teacher.load import load_teacher


def _grad(loss_fn, logits: torch.Tensor) -> torch.Tensor:
    x = logits.detach().clone().requires_grad_(True)
    loss_fn(x).backward()
    return x.grad.flatten().double()


def _compare(g: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    cos = float(g @ ref / (g.norm() * ref.norm()))
    return {"angle_deg": math.degrees(math.acos(max(-1.0, min(1.0, cos)))), "norm_ratio": float(g.norm() / ref.norm())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--corpus", default="wiki-en")
    parser.add_argument("--heldout-docs", type=int, default=200)
    parser.add_argument("--sequences", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--hidden-size", type=int, default=288)
    parser.add_argument("--ks", default="1,8,32,64,256,1024")
    parser.add_argument("--logprob-dtypes", default="float16,log8", help="how top-k log-probs are stored")
    parser.add_argument("--draws", default="16,64", help="N draws for the sampled signal")
    parser.add_argument("--out", default="benchmarks/results/fidelity")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    teacher = load_teacher(args.teacher)
    ids = heldout_sequences(args.corpus, "text", args.heldout_docs, teacher.tokenizer, args.seq_len, args.sequences).long()
    captured = capture_teacher(teacher.model, ids, positions_BP=torch.arange(args.seq_len).expand(len(ids), -1),
                               terms=("input",), want_hidden=True)  # fmt: skip
    teacher_logits = captured.logits_BTV.float()
    mask = torch.ones_like(ids, dtype=torch.bool)
    head = teacher.model.lm_head.weight

    moment = SecondMoment(teacher.config.hidden_size)
    moment.update(captured.acts["input"])
    students = {"random init": build_student(teacher.model, StudentConfig(hidden_size=args.hidden_size))}
    pca = build_student(teacher.model, StudentConfig(hidden_size=args.hidden_size, init="pca", head="untied"))
    init_pca(pca, pca_basis(moment, args.hidden_size))
    students["pca init"] = pca

    results = {"setup": vars(args), "students": {}}
    for name, student in students.items():
        with torch.no_grad():
            logits = student(ids).logits_BTV.float()
        ref = _grad(lambda x: losses.kl_full(x, teacher_logits, mask), logits)
        row = {"kl_full": float(losses.kl_full(logits, teacher_logits, mask))}
        teacher_logprobs = logprobs_at(teacher_logits.reshape(-1, teacher_logits.shape[-1]), 1.0)
        for k in [int(k) for k in args.ks.split(",")]:
            top_ids, top_lp, _ = topk_signal(teacher_logprobs, k)
            top_ids = top_ids.reshape(*ids.shape, k)
            for dtype in args.logprob_dtypes.split(","):
                stored = {"float16": lambda lp: lp.to(torch.float16).float(),
                          "log8": lambda lp: dequantize_log8(*quantize_log8(lp))}[dtype](top_lp)  # fmt: skip
                stored = stored.reshape(*ids.shape, k)
                label = f"topk k={k}" if dtype == "float16" else f"topk k={k} ({dtype})"
                row[label] = _compare(_grad(lambda x: losses.kl_topk(x, top_ids, stored, mask), logits), ref)
        for n in [int(n) for n in args.draws.split(",")]:
            gen = torch.Generator().manual_seed(1)
            s_ids, counts = sampled_signal(teacher_logprobs, n, gen)
            s_ids, counts = s_ids.reshape(*ids.shape, n), counts.reshape(*ids.shape, n)
            entry = _compare(_grad(lambda x: losses.kd_sampled(x, s_ids, counts, mask), logits), ref)
            entry["unique_ids_mean"] = float((counts > 0).sum(-1).float().mean())
            row[f"sampled N={n}"] = entry
        hidden_bf16 = captured.hidden_BTD.to(torch.bfloat16).float()  # as stored (bfloat16)
        row["hidden (bf16)"] = _compare(_grad(lambda x: losses.kl_from_hidden(x, hidden_bf16, head, mask), logits), ref)
        results["students"][name] = row
        print(name, json.dumps(row, indent=1), flush=True)
    (out / "fidelity.json").write_text(json.dumps(results, indent=2) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for name, row in results["students"].items():
        labels = [k for k in row if k != "kl_full"]
        ax.plot(labels, [row[k]["angle_deg"] for k in labels], "o-", label=name)
    ax.set_ylabel("angle to the full-KL gradient (degrees)")
    ax.set_title(f"{args.teacher}: KD gradient fidelity of cached logit signals")
    ax.tick_params(axis="x", rotation=45)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "fidelity.png", dpi=120)


if __name__ == "__main__":
    main()
