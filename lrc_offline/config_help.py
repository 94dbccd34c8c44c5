"""Help text for every config key, taken from the docstring written under each dataclass field.

Python keeps no field docstrings at run time, so they are read from the class source with `ast`:
a string expression right after an annotated assignment documents that field.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import textwrap
import typing
from dataclasses import dataclass
from typing import Any

__all__ = ["KeyHelp", "field_docs", "config_keys", "format_config_help"]


@dataclass(frozen=True)
class KeyHelp:
    """One config key as `--help-config` shows it."""

    key: str
    """Dotted key, as written in an override (`student.hidden_size`)."""
    type: str
    """The field's type hint, e.g. `int | None`."""
    default: Any
    """Default value (JSON-ready)."""
    doc: str
    """The field's docstring, whitespace-normalised ('' when it has none)."""


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the docstring under that field, for dataclass `cls` (fields without one are left out)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):  # fmt: skip
            docs[node.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
    return docs


def _type_name(hint: Any) -> str:
    if isinstance(hint, type) and not typing.get_args(hint):
        return hint.__name__
    return str(hint).replace("typing.", "")


def _default(f: dataclasses.Field) -> Any:
    value = f.default_factory() if f.default is dataclasses.MISSING else f.default
    return json.loads(json.dumps(dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value))


def config_keys(cls: type, prefix: str = "") -> list[KeyHelp]:
    """Every leaf key of config dataclass `cls` (nested sections flattened to dotted keys), in field order."""
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    keys = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            keys += config_keys(hint, f"{prefix}{f.name}.")
        else:
            keys.append(KeyHelp(prefix + f.name, _type_name(hint), _default(f), docs.get(f.name, "")))
    return keys


def format_config_help(cls: type, width: int = 100) -> str:
    """Each key with its type and default on one line, its docstring wrapped and indented beneath."""
    lines = [f"{cls.__name__}: {inspect.cleandoc(cls.__doc__ or '')}",
             "Set keys in a --config file (JSON or YAML, sections nested) or as key=value overrides",
             "(values in JSON; plain words are strings). --print-config shows the config a command would run.",
             ""]  # fmt: skip
    for item in config_keys(cls):
        lines.append(f"{item.key}  ({item.type}, default: {json.dumps(item.default)})")
        if item.doc:
            lines += textwrap.wrap(item.doc, width, initial_indent="    ", subsequent_indent="    ")
    return "\n".join(lines) + "\n"
