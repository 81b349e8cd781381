"""Optimizers and learning-rate schedules: Adam for G and D (separate rates: TTUR), warmup then constant, linear or
cosine decay to `lr_end` of the base rates, over train.steps or (`schedule_kimg`, as R3GAN) over images seen. Pure
torch: the schedule is a function of the step and images seen alone, so a resumed run needs no scheduler state.
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


def schedule_progress(step: int, total: int, cfg: OptimConfig, nimg: int = 0) -> float:
    """How far the decay has gone at `step` (0-based) of `total` after `nimg` images, from 0 to 1."""
    if cfg.schedule_kimg > 0:
        return min(nimg / (1000 * cfg.schedule_kimg), 1.0)
    return min(max(step - cfg.warmup_steps, 0) / max(total - cfg.warmup_steps, 1), 1.0)


def cosine(p: float, end: float) -> float:
    """From 1 at p = 0 to `end` at p = 1 along half a cosine."""
    return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * p))


def lr_factor(step: int, total: int, cfg: OptimConfig, nimg: int = 0) -> float:
    """The multiple of the base learning rates for the update made at `step` (0-based) of `total`."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    p = schedule_progress(step, total, cfg, nimg)
    if cfg.schedule == "linear":
        return 1 - (1 - cfg.lr_end) * p
    if cfg.schedule == "cosine":
        return cosine(p, cfg.lr_end)
    return 1.0


def set_lr(opt_G: torch.optim.Optimizer, opt_D: torch.optim.Optimizer, factor: float, cfg: OptimConfig) -> None:
    for opt, base in ((opt_G, cfg.lr_G), (opt_D, cfg.lr_D)):
        for group in opt.param_groups:
            group["lr"] = base * factor
