"""The LRC student against `transformers`: parity, clone activations, gradients, export."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from lrc_offline.student.export import export_student
from lrc_offline.student.lrc import CLONE_TERMS, LRCStudent
from lrc_offline.teacher.hooks import capture_teacher


def _ids(batch=2, tokens=12, seed=0):
    return torch.randint(0, 300, (batch, tokens), generator=torch.Generator().manual_seed(seed))


def _padding_mask(batch=2, tokens=12):
    mask = torch.ones(batch, tokens, dtype=torch.long)
    mask[1, 8:] = 0  # right padding on the second row
    return mask


@pytest.mark.parametrize("with_mask", [False, True])
def test_identity_student_equals_teacher(teacher, with_mask):
    student = LRCStudent(teacher, teacher.config.hidden_size)
    student.set_identity()
    ids = _ids()
    mask = _padding_mask() if with_mask else None
    ref = teacher(input_ids=ids, attention_mask=mask).logits
    out = student(ids, mask).logits_BTV
    valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    torch.testing.assert_close(out[valid], ref[valid], rtol=1e-5, atol=1e-5)


def test_identity_student_clone_activations_equal_teacher_hooks(teacher):
    student = LRCStudent(teacher, teacher.config.hidden_size)
    student.set_identity()
    ids, positions = _ids(), torch.tensor([[0, 3, 11], [1, 2, 7]])
    captured = capture_teacher(teacher, ids, positions_BP=positions, terms=CLONE_TERMS)
    out = student(ids, clone_positions_BP=positions)
    for term in CLONE_TERMS:
        assert out.acts[term].shape == captured.acts[term].shape
        torch.testing.assert_close(out.acts[term], captured.acts[term], rtol=1e-5, atol=1e-5)


def test_targets_recomputed_from_residual_equal_teacher(teacher):
    student = LRCStudent(teacher, 16)
    ids, positions = _ids(tokens=16), torch.tensor([[0, 5, 9, 15], [0, 1, 2, 3]])
    captured = capture_teacher(teacher, ids, _padding_mask(tokens=16), positions, terms=CLONE_TERMS + ("input", "attn"))
    for layer in range(student.num_layers):
        rec = student.teacher_targets_from_residual(layer, captured.acts["input"][layer], captured.acts["attn"][layer])
        for term in CLONE_TERMS:
            torch.testing.assert_close(rec[term], captured.acts[term][layer], rtol=1e-5, atol=1e-6)


def test_clone_layer_subset_and_shapes(teacher):
    student = LRCStudent(teacher, 24)
    positions = torch.tensor([[0, 4], [2, 6]])
    out = student(_ids(), clone_positions_BP=positions, clone_layers=[1])
    cfg = teacher.config
    widths = {"q": cfg.num_attention_heads * cfg.head_dim, "k": cfg.num_key_value_heads * cfg.head_dim,
              "v": cfg.num_key_value_heads * cfg.head_dim, "o": 24, "gate": cfg.intermediate_size,
              "up": cfg.intermediate_size, "down": 24}  # fmt: skip
    for term, width in widths.items():
        assert out.acts[term].shape == (1, 2, 2, width)


def test_gradients_reach_every_projection_and_norm_and_no_teacher_parameter(teacher):
    student = LRCStudent(teacher, 24, init_std=0.1)
    out = student(_ids(), clone_positions_BP=torch.tensor([[0, 4], [2, 6]]))
    loss = out.logits_BTV.pow(2).mean() + sum(a.pow(2).mean() for a in out.acts.values())
    loss.backward()
    for name, p in student.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"
    assert all(p.grad is None for p in teacher.parameters())
    assert all(not b.requires_grad for b in student.buffers())
    # teacher tensors are shared, not copied, and stay out of the student's state dict
    assert student.teacher_embed.data_ptr() == teacher.model.embed_tokens.weight.data_ptr()
    assert not any(k.startswith("teacher_") for k in student.state_dict())


def test_random_init_is_seeded_and_paper_scaled(teacher):
    a, b, c = LRCStudent(teacher, 16, seed=1), LRCStudent(teacher, 16, seed=1), LRCStudent(teacher, 16, seed=2)
    torch.testing.assert_close(a.proj_embed, b.proj_embed)
    assert not torch.equal(a.proj_embed, c.proj_embed)
    stds = torch.stack([p.std() for p in a.projections()])
    assert torch.allclose(stds, torch.full_like(stds, 0.02), rtol=0.2)


@pytest.mark.parametrize("with_mask", [False, True])
def test_export_reproduces_module_logits(teacher, tokenizer, tmp_path, with_mask):
    student = LRCStudent(teacher, 24, init_std=0.1, seed=3)
    with torch.no_grad():
        for w in student.norm_weights():
            w.uniform_(0.5, 1.5)
    export_dir = export_student(student, tmp_path / "student", tokenizer, {"note": "test"})
    model = AutoModelForCausalLM.from_pretrained(export_dir)
    assert model.config.hidden_size == 24 and model.config.head_dim == teacher.config.head_dim
    assert model.config.tie_word_embeddings == teacher.config.tie_word_embeddings
    ids, mask = _ids(), (_padding_mask() if with_mask else None)
    with torch.no_grad():
        ref = student(ids, mask).logits_BTV
        out = model(input_ids=ids, attention_mask=mask).logits
    valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    rel = (out[valid] - ref[valid]).norm() / ref[valid].norm()
    assert rel < 1e-5, f"relative error {rel:.2e}"
    assert (export_dir / "lrc_config.json").is_file() and (export_dir / "tokenizer.json").is_file()
    assert list(export_dir.glob("*.safetensors"))


def test_student_on_bf16_teacher_runs(teacher):
    student = LRCStudent(teacher, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = student(_ids(), clone_positions_BP=torch.tensor([[0, 1], [0, 2]]))
    assert torch.isfinite(out.logits_BTV.float()).all()


def test_document_mask_equals_running_each_packed_document_alone(teacher):
    student = LRCStudent(teacher, teacher.config.hidden_size)
    student.set_identity()
    ids = _ids(batch=1, tokens=12)
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]])  # two documents packed in one row
    packed = student(ids, position_ids_BT=position_ids, document_mask=True).logits_BTV
    first = teacher(input_ids=ids[:, :5]).logits
    second = teacher(input_ids=ids[:, 5:]).logits
    torch.testing.assert_close(packed, torch.cat([first, second], dim=1), rtol=1e-5, atol=1e-5)
    unmasked = student(ids).logits_BTV
    assert not torch.allclose(unmasked[:, 5:], second, atol=1e-3)  # without the mask the documents mix


def test_sizes_transformers_cannot_export_are_refused_before_training():
    from lrc_offline.config import ConfigError, StudentConfig
    from lrc_offline.student.lrc import build_student
    from lrc_offline.teacher.tiny import tiny_teacher

    llama = tiny_teacher("llama")  # 4 heads: LlamaConfig wants hidden_size % 4 == 0
    with pytest.raises(ConfigError, match="multiple of the teacher's 4 attention heads, e.g. 28 or 32"):
        build_student(llama, StudentConfig(hidden_size=30))
    assert build_student(llama, StudentConfig(hidden_size=28)).d_student == 28
