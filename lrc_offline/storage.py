"""Where caches and their companions live: a local directory, or a prefix on object storage named by an
fsspec URL (``s3://bucket/prefix``, ``gs://...``, ``file://...``, ``memory://`` in tests).

A `Location` is a directory-like prefix with the few operations the cache needs: read and write whole
objects, create one exclusively, list, delete, checksum, and stage a file or directory tree locally
before committing it under its final name (`Location.staging`). Locally it works on files (writes are
atomic renames of owner-tagged temporaries, see `fsutil.temp_path`); remotely it calls the fsspec
filesystem of the URL's protocol, retrying transient errors (timeouts, 5xx, throttling) with backoff and
naming the object when an error persists. Whether a location is a local directory is known here only:
callers use the operations, which do the right thing for either.

A string with ``<protocol>://`` is always a URL: a protocol fsspec does not know, or whose package is
not installed, is an error, never a local folder named ``s3:``. Credentials come from the protocol's
standard chain (for S3: the environment, ``AWS_ENDPOINT_URL``, the AWS config/profile, the instance
role); ``storage_options`` (endpoint, region, profile) may not carry secrets, so that none can reach a
manifest, a config file or a log.
"""

from __future__ import annotations

import errno
import os
import hashlib
import logging
import random
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from .fsutil import (
    fsync_path,
    fsync_tree,
    is_stale_temporary,
    move_into_place,
    remove_path,
    remove_stale_temporaries,
    temp_path,
    write_file_atomic,
)

