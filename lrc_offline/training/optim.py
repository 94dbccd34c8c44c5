"""AdamW over the trainable LRC parameters, with linear warmup then linear decay."""

from __future__ import annotations

import torch

from ..config import OptimConfig
from ..student.lrc import LRCStudent

__all__ = ["build_optimizer", "lr_factor"]


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based): linear warmup to 1 over
    `warmup_steps`, then linear decay that reaches `min_lr_ratio` at step `total_steps`, one past the last.
    A warmup as long as the run or longer ramps for the whole run and never decays."""
    assert cfg.warmup_steps is not None, "optim.warmup_steps=None is resolved by TrainJobConfig.resolved()"
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    decay_steps = max(total_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / decay_steps, 1.0)
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * (1.0 - progress)


def build_optimizer(
    student: LRCStudent, cfg: OptimConfig, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with weight decay on the projections only (never on norm weights)."""
    assert cfg.lr is not None and cfg.warmup_steps is not None, \
        "optim.lr=None and optim.warmup_steps=None are resolved by TrainJobConfig.resolved() before this"
    projections = student.projections()
    norms = student.norm_weights()
    trainable = [p for p in student.parameters() if p.requires_grad]  # a sharded student's teacher is frozen
    assert {id(p) for p in projections + norms} == {id(p) for p in trainable}, "untracked parameter"
    groups = [
        {"params": projections, "weight_decay": cfg.weight_decay},
        {"params": norms, "weight_decay": 0.0},
    ]
    fused = all(p.is_cuda for p in student.parameters())
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=fused or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, cfg))
    return optimizer, scheduler
