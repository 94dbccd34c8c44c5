"""The teacher cache: the on-disk contract between capture (stage 1) and training (stage 2).

A cache is a directory holding ``manifest.json`` and ``shards/`` (Zarr v3 groups or WebDataset tars,
each with a completion record): the training sequences' shards and, when built with held-out documents,
the held-out split's (``HELDOUT``). Files computed from a cache later (the PCA basis) go under
``derived/`` (`derived_location`), never beside the manifest and shards. See docs/cache_format.md for the layout and how to read it without
this package. This package knows nothing of teachers' forward passes or of training.
"""

from lrc_offline.cache.dtypes import FLOAT8_MAX, dequantize_float8, quantize_float8
from lrc_offline.cache.derived import DERIVED_DIR, derived_location, derived_names, remove_derived
from lrc_offline.cache.quantize import dequantize_int4, dequantize_log8, quantize_int4, quantize_log8
from lrc_offline.cache.manifest import (
    FINGERPRINT_KEYS,
    HELDOUT,
    TRAIN,
    HeldoutSplit,
    Manifest,
    make_manifest,
    read_manifest,
)
from lrc_offline.cache.schema import (
    SCHEMA_VERSION,
    CacheFormatError,
    FieldSpec,
    TeacherGeometry,
    act_layers,
    cache_fields,
    num_act_positions,
)
from lrc_offline.cache.store import (
    CacheMismatchError,
    CorruptShardError,
    CacheReader,
    CacheWriter,
    clean_stale,
    temporaries,
)
from lrc_offline.cache.verify import VerifyReport, inspect_cache, verify_cache

__all__ = [
    "SCHEMA_VERSION",
    "FINGERPRINT_KEYS",
    "FLOAT8_MAX",
    "CacheFormatError",
    "CacheMismatchError",
    "CorruptShardError",
    "TeacherGeometry",
    "FieldSpec",
    "cache_fields",
    "num_act_positions",
    "act_layers",
    "TRAIN",
    "HELDOUT",
    "HeldoutSplit",
    "Manifest",
    "make_manifest",
    "read_manifest",
    "CacheWriter",
    "CacheReader",
    "clean_stale",
    "temporaries",
    "DERIVED_DIR",
    "derived_location",
    "derived_names",
    "remove_derived",
    "VerifyReport",
    "verify_cache",
    "inspect_cache",
    "quantize_float8",
    "dequantize_float8",
    "quantize_int4",
    "dequantize_int4",
    "quantize_log8",
    "dequantize_log8",
]
