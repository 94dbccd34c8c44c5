"""The package's layering (docs/architecture.md): which packages may import which, the manifest is read
only through `cache/`, and a stage-2 batch only through `lrc_offline.batch.Batch`."""

import ast
import re
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lrc_offline"

FORBIDDEN = {
    "cache": ("lrc_offline.capture", "lrc_offline.training", "lrc_offline.online"),
    "training": ("lrc_offline.capture", "lrc_offline.online", "lrc_offline.evaluation"),
    "student": ("lrc_offline.cache",),
    "data": ("lrc_offline.capture", "lrc_offline.training", "lrc_offline.student", "lrc_offline.online",
             "lrc_offline.evaluation"),
}


def _imports(path: Path) -> set[str]:
    """Absolute module names `path` imports (relative imports resolved against its package)."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = parts[: len(parts) - node.level] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names |= {module} | {f"{module}.{alias.name}" for alias in node.names}
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_import_directions(package):
    bad = [f"{path.relative_to(PACKAGE)} imports {name}"
           for path in sorted((PACKAGE / package).rglob("*.py")) for name in sorted(_imports(path))
           if name.startswith(FORBIDDEN[package])]  # fmt: skip
    assert not bad, bad


def test_no_raw_manifest_indexing_outside_cache():
    raw = re.compile(r"""manifest\w*(\(\))?(\.to_dict\(\))?\s*\[|manifest\w*\.get\(|read_manifest\([^)]*\)\s*\[""")
    hits = [f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}"
            for path in sorted(PACKAGE.rglob("*.py")) if "cache" not in path.relative_to(PACKAGE).parts[:1]
            for number, line in enumerate(path.read_text().splitlines(), 1) if raw.search(line)]  # fmt: skip
    assert not hits, hits


# ---- the batch: a typed object outside `lrc_offline/batch.py` -------------------------------------------

BATCH_KEYS = {
    "input_ids", "attention_mask", "position_ids",
    "teacher_logits", "hidden", "topk_ids", "topk_logprobs", "sampled_ids", "sampled_counts",
    "act_positions", "act_input", "act_attn", "act_present", "act_layer_mask", "act_mask",
    *(f"act_{term}" for term in ("q", "k", "v", "o", "gate", "up", "down")),
}  # fmt: skip
"""The names a stage-2 batch dict was indexed by: the cache's per-sequence fields (and the online source's
`teacher_logits`, tests' `act_mask`)."""

FIELD_NAME_HOMES = ("batch.py", "cache", "capture")
"""Where these names legitimately are strings: the batch module (the cache's fields -> `Batch`), the cache's
schema and store, and capture, which writes the fields it captured under the schema's names."""


def _batch_key(node: ast.expr) -> str | None:
    """The batch key `node` spells: a string constant, or an f-string starting with `act_` (`f"act_{m}"`)."""
    if isinstance(node, ast.Constant) and node.value in BATCH_KEYS:
        return node.value
    if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
        return ast.unparse(node) if str(node.values[0].value).startswith("act_") else None
    return None


def _batch_key_lookups(tree: ast.AST):
    """(line, key) of every lookup by a batch key: `x[key]` (read, write or delete; not of a call's result,
    such as a tokenizer's `tokenizer(texts)["input_ids"]`), `x.get(key)`, `x.pop(key)`, `x.setdefault(key)`
    and `key in x` / `key not in x`."""
    for node in ast.walk(tree):
        key = None
        if isinstance(node, ast.Subscript) and not isinstance(node.value, ast.Call):
            key = _batch_key(node.slice)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args and \
                node.func.attr in ("get", "pop", "setdefault"):  # fmt: skip
            key = _batch_key(node.args[0])
        elif isinstance(node, ast.Compare) and isinstance(node.ops[0], (ast.In, ast.NotIn)):
            key = _batch_key(node.left)
        if key is not None:
            yield node.lineno, key


def test_no_batch_key_lookups_outside_the_batch_module():
    """Stage 2 reads a batch through `Batch`'s attributes; the cache's field names are turned into it in one
    place (`Batch.from_fields`), so no other module looks a tensor up by such a name."""
    hits = [f"{path.relative_to(PACKAGE)}:{line}: [{key!r}]"
            for path in sorted(PACKAGE.rglob("*.py")) if path.relative_to(PACKAGE).parts[0] not in FIELD_NAME_HOMES
            for line, key in _batch_key_lookups(ast.parse(path.read_text()))]  # fmt: skip
    assert not hits, hits


def test_the_batch_key_scan_finds_each_kind_of_lookup():
    source = textwrap.dedent('''
        a = batch["topk_ids"]
        batch["act_positions"] = positions
        b = batch.get("attention_mask")
        c = shard.pop("act_present")
        if "hidden" in batch: pass
        d = teacher_acts[f"act_{m}"]
        e = tokenizer(texts)["input_ids"]
        f = out["logits"]
        g = kind in ("logits", "hidden")
    ''')
    assert sorted(line for line, _ in _batch_key_lookups(ast.parse(source))) == [2, 3, 4, 5, 6, 7]


# ---- storage: whether a location is a local directory is known in `lrc_offline/storage.py` only ------------


def test_no_local_path_of_a_location_outside_storage():
    """Staging, committing and temporaries are `Location` operations: no caller branches on a local
    directory (`.is_local`) or reaches for its path (`.local`)."""
    leak = re.compile(r"\.local\b|\bis_local\b")
    hits = [f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}"
            for path in sorted(PACKAGE.rglob("*.py")) if path != PACKAGE / "storage.py"
            for number, line in enumerate(path.read_text().splitlines(), 1) if leak.search(line)]  # fmt: skip
    assert not hits, hits
