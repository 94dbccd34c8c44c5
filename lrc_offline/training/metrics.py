"""Metrics: one JSON line per logged step, written and flushed as training goes."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

__all__ = ["MetricsWriter", "read_metrics"]


class MetricsWriter:
    """Appends one JSON object per logged step to `path` (created with its parents).

    Tensor values are converted to floats here, once per logged step, so the training loop itself
    never waits on the device.
    """

    def __init__(self, path: str | Path, append: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a" if append else "w")

    def write(self, record: dict) -> dict:
        clean = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in record.items()}
        clean.setdefault("time", time.time())
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        return clean

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(path: str | Path) -> list[dict]:
    """All records of a metrics file (a torn last line from a crash is skipped)."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
