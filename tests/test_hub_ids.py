"""Teachers named by Hugging Face id, resolved from a local Hugging Face cache with no network.

The tests lay out a fake hub cache (`models--<owner>--<name>/{refs,snapshots}`) under a temporary HF_HOME,
as `hf download` would have written it.
"""

from __future__ import annotations

import json

import pytest

from lrc_offline.cache import read_manifest
from lrc_offline.cli.cache import main as cache_main
from lrc_offline.teacher.fingerprint import weights_fingerprint
from lrc_offline.teacher.load import TeacherLoadError, load_teacher
from lrc_offline.teacher.tiny import tiny_teacher, tiny_tokenizer

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OLD_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    """An HF_HOME whose hub cache holds acme/tiny-llama at two commits: main -> COMMIT, tag v0 -> OLD_COMMIT."""
    home = tmp_path / "hf-home"
    repo = home / "hub" / "models--acme--tiny-llama"
    for commit in (COMMIT, OLD_COMMIT):
        snapshot = repo / "snapshots" / commit
        tiny_teacher("llama").save_pretrained(snapshot)
        tiny_tokenizer().save_pretrained(snapshot)
    (repo / "refs" / "tags").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "refs" / "tags" / "v0").write_text(OLD_COMMIT)
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


def test_hub_id_loads_from_the_local_cache(hf_home):
    teacher = load_teacher("acme/tiny-llama")
    assert teacher.revision == COMMIT and teacher.model.config._commit_hash == COMMIT
    assert teacher.source == str(hf_home / "hub" / "models--acme--tiny-llama" / "snapshots" / COMMIT)
    assert weights_fingerprint(teacher.model) == weights_fingerprint(load_teacher("tiny-random:llama").model)
    for name, revision, expected in [("acme/tiny-llama@main", None, COMMIT), ("acme/tiny-llama@tags/v0", None, OLD_COMMIT),
                                     (f"acme/tiny-llama@{OLD_COMMIT}", None, OLD_COMMIT),
                                     (f"acme/tiny-llama@{OLD_COMMIT[:10]}", None, OLD_COMMIT),
                                     ("acme/tiny-llama", "tags/v0", OLD_COMMIT)]:  # fmt: skip
        assert load_teacher(name, revision=revision).revision == expected, (name, revision)


def test_uncached_ids_fail_in_one_line_naming_the_id(hf_home):
    with pytest.raises(TeacherLoadError, match=r"'acme/not-here' is neither a local directory nor a model in the "
                                                r"local Hugging Face cache .*hf download acme/not-here"):  # fmt: skip
        load_teacher("acme/not-here")
    with pytest.raises(TeacherLoadError, match=r"'acme/tiny-llama' has no revision 'nope'.*cached refs: \['main', 'tags'\]"):
        load_teacher("acme/tiny-llama@nope")
    weights = hf_home / "hub" / "models--acme--tiny-llama" / "snapshots" / COMMIT / "model.safetensors"
    weights.unlink()
    with pytest.raises(TeacherLoadError, match=r"'acme/tiny-llama' at 0123456789ab.* is only partly in"):
        load_teacher("acme/tiny-llama")


def test_cli_error_is_one_line_with_exit_2(hf_home, tmp_path, capsys):
    assert cache_main(["build", "--out", str(tmp_path / "c"), "--no-progress", "teacher=acme/not-here"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: teacher 'acme/not-here'")


def test_cache_built_from_an_id_records_the_commit_and_trains(hf_home, tmp_path):
    from lrc_offline.cli.train import main as train_main

    cache = tmp_path / "cache"
    assert cache_main(["build", "--out", str(cache), "--no-progress", "teacher=acme/tiny-llama@main", "seq_len=32",
                       "max_sequences=8", "sequences_per_shard=8", "topk=8", "act_positions=4"]) == 0  # fmt: skip
    manifest = read_manifest(cache)
    assert manifest.extra["teacher_revision"] == COMMIT and manifest.teacher_name == "acme/tiny-llama@main"
    # the trainer loads the cache's teacher by its id, again from the local cache
    run = tmp_path / "run"
    assert train_main(["train", "--cache", str(cache), "--out", str(run), "--no-progress", "train.steps=2",
                       "train.batch_size=4", "student.hidden_size=16"]) == 0  # fmt: skip
    info = json.loads((run / "student" / "lrc_config.json").read_text())
    assert info["config"]["teacher"] == "acme/tiny-llama@main"
