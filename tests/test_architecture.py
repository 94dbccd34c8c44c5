"""The package's layering (docs/architecture.md): which packages may import which, and the manifest
is read only through `cache/`."""

import ast
import re
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
