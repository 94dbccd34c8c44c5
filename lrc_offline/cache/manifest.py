"""The cache manifest: what a cache holds, for which teacher, tokenizer and corpus, in which layout.

``manifest.json`` is written once, before any shard, and never changes. Every worker building shards
of the same cache must request an identical manifest, up to its volatile parts (creation time, library
versions and the creating worker's run options, ``build``); `Manifest.differences` says how two
manifests differ, in terms a user can act on. `Manifest` is the only reader and writer of the JSON form.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from lrc_offline.cache.records import MANIFEST_NAME
from lrc_offline.cache.schema import (
    SCHEMA_VERSION,
    CacheFormatError,
    FieldSpec,
    TeacherGeometry,
    act_layers,
    cache_fields,
    schema_for,
)
from lrc_offline.config import FORMATS, BuildRunConfig, CacheConfig, ConfigError, from_dict, to_dict
from lrc_offline.differences import differences
from lrc_offline.fsutil import json_bytes
from lrc_offline.storage import Location, as_location

__all__ = ["FINGERPRINT_KEYS", "TRAIN", "HELDOUT", "HeldoutSplit", "SplitLayout", "Manifest", "make_manifest",
           "read_manifest", "create_manifest"]  # fmt: skip

FINGERPRINT_KEYS = ("teacher_config", "teacher_weights", "tokenizer", "corpus")
"""Fingerprints every manifest carries (strings computed by the capture code, e.g. sha256 hex)."""

_REQUIRED_KEYS = (
    "schema_version", "format", "config", "geometry", "fingerprints",
    "num_sequences", "sequences_per_shard", "num_shards", "fields",
)  # fmt: skip
_VOLATILE_KEYS = ("created", "versions", "build")
"""Top-level keys that legitimately differ between workers of one cache: left out of the digest and
of `Manifest.differences`."""
_BUILD_RUN_FIELDS = tuple(f.name for f in dataclasses.fields(BuildRunConfig))
"""`BuildRunConfig`'s fields: recorded under ``build``, and found inside ``config`` in schema 1."""

_ADDED_CONFIG_KEYS = {"act_layer_fraction": 1.0, "logprob_dtype": "float32", "act_dtype": "bfloat16",
                      "act_positions": 16, "document_mask": False}
"""Config keys whose default changed after caches were built without them, with the value such a cache
was built with (CacheConfig's defaults became the compact codec; an older manifest means the old ones)."""

_HELDOUT_SPLIT_KEYS = ("heldout_sequences", "heldout_activations")
"""Config keys that shape only the held-out split."""

