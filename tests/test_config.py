"""Config files, dotted overrides and validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from lrc_offline.config import (
    CacheConfig,
    ConfigError,
    TrainJobConfig,
    apply_overrides,
    load_config,
    to_dict,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "cache_jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_cache_job_configs_load(path):
    cfg = load_config(CacheConfig, path)
    assert cfg.seq_len >= 2 and cfg.teacher


@pytest.mark.parametrize("path", sorted((ROOT / "train").glob("*.yaml")), ids=lambda p: p.name)
def test_train_job_configs_load(path):
    cfg = load_config(TrainJobConfig, path)
    assert cfg.student.hidden_size > 0


def test_dotted_overrides_parse_values_and_validate():
    cfg = apply_overrides(TrainJobConfig(), ["student.hidden_size=48", "loss.o_space=teacher", "optim.betas=[0.8,0.9]"])
    assert cfg.student.hidden_size == 48 and cfg.loss.o_space == "teacher" and cfg.optim.betas == (0.8, 0.9)
    with pytest.raises(ConfigError, match="unknown key 'hidden'"):
        apply_overrides(TrainJobConfig(), ["student.hidden=3"])
    with pytest.raises(ConfigError, match="student.hidden_size"):
        apply_overrides(TrainJobConfig(), ["student.hidden_size=0"])
    with pytest.raises(ConfigError, match="cache.logit_mode"):
        apply_overrides(CacheConfig(), ["logit_mode=full"])
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides(CacheConfig(), ["topk"])


def test_config_round_trips_through_a_file(tmp_path):
    cfg = apply_overrides(TrainJobConfig(), ["train.steps=7", "loss.clone_terms={\"q\": 0.5}"])
    (tmp_path / "c.json").write_text(__import__("json").dumps(to_dict(cfg)))
    again = load_config(TrainJobConfig, tmp_path / "c.json")
    assert again == cfg
    (tmp_path / "bad.yaml").write_text("student: {width: 3}\n")
    with pytest.raises(ConfigError, match="bad.yaml.student: unknown keys"):
        load_config(TrainJobConfig, tmp_path / "bad.yaml")


def test_floats_load_in_any_standard_notation(tmp_path):
    # PyYAML reads 1e-4, 1E5 and 2.5e3 (no dot, or no exponent sign) as strings
    (tmp_path / "c.yaml").write_text("optim:\n  lr: 1e-4\n  betas: [9e-1, .95]\nloss:\n  alpha: 1E5\n"
                                     "  huber_delta: 2.5e3\n  clone_terms: {q: 5e-1}\nstudent:\n  init_std: .5\n")
    cfg = load_config(TrainJobConfig, tmp_path / "c.yaml")
    assert (cfg.optim.lr, cfg.optim.betas, cfg.loss.alpha) == (1e-4, (0.9, 0.95), 1e5)
    assert (cfg.loss.huber_delta, cfg.loss.clone_terms, cfg.student.init_std) == (2500.0, {"q": 0.5}, 0.5)
    (tmp_path / "negative.yaml").write_text("loss:\n  huber_delta: -2.5e-3\n")
    with pytest.raises(ConfigError, match="loss.huber_delta=-0.0025 must be > 0"):  # read as a number
        load_config(TrainJobConfig, tmp_path / "negative.yaml")
    cfg = apply_overrides(TrainJobConfig(), ["optim.lr=.5", "loss.alpha=+1.5E-2", "loss.clone_terms.q=1."])
    assert (cfg.optim.lr, cfg.loss.alpha, cfg.loss.clone_terms["q"]) == (0.5, 0.015, 1.0)
    # a float-looking string is still a string where the field is one; words are still refused as floats
    (tmp_path / "corpus.yaml").write_text("corpus: 1e5\n")
    assert load_config(TrainJobConfig, tmp_path / "corpus.yaml").corpus == "1e5"
    with pytest.raises(ConfigError, match="optim.lr='fast' has the wrong type; expected float | None"):
        apply_overrides(TrainJobConfig(), ["optim.lr=fast"])
    with pytest.raises(ConfigError, match="student.hidden_size='1e2' has the wrong type"):
        apply_overrides(TrainJobConfig(), ["student.hidden_size=\"1e2\""])


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:3", "mps"])
def test_device_strings(device):
    assert apply_overrides(TrainJobConfig(), [f"train.device={device}"]).train.device == device
    assert apply_overrides(CacheConfig(), [f"run.device={device}"]).run.device == device


@pytest.mark.parametrize("device", ["gpu", "cuda:", "cuda:x", "CPU", "cpu:0 "])
def test_unknown_devices_are_refused(device):
    with pytest.raises(ConfigError, match="train.device=.* is not a device; use auto, cpu, cuda, cuda:N or mps"):
        apply_overrides(TrainJobConfig(), [f"train.device={device}"])
    with pytest.raises(ConfigError, match="cache.run.device"):
        apply_overrides(CacheConfig(), [f"run.device={device}"])


def test_clone_term_weights_must_not_be_negative():
    assert apply_overrides(TrainJobConfig(), ["loss.clone_terms.q=0"]).loss.clone_terms["q"] == 0
    with pytest.raises(ConfigError, match="loss.clone_terms.v=-0.5 must be >= 0"):
        apply_overrides(TrainJobConfig(), ["loss.clone_terms.v=-0.5"])


def test_every_field_has_a_docstring_for_the_help():
    from lrc_offline.config_help import config_keys, field_docs

    assert field_docs(CacheConfig)["topk"] == "k for logit_mode=topk."
    assert field_docs(TrainJobConfig)["teacher"].startswith("Teacher whose weights generate the student. None:")
    for cls in (CacheConfig, TrainJobConfig):
        undocumented = [k.key for k in config_keys(cls) if not k.doc]
        assert not undocumented, f"{cls.__name__} fields without a docstring: {undocumented}"


def test_yaml_dump_round_trips(tmp_path):
    from lrc_offline.config import config_yaml

    for cfg in (apply_overrides(TrainJobConfig(), ["optim.lr=1e-5", "optim.betas=[0.8,0.9]", "teacher=x"]),
                apply_overrides(CacheConfig(), ["act_layers=[0,1]", "temperature=1e-3"])):  # fmt: skip
        (tmp_path / "c.yaml").write_text(config_yaml(cfg))
        assert load_config(type(cfg), tmp_path / "c.yaml") == cfg


def test_cache_defaults_are_the_compact_codec_and_auto_positions_follow_the_sequence_length():
    cfg = CacheConfig()
    assert (cfg.logprob_dtype, cfg.act_dtype, cfg.act_layer_fraction, cfg.act_positions) == ("float16", "int4g",
                                                                                              0.25, "auto")  # fmt: skip
    resolved = {n: apply_overrides(CacheConfig(), [f"seq_len={n}"]).resolved().act_positions
                for n in (8, 64, 256, 1024, 2048, 4096)}  # fmt: skip
    assert resolved == {8: 8, 64: 16, 256: 16, 1024: 16, 2048: 32, 4096: 64}
    # a number given is kept as given (a manifest records what was asked), though only seq_len are stored
    explicit = apply_overrides(CacheConfig(), ["act_positions=100", "seq_len=64"])
    assert explicit.resolved() == explicit and explicit.num_act_positions == 64
    # auto is resolved after every override: a later seq_len still counts
    assert load_config(CacheConfig, ROOT / "cache_jobs" / "smollm2_demo.yaml", ["seq_len=2048"]).num_act_positions == 32
    for bad in ("act_positions=some", "act_positions=0"):
        with pytest.raises(ConfigError, match="cache.act_positions"):
            apply_overrides(CacheConfig(), [bad])


@pytest.mark.parametrize(("init", "steps", "warmup"), [("pca", 40, 20), ("pca", 240, 60), ("pca", 9765, 195),
                                                       ("random", 6, 3), ("random", 100, 10), ("random", 4882, 97)])
def test_auto_warmup_keeps_a_pca_start_gentle_and_long_runs_warm_up_over_2_percent(init, steps, warmup):
    job = apply_overrides(TrainJobConfig(), [f"student.init={init}", f"train.steps={steps}"])
    assert job.optim.warmup_steps is None
    ran = job.resolved(residual_available=True)
    assert ran.optim.warmup_steps == warmup and ran.optim.lr == (5e-5 if init == "pca" else 1e-3)
    assert ran.resolved(residual_available=True) == ran  # resolving twice changes nothing
    given = apply_overrides(job, ["optim.warmup_steps=0"]).resolved(residual_available=True)
    assert given.optim.warmup_steps == 0


def test_the_auto_warmup_leaves_a_short_run_half_its_steps_to_decay():
    from lrc_offline.training.optim import lr_factor

    optim = TrainJobConfig().optim.resolved("pca", 40)
    factors = [lr_factor(step, 40, optim) for step in range(40)]
    assert factors[:20] == pytest.approx([(s + 1) / 20 for s in range(20)])
    assert factors[19] == 1.0 and factors[39] == pytest.approx(1 / 20)  # the peak, then linear decay to 0 at 40
    given = apply_overrides(TrainJobConfig(), ["optim.warmup_steps=60"]).optim.resolved("pca", 40)
    assert [lr_factor(step, 40, given) for step in range(40)] == pytest.approx([(s + 1) / 60 for s in range(40)])
