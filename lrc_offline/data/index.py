"""The tokenised index: a corpus tokenised once, in parallel, and stored with the cache, from which any
worker reads the packed sequences of its own shards without touching the rest.

Layout of ``<cache>/index/``::

    index.json               what was tokenised: the corpus (spec and units), the tokenizer's fingerprint,
                             BOS/EOS; created once, compared by every later worker
    part-000042.tokens       unit 42's token stream: int32, BOS ids EOS per document (`packing.document_affixes`)
    part-000042.starts       int64 start of each document in that stream
    part-000042.json         the unit's record, written last (its documents, tokens and content digest):
                             the unit is tokenised iff it exists
    .tmp-*@<host>.<pid>.*    work in progress of the process named; never read. Workers tokenising the same
                             unit at once each write their own and rename identical files into place; a
                             worker removes only temporaries whose writer is gone (`fsutil.is_stale_temporary`)

An online training run keeps its index in its output directory (``<out>/index/``).

The index lives with its cache, locally or on object storage (a `storage.Location`). A part is written
to the location's staging path (`Location.staging`: a temporary sibling, or a local file uploaded on
object storage) and committed before its record; a worker reading parts from object storage downloads
those its sequences lie in to a local scratch directory to memory-map them (`Location.local_file`).

Tokenising splits the units between workers (unit u goes to worker u mod N), so any number of workers
writes the same parts; packing is arithmetic on the parts' counts by the rules of `packing.py`, so the
packed sequences are identical whatever the number of tokenising workers, and equal to
`corpus.pack_documents` (the same rules over documents in memory) over the same documents. A build
worker reads ``index.json``, one small record per unit, and memory-maps only the parts its sequences lie
in: its memory and start-up grow with the number of units, never with tokens.

Legend: S sequences, T tokens (seq_len).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..fsutil import json_bytes
from ..storage import Location, as_location
from .packing import cut_sequences, document_affixes, heldout_start, join_documents, plan_packing
from .sources import CorpusError, CorpusSpec, Unit, corpus_units, iter_unit_documents

__all__ = ["INDEX_DIR", "IndexError_", "TokenIndex", "PackedIndex", "open_index", "open_heldout", "tokenize_units",
           "my_units"]  # fmt: skip

INDEX_DIR = "index"
INDEX_VERSION = 1
_BATCH_DOCS = 1000
_BATCH_CHARS = 1 << 20
"""Characters tokenised in one call. A fast tokenizer holds its whole input's pre-tokenised pieces and
tokens at once (~250 bytes a character measured on byte-level BPE), so a worker's peak memory follows
the characters of one call, whatever the documents' lengths."""
_PIECE_CHARS = 1 << 16
"""A longer document is tokenised in pieces of at most about this many characters (see `_pieces`)."""
_CUT_WINDOW = 256
"""Characters either side of a cut that must tokenise the same cut as whole."""


class IndexError_(CorpusError):  # noqa: N801 -- IndexError is a builtin
    """An index built for another corpus or tokenizer, or a damaged one; the message names the fix."""


def my_units(num_units: int, worker: int | None, num_workers: int | None) -> list[int]:
    """The units worker `worker` of `num_workers` tokenises: u with u mod N == worker (all when None)."""
    if worker is None or num_workers is None:
        return list(range(num_units))
    return list(range(worker, num_units, num_workers))


