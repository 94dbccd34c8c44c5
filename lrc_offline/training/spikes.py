"""Skipping the optimizer steps of gradient spikes.

With `optim.grad_clip` below the typical gradient norm every step is scaled to the same norm, so a step
whose gradient norm is ten times its neighbours' is not smaller for the clip: it moves the weights as far
as any other, in the direction of the few parameters (one layer's projection, one loss term's outlier
rows) that produced it, and AdamW, whose second moments have not seen gradients that large there, gives
those parameters the largest steps of the run. A `SpikeGuard` skips such a step instead: the gradients
are dropped, the optimizer's moments and step count stay as they were, and the learning-rate schedule
and the data go on. `optim.skip_spikes` sets the factor above the median gradient norm of the last
`optim.spike_window` steps (the skipped steps' norms included, so a lasting change of scale stops being
skipped once it fills more than half the window); a non-finite norm is always skipped.

The decision stays on the device: with a fused AdamW (on CUDA) it is handed to the optimizer as
``found_inf``, the flag `torch.amp.GradScaler` uses for the same purpose, so the step costs no host
sync; other optimizers read one flag per step.
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["MIN_HISTORY", "SpikeGuard", "optimizer_step"]

MIN_HISTORY = 10
"""Steps seen before the guard skips anything: a median of fewer norms says little."""


class SpikeGuard:
    """Flags the steps whose gradient norm exceeds `factor` times the median of the last `window` norms.

    Args:
        factor: The multiple of the median norm above which a step is skipped, > 1.
        window: How many recent steps' norms the median is taken over, >= MIN_HISTORY.
        device: Where the norms live (the gradients' device).
    """

    def __init__(self, factor: float, window: int, device: torch.device | str) -> None:
        if not factor > 1:
            raise ValueError(f"SpikeGuard: factor must be > 1, got {factor}")
        if window < MIN_HISTORY:
            raise ValueError(f"SpikeGuard: window must be >= {MIN_HISTORY}, got {window}")
        self.factor = float(factor)
        self.norms_W = torch.full((window,), float("nan"), dtype=torch.float32, device=device)
        self.seen = 0
        """Norms recorded (a host counter, no sync); the next goes to slot seen % window."""
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)
        """Steps skipped so far (a device counter, read when a metrics line is written)."""

    def check(self, grad_norm: torch.Tensor) -> torch.Tensor:
        """Record this step's gradient norm (before clipping); a 0-dim bool tensor on the guard's device,
        True where the step must be skipped. No host sync."""
        norm = grad_norm.detach().to(self.norms_W.device, torch.float32).reshape(())
        finite = torch.isfinite(norm)
        skip = ~finite
        if self.seen >= MIN_HISTORY:
            skip = skip | (norm > self.factor * torch.nanmedian(self.norms_W))
        # A non-finite norm stays out of the window (nanmedian ignores it); every finite one goes in.
        self.norms_W[self.seen % self.norms_W.numel()] = torch.where(finite, norm, float("nan"))
        self.seen += 1
        self.skipped += skip
        return skip

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready state for a checkpoint (reads the window back to the host): the window's norms oldest
        first (None for a non-finite one), the steps seen and the steps skipped."""
        width = self.norms_W.numel()
        slots = [None if math.isnan(x) else x for x in self.norms_W.tolist()]
        cut = self.seen % width
        ordered = slots[cut:] + slots[:cut] if self.seen >= width else slots[: self.seen]
        return {"factor": self.factor, "norms": ordered, "seen": self.seen, "skipped": int(self.skipped)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict()`; a window of another length keeps the most recent norms it can hold."""
        width = self.norms_W.numel()
        recent = [float("nan") if x is None else float(x) for x in state["norms"]][-width:]
        self.norms_W.fill_(float("nan"))
        if recent:
            self.norms_W[: len(recent)] = torch.tensor(recent, dtype=torch.float32)
        # the next norm goes to slot len(recent) % width: over the oldest once the window is full
        self.seen = len(recent)
        self.skipped.fill_(int(state["skipped"]))


def optimizer_step(optimizer: torch.optim.Optimizer, skip: torch.Tensor | None) -> None:
    """`optimizer.step()`, or nothing where `skip` holds: a fused optimizer (torch's fused AdamW, possibly
    inside `accelerate`'s wrapper without a gradient scaler) takes the flag as ``found_inf`` on the device;
    any other reads it on the host."""
    if skip is None:
        optimizer.step()
        return
    inner = getattr(optimizer, "optimizer", optimizer)
    fused = all(group.get("fused") for group in inner.param_groups) and getattr(optimizer, "scaler", None) is None
    if fused:
        inner.found_inf = skip.to(torch.float32)
        try:
            optimizer.step()
        finally:
            del inner.found_inf
    elif not bool(skip):
        optimizer.step()
