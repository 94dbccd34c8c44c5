"""The packer: how documents' token ids become fixed-length training sequences. One set of rules for the
tokenised index (`index.py`: cache builds and online training) and for in-memory documents
(`corpus.pack_documents`: evaluation on a corpus, small tools), so the two cannot drift apart:

- `document_affixes`: the special tokens around each document in the stream, `join_documents` the stream;
- `heldout_start`: which documents are held out (the last N);
- `plan_packing`: how much of the stream is packed, and how many sequences it makes;
- `cut_sequences`: a stretch of the stream and its document starts -> input ids and document positions.

Legend: S sequences, T tokens (seq_len).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .sources import CorpusError

__all__ = ["PackingPlan", "count_sequences", "cut_sequences", "document_affixes", "heldout_start", "join_documents",
           "plan_packing"]  # fmt: skip


def document_affixes(tokenizer: Any) -> tuple[list[int], list[int]]:
    """`(prefix, suffix)`: the ids put before and after each document's tokens, the way the teacher was
    trained: BOS in front when the tokenizer has one distinct from EOS (Llama, SmolLM2), EOS after when it
    has one (Qwen has EOS only)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return ([bos] if bos is not None and bos != eos else []), ([eos] if eos is not None else [])


def join_documents(
    doc_ids: Sequence[Sequence[int]], prefix: list[int], suffix: list[int]
) -> tuple[np.ndarray, np.ndarray]:
    """`(tokens, starts)`: the documents' ids joined into one stream, each between `prefix` and `suffix`
    (`document_affixes`), and where each document starts in it; both int64."""
    lengths = np.array([len(prefix) + len(ids) + len(suffix) for ids in doc_ids], dtype=np.int64)
    # np.fromiter over a chain is ~7x faster than torch.tensor on a flattened Python list.
    pieces = itertools.chain.from_iterable((prefix, ids, suffix) for ids in doc_ids)
    tokens = np.fromiter(itertools.chain.from_iterable(pieces), dtype=np.int64, count=int(lengths.sum()))
    return tokens, np.cumsum(lengths) - lengths


def heldout_start(num_documents: int, heldout_docs: int) -> int:
    """The first held-out document: the last `heldout_docs` of `num_documents` are held out for evaluation
    (0: none), the ones before it are the training documents.

    Raises:
        CorpusError: `heldout_docs` is negative or leaves no training document.
    """
    if heldout_docs < 0:
        raise CorpusError(f"cache.heldout_docs={heldout_docs} is negative; use 0 or more")
    if heldout_docs >= num_documents:
        raise CorpusError(
            f"cache.heldout_docs={heldout_docs} leaves no training documents (the corpus has {num_documents}); "
            "lower cache.heldout_docs or add documents"
        )
    return num_documents - heldout_docs


def count_sequences(num_tokens: int, seq_len: int, max_sequences: int | None) -> int:
    """How many whole sequences `num_tokens` packed tokens make (at most `max_sequences`).

    Raises:
        CorpusError: not even one.
    """
    if num_tokens < seq_len:
        raise CorpusError(f"corpus has {num_tokens} tokens, fewer than one sequence of seq_len={seq_len}; add text "
                          "or lower cache.seq_len")  # fmt: skip
    return num_tokens // seq_len if max_sequences is None else min(num_tokens // seq_len, max_sequences)


@dataclass(frozen=True)
class PackingPlan:
    """What a stream of documents packs into: its first `num_sequences * seq_len` tokens, cut into rows."""

    seq_len: int
    num_sequences: int
    num_documents: int
    """Documents in the stream (with a cap, up to the one that fills the last sequence)."""
    num_tokens: int
    """Length of the stream those documents make."""

    @property
    def dropped_tokens(self) -> int:
        """Tokens of the stream in no sequence: the tail short of a whole sequence, or past the cap."""
        return self.num_tokens - self.num_sequences * self.seq_len


def plan_packing(
    num_documents: int, num_tokens: int, seq_len: int, max_sequences: int | None,
    doc_at: Callable[[int], int], doc_start: Callable[[int], int],
) -> PackingPlan:  # fmt: skip
    """How a stream of `num_documents` documents and `num_tokens` tokens packs into sequences of `seq_len`
    tokens, at most `max_sequences`. Under a cap the stream ends with the document holding the cap's last
    token, so the counts are the same whether the documents after it were tokenised or not (in-memory
    packing stops tokenising there).

    Args:
        doc_at: The index of the document holding stream token t (t < num_tokens).
        doc_start: Where document k starts in the stream (k < num_documents).

    Raises:
        CorpusError: the stream is shorter than one sequence.
    """
    if max_sequences is not None and num_tokens > max_sequences * seq_len:
        end = doc_at(max_sequences * seq_len - 1) + 1
        if end < num_documents:
            num_documents, num_tokens = end, doc_start(end)
    return PackingPlan(seq_len, count_sequences(num_tokens, seq_len, max_sequences), num_documents, num_tokens)


def cut_sequences(ids: np.ndarray, doc_starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(input_ids, position_ids)`, each [S, T] int32: a stretch of S * T tokens of the stream cut into rows,
    and each token's distance from the latest document start or row start at or before it (a document cut
    by a row boundary restarts at 0 there).

    Args:
        ids: The stretch's token ids, [S * T].
        doc_starts: Where documents start, as offsets into the stretch; those outside it are ignored.
    """
    assert ids.ndim == 1 and ids.size % seq_len == 0, (ids.shape, seq_len)
    assert ids.size == 0 or int(ids.max()) < 2**31, "token id does not fit in int32"
    num_sequences = ids.size // seq_len
    doc_starts = np.asarray(doc_starts, dtype=np.int64)
    is_start = np.zeros(ids.size, dtype=bool)
    is_start[doc_starts[(doc_starts >= 0) & (doc_starts < ids.size)]] = True
    is_start_ST = torch.from_numpy(is_start).view(num_sequences, seq_len)
    is_start_ST[:, 0] = True
    col_ST = torch.arange(seq_len, dtype=torch.int64).expand(num_sequences, seq_len)
    last_start_ST = torch.where(is_start_ST, col_ST, torch.zeros_like(col_ST)).cummax(dim=1).values
    input_ids_ST = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int32)).view(num_sequences, seq_len)
    return input_ids_ST, (col_ST - last_start_ST).to(torch.int32)
