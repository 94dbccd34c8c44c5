"""How two nested configurations (or manifests) differ, in lines a user can act on.

One routine for every "was this built or saved with the same settings?" check: a cache's manifest
against the one a worker requests, a checkpoint's config against the resuming run's.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["flatten", "differences"]

_ABSENT = object()


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> leaf value. Non-empty dicts nest; a list of dicts that each have a `name` (the
    manifest's field list) nests by name, so a line reads `fields.topk_ids.shape: ...`."""
    out: dict[str, Any] = {}
    if isinstance(value, dict) and value:
        for key in sorted(value):
            out.update(flatten(value[key], f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(value, list) and value and all(isinstance(v, dict) and "name" in v for v in value):
        for item in value:
            out.update(flatten({k: v for k, v in item.items() if k != "name"}, f"{prefix}.{item['name']}"))
    else:
        out[prefix] = value
    return out


def differences(old: dict, new: dict, old_label: str, new_label: str, defaults: dict | None = None) -> list[str]:
    """Lines `key: <old> <old_label>, <new> <new_label>` for every leaf that differs (values as JSON,
    `absent` where a side lacks the key); empty when they agree.

    Args:
        defaults: Nested defaults of `new`'s schema: a key `old` lacks (added to the schema since `old`
            was written) that `new` holds at its default asks for what `old` did, and is no difference.
    """
    flat_old, flat_new = flatten(_json_ready(old)), flatten(_json_ready(new))
    flat_defaults = flatten(_json_ready(defaults)) if defaults else {}
    lines = []
    for key in sorted(set(flat_old) | set(flat_new)):
        a, b = flat_old.get(key, _ABSENT), flat_new.get(key, _ABSENT)
        if a is _ABSENT and key in flat_defaults and b == flat_defaults[key]:
            continue
        if a != b:
            lines.append(f"{key}: {_show(a)} {old_label}, {_show(b)} {new_label}")
    return lines


def _json_ready(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _show(value: Any) -> str:
    return "absent" if value is _ABSENT else json.dumps(value)