TRAIN, HELDOUT = "train", "heldout"
"""The splits of a cache: the training sequences (``shards/shard-*``) and the held-out ones
(``shards/heldout-*``, present when the manifest has a ``heldout`` section)."""
_SHARD_PREFIX = {TRAIN: "shard", HELDOUT: "heldout"}


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass(frozen=True)
class HeldoutSplit:
    """The held-out split: sequences packed from the held-out documents (the last ``config.heldout_docs``,
    at most ``config.heldout_sequences``), captured like the training sequences into shards of their own
    (``shards/heldout-*``), so stage 2 evaluates from the cache alone. Held-out sequence j is global
    sequence ``num_sequences + j`` where a seed needs an index (position sampling, sampled draws)."""

    num_sequences: int
    """Held-out sequences."""
    sequences_per_shard: int
    """Held-out shard i holds held-out sequences [i * S, min((i + 1) * S, num_sequences))."""
    num_shards: int
    """ceil(num_sequences / sequences_per_shard)."""
    activations: bool
    """Whether the held-out shards store the activation fields too (``config.heldout_activations``); without
    them they hold the token ids and the logit signal, all held-out evaluation reads."""

    def __post_init__(self) -> None:
        num, per_shard = self.num_sequences, self.sequences_per_shard
        if not (_positive_int(num) and _positive_int(per_shard)):
            raise CacheFormatError("heldout: num_sequences and sequences_per_shard must be positive integers")
        if self.num_shards != math.ceil(num / per_shard):
            raise CacheFormatError(f"heldout: num_shards {self.num_shards} != ceil({num} / {per_shard})")
        if not isinstance(self.activations, bool):
            raise CacheFormatError(f"heldout: activations {self.activations!r} must be true or false")

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (the manifest's ``heldout`` section)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> HeldoutSplit:
        """Inverse of `to_dict`."""
        names = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(data, dict) or set(data) != set(names):
            raise CacheFormatError(f"heldout {data!r} must be an object with exactly the keys {names}")
        return cls(**data)


@dataclass(frozen=True)
class SplitLayout:
    """The shard arithmetic of one split of a cache (`Manifest.split`)."""

    name: str
    """TRAIN or HELDOUT."""
    prefix: str
    """Shard file-name prefix: ``shard`` or ``heldout``."""
    num_sequences: int
    sequences_per_shard: int
    num_shards: int
    fields: tuple[FieldSpec, ...]
    """The arrays each of its shards stores."""


@dataclass(frozen=True)
class Manifest:
    """What a cache holds (the JSON form is ``manifest.json``, see docs/cache_format.md).

    Build one with `make_manifest`, read one with `read_manifest`.
    """

    schema_version: int
    """Version of the on-disk layout it was written with."""
    format: str
    """Shard file format: zarr or webdataset."""
    config: CacheConfig
    """The cache config. Its contract (every field but ``run``) is stored as ``config``; ``run`` holds the
    run options of the worker that created the manifest, stored as ``build`` (volatile: other workers of
    the cache may have run differently)."""
    geometry: TeacherGeometry
    """The teacher's shapes."""
    fields: tuple[FieldSpec, ...]
    """Every array a shard stores, in order."""
    fingerprints: dict[str, str]
    """Strings identifying the teacher config, weights, tokenizer and corpus (FINGERPRINT_KEYS)."""
    num_sequences: int
    """Packed sequences in the whole cache."""
    sequences_per_shard: int
    """Shard i holds sequences [i * S, min((i + 1) * S, num_sequences))."""
    num_shards: int
    """ceil(num_sequences / sequences_per_shard)."""
    created: str = ""
    """Creation time (UTC, ISO 8601); volatile."""
    versions: dict[str, str] = field(default_factory=dict)
    """Library versions of the creating worker; volatile."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Further facts recorded and compared (packing, teacher_name, backend)."""
    heldout: HeldoutSplit | None = None
    """The held-out split (None: the cache has none: built with heldout_docs=0, or before held-out splits)."""
    _digest_as_read: str | None = field(default=None, repr=False, compare=False)
    """For a manifest read from JSON: the digest of that JSON, which its completion records carry. Kept,
    not recomputed, so a config key added to CacheConfig since (read at its default) or a schema-1
    layout leaves the cache's shards complete."""

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise CacheFormatError(f"format {self.format!r} is not one of {list(FORMATS)}")
        num, per_shard = self.num_sequences, self.sequences_per_shard
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (num, per_shard)):
            raise CacheFormatError("num_sequences and sequences_per_shard must be positive integers")
        if self.num_shards != math.ceil(num / per_shard):
            raise CacheFormatError(f"num_shards {self.num_shards} != ceil({num} / {per_shard})")
        if not self.fields:
            raise CacheFormatError("fields must be a non-empty list")
        names = [spec.name for spec in self.fields]
        if len(set(names)) != len(names):
            raise CacheFormatError(f"field names repeat: {names}")

    # ---- what readers ask ------------------------------------------------------------------------------

    @property
    def field_names(self) -> tuple[str, ...]:
        """Names of the stored fields, in order."""
        return tuple(spec.name for spec in self.fields)

    def has_field(self, name: str) -> bool:
        """Whether shards store field `name`."""
        return name in self.field_names

    @property
    def has_residuals(self) -> bool:
        """Whether the cache holds residual activations (layer inputs and attention outputs)."""
        return self.has_field("act_input")

    @property
    def act_layers(self) -> list[int]:
        """The teacher layers whose activations are stored, ascending (see `schema.act_layers`)."""
        return act_layers(self.config, self.geometry)

    @property
    def heldout_fields(self) -> tuple[FieldSpec, ...]:
        """The fields a held-out shard stores: every field, or all but the activations (``act_*``)."""
        if self.heldout is not None and self.heldout.activations:
            return self.fields
        return tuple(spec for spec in self.fields if not spec.name.startswith("act_"))

    def split(self, name: str) -> SplitLayout:
        """The shard arithmetic of split `name` (TRAIN or HELDOUT).

        Raises:
            CacheFormatError: HELDOUT of a cache without a held-out split.
        """
        if name == TRAIN:
            return SplitLayout(TRAIN, _SHARD_PREFIX[TRAIN], self.num_sequences, self.sequences_per_shard,
                               self.num_shards, self.fields)  # fmt: skip
        if name != HELDOUT:
            raise ValueError(f"split {name!r} is not one of {[TRAIN, HELDOUT]}")
        if self.heldout is None:
            raise CacheFormatError("the cache has no held-out split (built with cache.heldout_docs=0, or before "
                                   "held-out splits were stored); rebuild it with cache.heldout_docs > 0")  # fmt: skip
        held = self.heldout
        return SplitLayout(HELDOUT, _SHARD_PREFIX[HELDOUT], held.num_sequences, held.sequences_per_shard,
                           held.num_shards, self.heldout_fields)  # fmt: skip

    @property
    def document_mask(self) -> bool:
        """Whether the teacher saw each packed document alone (``config.document_mask``: position ids restarting
        at each document, no attention across documents). False for a cache built before the option, whose
        manifest lacks the key: its teacher attended across the documents of a sequence."""
        return self.config.document_mask

    @property
    def teacher_name(self) -> str:
        """The name the teacher was loaded by when the cache was built."""
        return self.extra.get("teacher_name") or self.config.teacher

    # ---- JSON form, digest, comparison ------------------------------------------------------------------

    def config_dict(self) -> dict[str, Any]:
        """The JSON form of the cache's contract, as stored under ``config`` (the config without ``run``)."""
        config = to_dict(self.config)
        del config["run"]
        return config

    def to_dict(self) -> dict[str, Any]:
        """The JSON form of the current schema (what `create_manifest` writes); ``heldout`` only when the
        cache has a held-out split, so a manifest without one reads and digests as before."""
        data = {
            "schema_version": self.schema_version,
            "format": self.format,
            "config": self.config_dict(),
            "build": to_dict(self.config.run),
            "geometry": self.geometry.to_dict(),
            "fingerprints": dict(self.fingerprints),
            "num_sequences": self.num_sequences,
            "sequences_per_shard": self.sequences_per_shard,
            "num_shards": self.num_shards,
            "fields": [spec.to_dict() for spec in self.fields],
            "created": self.created,
            "versions": dict(self.versions),
            "extra": json.loads(json.dumps(self.extra)),
        }
        if self.heldout is not None:
            data["heldout"] = self.heldout.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Any, where: str = "manifest") -> Manifest:
        """Parse and check a manifest's JSON form, of this schema or an older one.

        Raises:
            CacheFormatError: a key is missing or malformed, or the schema is newer than supported;
                the message starts with `where`.
        """
        if not isinstance(data, dict):
            raise CacheFormatError(f"{where}: the manifest must be a JSON object")
        version = data.get("schema_version")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise CacheFormatError(f"{where}: schema_version {version!r} is not a positive integer")
        if version > SCHEMA_VERSION:
            raise CacheFormatError(
                f"{where}: written with cache schema {version}, this lrc_offline reads up to {SCHEMA_VERSION}; "
                "upgrade lrc_offline to read it"
            )
        missing = [k for k in _REQUIRED_KEYS if k not in data]
        if missing:
            raise CacheFormatError(f"{where}: manifest lacks keys {missing}")
        try:
            config = dict(data["config"])
            build = dict(data.get("build") or {})
            if version == 1:  # schema 1 kept the run options inside config
                build.update({k: config.pop(k) for k in _BUILD_RUN_FIELDS if k in config})
            # Keys a manifest of an older version lacks mean what that version did, not today's default.
            for key, old_default in _ADDED_CONFIG_KEYS.items():
                config.setdefault(key, old_default)
            # Run options are volatile facts about one worker: an unknown one never blocks reading.
            run = {k: v for k, v in build.items() if k in _BUILD_RUN_FIELDS}
            if not isinstance(data["fields"], list):
                raise CacheFormatError("fields must be a list")
            fields = tuple(FieldSpec.from_dict(f) for f in data["fields"])
            if schema_for(fields) > version:
                raise CacheFormatError(
                    f"schema_version {version} cannot describe its fields' dtypes, which need schema "
                    f"{schema_for(fields)}"
                )
            return cls(
                schema_version=version,
                format=data["format"],
                config=from_dict(CacheConfig, {**config, "run": run}, "config"),
                geometry=TeacherGeometry.from_dict(data["geometry"]),
                fields=fields,
                fingerprints=_fingerprints(data["fingerprints"]),
                num_sequences=data["num_sequences"],
                sequences_per_shard=data["sequences_per_shard"],
                num_shards=data["num_shards"],
                created=data.get("created", ""),
                versions=dict(data.get("versions") or {}),
                extra=dict(data.get("extra") or {}),
                heldout=None if data.get("heldout") is None else HeldoutSplit.from_dict(data["heldout"]),
                _digest_as_read=_legacy_digest(data) if version == 1 else _digest(data),
            )
        except (CacheFormatError, ConfigError, TypeError, ValueError) as err:
            raise CacheFormatError(f"{where}: {err}") from err

    def digest(self) -> str:
        """sha256 of what the manifest says about the data (its volatile parts left out). Every completion
        record carries it, so a shard is complete only for the manifest it was built under."""
        return self._digest_as_read or _digest(self.to_dict())

    def differences(self, other: Manifest) -> list[str]:
        """Human-readable differences from `other`, ignoring the volatile parts and the schema version
        (schemas 1 and 2 describe the same shard data: 2 only moved the run options out of config; 3
        differs from 2 only in field dtypes, which are compared).

        A cache without a held-out split (this manifest) agrees with a request for one that otherwise
        agrees (whatever its split's options): it was built before held-out splits were stored, and its
        training shards stay valid.

        Returns:
            Lines like ``"config.topk: 32 in the existing cache, 64 requested"`` (this manifest being
            the existing one); empty when they agree.
        """
        ignored = (*_VOLATILE_KEYS, "schema_version", *(("heldout",) if self.heldout is None else ()))
        mine, theirs = ({k: v for k, v in m.to_dict().items() if k not in ignored} for m in (self, other))
        if self.heldout is None:
            for data in (mine, theirs):
                data["config"] = {k: v for k, v in data["config"].items() if k not in _HELDOUT_SPLIT_KEYS}
        return differences(mine, theirs, "in the existing cache", "requested")


