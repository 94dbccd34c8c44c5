"""Build workers sharing one cache directory: temporaries are per process and a worker removes only
those of writers that are gone; two workers started together (the documented split, or two identical
builds) both succeed and leave the cache a one-worker build makes; a config the teacher cannot serve is
refused before anything is written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lrc_offline.cache import CacheReader, read_manifest
from lrc_offline.capture.build import build_cache
from lrc_offline.cli.cache import main as cache_main
from lrc_offline.config import BuildRunConfig, CacheConfig
from lrc_offline.fsutil import TMP_PREFIX
from lrc_offline.teacher.load import load_teacher

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
TINY_CPU = str(ROOT / "cache_jobs/tiny_cpu.yaml")

# Another worker's temporaries, written through `fsutil.temp_path` in a process of its own: one that
# keeps running (`live`), one that has exited (`dead`, as a worker killed by the scheduler).
_WRITE_TEMPORARIES = """
import sys
from pathlib import Path
from lrc_offline.fsutil import temp_path
for final in sys.argv[1:]:
    tmp = temp_path(final)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    if final.endswith(".zarr"):
        tmp.mkdir()
        (tmp / "chunk").write_bytes(b"in progress")
    else:
        tmp.write_bytes(b"in progress")
print("written", flush=True)
sys.stdin.readline()
"""

# The final names a build writes under temporaries: the index header, a part, the manifest, a shard
# (a Zarr directory) and its completion record.
_FINALS = ("index/index.json", "index/part-000000.tokens", "manifest.json", "shards/shard-00000.zarr",
           "shards/shard-00000.done.json")  # fmt: skip


def _temporaries(root: Path) -> set[Path]:
    return set(root.rglob(TMP_PREFIX + "*"))


def _writer(out: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _WRITE_TEMPORARIES, *(str(out / f) for f in _FINALS)], env=ENV,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout.readline().strip() == "written"
    return proc


@pytest.fixture
def live_and_dead(tmp_path):
    """`out` with the temporaries of a live worker and of a dead one, each a set of paths."""
    out = tmp_path / "cache"
    dead = _writer(out)
    dead.communicate("")  # the worker exits: its pid is gone, its temporaries stay
    dead_files = _temporaries(out)
    live = _writer(out)
    live_files = _temporaries(out) - dead_files
    assert len(dead_files) == len(live_files) == len(_FINALS)
    yield out, live_files, dead_files
    live.communicate("")


def test_a_live_workers_temporaries_survive_a_build_and_a_dead_ones_are_removed(live_and_dead):
    """A build's every cleanup (index header, parts, manifest, shard and record) runs while another
    worker's temporaries are on disk: the live worker's stay, byte for byte; the dead one's go."""
    out, live_files, dead_files = live_and_dead
    cfg = CacheConfig(seq_len=16, max_sequences=8, sequences_per_shard=4, topk=8, act_positions=4, heldout_docs=2,
                      run=BuildRunConfig(batch_size=4))  # fmt: skip
    report = build_cache(cfg, out, progress=False, teacher=load_teacher("tiny-random:llama"))
    assert report.built == [0, 1]
    assert sorted(p for p in live_files if not p.exists()) == []
    assert all((p / "chunk" if p.is_dir() else p).read_bytes() == b"in progress" for p in live_files)
    assert sorted(p for p in dead_files if p.exists()) == []
    assert cache_main(["verify", str(out)]) == 0


def test_clean_keeps_a_live_workers_temporaries_unless_told_all(live_and_dead, capsys):
    out, live_files, dead_files = live_and_dead
    (out / "manifest.json").write_text("{}")  # `clean` wants a cache; the temporaries are what it looks at
    assert cache_main(["clean", str(out)]) == 0
    assert all(p.exists() for p in live_files) and not any(p.exists() for p in dead_files)
    assert "rerun with --all" in capsys.readouterr().out
    assert cache_main(["clean", "--all", str(out)]) == 0
    assert _temporaries(out) == set()


def test_another_hosts_temporary_is_removed_only_once_untouched_for_the_age_limit(tmp_path):
    """Another host's pids cannot be checked: its temporary goes once nothing in it changed for the age
    limit. A directory counts as changed when anything inside it did (a shard being written adds files)."""
    from lrc_offline.fsutil import remove_stale_temporaries

    folder = tmp_path / "shards"
    folder.mkdir()
    old = time.time() - 3 * 3600
    foreign_file = folder / f"{TMP_PREFIX}shard-00001.tar@elsewhere-node_4026531836.4242.0badcafe"
    foreign_dir = folder / f"{TMP_PREFIX}shard-00002.zarr@elsewhere-node_4026531836.4242.0badcafe"
    unnamed = folder / f"{TMP_PREFIX}shard-00003.tar-4242-0badcafe"  # no owner in the name
    foreign_file.write_bytes(b"x")
    foreign_dir.mkdir()
    (foreign_dir / "fresh-chunk").write_bytes(b"x")
    unnamed.write_bytes(b"x")
    for path in (foreign_file, foreign_dir, unnamed):
        os.utime(path, (old, old))
    assert remove_stale_temporaries(folder, max_age_s=4 * 3600) == 0
    assert remove_stale_temporaries(folder, max_age_s=2 * 3600) == 2  # the file and the unnamed one
    assert [p.name for p in folder.iterdir()] == [foreign_dir.name]  # a file inside changed just now
    os.utime(foreign_dir / "fresh-chunk", (old, old))
    assert remove_stale_temporaries(folder, max_age_s=2 * 3600) == 1
    assert list(folder.iterdir()) == []