@dataclass
class TokenIndex:
    """An index directory and the corpus and tokenizer it is for."""

    root: Location
    spec: CorpusSpec
    units: list[Unit]
    tokenizer_fingerprint: str
    bos_token_id: int | None
    eos_token_id: int | None

    def __post_init__(self) -> None:
        self._scratch: tempfile.TemporaryDirectory | None = None  # local copies of remote parts

    @classmethod
    def create(cls, cache_dir: str | Path | Location, spec: CorpusSpec, tokenizer: Any, tokenizer_fingerprint: str) -> TokenIndex:
        """The index of `spec` under `cache_dir` (created if absent; an existing one must agree).

        Raises:
            IndexError_: the existing index was built from another corpus (units or file sizes differ) or
                with another tokenizer.
            CorpusError: the corpus cannot be listed.
        """
        index = cls(as_location(cache_dir) / INDEX_DIR, spec, corpus_units(spec), tokenizer_fingerprint,
                    tokenizer.bos_token_id, tokenizer.eos_token_id)  # fmt: skip
        created = index.root.write_bytes("index.json", json_bytes(index._header()), exclusive=True)
        index.root.remove_abandoned_temporaries("index.json")  # a killed worker's, never a live one's
        if not created:
            existing = json.loads(index.root.read_bytes("index.json"))
            if existing != index._header():
                diff = [k for k in index._header() if existing.get(k) != index._header()[k]]
                raise IndexError_(
                    f"{index.root}: the tokenised index there was built from another "
                    f"{' and '.join(diff)} (a file changed, or the config's corpus or teacher differs); delete "
                    f"{index.root} to re-tokenise, or build into another cache directory"
                )
        return index

    def _header(self) -> dict[str, Any]:
        return {
            "version": INDEX_VERSION,
            "corpus": {"corpus": self.spec.corpus, "text_field": self.spec.text_field, "split": self.spec.split,
                       "config": self.spec.config, "revision": self.spec.revision},
            "units": [u.to_dict() for u in self.units],
            "tokenizer": {"fingerprint": self.tokenizer_fingerprint, "bos_token_id": self.bos_token_id,
                          "eos_token_id": self.eos_token_id},
        }  # fmt: skip

    @staticmethod
    def _part(u: int, suffix: str) -> str:
        return f"part-{u:06d}.{suffix}"

    def record(self, u: int) -> dict[str, Any] | None:
        """Unit `u`'s record, or None when it is not tokenised yet."""
        try:
            return json.loads(self.root.read_bytes(self._part(u, "json")))
        except FileNotFoundError:
            return None

    def records(self) -> dict[int, dict[str, Any]]:
        """Every tokenised unit's record, read concurrently (one listing, then the records)."""
        names = self.root.files()
        done = [u for u in range(len(self.units)) if self._part(u, "json") in names]
        data = self.root.read_many([self._part(u, "json") for u in done])
        return {u: json.loads(data[self._part(u, "json")]) for u in done}

    def missing(self) -> list[int]:
        """Units without a record."""
        names = self.root.files()
        return [u for u in range(len(self.units)) if self._part(u, "json") not in names]

    def remove_stale(self) -> int:
        """Remove the part temporaries killed workers left (any unit's: a unit another worker finished is
        never rewritten, so its leftovers would stay otherwise); a live worker's, which may be tokenising
        the same unit right now, are left alone. Returns how many were removed."""
        return self.root.remove_abandoned_temporaries("part-")

    def tokenize_unit(self, u: int, tokenizer: Any) -> dict[str, Any]:
        """Tokenise unit `u` into its part files, batch by batch (memory: one batch of documents)."""
        prefix, suffix = document_affixes(tokenizer)
        digest = hashlib.sha256()
        num_docs = num_tokens = 0
        stage = {s: self.root.staging(self._part(u, s)) for s in ("tokens", "starts")}
        with stage["tokens"], stage["starts"]:
            with open(stage["tokens"].path, "wb") as tokens_file, open(stage["starts"].path, "wb") as starts_file:
                batch: list[str] = []
                batch_chars = 0
                docs = iter_unit_documents(self.units[u], self.spec)
                while True:
                    doc = next(docs, None)
                    if doc is not None:
                        batch.append(doc)
                        data = doc.encode("utf-8")
                        digest.update(len(data).to_bytes(8, "little"))
                        digest.update(data)
                    batch_chars = batch_chars + len(doc) if doc is not None else batch_chars
                    if batch and (doc is None or len(batch) == _BATCH_DOCS or batch_chars >= _BATCH_CHARS):
                        flat, starts = join_documents(_encode(tokenizer, batch), prefix, suffix)
                        assert flat.size == 0 or int(flat.max()) < 2**31, "token id does not fit in int32"
                        flat.astype("<i4").tofile(tokens_file)
                        (starts + num_tokens).astype("<i8").tofile(starts_file)
                        num_docs += len(batch)
                        num_tokens += flat.size
                        batch, batch_chars = [], 0
                    if doc is None:
                        break
            stage["tokens"].commit()
            stage["starts"].commit()
        record = {"unit": u, "num_documents": num_docs, "num_tokens": num_tokens,
                  "digest": "sha256:" + digest.hexdigest()}  # fmt: skip
        self.root.write_bytes(self._part(u, "json"), json_bytes(record))  # last: the unit is tokenised
        return record

    def tokens(self, u: int) -> np.ndarray:
        """Unit `u`'s token stream, memory-mapped (int32)."""
        return _mmap(self._local_part(u, "tokens"), "<i4")

    def starts(self, u: int) -> np.ndarray:
        """Unit `u`'s document starts in its stream, memory-mapped (int64)."""
        return _mmap(self._local_part(u, "starts"), "<i8")

    def _local_part(self, u: int, suffix: str) -> Path:
        """A local file holding the part: itself, or (object storage) a copy downloaded once into this
        index's scratch directory, removed with the index object."""
        return self.root.local_file(self._part(u, suffix), self._scratch_dir)

    def _scratch_dir(self) -> Path:
        if self._scratch is None:
            self._scratch = tempfile.TemporaryDirectory(prefix="lrc-index-")
        return Path(self._scratch.name)