def _fingerprints(value: Any) -> dict[str, str]:
    """The manifest's fingerprints, checked: an object of strings with every FINGERPRINT_KEYS key (a
    hand-edited one is refused here, not met later as a type or key error)."""
    if not isinstance(value, dict):
        problem = f"is a {type(value).__name__}"
    else:
        bad = [k for k in FINGERPRINT_KEYS if not isinstance(value.get(k), str)]
        bad += [k for k, v in value.items() if k not in FINGERPRINT_KEYS and not isinstance(v, str)]
        problem = f"has no string for {bad}" if bad else ""
    if problem:
        raise CacheFormatError(f"fingerprints {problem}: it must be an object of strings with keys "
                               f"{list(FINGERPRINT_KEYS)}; restore manifest.json or rebuild the cache")  # fmt: skip
    return dict(value)


def _digest(data: dict[str, Any]) -> str:
    kept = {k: v for k, v in data.items() if k not in _VOLATILE_KEYS}
    return "sha256:" + hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


def _legacy_digest(data: dict[str, Any]) -> str:
    """The digest the completion records of a schema-1 cache carry, computed as schema 1 did.

    Schema 1 hashed the manifest as written, less ``created`` and ``versions``, and less the config keys
    ``device`` and ``vllm_*``, but with ``batch_size``, ``compute_dtype`` and ``backend`` in it. Never
    change this: it decides whether the shards of caches built before schema 2 count as complete.
    """
    dropped = ("device", "vllm_tensor_parallel_size", "vllm_pipeline_parallel_size", "vllm_gpu_memory_utilization",
               "vllm_enforce_eager")  # fmt: skip
    kept = {k: v for k, v in data.items() if k not in ("created", "versions")}
    kept["config"] = {k: v for k, v in kept.get("config", {}).items() if k not in dropped}
    return "sha256:" + hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


