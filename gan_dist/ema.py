"""G_ema: an exponential moving average of G's weights, built on torch's own `AveragedModel`.

The decay follows StyleGAN: a half-life counted in images (`ema.halflife_kimg`), shortened early in training by
`ema.rampup`, so it does not depend on batch size or process count. BatchNorm buffers are copied, not averaged.
Pure torch: every rank holds the same copy because every rank feeds it the same (DDP-synchronised) G.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from gan_dist.config import EMAConfig


def ema_beta(cfg: EMAConfig, nimg: int, batch: int) -> float:
    """Per-update decay for a step of `batch` images after `nimg` images were seen."""
    halflife = cfg.halflife_kimg * 1000
    if cfg.rampup > 0:
        halflife = min(halflife, nimg * cfg.rampup)
    return 0.5 ** (batch / max(halflife, 1e-8))


class EMA(nn.Module):
    def __init__(self, G: nn.Module, cfg: EMAConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.beta = 0.0
        # Built from the unwrapped G on its device; n_averaged stays on the CPU so updates need no host sync.
        self.averaged = AveragedModel(G, multi_avg_fn=self._lerp, use_buffers=False)
        self.averaged.module.eval().requires_grad_(False)

    def _lerp(self, ema_params: list[torch.Tensor], params: list[torch.Tensor], n_averaged: torch.Tensor) -> None:
        torch._foreach_lerp_(ema_params, params, 1.0 - self.beta)

    @property
    def G_ema(self) -> nn.Module:
        return self.averaged.module

    @torch.no_grad()
    def update(self, G: nn.Module, nimg: int, batch: int) -> None:
        """Fold in G after a step of `batch` images; `nimg` counts the images seen before it."""
        self.beta = ema_beta(self.cfg, nimg, batch)
        self.averaged.update_parameters(G)
        for b_ema, b in zip(self.averaged.module.buffers(), G.buffers()):
            b_ema.copy_(b)
