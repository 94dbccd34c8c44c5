"""A sweep of student sizes trained from one cache: one run per hidden size, then a table and a plot."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from accelerate import PartialState

from ..config import ConfigError, TrainJobConfig
from .metrics import read_metrics
from .plots import plot_sweep
from .trainer import train_from_cache

__all__ = ["run_sweep", "parse_sizes"]


def parse_sizes(text: str) -> list[int]:
    """`128,192,256` -> [128, 192, 256], refusing anything but distinct positive integers."""
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise ConfigError(f"--hidden-sizes {text!r} must be comma-separated integers, e.g. 128,192,256") from err
    if not sizes or any(s <= 0 for s in sizes) or len(set(sizes)) != len(sizes):
        raise ConfigError(f"--hidden-sizes {text!r} must list distinct positive integers")
    return sizes


def run_sweep(
    cfg: TrainJobConfig,
    cache_dir: str | Path,
    out_dir: str | Path,
    hidden_sizes: list[int],
    teacher=None,
    heldout_ids: torch.Tensor | None = None,
    progress: bool = True,
) -> list[dict]:
    """Train one student per size (runs in `out_dir/d<size>/`, each resumable), then write
    `sweep.json`, `sweep.md` and `sweep.png` to `out_dir`. Returns the table rows; under DDP every rank
    trains, and only rank 0 writes the table and returns its rows (the others return [])."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, runs = [], {}
    for size in hidden_sizes:
        run_cfg = dataclasses.replace(cfg, student=dataclasses.replace(cfg.student, hidden_size=size))
        run_dir = out_dir / f"d{size}"
        summary = train_from_cache(run_cfg, cache_dir, run_dir, resume="auto", progress=progress,
                                   teacher=teacher, heldout_ids=heldout_ids)  # fmt: skip
        if not PartialState().is_main_process:  # its metrics.jsonl and export are rank 0's
            continue
        records = read_metrics(run_dir / "metrics.jsonl")
        runs[f"d_S={size}"] = records
        final = records[-1]
        rows.append({"hidden_size": size, "final_loss": final["loss"], "heldout_ce": final.get("heldout_ce"),
                     "heldout_kl": final.get("heldout_kl"), "heldout_top1": final.get("heldout_top1"),
                     "tokens": final["tokens"], "tokens_per_s": final["tokens_per_s"],
                     "export": summary.get("export"), "run": str(run_dir)})  # fmt: skip
    if not PartialState().is_main_process:
        return []
    metric = "heldout_ce" if all(r["heldout_ce"] is not None for r in rows) else "final_loss"
    (out_dir / "sweep.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["| d_S | final train loss | held-out CE | held-out KL | held-out top-1 | tokens | tokens/s |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        held = [("" if r[key] is None else f"{r[key]:.{digits}f}")
                for key, digits in (("heldout_ce", 4), ("heldout_kl", 4), ("heldout_top1", 3))]  # fmt: skip
        lines.append(f"| {r['hidden_size']} | {r['final_loss']:.4f} | {' | '.join(held)} | {r['tokens']} | "
                     f"{r['tokens_per_s']:.0f} |")  # fmt: skip
    (out_dir / "sweep.md").write_text("\n".join(lines) + "\n")
    plot_sweep(rows, runs, out_dir / "sweep.png", metric)
    return rows