def _encode(tokenizer: Any, docs: list[str]) -> list[list[int]]:
    """Each document's token ids (no special tokens), equal to tokenising it whole, in calls of at most
    `_BATCH_CHARS` characters (a longer document in pieces, see `_pieces`)."""
    pieces, owners = [], []
    for d, doc in enumerate(docs):
        for piece in _pieces(doc, tokenizer):
            pieces.append(piece)
            owners.append(d)
    out: list[list[int]] = [[] for _ in docs]
    lo = 0
    while lo < len(pieces):
        hi, chars = lo + 1, len(pieces[lo])
        while hi < len(pieces) and chars + len(pieces[hi]) <= _BATCH_CHARS:
            chars += len(pieces[hi])
            hi += 1
        for d, ids in zip(owners[lo:hi], tokenizer(pieces[lo:hi], add_special_tokens=False, verbose=False)["input_ids"]):
            out[d].extend(ids)
        lo = hi
    return out


def _pieces(doc: str, tokenizer: Any) -> list[str]:
    """`doc` cut into pieces of at most ~`_PIECE_CHARS` characters whose token ids, concatenated, are the
    document's.

    A cut goes before a run of whitespace (where byte-level and metaspace pre-tokenizers start a new
    piece), and is kept only if the `_CUT_WINDOW` characters either side tokenise the same cut as whole:
    merges and normalisation never reach further than that in the tokenizers of our teacher families. A
    stretch with no such cut (one word of 64k characters) stays whole: exact ids before bounded memory.
    """
    if len(doc) <= _PIECE_CHARS:
        return [doc]
    pieces, lo = [], 0
    while len(doc) - lo > _PIECE_CHARS:
        cut = _find_cut(doc, lo + _PIECE_CHARS // 2, lo + _PIECE_CHARS, tokenizer)
        if cut is None:
            break
        pieces.append(doc[lo:cut])
        lo = cut
    pieces.append(doc[lo:])
    return pieces


def _find_cut(doc: str, lo: int, hi: int, tokenizer: Any) -> int | None:
    """The last position in (lo, hi] before a whitespace run that tokenises the same cut as whole."""
    for cut in range(hi, lo, -1):
        if not doc[cut].isspace() or doc[cut - 1].isspace():
            continue
        left, right = doc[max(cut - _CUT_WINDOW, 0) : cut], doc[cut : cut + _CUT_WINDOW]
        whole, left_ids, right_ids = tokenizer([left + right, left, right], add_special_tokens=False,
                                               verbose=False)["input_ids"]  # fmt: skip
        if whole == left_ids + right_ids:
            return cut
    return None


def _mmap(path: Path, dtype: str) -> np.ndarray:
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def tokenize_units(index: TokenIndex, tokenizer: Any, units: Sequence[int], progress=None) -> list[int]:
    """Tokenise those of `units` not tokenised yet; returns the units tokenised by this call."""
    missing = set(index.missing())
    todo = [u for u in units if u in missing]
    if todo:
        index.remove_stale()
    for u in todo:
        index.tokenize_unit(u, tokenizer)
        if progress is not None:
            progress(u)
    return todo


@dataclass
class PackedIndex:
    """The packed sequences of an index: the first `num_sequences * seq_len` tokens of the training
    documents' stream (or the held-out documents', `open_heldout`), cut into rows by `packing.cut_sequences`;
    what `corpus.pack_documents` returns for those documents, read on demand."""

    index: TokenIndex
    seq_len: int
    num_sequences: int
    num_documents: int
    """Documents in the stream (with `max_sequences`, up to the one that fills the last sequence)."""
    num_tokens: int
    """Length of that stream."""
    dropped_tokens: int
    heldout_documents: int
    fingerprint: str
    """`sha256:` digest of the corpus's content and the held-out count: identifies the training documents."""
    _token_offsets: np.ndarray
    _doc_offsets: np.ndarray
    first_token: int = 0
    """Where the packed stream starts in the corpus's token stream: 0 for the training documents, the first
    held-out document's start for the held-out ones (`open_heldout`)."""

    def sequences(self, first: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`(input_ids, position_ids)` of sequences [first, end), each [S, T] int32, read from the parts
        these tokens lie in (positions restart at each document start and each sequence start)."""
        assert 0 <= first <= end <= self.num_sequences
        lo, hi = self.first_token + first * self.seq_len, self.first_token + end * self.seq_len
        ids = np.empty(hi - lo, dtype=np.int32)
        doc_starts = [np.zeros(0, dtype=np.int64)]
        u = int(np.searchsorted(self._token_offsets, lo, side="right")) - 1
        while lo < hi and u < len(self.index.units):
            base, top = int(self._token_offsets[u]), int(self._token_offsets[u + 1])
            a, b = max(lo, base), min(hi, top)
            if a < b:
                ids[a - lo : b - lo] = self.index.tokens(u)[a - base : b - base]
                starts = self.index.starts(u)  # memory-mapped: only the starts in [a, b) are read
                i, j = np.searchsorted(starts, [a - base, b - base])
                doc_starts.append(np.asarray(starts[i:j], dtype=np.int64) + (base - lo))
            if top >= hi:
                break
            u += 1
        return cut_sequences(ids, np.concatenate(doc_starts), self.seq_len)

    def input_ids_at(self, rows: Sequence[int]) -> torch.Tensor:
        """[len(rows), T] int32 token ids of the sequences `rows`, in that order (any order, repeats allowed):
        a shuffled batch read from the parts without holding the corpus in memory."""
        ids = [self.sequences(r, r + 1)[0] for r in map(int, rows)]
        return torch.cat(ids) if ids else torch.zeros(0, self.seq_len, dtype=torch.int32)


def open_index(index: TokenIndex, seq_len: int, heldout_docs: int = 0, max_sequences: int | None = None) -> PackedIndex:
    """The packing of a complete index: training documents (all but the last `heldout_docs`) cut into
    sequences of `seq_len` tokens, at most `max_sequences`.

    Raises:
        CorpusError: the index is incomplete, the corpus is empty, `heldout_docs` leaves no training
            document, or the training documents make fewer tokens than one sequence.
    """
    records, doc_offsets, token_offsets = _unit_offsets(index, heldout_docs)
    train_docs = heldout_start(int(doc_offsets[-1]), heldout_docs)
    plan = plan_packing(train_docs, _doc_start(index, doc_offsets, token_offsets, train_docs), seq_len, max_sequences,
                        doc_at=lambda t: _doc_at(index, doc_offsets, token_offsets, t),
                        doc_start=lambda k: _doc_start(index, doc_offsets, token_offsets, k))  # fmt: skip
    return PackedIndex(index, seq_len, plan.num_sequences, plan.num_documents, plan.num_tokens, plan.dropped_tokens,
                       heldout_docs, _fingerprint(records, heldout_docs), token_offsets, doc_offsets)  # fmt: skip


def open_heldout(index: TokenIndex, seq_len: int, heldout_docs: int, max_sequences: int | None) -> PackedIndex:
    """The packing of the held-out documents (the last `heldout_docs`): their own stream cut into sequences
    of `seq_len` tokens as `open_index` cuts the training documents', at most `max_sequences` (None: all).

    Raises:
        CorpusError: as `open_index`, `heldout_docs` < 1, or the held-out documents make fewer tokens than
            one sequence.
    """
    if heldout_docs < 1:
        raise CorpusError(f"cache.heldout_docs={heldout_docs}: a held-out split needs at least one document")
    records, doc_offsets, token_offsets = _unit_offsets(index, heldout_docs)
    first_doc = heldout_start(int(doc_offsets[-1]), heldout_docs)
    start = _doc_start(index, doc_offsets, token_offsets, first_doc)
    stream = int(token_offsets[-1]) - start
    if stream < seq_len:
        raise CorpusError(f"the {heldout_docs} held-out documents (cache.heldout_docs) make {stream} tokens, fewer "
                          f"than one sequence of seq_len={seq_len}; raise cache.heldout_docs")  # fmt: skip
    plan = plan_packing(heldout_docs, stream, seq_len, max_sequences,  # offsets in the held-out stream
                        doc_at=lambda t: _doc_at(index, doc_offsets, token_offsets, start + t) - first_doc,
                        doc_start=lambda k: _doc_start(index, doc_offsets, token_offsets, first_doc + k) - start)
    return PackedIndex(index, seq_len, plan.num_sequences, plan.num_documents, plan.num_tokens, plan.dropped_tokens,
                       heldout_docs, _fingerprint(records, heldout_docs), token_offsets, doc_offsets,
                       start)  # fmt: skip


def _unit_offsets(index: TokenIndex, heldout_docs: int) -> tuple[list[dict], np.ndarray, np.ndarray]:
    """The units' records, and the global document and token offsets at each unit's start (and the end),
    checking that the index is complete and that `heldout_docs` leaves training documents."""
    by_unit = index.records()  # one listing, then the records
    missing = [u for u in range(len(index.units)) if u not in by_unit]
    if missing:
        raise IndexError_(
            f"{index.root}: {len(missing)} of {len(index.units)} corpus units are not tokenised (first: "
            f"{index.units[missing[0]].label()}); run `lrc-cache tokenize` with the same config and --out first"
        )
    records = [by_unit[u] for u in range(len(index.units))]
    docs = np.array([r["num_documents"] for r in records], dtype=np.int64)
    tokens = np.array([r["num_tokens"] for r in records], dtype=np.int64)
    doc_offsets = np.concatenate([[0], np.cumsum(docs)])
    token_offsets = np.concatenate([[0], np.cumsum(tokens)])
    total_docs = int(doc_offsets[-1])
    if total_docs == 0:
        raise CorpusError(
            f"corpus {index.spec.corpus!r} has no non-empty documents (empty corpus); point cache.corpus at files "
            f"holding text (or check cache.text_field={index.spec.text_field!r})"
        )
    heldout_start(total_docs, heldout_docs)
    return records, doc_offsets, token_offsets


def _fingerprint(records: list[dict], heldout_docs: int) -> str:
    """The corpus fingerprint: the held-out count and each unit's document count and content digest."""
    digest = hashlib.sha256(f"lrc-index-{INDEX_VERSION}:heldout={heldout_docs}".encode())
    for record in records:
        digest.update(f":{record['num_documents']}:{record['digest']}".encode())
    return "sha256:" + digest.hexdigest()


def _doc_start(index: TokenIndex, doc_offsets: np.ndarray, token_offsets: np.ndarray, k: int) -> int:
    """Stream offset where global document `k` starts (the stream's end for k = the document count)."""
    if k >= doc_offsets[-1]:
        return int(token_offsets[-1])
    u = int(np.searchsorted(doc_offsets, k, side="right")) - 1
    return int(token_offsets[u]) + int(index.starts(u)[k - doc_offsets[u]])


def _doc_at(index: TokenIndex, doc_offsets: np.ndarray, token_offsets: np.ndarray, t: int) -> int:
    """Global index of the document holding stream token `t`."""
    u = int(np.searchsorted(token_offsets, t, side="right")) - 1
    while doc_offsets[u + 1] == doc_offsets[u]:  # a unit without documents holds no token either
        u -= 1
    local = int(np.searchsorted(index.starts(u), t - token_offsets[u], side="right")) - 1
    return int(doc_offsets[u]) + local


def index_size(index: TokenIndex) -> int:
    """Bytes of the index's part files."""
    return sum(size for name, size in index.root.files().items() if name.startswith("part-"))


