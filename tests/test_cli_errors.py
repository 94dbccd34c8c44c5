"""Bad input to `lrc-cache` and `lrc-train`: one line on stderr, exit 2, nothing written. And the config help."""

from __future__ import annotations

from pathlib import Path

import pytest

from lrc_offline.cli.cache import main as cache_main
from lrc_offline.cli.train import main as train_main
from lrc_offline.config import CacheConfig, TrainJobConfig, load_config
from lrc_offline.config_help import config_keys

ROOT = Path(__file__).resolve().parents[1]


def _one_line_error(capsys, *names: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    for name in names:
        assert name in err, (name, err)
    return err


@pytest.fixture
def bad_files(tmp_path):
    (tmp_path / "bad.yaml").write_text("student:\n  hidden_size: [16\n")
    (tmp_path / "bad.json").write_text('{"student": {"hidden_size": 16,}}')
    return tmp_path


@pytest.mark.parametrize("name", ["bad.yaml", "bad.json"])
def test_malformed_config_file_is_one_line_naming_the_file(bad_files, capsys, name):
    out = bad_files / "out"
    config = str(bad_files / name)
    assert cache_main(["build", "--config", config, "--out", str(out)]) == 2
    _one_line_error(capsys, name, "line")
    assert train_main(["train", "--config", config, "--cache", str(bad_files / "cache"), "--out", str(out)]) == 2
    _one_line_error(capsys, name, "line")
    assert train_main(["online", "--config", config, "--out", str(out)]) == 2
    _one_line_error(capsys, name)
    assert not out.exists()


def test_unknown_device_is_refused_before_anything_loads(tmp_path, capsys):
    out = tmp_path / "out"
    assert cache_main(["build", "--out", str(out), "run.device=gpu"]) == 2
    _one_line_error(capsys, "cache.run.device", "'gpu'")
    assert train_main(["train", "--cache", str(tmp_path / "cache"), "--out", str(out), "train.device=gpu"]) == 2
    _one_line_error(capsys, "train.device")
    assert train_main(["online", "--out", str(out), "teacher=tiny-random:llama", "train.device=cuda:x"]) == 2
    _one_line_error(capsys, "train.device")
    assert not out.exists()


def test_negative_clone_weight_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    assert train_main(["train", "--cache", str(tmp_path / "cache"), "--out", str(out), "loss.clone_terms.q=-1"]) == 2
    _one_line_error(capsys, "loss.clone_terms.q")
    assert not out.exists()


def test_online_without_a_teacher_leaves_no_run_directory(tmp_path, capsys):
    out = tmp_path / "out"
    assert train_main(["online", "--out", str(out), "--no-progress"]) == 2
    _one_line_error(capsys, "teacher=")
    assert not out.exists()


def test_eval_of_a_missing_student_names_the_path(tmp_path, capsys):
    missing = tmp_path / "no-such-student"
    assert train_main(["eval", "--student", str(missing), "--corpus", "tiny-text", "--heldout-docs", "2"]) == 2
    _one_line_error(capsys, str(missing))
    assert train_main(["eval", "--student", str(tmp_path), "--corpus", "tiny-text", "--heldout-docs", "2"]) == 2
    _one_line_error(capsys, str(tmp_path), "config.json")
    assert not missing.exists()


def test_clean_refuses_a_folder_that_is_not_a_cache(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert cache_main(["clean", str(tmp_path)]) == 2
    _one_line_error(capsys, str(tmp_path), "manifest.json")
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert cache_main(["clean", str(tmp_path / "nowhere")]) == 2
    _one_line_error(capsys, "nowhere")


@pytest.mark.parametrize("argv", [["--config", "x.yaml"], [], ["trian"]])
def test_train_without_a_command_says_which_to_use(argv, capsys):
    assert train_main(argv) == 2
    assert "train" in _one_line_error(capsys, "lrc-train")


def test_overrides_may_follow_flags(tmp_path, capsys):
    out = tmp_path / "cache"
    assert cache_main(["build", "--out", str(out), "max_sequences=4", "--no-progress", "seq_len=16",
                       "cache.sequences_per_shard=4", "act_positions=2"]) == 0  # fmt: skip
    from lrc_offline.cache import read_manifest

    built = read_manifest(out).config
    assert (built.max_sequences, built.seq_len, built.sequences_per_shard) == (4, 16, 4)
    capsys.readouterr()
    assert train_main(["train", "--cache", str(out), "student.hidden_size=16", "--print-config", "train.steps=3",
                       "--resume", "never", "optim.lr=1e-4"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "hidden_size: 16" in printed and "steps: 3" in printed and "lr: 0.0001" in printed


@pytest.mark.parametrize("command", [["build"], ["train"], ["sweep"], ["online"]])
def test_help_config_lists_every_key_with_type_default_and_doc(command, capsys):
    main, cls = (cache_main, CacheConfig) if command == ["build"] else (train_main, TrainJobConfig)
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help-config"])  # no --out or --cache needed
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    keys = config_keys(cls)
    assert len(keys) > 20 and all(k.doc for k in keys)
    for key in keys:
        assert f"\n{key.key}  ({key.type}, default: " in text
        assert key.doc.split()[0] in text
    if cls is TrainJobConfig:
        assert "\nloss.clone_terms  (dict[str, float], default: " in text
        assert "\noptim.lr  (float | None, default: null)" in text
        assert "Peak learning rate." in text


@pytest.mark.parametrize("main, cls, argv, config", [
    (cache_main, CacheConfig, ["build"], ROOT / "cache_jobs" / "tiny_cpu.yaml"),
    (train_main, TrainJobConfig, ["train"], ROOT / "train" / "tiny_cpu.yaml"),
    (train_main, TrainJobConfig, ["online"], ROOT / "train" / "tiny_cpu_online.yaml"),
])  # fmt: skip
def test_print_config_round_trips_and_writes_nothing(main, cls, argv, config, tmp_path, capsys):
    overrides = ["topk=8", "temperature=2.5e-1"] if cls is CacheConfig else [
        "optim.lr=3e-5", "loss.clone_terms.q=.5", "optim.betas=[0.8,0.9]", "student.hidden_size=16"]  # fmt: skip
    out = tmp_path / "out"
    assert main([*argv, "--config", str(config), "--out", str(out), "--print-config", *overrides]) == 0
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out)
    assert load_config(cls, printed) == load_config(cls, config, overrides)
    assert not out.exists()
