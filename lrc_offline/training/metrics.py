"""Metrics: one JSON line per logged step, written and flushed as training goes, and the same values sent
to the experiment trackers (`train.report_to`: TensorBoard, W&B) through `accelerate`. Evaluation steps add
heldout_ce, heldout_kl and heldout_top1 (`training.heldout`), logged like every other number."""

from __future__ import annotations

import datetime
import importlib.util
import json
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import ConfigError

__all__ = ["MetricsWriter", "read_metrics", "tracker_names", "start_trackers", "log_to_trackers", "stop_trackers",
           "progress_line"]  # fmt: skip

_TRACKERS = {"none": (), "tensorboard": ("tensorboard",), "wandb": ("wandb",), "all": ("tensorboard", "wandb")}
_NOT_METRICS = ("step", "time")
"""Record keys that are not logged as scalars: the step is the trackers' x axis; the time is their own."""


class MetricsWriter:
    """Appends one JSON object per logged step to `path` (created with its parents).

    Tensor values are converted to floats here, once per logged step, so the training loop itself
    never waits on the device. `on_write`, when set, receives every record as written (JSON-ready):
    the loop sends it on to the trackers, so they log exactly what the file holds.
    """

    def __init__(self, path: str | Path, append: bool = False, on_write: Callable[[dict], None] | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a" if append else "w")
        self.on_write = on_write

    def write(self, record: dict) -> dict:
        clean = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in record.items()}
        clean.setdefault("time", time.time())
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        if self.on_write is not None:
            self.on_write(clean)
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


# ---- experiment trackers ----------------------------------------------------------------------------


def tracker_names(report_to: str) -> list[str]:
    """accelerate's tracker names for `train.report_to`, refusing one whose package is not installed
    (accelerate itself would only warn and log nothing)."""
    names = list(_TRACKERS[report_to])
    missing = [name for name in names if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"train.report_to={report_to} needs {' and '.join(missing)}, which is not installed: "
                          f"pip install {' '.join(missing)} (or pip install 'lrc-offline[track]'), or set "
                          "train.report_to=none")  # fmt: skip
    return names


def _flat_config(config: dict, prefix: str = "") -> dict[str, Any]:
    """Dotted keys -> scalars, as TensorBoard's hparams want them (lists and None as text)."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(_flat_config(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
    return out


def _wandb_run_id(out_dir: Path) -> str:
    """The run's W&B id, made once and kept in the run directory, so a resumed run continues the same W&B run."""
    path = out_dir / "wandb_run_id"
    if path.is_file():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:8]  # W&B ids are lower-case letters and digits
    path.write_text(run_id + "\n")
    return run_id


def start_trackers(accelerator, out_dir: str | Path, project: str, config: dict) -> None:
    """Start this run's trackers (main process only; none when `accelerator` was made without any):
    TensorBoard writes under `out_dir/tensorboard/<project>/`, W&B under `out_dir/wandb/` with the run
    directory's name as the run's name. `config` (the resolved run config) is stored as hyperparameters."""
    if not accelerator.log_with or not accelerator.is_main_process:
        return
    out_dir = Path(out_dir)
    # The run directory is known only now; TensorBoard's tracker reads it when it starts.
    accelerator.project_configuration.logging_dir = str(out_dir / "tensorboard")
    init_kwargs = {}
    if "wandb" in [str(name) for name in accelerator.log_with]:
        init_kwargs["wandb"] = {"dir": str(out_dir), "name": out_dir.name, "id": _wandb_run_id(out_dir),
                                "resume": "allow"}  # fmt: skip
    accelerator.init_trackers(project, config=_flat_config(config), init_kwargs=init_kwargs)


def log_to_trackers(accelerator, record: dict) -> None:
    """Log one metrics record (as written to metrics.jsonl) at its step: every number but the step and time."""
    if not accelerator.trackers:
        return
    values = {k: v for k, v in record.items()
              if k not in _NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)}  # fmt: skip
    accelerator.log(values, step=int(record["step"]))


def stop_trackers(accelerator) -> None:
    """Close the trackers (flushing their files). Not `accelerator.end_training()`: that also destroys
    the process group, which a sweep's next run still needs."""
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers.clear()


def progress_line(record: dict, total_steps: int, eta_s: float) -> str:
    """The log line a job without a progress bar prints every `log_every` steps."""
    parts = [f"step {record['step']}/{total_steps}", f"loss {record['loss']:.4f}", f"lr {record['lr']:.3g}",
             f"tokens/s {record['tokens_per_s']:.0f}"]  # fmt: skip
    if "heldout_ce" in record:
        parts.append(f"heldout_ce {record['heldout_ce']:.4f}")
    if "heldout_kl" in record:
        parts.append(f"heldout_kl {record['heldout_kl']:.4f} | heldout_top1 {record['heldout_top1']:.3f}")
    parts.append(f"ETA {datetime.timedelta(seconds=round(eta_s))}")
    return " | ".join(parts)
