"""The tokenised index (data/index.py), the corpus readers' bad-input errors, the writer thread and a
kill -9 in the tokenise or build phase."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lrc_offline.cache import verify_cache
from lrc_offline.capture import build as build_mod
from lrc_offline.capture.build import build_cache, tokenize_corpus
from lrc_offline.cli.cache import main as cache_main
from lrc_offline.config import BuildRunConfig, CacheConfig
from lrc_offline.data import CorpusError, CorpusSpec, document_affixes, load_documents, pack_documents, split_heldout
from lrc_offline.data.index import IndexError_, TokenIndex, my_units, open_heldout, open_index, tokenize_units
from lrc_offline.evaluation import heldout_sequences
from lrc_offline.data import index as index_mod
from lrc_offline.teacher.load import load_teacher
from lrc_offline.teacher.tiny import tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(seq_len=24, sequences_per_shard=5, topk=8, act_positions=6, heldout_docs=3,
             run=BuildRunConfig(batch_size=4))  # fmt: skip


def _corpus(folder: Path, num_files: int = 9) -> Path:
    """Files of every kind, some compressed, with documents of uneven length."""
    folder.mkdir(parents=True, exist_ok=True)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    for f in range(num_files):
        docs = [" ".join(words[(f + d + k) % 10] for k in range(3 + (f * 7 + d * 5) % 40)) for d in range(6)]
        kind = f % 4
        if kind == 0:
            with gzip.open(folder / f"f{f:02d}.jsonl.gz", "wt") as out:
                out.writelines(json.dumps({"text": d}) + "\n" for d in docs)
        elif kind == 1:
            pq.write_table(pa.table({"text": docs}), folder / f"f{f:02d}.parquet")
        elif kind == 2:
            (folder / f"f{f:02d}.txt").write_text("\n\n".join(docs), "utf-8")
        else:
            (folder / f"f{f:02d}.json").write_text(json.dumps([{"text": d} for d in docs]), "utf-8")
    return folder


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _packed(tmp: Path, corpus: Path, tok, workers: int, seq_len: int, heldout: int, max_sequences=None):
    index = TokenIndex.create(tmp, CorpusSpec(str(corpus)), tok, "fingerprint")
    for w in range(workers):
        tokenize_units(index, tok, my_units(len(index.units), w, workers))
    return open_index(index, seq_len, heldout, max_sequences)


@pytest.mark.parametrize("seq_len, heldout, max_sequences", [(16, 0, None), (24, 5, None), (7, 2, 30)])
def test_packed_sequences_are_identical_for_1_3_8_workers_and_equal_in_memory_packing(
    tmp_path, tok, seq_len, heldout, max_sequences
):
    corpus = _corpus(tmp_path / "corpus")
    train, held = split_heldout(load_documents(str(corpus)), heldout)
    ref = pack_documents(train, tok, seq_len, max_sequences)
    held_ref = pack_documents(held, tok, seq_len, 2) if heldout else None
    parts = {}
    for workers in (1, 3, 8):
        packed = _packed(tmp_path / f"w{workers}", corpus, tok, workers, seq_len, heldout, max_sequences)
        ids, pos = packed.sequences(0, packed.num_sequences)
        assert torch.equal(ids, ref.input_ids) and torch.equal(pos, ref.position_ids)
        assert (packed.num_documents, packed.num_tokens, packed.dropped_tokens) == (
            ref.num_documents, ref.num_tokens, ref.dropped_tokens)  # fmt: skip
        middle = packed.sequences(3, 6)
        assert torch.equal(middle[0], ref.input_ids[3:6]) and torch.equal(middle[1], ref.position_ids[3:6])
        assert torch.equal(packed.input_ids_at([5, 0, 5]), ref.input_ids[[5, 0, 5]])
        if heldout:  # the held-out split (capped at 2 sequences), as evaluation packs the held-out text
            held_packed = open_heldout(packed.index, seq_len, heldout, 2)
            ids, pos = held_packed.sequences(0, held_packed.num_sequences)
            assert torch.equal(ids, held_ref.input_ids) and torch.equal(pos, held_ref.position_ids)
            assert (held_packed.num_documents, held_packed.num_tokens, held_packed.dropped_tokens) == (
                held_ref.num_documents, held_ref.num_tokens, held_ref.dropped_tokens)  # fmt: skip
            assert torch.equal(heldout_sequences(str(corpus), "text", heldout, tok, seq_len, 2), ids)
        parts[workers] = {p.name: p.read_bytes() for p in (tmp_path / f"w{workers}" / "index").glob("part-*")}
        parts[workers]["fingerprint"] = packed.fingerprint.encode()
    assert parts[1] == parts[3] == parts[8]


def test_index_of_another_tokenizer_or_changed_corpus_is_refused(tmp_path, tok):
    corpus = _corpus(tmp_path / "corpus", 3)
    TokenIndex.create(tmp_path / "c", CorpusSpec(str(corpus)), tok, "tok-a")
    with pytest.raises(IndexError_, match="tokenizer"):
        TokenIndex.create(tmp_path / "c", CorpusSpec(str(corpus)), tok, "tok-b")
    (corpus / "f00.jsonl.gz").write_bytes(gzip.compress(b'{"text": "changed"}\n'))
    with pytest.raises(IndexError_, match="units"):
        TokenIndex.create(tmp_path / "c", CorpusSpec(str(corpus)), tok, "tok-a")


# ----------------------------------------------------------------------------------------------------
# Bad input: one line naming the file, nothing half-written
# ----------------------------------------------------------------------------------------------------


def test_corrupt_and_truncated_files_are_named(tmp_path):
    good = json.dumps({"text": "fine text " * 20}) + "\n"
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress((good * 2000).encode())[:-40])  # truncated stream
    with pytest.raises(CorpusError, match=r"a\.jsonl\.gz: cannot decompress|a\.jsonl\.gz: not a readable"):
        load_documents(str(tmp_path / "a.jsonl.gz"))
    (tmp_path / "b.jsonl.gz").write_bytes(b"definitely not gzip data")
    with pytest.raises(CorpusError, match=r"b\.jsonl\.gz"):
        load_documents(str(tmp_path / "b.jsonl.gz"))
    pq.write_table(pa.table({"text": ["x" * 100] * 100}), tmp_path / "c.parquet")
    data = (tmp_path / "c.parquet").read_bytes()
    (tmp_path / "c.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorpusError, match=r"c\.parquet: not a readable Parquet file"):
        load_documents(str(tmp_path / "c.parquet"))


def test_missing_field_in_one_file_of_many_and_non_string_text(tmp_path):
    corpus = _corpus(tmp_path / "corpus", 4)
    (corpus / "zz.jsonl").write_text('{"body": "no text field here"}\n', "utf-8")
    with pytest.raises(CorpusError, match=r"zz\.jsonl: no field 'text'"):
        load_documents(str(corpus))
    (corpus / "zz.jsonl").write_text('{"text": ["a", "list"]}\n', "utf-8")
    with pytest.raises(CorpusError, match=r"zz\.jsonl: row 1: field 'text' is a list"):
        load_documents(str(corpus))


def test_dataset_id_absent_from_the_local_cache_is_named():
    with pytest.raises(CorpusError, match=r"dataset 'no-such-org/no-such-dataset'.*not in the local Hugging Face cache"):
        load_documents("no-such-org/no-such-dataset")


def test_cli_tokenize_reports_a_bad_corpus_in_one_line_and_leaves_nothing(tmp_path, capsys):
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip")
    out = tmp_path / "cache"
    assert cache_main(["tokenize", "--out", str(out), f"corpus={tmp_path / 'bad.jsonl.gz'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.jsonl.gz" in err[0]
    assert not out.exists()


# ----------------------------------------------------------------------------------------------------
# Build: tokenise phase, writer thread, kill -9
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama():
    return load_teacher("tiny-random:llama")


def _shard_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted((root / "shards").rglob("*")) if p.is_file() and not p.name.endswith(".done.json")}  # fmt: skip


def test_separate_tokenise_phase_gives_the_same_cache(tmp_path, llama):
    corpus = _corpus(tmp_path / "corpus")
    cfg = CacheConfig(corpus=str(corpus), **SMALL)
    build_cache(cfg, tmp_path / "a", progress=False, teacher=llama)
    for w in range(3):
        tokenize_corpus(cfg, tmp_path / "b", llama.tokenizer, w, 3)
    build_cache(cfg, tmp_path / "b", 0, 2, progress=False, teacher=llama)
    build_cache(cfg, tmp_path / "b", 1, 2, progress=False, teacher=llama)
    assert verify_cache(tmp_path / "b").ok
    assert _shard_files(tmp_path / "a") == _shard_files(tmp_path / "b")


def test_writer_thread_error_reaches_the_build_and_leaves_no_temporary(tmp_path, llama, monkeypatch):
    real = build_mod.ShardPipeline

    class Failing(real):
        def _run(self):
            self.writer.open_shard = lambda index: (_ for _ in ()).throw(OSError(28, "No space left on device"))
            super()._run()

    monkeypatch.setattr(build_mod, "ShardPipeline", Failing)
    with pytest.raises(OSError, match="No space left"):
        build_cache(CacheConfig(**SMALL), tmp_path / "c", progress=False, teacher=llama)
    assert not [p for p in (tmp_path / "c" / "shards").iterdir() if p.name.startswith(".tmp")]


def test_shard_memory_is_a_chunk_not_a_shard(tmp_path, llama):
    """A shard larger than a chunk is written in several chunk writes, and equals a whole-shard write."""
    cfg = CacheConfig(**dict(SMALL, sequences_per_shard=40, act_positions=24, heldout_docs=0))
    build_cache(cfg, tmp_path / "a", progress=False, teacher=llama)
    rebuilt = CacheConfig(**dict(SMALL, sequences_per_shard=40, act_positions=24, heldout_docs=0,
                                 run=BuildRunConfig(batch_size=3, write_queue=1)))  # fmt: skip
    build_cache(rebuilt, tmp_path / "b", progress=False, teacher=llama)
    assert _shard_files(tmp_path / "a") == _shard_files(tmp_path / "b")


def _cli(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lrc_offline.cli.cache", "build", "--config", str(ROOT / "cache_jobs/tiny_cpu.yaml"),
            "--out", str(out), "--no-progress", "max_sequences=64", "sequences_per_shard=8", *extra]  # fmt: skip


@pytest.mark.parametrize("delay", [1.5, 3.0])
def test_kill_9_then_rerun_equals_a_clean_build_with_no_temporary_left(tmp_path, delay):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run(_cli(tmp_path / "clean"), check=True, env=env, capture_output=True)
    proc = subprocess.Popen(_cli(tmp_path / "killed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    subprocess.run(_cli(tmp_path / "killed"), check=True, env=env, capture_output=True)
    assert verify_cache(tmp_path / "killed").ok
    assert _shard_files(tmp_path / "killed") == _shard_files(tmp_path / "clean")
    leftovers = [p for p in (tmp_path / "killed").rglob(".tmp-*")]
    assert not leftovers, leftovers


class _CallSizes:
    """A tokenizer that records how many characters each call hands it."""

    def __init__(self, tokenizer):
        self.tokenizer, self.chars = tokenizer, []

    def __call__(self, texts, **kwargs):
        self.chars.append(sum(map(len, texts)))
        return self.tokenizer(texts, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_a_document_of_one_long_line_is_tokenised_in_bounded_calls_with_the_same_ids(tmp_path, tok):
    """A 2.3 MB one-line corpus: no tokenizer call sees more than the batch's characters (a fast
    tokenizer's memory follows its input: one call of the whole line doubled a worker's peak), and the
    ids equal the whole line's."""
    words = ["alpha", "beta", "  gamma", "délta\n", "epsilon,", "zeta.", "η", "\t", "x" * 12]
    gen = torch.Generator().manual_seed(0)
    line = " ".join(words[i] for i in torch.randint(len(words), (330_000,), generator=gen).tolist())
    assert len(line) > 2 * index_mod._BATCH_CHARS
    (tmp_path / "corpus.txt").write_text(line + "\n", "utf-8")
    counting = _CallSizes(tok)
    index = TokenIndex.create(tmp_path / "c", CorpusSpec(str(tmp_path / "corpus.txt")), tok, "fingerprint")
    tokenize_units(index, counting, list(range(len(index.units))))
    assert max(counting.chars) <= index_mod._BATCH_CHARS
    prefix, suffix = document_affixes(tok)  # the line tokenised whole, as the reference
    stream = torch.tensor(prefix + tok([line], add_special_tokens=False)["input_ids"][0] + suffix, dtype=torch.int32)
    packed = open_index(index, 64, 0)
    ids, _ = packed.sequences(0, packed.num_sequences)
    assert torch.equal(ids, stream[: packed.num_sequences * 64].view(-1, 64))
    assert torch.equal(pack_documents([line], tok, 64).input_ids, ids)  # in memory: the same pieces


def test_a_cut_goes_only_where_the_tokenizer_splits_the_same(tok):
    # The byte-level tokenizer starts a piece at a space: a cut before " b" keeps the ids, a cut inside a
    # word would not be taken (no whitespace there: the document stays one piece).
    doc = ("word " * 30_000).strip()
    pieces = index_mod._pieces(doc, tok)
    assert len(pieces) > 1 and "".join(pieces) == doc and all(p.startswith(" ") for p in pieces[1:])
    assert index_mod._pieces("y" * 200_000, tok) == ["y" * 200_000]