__all__ = ["Location", "Staging", "StorageError", "as_location", "is_url", "check_storage_options", "redact_url"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://(.*)$")
_SECRET_KEY = re.compile(r"secret|token|password|passwd|credential|session|^key$|_key$|private|connection_string|"
                         r"sas|signature", re.IGNORECASE)
_USERINFO = re.compile(r"(?P<scheme>://)[^/@\s]*:[^/@\s]*@")
"""A URL carrying `user:password@` (`container@account`, as Azure names a container, is no secret)."""
_QUERY_PARAM = re.compile(r"(?P<head>[?&;](?P<name>[^=&;#?\s/]+)=)(?P<value>(?:[^&;#\s:]|:(?!\s|$))*)")
"""A query parameter; its value ends before a colon that ends a word (`URL: message`)."""
_SECRET_PARAM = re.compile(rf"{_SECRET_KEY.pattern}|^sig$|access_?key", re.IGNORECASE)
"""Query parameters that carry credentials: keys, tokens, signatures (S3 presigned X-Amz-*, Azure SAS sig)."""
_REDACTED = "***"
_TRANSIENT = re.compile(
    r"SlowDown|Throttl|TooManyRequests|RequestTimeout|ServiceUnavailable|InternalError|Timeout|timed out|"
    r"Connection (?:reset|refused|aborted)|\b50[0234]\b|BrokenPipe|ServerDisconnected|ConditionalRequestConflict|"
    r"RequestLimitExceeded|reduce your request rate",
    re.IGNORECASE,
)
_TRANSIENT_ERRNOS = {errno.EBUSY, errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET, getattr(errno, "EREMOTEIO", 121)}
"""What s3fs makes of 5xx and throttling responses (SlowDown and 503 -> EBUSY, 500 -> EREMOTEIO)."""
_NO_BUCKET = re.compile(r"NoSuchBucket|bucket does not exist", re.IGNORECASE)
_HASH_BLOCK = 8 << 20
_LISTING_CACHED = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl")
RETRIES = 5
"""Attempts of one remote operation before its error is reported (backoff 0.5, 1, 2, 4 s, jittered)."""


def _local_files(base: Path, root: Path) -> dict[str, int]:
    """Every file under the folder `base`, as its path relative to `root` -> bytes, sorted. Other workers
    rename their temporaries into place while this lists: an entry gone between the listing and its size
    was not there (`os.walk` likewise skips a folder gone before it is read)."""
    found = {}
    for folder, _, names in os.walk(base, followlinks=True):
        for name in names:
            path = Path(folder, name)
            try:
                info = path.stat()
            except FileNotFoundError:
                continue
            if stat.S_ISREG(info.st_mode):
                found[path.relative_to(root).as_posix()] = info.st_size
    return dict(sorted(found.items()))


class StorageError(OSError):
    """A location that cannot be reached or used: unknown protocol, missing package, missing bucket,
    refused credentials, or an error that persisted through retries. The message names the object."""


def redact_url(text: str | Path) -> str:
    """`text` (a URL, or a message holding URLs) with every credential masked: the `user:password@` part
    and the values of secret-looking query parameters (``?access_key=***&token=***``). Whatever shows a
    location to a person (messages, logs, `Location`'s str and repr) goes through here."""
    text = _USERINFO.sub(rf"\g<scheme>{_REDACTED}@", str(text))
    return _QUERY_PARAM.sub(lambda m: m["head"] + (_REDACTED if _SECRET_PARAM.search(m["name"]) else m["value"]), text)


def _has_credentials(url: str) -> bool:
    return redact_url(url) != url


def is_url(where: str | Path) -> bool:
    """Whether `where` names a location by URL (``<protocol>://...``) rather than a local path."""
    return isinstance(where, str) and _URL.match(where) is not None


def check_storage_options(options: Mapping[str, Any] | None, where: str) -> dict[str, Any]:
    """`options` as a dict, refusing keys that carry secrets (they would be saved with the config).

    Raises:
        StorageError: a secret-looking key (key, secret, token, password, ...), naming the fix.
    """
    options = dict(options or {})
    secrets = sorted(k for k, value in _flat_items(options) if _SECRET_KEY.search(k) or _has_credentials(str(value)))
    if secrets:
        raise StorageError(
            f"{redact_url(where)}: storage_options may not hold credentials ({', '.join(secrets)}); they would be "
            "saved with the config. Use the standard chain instead: environment (AWS_ACCESS_KEY_ID, "
            "AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL), an AWS profile (storage_options: {profile: NAME}) or "
            "an instance role"
        )
    return options


def _flat_items(options: Mapping[str, Any]) -> Iterable[tuple[str, Any]]:
    for key, value in options.items():
        if isinstance(value, Mapping):
            yield from _flat_items(value)
        else:
            yield str(key), value


def _transient(err: BaseException) -> bool:
    """Whether `err` (or what it was translated from) is a timeout, a 5xx, throttling or a conflict worth
    retrying."""
    if isinstance(err, (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(err, (TimeoutError, ConnectionError)):
        return True
    if isinstance(err, OSError) and err.errno in _TRANSIENT_ERRNOS:
        return True
    chain = [err, err.__cause__, err.__context__]
    return any(_TRANSIENT.search(f"{type(e).__name__} {e} {_service_code(e)}") for e in chain if e is not None)


def _service_code(err: BaseException | None) -> str:
    """The service's error code (botocore's ``response["Error"]["Code"]``) behind `err`, or ''."""
    for e in (err, getattr(err, "__cause__", None)):
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            return str(response.get("Error", {}).get("Code", ""))
    return ""


class Location:
    """A directory: a local path, or a prefix on an fsspec filesystem.

    Args:
        where: A path, a ``file://`` URL, or any other fsspec URL.
        storage_options: Keyword arguments for the fsspec filesystem (e.g. ``endpoint_url``,
            ``client_kwargs: {region_name: ...}``, ``profile`` for s3fs); no secrets.

    Raises:
        StorageError: an unknown protocol, a protocol whose package is missing, credentials in the URL
            or in `storage_options`.
    """

    def __init__(self, where: str | Path, storage_options: Mapping[str, Any] | None = None) -> None:
        self.storage_options = check_storage_options(storage_options, redact_url(where))
        match = _URL.match(where) if isinstance(where, str) else None
        self.protocol = match.group(1).lower() if match else "file"
        self._fs: Any = None
        if match is None or self.protocol == "file":
            self.local: Path | None = Path(match.group(2) if match else where)
            self.url = str(self.local)
            self._prefix = ""
            return
        self.local = None
        rest = match.group(2).rstrip("/")
        if _has_credentials(f"://{rest}"):
            raise StorageError(f"{redact_url(where)}: credentials in a URL are refused (they would be saved with "
                               "the config and shown in logs); use the environment, a profile or an instance "
                               "role")  # fmt: skip
        self.url = f"{self.protocol}://{rest}"
        self._fs, self._pid = _filesystem(self.protocol, self.storage_options, where), os.getpid()
        self._prefix = self._fs._strip_protocol(self.url).rstrip("/")

    @property
    def fs(self) -> Any:
        """The fsspec filesystem; made anew in a forked process (DataLoader workers), where the parent's
        asynchronous filesystems refuse to run."""
        if self._fs is not None and self._pid != os.getpid():
            self._fs, self._pid = _filesystem(self.protocol, self.storage_options, self.url), os.getpid()
        return self._fs

    @property
    def is_local(self) -> bool:
        return self.local is not None

    def __str__(self) -> str:
        return self.url if self.local is not None else redact_url(self.url)  # a local path is shown as is

    def __repr__(self) -> str:
        return f"Location({str(self)!r})"

    def __truediv__(self, rel: str) -> Location:
        return self.child(rel)

    def child(self, rel: str) -> Location:
        """The location `rel` (a '/'-separated relative path) below this one."""
        sub = object.__new__(Location)
        sub.__dict__.update(self.__dict__)
        if self.local is not None:
            sub.local = self.local / rel
            sub.url = str(sub.local)
        else:
            sub._prefix = f"{self._prefix}/{rel.strip('/')}"
            sub.url = f"{self.url}/{rel.strip('/')}"
        return sub

    def name_of(self, rel: str = "") -> str:
        """The full name of `rel` (a path or URL), for messages."""
        if self.local is not None:
            return str(self.local / rel) if rel else self.url
        return redact_url(f"{self.url}/{rel}" if rel else self.url)

    def _key(self, rel: str) -> str:
        return self._prefix if not rel else f"{self._prefix}/{rel}"

    def _path(self, rel: str) -> Path:
        assert self.local is not None
        return self.local / rel if rel else self.local

    def _remote(self, op: Callable[[], T], rel: str, what: str) -> T:
        """Run one remote operation on `rel`, retrying transient errors with backoff."""
        for attempt in range(RETRIES):
            try:
                return op()
            except FileNotFoundError as err:
                if _NO_BUCKET.search(str(err)):
                    raise _storage_error(err, f"{what} {self.name_of(rel)}") from err
                raise
            except FileExistsError:
                raise  # a conditional create that found the object: the caller's answer, not an error
            except Exception as err:  # s3fs/gcsfs raise a mix of OSError, botocore and aiohttp errors
                if not _transient(err) or attempt == RETRIES - 1:
                    raise _storage_error(err, f"{what} {self.name_of(rel)}") from err
                delay = 0.5 * 2**attempt * (0.5 + random.random())
                log.warning("%s %s: %s; retrying in %.1f s", what, self.name_of(rel), redact_url(str(err)), delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    # ---- reading

    def exists(self, rel: str = "") -> bool:
        if self.local is not None:
            return self._path(rel).exists()
        return self._remote(lambda: self.fs.exists(self._key(rel)), rel, "checking")

    def is_file(self, rel: str = "") -> bool:
        if self.local is not None:
            return self._path(rel).is_file()
        return self._remote(lambda: self.fs.isfile(self._key(rel)), rel, "checking")

    def read_bytes(self, rel: str = "") -> bytes:
        """The whole object `rel`. Raises FileNotFoundError (its ``filename`` the full name) when it does
        not exist."""
        try:
            if self.local is not None:
                return self._path(rel).read_bytes()
            return self._remote(lambda: self.fs.cat_file(self._key(rel)), rel, "reading")
        except FileNotFoundError as err:
            raise _not_found(self.name_of(rel)) from err

    def read_many(self, rels: Iterable[str], missing_ok: bool = False, sizes: Sequence[int] | None = None) -> dict[str, bytes]:
        """Several whole objects (fetched concurrently on object storage). Raises FileNotFoundError
        naming the first missing one, unless `missing_ok` (then missing ones are left out).

        `sizes`, when known (a completion record has them), saves a size request per object: each is
        one ranged GET of exactly that many bytes (a shorter object comes back short, which the caller's
        size check catches)."""
        rels = list(rels)
        if sizes is not None and 0 in sizes:  # a ranged GET cannot ask for zero bytes: check those exist
            out = {}
            for rel, n in zip(rels, sizes):
                if n == 0 and self.exists(rel):
                    out[rel] = b""
                elif n == 0 and not missing_ok:
                    raise _not_found(self.name_of(rel))
            rest = [(rel, n) for rel, n in zip(rels, sizes) if n]
            out.update(self.read_many([rel for rel, _ in rest], missing_ok, [n for _, n in rest]))
            return out
        if self.local is not None or not rels:
            out = {}
            for rel in rels:
                try:
                    out[rel] = self.read_bytes(rel)
                except FileNotFoundError:
                    if not missing_ok:
                        raise
            return out
        keys = [self._key(rel) for rel in rels]
        # cat_ranges: all at once, no path expansion (cat would HEAD each path first); with the sizes
        # given, no size lookup either (s3fs otherwise asks each object's size before reading it)
        starts = None if sizes is None else [0] * len(keys)
        ends = None if sizes is None else [int(n) for n in sizes]
        got = self._remote(lambda: self.fs.cat_ranges(keys, starts, ends, on_error="return"), rels[0],
                           f"reading {len(rels)} objects from")  # fmt: skip
        out = {}
        for rel, value in zip(rels, got):
            if isinstance(value, FileNotFoundError) and _NO_BUCKET.search(str(value)):
                raise _storage_error(value, f"reading {self.name_of(rel)}")
            if isinstance(value, FileNotFoundError) or value is None:
                if missing_ok:
                    continue
                raise _not_found(self.name_of(rel))
            if isinstance(value, BaseException):  # one object failed: retry it alone (retries transient errors)
                value = self.read_bytes(rel)
            out[rel] = value
        return out

    def size(self, rel: str) -> int:
        if self.local is not None:
            return self._path(rel).stat().st_size
        return int(self._remote(lambda: self.fs.size(self._key(rel)), rel, "sizing"))

    def sha256(self, rel: str) -> str:
        """Hex sha256 of object `rel`, streamed in 8 MiB blocks."""
        digest = hashlib.sha256()
        if self.local is not None:
            with open(self._path(rel), "rb") as file:
                while block := file.read(_HASH_BLOCK):
                    digest.update(block)
            return digest.hexdigest()

        def stream() -> str:
            digest = hashlib.sha256()
            with self.fs.open(self._key(rel), "rb", block_size=_HASH_BLOCK) as file:
                while block := file.read(_HASH_BLOCK):
                    digest.update(block)
            return digest.hexdigest()

        return self._remote(stream, rel, "checksumming")

    def files(self, rel: str = "") -> dict[str, int]:
        """Every object at or below `rel`, as its path relative to this location -> bytes ({} if none)."""
        if self.local is not None:
            base = self._path(rel)
            if base.is_file():
                return {rel: base.stat().st_size}
            if not base.is_dir():
                return {}
            return _local_files(base, self._path(""))
        key = self._key(rel)
        try:
            found = self._remote(lambda: self.fs.find(key, detail=True), rel, "listing")
        except FileNotFoundError:
            return {}
        self.fs.invalidate_cache()
        prefix = self._prefix + "/"
        return {name[len(prefix):]: int(info.get("size") or 0) for name, info in sorted(found.items())
                if name.startswith(prefix) and info.get("type", "file") != "directory"}  # fmt: skip

    def names(self, rel: str = "") -> list[str]:
        """Names of the entries directly under `rel` (files, directories, object prefixes); [] if none.
        One shallow listing: on object storage a delimiter listing, so a shard's many chunk objects
        are one entry."""
        if self.local is not None:
            folder = self._path(rel)
            return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        key = self._key(rel)
        try:
            found = self._remote(lambda: self.fs.ls(key, detail=False, refresh=True), rel, "listing")
        except FileNotFoundError:
            return []
        return sorted({name.rstrip("/").rsplit("/", 1)[-1] for name in found if name.rstrip("/") != key})

    # ---- writing

    def write_bytes(self, rel: str, data: bytes, exclusive: bool = False) -> bool:
        """Write object `rel` whole: readers see the old object (or none) or the new one, never a part.

        Args:
            exclusive: Never replace an existing object: of several writers creating it at once, exactly
                one succeeds (a conditional put, If-None-Match, on S3; an exclusive hard link locally;
                elsewhere put-then-read-back, where the writer whose bytes are not there lost).

        Returns:
            True when this call wrote the object; False only with `exclusive` when it already existed.
        """
        if self.local is not None:
            path = self._path(rel)
            path.parent.mkdir(parents=True, exist_ok=True)
            return write_file_atomic(path, data, exclusive=exclusive)
        key = self._key(rel)
        if not exclusive:
            self._remote(lambda: self.fs.pipe_file(key, data), rel, "writing")
            return True
        if self.protocol in ("s3", "s3a"):
            try:
                self._remote(lambda: self.fs.pipe_file(key, data, mode="create"), rel, "creating")
                return True
            except FileExistsError:
                return False
            except StorageError as err:  # a store that answers 412 without naming the condition
                if _service_code(err.__cause__) == "PreconditionFailed":
                    return False
                raise
        if self.exists(rel):
            return False
        self._remote(lambda: self.fs.pipe_file(key, data), rel, "creating")
        return self.read_bytes(rel) == data

    def upload(self, source: Path, rel: str, last: Sequence[str] = ()) -> None:
        """Copy a local file, or every file of a local directory tree, to `rel`: files in sorted order,
        those named in `last` (e.g. the file whose presence marks the whole as usable) after the rest."""
        source = Path(source)
        files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
        files.sort(key=lambda p: p.relative_to(source).as_posix() in last)
        for file in files:
            inner = file.relative_to(source).as_posix()
            sub = rel if file == source else (f"{rel}/{inner}" if rel else inner)
            if self.local is not None:
                self.write_bytes(sub, file.read_bytes())
            else:
                key = self._key(sub)
                self._remote(lambda: self.fs.put_file(str(file), key), sub, "uploading")

    def remove(self, rel: str) -> None:
        """Delete object `rel`, or every object under prefix `rel`; nothing there is fine."""
        if self.local is not None:
            remove_path(self._path(rel))
            return
        names = self.files(rel)
        if names:
            keys = [self._key(n) for n in names]
            self._remote(lambda: self.fs.rm(keys), rel, "deleting")
        self.fs.invalidate_cache()

    def make_folder(self, rel: str = "") -> None:
        """Create folder `rel` (and its parents) if absent; object storage has no folders: nothing to do."""
        if self.local is not None:
            self._path(rel).mkdir(parents=True, exist_ok=True)

    # ---- staging, committing, and the temporaries of writers

    def staging(self, rel: str) -> Staging:
        """A local path to write `rel` at (one file, or a directory tree), committed under `rel` by
        `Staging.commit`; used as a context manager, whatever was not committed is removed on leaving.

        Locally the path is an owner-tagged temporary sibling of `rel` (`fsutil.temp_path`), renamed into
        place on commit; for object storage it lies in a local temporary directory and is uploaded.
        """
        return Staging(self, rel)

    def remove_abandoned_temporaries(self, prefix: str) -> int:
        """Remove the temporaries of objects whose names start with `prefix` (``shards/shard-00003.``: a
        folder, then the start of a name) that killed writers left; a live writer's are left alone
        (`fsutil.is_stale_temporary`). Returns how many were removed.

        Object storage holds none: everything there is uploaded whole under its final name."""
        if self.local is None:
            return 0
        folder, _, start = prefix.rpartition("/")
        return remove_stale_temporaries(self._path(folder), start)

    def is_abandoned_temporary(self, rel: str) -> bool:
        """Whether the temporary entry `rel` is provably abandoned (`fsutil.is_stale_temporary`), so that
        it may be removed while writers run. On object storage any is: no writer keeps one there."""
        return self.local is None or is_stale_temporary(self._path(rel))

    def local_file(self, rel: str, scratch: Callable[[], Path]) -> Path:
        """A local file holding object `rel`, for memory-mapping: the file itself in a local directory; for
        object storage a copy downloaded once into the folder `scratch()` returns (kept by the caller)."""
        if self.local is not None:
            return self._path(rel)
        path = scratch() / rel
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_file_atomic(path, self.read_bytes(rel))
        return path


class Staging:
    """A file or directory tree being written locally (`path`) before it is placed in a `Location` under
    its final name (see `Location.staging`)."""

    def __init__(self, location: Location, rel: str) -> None:
        self.location, self.rel = location, rel
        self._scratch: Path | None = None
        if location.local is not None:
            final = location._path(rel)
            final.parent.mkdir(parents=True, exist_ok=True)
            self.path = temp_path(final)
        else:
            self._scratch = Path(tempfile.mkdtemp(prefix=f"lrc-{Path(rel).stem}-"))
            self.path = self._scratch / Path(rel).name

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def commit(
        self, marker: str | None = None, body: bytes = b"", keep: Callable[[bytes], bool] | None = None
    ) -> bytes:
        """Place what was written at `path` under its final name, durably, then, with `marker`, write
        object `marker` (relative to the location) holding `body`: the commit readers trust, written only
        once every data object is in place. Returns the marker's bytes that stand.

        Several writers committing the same name at once: locally each rename replaces the whole tree
        (`fsutil.move_into_place`) and the last writer's tree and marker stand together. On object storage
        a tree is many objects uploaded one by one, so the marker is created only if absent; a writer
        that finds another's keeps it when `keep(existing)` says it describes the same data (a
        deterministic rebuild; the existing bytes are returned), else removes it, uploads its own tree
        again, whole, and writes its own marker: a crash from then on leaves no marker beside mixed objects.
        """
        location = self.location
        if location.local is not None:
            final = location._path(self.rel)
            fsync_tree(self.path)
            move_into_place(self.path, final)
            fsync_path(final.parent)  # the rename is durable before a marker can say the data is there
            if marker is not None:
                location.write_bytes(marker, body)
            return body
        location.upload(self.path, self.rel)
        if marker is None or location.write_bytes(marker, body, exclusive=True):
            return body
        try:
            existing = location.read_bytes(marker)
        except FileNotFoundError:
            existing = None
        if existing is not None and keep is not None and keep(existing):
            return existing
        location.remove(marker)
        location.upload(self.path, self.rel)
        location.write_bytes(marker, body)
        return body

    def close(self) -> None:
        """Remove what is left of the staged copy (nothing after a local commit)."""
        remove_path(self.path)
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)


def _not_found(name: str) -> FileNotFoundError:
    return FileNotFoundError(errno.ENOENT, "not found", name)


def _filesystem(protocol: str, options: dict[str, Any], where: str) -> Any:
    where = redact_url(where)
    try:
        import fsspec

        cls = fsspec.get_filesystem_class(protocol)
    except ValueError as err:
        raise StorageError(f"{where}: unknown storage protocol {protocol!r} ({err}); use a local path or an "
                           "fsspec URL such as s3://bucket/prefix") from err  # fmt: skip
    except ImportError as err:
        raise StorageError(f"{where}: the {protocol}:// protocol needs a package that is not installed ({err})") from err
    if protocol in _LISTING_CACHED:
        # other workers write the same prefix: a cached listing would hide their shards and records
        options = {"use_listings_cache": False, **options}
    # skip_instance_cache: a filesystem made before a fork (prefetch threads, dataloader workers) is not reused
    return cls(**options, skip_instance_cache=True) if protocol != "memory" else cls(**options)


def _storage_error(err: BaseException, what: str) -> StorageError:
    text = redact_url(str(err).splitlines()[0]) if str(err) else type(err).__name__
    if isinstance(err, PermissionError) or re.search(r"AccessDenied|InvalidAccessKeyId|SignatureDoesNotMatch|"
                                                     r"Forbidden|\b403\b|NoCredentials", str(err) + type(err).__name__):
        return StorageError(f"{what}: access refused ({text}); check the credentials (environment, profile, "
                            "instance role) and the endpoint (AWS_ENDPOINT_URL or storage_options)")  # fmt: skip
    if _NO_BUCKET.search(str(err)):
        return StorageError(f"{what}: the bucket does not exist ({text}); create it or fix the URL")
    return StorageError(f"{what}: {type(err).__name__}: {text}")


def as_location(where: str | Path | Location, storage_options: Mapping[str, Any] | None = None) -> Location:
    """`where` as a Location (returned as is when it already is one)."""
    return where if isinstance(where, Location) else Location(where, storage_options)