def _library_versions() -> dict[str, str]:
    versions = {}
    for dist in ("torch", "zarr", "numcodecs", "numpy", "webdataset", "lrc-offline"):
        try:
            versions[dist.replace("-", "_")] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return versions


def _json_ready(value: Any, where: str) -> Any:
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where} must be JSON-serialisable (plain numbers, strings, lists, dicts): {err}") from err


def make_manifest(
    cfg: CacheConfig,
    geometry: TeacherGeometry,
    fingerprints: dict[str, str],
    num_sequences: int,
    extra: dict | None = None,
    heldout_sequences: int = 0,
) -> Manifest:
    """The manifest of a cache built with `cfg` for a teacher of `geometry`.

    Args:
        cfg: The resolved cache config (saved whole: the contract as ``config``, ``cfg.run`` as ``build``).
        geometry: The teacher's shapes.
        fingerprints: Strings identifying what produced the data; must hold FINGERPRINT_KEYS.
        num_sequences: Packed sequences in the whole cache (all shards).
        extra: Further JSON-ready facts the caller wants recorded and compared (e.g. packing details).
        heldout_sequences: Sequences of the held-out split (0: none).
    """
    if not isinstance(fingerprints, dict):
        raise TypeError(f"fingerprints must be a dict with keys {list(FINGERPRINT_KEYS)}")
    missing = [k for k in FINGERPRINT_KEYS if k not in fingerprints]
    if missing:
        raise ValueError(f"fingerprints lack {missing}; every cache records {list(FINGERPRINT_KEYS)}")
    bad = [k for k, v in fingerprints.items() if not isinstance(v, str)]
    if bad:
        raise TypeError(f"fingerprints {bad} must be strings (e.g. sha256 hex digests)")
    if isinstance(num_sequences, bool) or not isinstance(num_sequences, int) or num_sequences < 1:
        raise ValueError(f"num_sequences={num_sequences!r} must be a positive integer")
    if cfg.max_sequences is not None and num_sequences > cfg.max_sequences:
        raise ValueError(f"num_sequences={num_sequences} exceeds cache.max_sequences={cfg.max_sequences}")
    fields = tuple(cache_fields(cfg, geometry))
    heldout = None
    if heldout_sequences:
        if cfg.heldout_docs < 1:
            raise ValueError("a held-out split needs cache.heldout_docs >= 1 (the documents it is packed from)")
        heldout = HeldoutSplit(heldout_sequences, cfg.sequences_per_shard,
                               math.ceil(heldout_sequences / cfg.sequences_per_shard),
                               cfg.heldout_activations and cfg.activation_mode != "none")  # fmt: skip
    return Manifest(
        # The layout is schema 2's; 3 only when a field's dtype needs it, so older code reads the rest.
        schema_version=max(2, schema_for(fields)),
        format=cfg.format,
        # a copy: the caller's config may change after, the manifest never does
        config=from_dict(CacheConfig, to_dict(cfg)),
        geometry=geometry,
        fields=fields,
        fingerprints=dict(fingerprints),
        num_sequences=num_sequences,
        sequences_per_shard=cfg.sequences_per_shard,
        num_shards=math.ceil(num_sequences / cfg.sequences_per_shard),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        versions=_library_versions(),
        extra=_json_ready(extra or {}, "manifest extra"),
        heldout=heldout,
    )


