"""Export an LRC student as a plain Hugging Face checkpoint (safetensors) that `transformers` and vLLM load.

The student's weights are materialised (W^S = W^T P, ...); the config is the teacher's with
`hidden_size = d_S` and an explicit `head_dim` (head count and head_dim stay the teacher's, so
head_dim no longer equals hidden_size / num_heads).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..fsutil import atomic_dir
from .hf_config import hf_config
from .lrc import LRCStudent

__all__ = ["student_config", "student_state_dict", "export_student"]


def student_config(student: LRCStudent):
    """The HF config of the exported student."""
    return hf_config(student.teacher_config, student.d_student, student.head_dim, student.tied)


@torch.no_grad()
def student_state_dict(student: LRCStudent, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """HF parameter names -> materialised student tensors."""
    out = {"model.embed_tokens.weight": student.embedding_weight(), "model.norm.weight": student.final_norm}
    if not student.tied:
        out["lm_head.weight"] = student.head_weight()
    names = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
             "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}  # fmt: skip
    for index, (layer, frozen) in enumerate(zip(student.layers, student.teacher_layers)):
        prefix = f"model.layers.{index}."
        for key, value in student.layer_weights(index).items():
            term, _, is_bias = key.partition("_bias")
            out[prefix + names[term] + (".bias" if key.endswith("_bias") else ".weight")] = value
        out[prefix + "input_layernorm.weight"] = layer.input_norm
        out[prefix + "post_attention_layernorm.weight"] = layer.post_norm
        if frozen.has_qk_norm:
            out[prefix + "self_attn.q_norm.weight"] = frozen.q_norm
            out[prefix + "self_attn.k_norm.weight"] = frozen.k_norm
    return {k: v.detach().to("cpu", dtype).contiguous() for k, v in out.items()}


def export_student(
    student: LRCStudent,
    out_dir: str | Path,
    tokenizer=None,
    run_config: dict | None = None,
    dtype: torch.dtype = torch.float32,
    extra_info: dict | None = None,
) -> Path:
    """Write a loadable HF checkpoint to `out_dir` (atomically: a temporary folder renamed into place).

    Args:
        student: the trained module.
        out_dir: destination folder (replaced if it exists).
        tokenizer: the teacher's tokenizer, saved beside the weights.
        run_config: the resolved training config, saved as `lrc_config.json`.
        dtype: dtype of the saved weights (the config's `dtype` records it).
        extra_info: more provenance for `lrc_config.json` (cache fingerprints, step, ...).
    """
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    config = student_config(student)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    state = student_state_dict(student, dtype)
    expected = set(model.state_dict())
    missing = expected - set(state) - ({"lm_head.weight"} if student.tied else set())
    unexpected = set(state) - expected
    assert not missing and not unexpected, f"export names out of step: missing {missing}, unexpected {unexpected}"
    model = model.to_empty(device="cpu").to(dtype)
    model.load_state_dict(state, strict=False)
    if student.tied:
        model.tie_weights()
    model.config.dtype = dtype
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        info = {"lrc": {"teacher_hidden_size": student.d_teacher, "student_hidden_size": student.d_student}}
        info.update(extra_info or {})
        info["config"] = run_config
        (tmp / "lrc_config.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
    return out_dir
