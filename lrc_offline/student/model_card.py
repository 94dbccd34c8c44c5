"""The model card (`README.md`) of an exported student: where it came from and how it did.

Facts only: the teacher (and the commit a Hub id resolved to), the cache's fingerprints, the training
steps and tokens, d_S against d_T, the held-out figures the run measured, and how to load and evaluate it.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["model_card"]

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _held_out(heldout: dict | None) -> str:
    if not heldout:
        return "not measured (the run had no held-out documents); compare with `lrc-train eval`"
    on = f"{heldout['tokens']} predicted tokens of " if heldout.get("tokens") else ""
    at = f", at step {heldout['step']}" if heldout.get("step") is not None else ""
    teacher = ""
    if heldout.get("kl") is not None:
        teacher = (f"; KL(teacher || student) {heldout['kl']:.4f} nats/token and top-1 agreement with the teacher "
                   f"{heldout['top1']:.3f}, from the teacher signal the cache stored")  # fmt: skip
    return (f"cross-entropy {heldout['ce']:.4f} nats/token (perplexity {heldout['ppl']:.2f}) on {on}the "
            f"held-out documents kept out of the training data{at}{teacher}")  # fmt: skip


def model_card(facts: dict[str, Any]) -> str:
    """Markdown with a Hugging Face metadata header.

    `facts` keys: teacher, revision, d_student, d_teacher, num_layers, num_heads, head_dim, tied,
    num_parameters, dtype, steps, tokens, trainer, cache, cache_fingerprints, heldout (ce, ppl, tokens, step,
    and kl, top1 where the held-out split carried the teacher's signal),
    export_dir. Missing or None values are shown as unknown.
    """
    teacher = facts.get("teacher") or "unknown"
    repo = teacher.split("@", 1)[0]
    header = ["---", "library_name: transformers", "tags:", "- lrc", "- low-rank-clone", "- distillation"]
    if _HUB_ID.fullmatch(repo):
        header += [f"base_model: {repo}", "base_model_relation: finetune"]
    header.append("---")
    revision = f" at commit `{facts['revision']}`" if facts.get("revision") else ""
    tokens = facts.get("tokens")
    fingerprints = facts.get("cache_fingerprints") or {}
    rows = [
        ("teacher", f"`{teacher}`{revision}"),
        ("hidden size (d_S)", f"{facts.get('d_student')} (teacher: {facts.get('d_teacher')}); layers, heads, "
                              f"head_dim, FFN width and vocabulary are the teacher's"),
        ("geometry", f"{facts.get('num_layers')} layers, {facts.get('num_heads')} attention heads of head_dim "
                     f"{facts.get('head_dim')} (explicit in config.json), "
                     f"{'tied' if facts.get('tied') else 'untied'} output head"),
        ("parameters", f"{facts['num_parameters']:,}" if facts.get("num_parameters") else "unknown"),
        ("weights dtype", str(facts.get("dtype"))),
        ("training", f"{facts.get('steps')} optimiser steps, {tokens:,} tokens" if tokens else
                     f"{facts.get('steps')} optimiser steps"),
        ("teacher signal", "offline, from the cache " + f"`{facts['cache']}`" if facts.get("cache") else
                           str(facts.get("trainer") or "unknown")),
        ("held-out", _held_out(facts.get("heldout"))),
    ]  # fmt: skip
    rows += [(f"cache fingerprint: {key}", f"`{value}`") for key, value in sorted(fingerprints.items())]
    table = ["| | |", "|---|---|"] + [f"| {key} | {value} |" for key, value in rows]
    where = facts.get("export_dir") or "path/to/student"
    body = [
        f"# LRC student of {teacher}",
        "",
        f"A Low-Rank Clone (Hao et al., 2025, arXiv 2505.12781) of `{teacher}`: every weight is the teacher's "
        "multiplied by a trained low-rank projection, W^S = W^T P, trained with lrc-offline from a cache of the "
        "teacher's signal. It is a plain Hugging Face checkpoint; `lrc_config.json` holds the full training "
        "config and provenance.",
        "",
        *table,
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'model = AutoModelForCausalLM.from_pretrained("{where}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{where}")',
        "```",
        "",
        "## Evaluate",
        "",
        "```bash",
        f"lrc-train eval --student {where} --cache <the cache>   # its held-out split, from the cached teacher signal",
        f"lm_eval --model hf --model_args pretrained={where},dtype={facts.get('dtype')} --tasks <tasks>",
        "```",
    ]
    return "\n".join(header + body) + "\n"