def read_manifest(root: str | Path | Location) -> Manifest:
    """Read and check ``<root>/manifest.json`` (`root` a directory or an fsspec URL).

    Raises:
        FileNotFoundError: `root` holds no manifest (not a cache, or its build never started).
        CacheFormatError: the manifest is not valid JSON, is newer than supported, or is malformed.
        StorageError: the location cannot be reached (see `lrc_offline.storage`).
    """
    root = as_location(root)
    path = root.name_of(MANIFEST_NAME)
    try:
        text = root.read_bytes(MANIFEST_NAME).decode()
    except (FileNotFoundError, NotADirectoryError):
        raise FileNotFoundError(
            f"{path} not found: {root} is not a teacher cache, or its build never started (run `lrc-cache build`)"
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise CacheFormatError(f"{path}: not valid JSON ({err}); restore the file or rebuild the cache") from err
    return Manifest.from_dict(data, str(path))


def create_manifest(root: Location, manifest: Manifest) -> bool:
    """Write ``<root>/manifest.json`` unless one exists; True when this call created it.

    The write is atomic (no reader sees half a file) and exclusive (of many workers starting at once,
    exactly one creates it; the rest compare): see `Location.write_bytes`. Workers starting together each
    write a temporary and link it into place; those killed workers left are removed here, a live
    worker's are left alone (`Location.remove_abandoned_temporaries`).
    """
    created = root.write_bytes(MANIFEST_NAME, json_bytes(manifest.to_dict()), exclusive=True)
    root.remove_abandoned_temporaries(MANIFEST_NAME)
    return created