def test_a_listing_taken_while_other_workers_rename_their_temporaries_fails_on_none(tmp_path):
    """A worker lists the cache (which index parts exist, a shard's files) while others rename their
    temporaries into place and remove shard folders: an entry gone between the listing and its size is
    left out, never an error, and every file that stayed is listed with its size."""
    from lrc_offline.storage import Location

    root = tmp_path / "index"
    root.mkdir()
    for u in range(20):
        (root / f"part-{u:06d}.json").write_bytes(b"{}")
    stop = threading.Event()

    def rename_into_place() -> None:
        n = 0
        while not stop.is_set():
            temp = root / f"{TMP_PREFIX}part-x.tokens@host.1.{n:08x}"
            temp.write_bytes(b"x" * 8)
            temp.rename(root / "part-x.tokens")
            folder = root / f"{TMP_PREFIX}shard.zarr@host.1.{n:08x}"
            folder.mkdir()
            (folder / "chunk").write_bytes(b"y")
            shutil.rmtree(folder)
            n += 1

    worker = threading.Thread(target=rename_into_place, daemon=True)
    worker.start()
    try:
        for _ in range(3000):
            listed = Location(root).files()
            assert {f"part-{u:06d}.json" for u in range(20)} <= set(listed)
            final = {name: size for name, size in listed.items() if not name.startswith(TMP_PREFIX)}
            assert all(size == (8 if name == "part-x.tokens" else 2) for name, size in final.items())
            assert list(listed) == sorted(listed)
    finally:
        stop.set()
        worker.join()


@pytest.mark.parametrize("override, field", [("act_layers=[99]", "act_layers"), ("topk=100000", "topk")])
def test_a_config_the_teacher_cannot_serve_is_refused_before_anything_is_written(tmp_path, capsys, override, field):
    out = tmp_path / "cache"
    assert cache_main(["build", "--config", TINY_CPU, "--out", str(out), "--no-progress", override]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"cache.{field}" in errors[0] and "Traceback" not in err, err
    assert not (out / "index").exists() and not out.exists()


# ---------------------------------------------------------------------------------------------------
# two real worker processes started together
# ---------------------------------------------------------------------------------------------------


def _build_cmd(out: Path, corpus: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lrc_offline.cli.cache", "build", "--config", TINY_CPU, "--out", str(out),
            "--no-progress", f"corpus={corpus}", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Six text files: tokenising them takes the two workers long enough to overlap (each tokenises its
    own units, then the other's it finds missing), the window where a worker used to delete the other's
    temporaries. The built-in tiny text is one unit, tokenised in milliseconds."""
    folder = tmp_path_factory.mktemp("corpus")
    text = (ROOT / "lrc_offline/data/tiny.txt").read_text("utf-8")
    for f in range(6):
        (folder / f"f{f}.txt").write_text((text + "\n\n") * 20, "utf-8")
    return folder


@pytest.fixture(scope="module")
def one_worker(tmp_path_factory, corpus) -> Path:
    out = tmp_path_factory.mktemp("one") / "cache"
    subprocess.run(_build_cmd(out, corpus), check=True, env=ENV, capture_output=True)
    return out


def _data_files(root: Path) -> dict[str, bytes]:
    """Every file of the cache but the manifest (which records when and by what it was written)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "manifest.json"}  # fmt: skip


def assert_same_cache(cache: Path, reference: Path) -> None:
    assert cache_main(["verify", str(cache)]) == 0
    assert _data_files(cache) == _data_files(reference)
    assert read_manifest(cache).digest() == read_manifest(reference).digest()
    mine, theirs = CacheReader(cache), CacheReader(reference)
    assert mine.complete_shards() == theirs.complete_shards() == list(range(theirs.num_shards))
    for i in range(theirs.num_shards):
        assert mine.shard_record(i)["files"] == theirs.shard_record(i)["files"]  # every checksum
    assert _temporaries(cache) == set()


@pytest.mark.slow
@pytest.mark.parametrize("split", ["documented split", "identical builds"])
@pytest.mark.parametrize("attempt", range(3))
def test_two_workers_started_together_both_succeed_and_equal_one_worker(tmp_path, corpus, one_worker, split, attempt):
    out = tmp_path / "cache"
    documented = split == "documented split"
    extra = [["--worker-index", str(w), "--num-workers", "2"] for w in range(2)] if documented else [[], []]
    procs = [subprocess.Popen(_build_cmd(out, corpus, *args), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for args in extra]  # fmt: skip
    logs = [p.communicate()[0] for p in procs]
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0, log[-2000:]
    assert_same_cache(out, one_worker)
    built = [json.loads(r.read_text())["index"] for r in (out / "shards").glob("shard-*.done.json")]
    assert sorted(built) == list(range(6))


@pytest.mark.slow
def test_parallel_build_benchmark_counts_a_good_run(tmp_path):
    """The benchmark script (one run of the split on the wide corpus) keeps working and counts it good."""
    subprocess.run([sys.executable, str(ROOT / "benchmarks/parallel_build.py"), "--runs", "1", "--wide-corpus", "6",
                    "--label", "smoke", "--out", str(tmp_path)], check=True, env=ENV, capture_output=True)  # fmt: skip
    result = json.loads((tmp_path / "wide6_smoke.json").read_text())
    assert result["modes"]["split"]["good"] == 1, result["modes"]["split"]["runs"]
