"""Student against teacher on held-out text: perplexities, top-1 agreement and KL to the teacher.

Evaluation runs the teacher's forward on the held-out sequences (a few, once), which is why it lives
outside `training/`.

Legend: N sequences, B batch, T tokens, V vocabulary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from .data import load_documents, pack_documents, split_heldout
from .config import ConfigError
from .training.heldout import heldout_metrics

__all__ = ["compare_models", "heldout_sequences", "evaluate_export", "format_table"]


def compare_models(
    student_fn: Callable[[torch.Tensor], torch.Tensor],
    teacher_fn: Callable[[torch.Tensor], torch.Tensor],
    input_ids_NT: torch.Tensor,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """`heldout_metrics` of a student against a teacher, under the names `lrc-train eval` reports:
    student_ce / teacher_ce, student_ppl / teacher_ppl, kl, top1_agreement, tokens."""
    out = heldout_metrics(student_fn, input_ids_NT, batch_size, device, teacher_fn=teacher_fn)
    out["student_ce"], out["student_ppl"] = out.pop("ce"), out.pop("ppl")
    return out


def heldout_sequences(corpus: str, text_field: str, heldout_docs: int, tokenizer, seq_len: int,
                      max_sequences: int | None) -> torch.Tensor:  # fmt: skip
    """The packed held-out sequences: the last `heldout_docs` documents of the corpus, which a cache
    built with the same `heldout_docs` never saw."""
    if heldout_docs < 1:
        raise ConfigError("evaluation on held-out text needs heldout_docs >= 1 (documents kept out of the cache)")
    _, heldout = split_heldout(load_documents(corpus, text_field), heldout_docs)
    return pack_documents(heldout, tokenizer, seq_len, max_sequences).input_ids


def evaluate_export(
    student_dir: str | Path,
    teacher,
    corpus: str,
    heldout_docs: int,
    seq_len: int,
    max_sequences: int | None = 32,
    text_field: str = "text",
    batch_size: int = 8,
) -> dict[str, float]:
    """Load an exported student with plain `transformers` and compare it with `teacher` (a loaded Teacher)."""
    from transformers import AutoModelForCausalLM

    device = next(teacher.model.parameters()).device
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).to(device).eval()
    ids = heldout_sequences(corpus, text_field, heldout_docs, teacher.tokenizer, seq_len, max_sequences)
    return compare_models(lambda x: student(input_ids=x).logits, lambda x: teacher.model(input_ids=x).logits,
                          ids, batch_size, device)  # fmt: skip


def format_table(metrics: dict[str, float]) -> str:
    """A short two-column table of the metrics."""
    rows = [("", "student", "teacher"),
            ("cross-entropy (nats)", f"{metrics['student_ce']:.4f}", f"{metrics['teacher_ce']:.4f}"),
            ("perplexity", f"{metrics['student_ppl']:.2f}", f"{metrics['teacher_ppl']:.2f}"),
            ("KL(teacher||student)", f"{metrics['kl']:.4f}", ""),
            ("top-1 agreement", f"{metrics['top1_agreement']:.3f}", ""),
            ("tokens", str(metrics["tokens"]), "")]  # fmt: skip
    return "\n".join(f"{a:<22}{b:>12}{c:>12}" for a, b, c in rows)
