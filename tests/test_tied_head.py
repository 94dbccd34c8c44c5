"""A tied head with the PCA start (lm_head^S = E^S): the rotated basis and fitted final norm, the teacher
reproduced at full size, the export, the config and a training run."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from lrc_offline.capture.build import build_cache
from lrc_offline.config import CacheConfig, ConfigError, StudentConfig, TrainConfig, TrainJobConfig
from lrc_offline.student.export import export_student
from lrc_offline.student.init import init_pca, tied_head_rotation
from lrc_offline.student.lrc import LRCStudent, build_student
from lrc_offline.teacher.tiny import tiny_teacher
from lrc_offline.training.trainer import train_from_cache


def _ids():
    return torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))


def _basis(d_teacher: int, d_student: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d_teacher, d_student, generator=gen, dtype=torch.float64))[0].float()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_tied_pca_student_of_full_size_is_the_teacher(family):
    # A per-channel final norm over the unrotated basis cannot carry the teacher's final-norm weight; the
    # rotated basis can, exactly, when nothing is cut away.
    teacher = tiny_teacher(family)
    assert teacher.config.tie_word_embeddings
    d = teacher.config.hidden_size
    student = LRCStudent(teacher, d)
    init_pca(student, _basis(d, d, 2))
    assert student.tied and student.proj_lm_head is None
    torch.testing.assert_close(student(_ids()).logits_BTV, teacher(input_ids=_ids()).logits, rtol=1e-4, atol=1e-4)


def _objective(s_SS, u_DS, g_D, embed_VD):
    centred = embed_VD.double() - embed_VD.double().mean(0)
    return (centred @ (u_DS.double() @ s_SS - g_D.double()[:, None] * u_DS.double())).square().sum()


def test_tied_head_rotation_is_the_least_squares_symmetric_fit():
    gen = torch.Generator().manual_seed(5)
    d_teacher, d_student, vocab = 8, 3, 40
    u = _basis(d_teacher, d_student, 6)
    g = 1.0 + 0.5 * torch.randn(d_teacher, generator=gen)
    embed = torch.randn(vocab, d_teacher, generator=gen) + 2.0  # a mean row, which the fit must ignore
    rotation, weight = tied_head_rotation(u, g, embed, rows_per_chunk=7)  # chunks that do not divide V
    assert torch.allclose(rotation.t() @ rotation, torch.eye(d_student), atol=1e-5)
    assert torch.all(weight[:-1] >= weight[1:])
    fitted = (rotation.double() * weight.double()) @ rotation.double().t()
    # Naive reference: least squares over the d_S (d_S + 1) / 2 free entries of a symmetric S.
    pairs = [(i, j) for i in range(d_student) for j in range(i, d_student)]
    centred = embed.double() - embed.double().mean(0)
    columns = []
    for i, j in pairs:
        unit = torch.zeros(d_student, d_student, dtype=torch.float64)
        unit[i, j] = unit[j, i] = 1.0
        columns.append((centred @ u.double() @ unit).reshape(-1))
    target = (centred @ (g.double()[:, None] * u.double())).reshape(-1)
    solution = torch.linalg.lstsq(torch.stack(columns, 1), target[:, None]).solution[:, 0]
    reference = torch.zeros(d_student, d_student, dtype=torch.float64)
    for (i, j), value in zip(pairs, solution):
        reference[i, j] = reference[j, i] = value
    torch.testing.assert_close(fitted, reference, rtol=1e-4, atol=1e-4)
    assert _objective(fitted, u, g, embed) <= _objective(torch.diag(torch.diagonal(fitted)), u, g, embed)


def test_the_tied_pca_head_comes_closer_to_the_teacher_than_the_per_channel_fold():
    teacher = tiny_teacher("llama")
    d, size = teacher.config.hidden_size, 24
    u = _basis(d, size, 3)
    tied = LRCStudent(teacher, size)
    init_pca(tied, u)
    # The fold without the rotation: basis U, final norm the diagonal of U^T diag(g_final) U.
    per_channel = LRCStudent(teacher, size)
    init_pca(per_channel, u)
    with torch.no_grad():
        g = teacher.model.norm.weight.float()
        for layer in per_channel.layers:
            for m in ("q", "k", "v", "gate", "up"):
                frozen = layer.teacher.input_norm if m in ("q", "k", "v") else layer.teacher.post_norm
                layer.proj[m].copy_(frozen[:, None] * u)
            for m in ("o", "down"):
                layer.proj[m].copy_(u)
        per_channel.proj_embed.copy_(u)
        per_channel.final_norm.copy_((d / size) ** 0.5 * (u.square() * g[:, None]).sum(0))

    def kl(student):
        with torch.no_grad():
            target = teacher(input_ids=_ids()).logits.log_softmax(-1)
            return (target.exp() * (target - student(_ids()).logits_BTV.log_softmax(-1))).sum(-1).mean()

    assert kl(tied) < kl(per_channel), (kl(tied), kl(per_channel))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_tied_pca_student_exports_a_tied_checkpoint_with_the_same_logits(family, tmp_path, tokenizer):
    teacher = tiny_teacher(family)
    student = LRCStudent(teacher, 24)
    init_pca(student, _basis(teacher.config.hidden_size, 24, 4))
    assert student.final_norm.std() > 0.05  # the fitted final norm is far from one constant
    out = export_student(student, tmp_path / "s", tokenizer)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()  # one matrix: the embedding
    model = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(model(input_ids=_ids()).logits, student(_ids()).logits_BTV, rtol=1e-5, atol=1e-5)


def test_a_tied_head_needs_a_teacher_with_a_tied_head():
    assert StudentConfig(head="tied").head == "tied"
    with pytest.raises(ConfigError, match="student.head"):
        StudentConfig(head="shared")
    teacher = tiny_teacher("qwen3")
    assert not teacher.config.tie_word_embeddings
    with pytest.raises(ConfigError, match="student.head=tied needs a teacher") as err:
        build_student(teacher, StudentConfig(hidden_size=32, head="tied"))
    assert "\n" not in str(err.value)
    assert build_student(tiny_teacher("llama"), StudentConfig(hidden_size=32, head="tied")).tied


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_the_auto_head_is_tied_exactly_when_the_teachers_is(family):
    teacher = tiny_teacher(family)
    student = build_student(teacher, StudentConfig(hidden_size=32))
    assert student.tied == teacher.config.tie_word_embeddings == (family == "llama")
    assert not build_student(teacher, StudentConfig(hidden_size=32, head="untied")).tied


@pytest.fixture(scope="module")
def residual_cache(tmp_path_factory):
    out = tmp_path_factory.mktemp("tied") / "cache"
    build_cache(CacheConfig(seq_len=32, max_sequences=16, sequences_per_shard=8, act_positions=8, topk=8,
                            act_dtype="float32"), out, progress=False)  # fmt: skip
    return out


def test_training_with_a_tied_pca_head_keeps_it_tied(residual_cache, tmp_path):
    cfg = TrainJobConfig(student=StudentConfig(hidden_size=32, init="pca", head="tied", pca_calibrate_sequences=8),
                         train=TrainConfig(steps=1, batch_size=8, log_every=1))  # fmt: skip
    assert cfg.resolved(residual_available=True).student.head == "tied"
    train_from_cache(cfg, residual_cache, tmp_path, progress=False)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["student"]["init"], saved["student"]["head"]) == ("pca", "tied")
    info = json.loads((tmp_path / "student" / "lrc_config.json").read_text())
    assert info["init"]["kind"] == "pca" and info["init"]["head_scale_sequences"] == 8
    config = json.loads((tmp_path / "student" / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["hidden_size"] == 32
    auto = dataclasses.replace(cfg, student=dataclasses.replace(cfg.student, head="auto"))
    assert auto.resolved(residual_available=True).student == dataclasses.replace(cfg.student, head="auto")
    train_from_cache(auto, residual_cache, tmp_path / "auto", progress=False)  # the PCA start's default head
    assert json.loads((tmp_path / "auto" / "student" / "config.json").read_text())["tie_word_embeddings"] is True


def test_tied_head_benchmark_smoke(tmp_path, monkeypatch):
    import runpy
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "tied_head.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--teacher", "tiny-random:llama", "--corpus", "tiny-text",
                                      "--heldout-docs", "3", "--cache-sequences", "16", "--heldout-sequences", "2",
                                      "--size", "64", "--calibrate-sequences", "4", "--steps", "2", "--eval-every", "1",
                                      "--out", str(tmp_path)])  # fmt: skip
    runpy.run_path(str(script), run_name="__main__")
    result = json.loads((tmp_path / "tied_head.json").read_text())
    step0 = result["step0"]
    # d_S = d_T: both PCA heads are the teacher (the head scale is left near 1); the per-channel fold is not
    for name in ("pca, untied head", "pca, tied head (rotated basis, fitted final norm)"):
        assert step0[name]["folded"]["kl"] < 1e-4, (name, step0[name])
    assert step0["pca, tied head (per-channel fold, before)"]["folded"]["kl"] > 1e-3
    tied, untied = step0["pca, tied head (rotated basis, fitted final norm)"], step0["pca, untied head"]
    assert untied["exported_parameters"] - tied["exported_parameters"] == 320 * 64  # vocab x d_S
    assert set(result["curves"]) == {"tied", "untied"}
    assert all(len(curve["heldout"]) >= 2 for curve in result["curves"].values())
    qwen = result["geometry"]["Qwen2.5-3B -> 1200"]
    assert qwen["untied_extra"] == 151936 * 1200
