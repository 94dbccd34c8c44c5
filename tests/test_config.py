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
