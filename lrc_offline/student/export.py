"""Export an LRC student as a plain Hugging Face checkpoint (safetensors) that `transformers` and vLLM load.

The student's weights are materialised (W^S = W^T P, ...); the config is the teacher's with
`hidden_size = d_S` and an explicit `head_dim` (head count and head_dim stay the teacher's, so
head_dim no longer equals hidden_size / num_heads). Beside the weights: the tokenizer, a
`generation_config.json` (the tokenizer's bos/eos/pad ids), `lrc_config.json` (run config and provenance)
and a model card, `README.md` (`model_card.py`).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from ..fsutil import atomic_dir
from .hf_config import hf_config
from .lrc import LRCStudent
from .model_card import model_card

__all__ = ["student_config", "student_state_dict", "export_student", "export_dtype"]


def export_dtype(name: str) -> torch.dtype:
    """`export.dtype` (float32, bfloat16, float16) as a torch dtype."""
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def student_config(student: LRCStudent):
    """The HF config of the exported student."""
    return hf_config(student.teacher_config, student.d_student, student.head_dim, student.tied)


TeacherReader = Callable[[str], torch.Tensor]
"""A student's teacher tensor by its name in the student (`LRCStudent.teacher_tensor_names`), read whole."""


@contextlib.contextmanager
def _teacher_part(student: LRCStudent, prefix: str, read: TeacherReader | None) -> Iterator[None]:
    """With `read`: the student's teacher tensors under `prefix` (on the meta device) read for the block
    and dropped after it, so an export holds one layer of the teacher at a time."""
    if read is None:
        yield
        return
    held = []
    for name, buffer in list(student.named_buffers(remove_duplicate=False)):  # a shared embedding and head too
        if name.startswith(prefix) and buffer.is_meta:
            owner, _, attr = name.rpartition(".")
            module = student.get_submodule(owner) if owner else student
            held.append((module, attr, buffer))
            module._buffers[attr] = read(name)
    try:
        yield
    finally:
        for module, attr, buffer in held:
            module._buffers[attr] = buffer


@torch.no_grad()
def student_state_dict(student: LRCStudent, dtype: torch.dtype = torch.float32,
                       read_teacher: TeacherReader | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
    """HF parameter names -> materialised student tensors. `read_teacher`: for a student whose teacher
    tensors are on the meta device (the export of a sharded run, `teacher.slices`), reads each part of
    the teacher as its weights are made (one layer, or the embedding, at a time)."""
    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu", dtype).contiguous()

    with _teacher_part(student, "teacher_embed", read_teacher):
        out = {"model.embed_tokens.weight": cast(student.embedding_weight()), "model.norm.weight": cast(student.final_norm)}
    if not student.tied:
        with _teacher_part(student, "teacher_lm_head", read_teacher):
            out["lm_head.weight"] = cast(student.head_weight())
    names = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
             "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}  # fmt: skip
    for index, layer in enumerate(student.layers):
        prefix = f"model.layers.{index}."
        with _teacher_part(student, f"layers.{index}.teacher.", read_teacher):
            frozen = layer.teacher
            for key, value in student.layer_weights(index).items():
                term, _, is_bias = key.partition("_bias")
                out[prefix + names[term] + (".bias" if key.endswith("_bias") else ".weight")] = cast(value)
            out[prefix + "input_layernorm.weight"] = cast(layer.input_norm)
            out[prefix + "post_attention_layernorm.weight"] = cast(layer.post_norm)
            if frozen.has_qk_norm:
                out[prefix + "self_attn.q_norm.weight"] = cast(frozen.q_norm)
                out[prefix + "self_attn.k_norm.weight"] = cast(frozen.k_norm)
    return out


def export_student(
    student: LRCStudent,
    out_dir: str | Path,
    tokenizer=None,
    run_config: dict | None = None,
    dtype: torch.dtype = torch.float32,
    extra_info: dict | None = None,
    read_teacher: TeacherReader | None = None,
) -> Path:
    """Write a loadable HF checkpoint to `out_dir` (atomically: a temporary folder renamed into place).

    Args:
        student: the trained module.
        out_dir: destination folder (replaced if it exists).
        tokenizer: the teacher's tokenizer, saved beside the weights.
        run_config: the resolved training config, saved as `lrc_config.json`.
        dtype: dtype of the saved weights (the config's `dtype` records it).
        extra_info: more provenance for `lrc_config.json` and the model card (steps, tokens, cache and its
            fingerprints, trainer, `heldout`: the run's last held-out figures).
        read_teacher: see `student_state_dict`.
    """
    from transformers import AutoModelForCausalLM, GenerationConfig

    out_dir = Path(out_dir)
    config = student_config(student)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    state = student_state_dict(student, dtype, read_teacher)
    expected = set(model.state_dict())
    missing = expected - set(state) - ({"lm_head.weight"} if student.tied else set())
    unexpected = set(state) - expected
    assert not missing and not unexpected, f"export names out of step: missing {missing}, unexpected {unexpected}"
    model = model.to_empty(device="cpu").to(dtype)
    model.load_state_dict(state, strict=False)
    if student.tied:
        model.tie_weights()
    model.config.dtype = dtype
    model.generation_config = _generation_config(GenerationConfig, config, tokenizer)
    info = {"lrc": {"teacher_hidden_size": student.d_teacher, "student_hidden_size": student.d_student}}
    info.update(extra_info or {})
    info["config"] = run_config
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        model.generation_config.save_pretrained(tmp)  # whether or not save_pretrained wrote one
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "lrc_config.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
        (tmp / "README.md").write_text(model_card(_card_facts(student, model, info, dtype, out_dir)))
    return out_dir


def _generation_config(cls, config, tokenizer):
    """The generation defaults: the teacher config's special-token ids, filled in from the tokenizer."""
    generation = cls.from_model_config(config)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(generation, key, None) is None and tokenizer is not None:
            setattr(generation, key, getattr(tokenizer, key, None))
    if generation.pad_token_id is None:
        generation.pad_token_id = generation.eos_token_id if isinstance(generation.eos_token_id, int) else None
    return generation


def _card_facts(student: LRCStudent, model, info: dict, dtype: torch.dtype, out_dir: Path) -> dict:
    config = info.get("config") or {}
    heads = student.teacher_config.num_attention_heads
    return {"teacher": config.get("teacher"), "revision": getattr(student.teacher_config, "_commit_hash", None),
            "d_student": student.d_student, "d_teacher": student.d_teacher, "num_heads": heads,
            "num_layers": len(student.layers), "head_dim": student.head_dim, "tied": student.tied,
            "num_parameters": sum(p.numel() for p in model.parameters()), "dtype": str(dtype).removeprefix("torch."),
            "steps": info.get("steps"), "tokens": info.get("tokens"), "trainer": info.get("trainer"),
            "cache": info.get("cache"), "cache_fingerprints": info.get("cache_fingerprints"),
            "heldout": info.get("heldout"), "export_dir": str(out_dir)}  # fmt: skip
