"""`lrc-cache tokenize|build --worker-index I --num-workers N` (worker I of N takes units and shards I, I+N,
...), and the deprecated names `--shard-index`/`--num-shards`, which still work and say so in one line."""

from __future__ import annotations

import json
import logging

import pytest

from lrc_offline.cli.cache import main as cache_main

TINY = ["teacher=tiny-random:llama", "seq_len=16", "max_sequences=8", "sequences_per_shard=2", "topk=8",
        "act_positions=4", "heldout_docs=0", "run.batch_size=4"]  # fmt: skip
DEPRECATION = "--shard-index, --num-shards: deprecated, use --worker-index, --num-workers"


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for f in range(5):
        (folder / f"f{f}.txt").write_text("\n\n".join(f"file {f} paragraph {d} " * 3 for d in range(3)), "utf-8")
    return folder


def _deprecation_lines(caplog) -> list[str]:
    lines = [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]
    assert all(line.startswith(DEPRECATION) and "\n" not in line for line in lines), lines
    return lines


def test_tokenize_worker_flags_and_their_deprecated_names_split_the_same_units(tmp_path, corpus, caplog):
    caplog.set_level(logging.WARNING)
    flags = {"new": ["--worker-index", "1", "--num-workers", "2"], "old": ["--shard-index", "1", "--num-shards", "2"]}
    parts = {}
    for name, worker in flags.items():
        caplog.clear()
        out = tmp_path / name
        assert cache_main(["tokenize", "--out", str(out), *worker, f"corpus={corpus}", *TINY]) == 0
        parts[name] = sorted(p.name for p in (out / "index").glob("part-*.json"))
        warned = _deprecation_lines(caplog)
        assert len(warned) == (name == "old"), warned
    assert parts["new"] == parts["old"] == ["part-000001.json", "part-000003.json"]


def test_build_under_the_deprecated_names_builds_worker_i_of_n_and_warns_once(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    built = {}
    for name, worker in {"new": ["--worker-index", "1", "--num-workers", "2"],
                         "old": ["--num-shards", "2", "--shard-index", "1"]}.items():  # fmt: skip
        caplog.clear()
        out = tmp_path / name
        assert cache_main(["build", "--out", str(out), "--no-progress", *worker, *TINY]) == 0
        built[name] = sorted(json.loads(r.read_text())["index"] for r in (out / "shards").glob("shard-*.done.json"))
        assert len(_deprecation_lines(caplog)) == (name == "old")
    assert built["new"] == built["old"] == [1, 3]


def test_a_worker_index_outside_the_split_names_the_new_flags(tmp_path, capsys):
    assert cache_main(["build", "--out", str(tmp_path / "c"), "--no-progress", "--shard-index", "2", "--num-shards",
                       "2", *TINY]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "--worker-index 2 must be in [0, --num-workers 2)" in err and not (tmp_path / "c").exists()
