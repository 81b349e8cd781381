"""Optimizers and learning-rate schedules: Adam for G and D (separate rates: TTUR), warmup then constant, linear or
cosine decay. Pure torch: the schedule is a function of the step alone, so a resumed run needs no scheduler state.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from gan_dist.config import OptimConfig


# optim.impl as Adam's keyword arguments: one fused kernel, a few multi-tensor kernels, or a loop over tensors.
ADAM_IMPL = {"auto": {}, "fused": {"fused": True}, "foreach": {"foreach": True}, "single": {"foreach": False}}


def make_optimizers(G: nn.Module, D: nn.Module, cfg: OptimConfig) -> tuple[torch.optim.Adam, torch.optim.Adam]:
    kwargs = {"betas": (cfg.beta1, cfg.beta2), "eps": cfg.eps, **ADAM_IMPL[cfg.impl]}
    opt_G = torch.optim.Adam(G.parameters(), lr=cfg.lr_G, **kwargs)
    opt_D = torch.optim.Adam(D.parameters(), lr=cfg.lr_D, **kwargs)
    return opt_G, opt_D


def lr_factor(step: int, total: int, cfg: OptimConfig) -> float:
    """The multiple of the base learning rates for the update made at `step` (0-based) of `total`."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(total - cfg.warmup_steps, 1)
    if cfg.schedule == "linear":
        return 1 - progress
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0


def set_lr(opt_G: torch.optim.Optimizer, opt_D: torch.optim.Optimizer, factor: float, cfg: OptimConfig) -> None:
    for opt, base in ((opt_G, cfg.lr_G), (opt_D, cfg.lr_D)):
        for group in opt.param_groups:
            group["lr"] = base * factor
