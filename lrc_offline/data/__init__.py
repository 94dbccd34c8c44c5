"""Corpora: documents read through Hugging Face `datasets` (`sources.py`), packed into fixed-length
sequences in memory (`corpus.py`) or through a tokenised index built once, in parallel, and stored with
the cache (`index.py`). Used by capture, online training and evaluation; imports nothing of them."""

from .corpus import PackedCorpus, corpus_fingerprint, load_documents, pack_documents, split_heldout
from .sources import BUILTIN_CORPORA, SUPPORTED_EXTENSIONS, CorpusError, CorpusSpec, corpus_units, iter_documents

__all__ = [
    "BUILTIN_CORPORA",
    "SUPPORTED_EXTENSIONS",
    "CorpusError",
    "CorpusSpec",
    "PackedCorpus",
    "corpus_fingerprint",
    "corpus_units",
    "iter_documents",
    "load_documents",
    "pack_documents",
    "split_heldout",
]
