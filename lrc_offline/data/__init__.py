"""Corpora: documents read through Hugging Face `datasets` (`sources.py`), packed into fixed-length
sequences by one set of rules (`packing.py`), either through a tokenised index built once, in parallel,
and stored with the cache or an online run (`index.py`), or in memory for small corpora and held-out text
(`corpus.py`). Used by capture, online training and evaluation; imports nothing of them."""

from .corpus import (PackedCorpus, corpus_fingerprint, load_documents, load_heldout_documents, pack_documents,
                     split_heldout)
from .packing import document_affixes, heldout_start
from .sources import BUILTIN_CORPORA, SUPPORTED_EXTENSIONS, CorpusError, CorpusSpec, corpus_units, iter_documents

__all__ = [
    "BUILTIN_CORPORA",
    "SUPPORTED_EXTENSIONS",
    "CorpusError",
    "CorpusSpec",
    "PackedCorpus",
    "corpus_fingerprint",
    "corpus_units",
    "document_affixes",
    "heldout_start",
    "iter_documents",
    "load_documents",
    "load_heldout_documents",
    "pack_documents",
    "split_heldout",
]
