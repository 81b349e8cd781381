"""G_ema: an exponential moving average of G's weights, updated in place on the device.

The decay follows StyleGAN: a half-life counted in images (`ema.halflife_kimg`), shortened early in training by
`ema.rampup`, so it does not depend on batch size or process count. BatchNorm buffers are copied, not averaged.
An update is two multi-tensor kernels (lerp of the weights, copy of the buffers) with the decay passed as a Python
number: nothing is read back from the device, so the step path never waits for it.
Pure torch: every rank holds the same copy because every rank feeds it the same (DDP-synchronised) G.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

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
        # State-dict keys `averaged.module.*` and `averaged.n_averaged`, as torch's AveragedModel named them in
        # earlier releases, so their checkpoints and exports load unchanged. The count lives on the CPU and is
        # mirrored in `self.updates`, so no update has to read it.
        self.averaged = nn.Module()
        self.averaged.module = copy.deepcopy(G).eval().requires_grad_(False)
        self.averaged.register_buffer("n_averaged", torch.tensor(0, dtype=torch.long))
        self.updates = 0
        self.register_load_state_dict_post_hook(lambda module, keys: module._count_loaded())

    def _count_loaded(self) -> None:
        self.updates = int(self.averaged.n_averaged)

    @property
    def G_ema(self) -> nn.Module:
        return self.averaged.module

    @torch.no_grad()
    def update(self, G: nn.Module, nimg: int, batch: int) -> None:
        """Fold in G after a step of `batch` images; `nimg` counts the images seen before it. The first update
        copies G, whatever the decay."""
        beta = ema_beta(self.cfg, nimg, batch) if self.updates else 0.0
        torch._foreach_lerp_(list(self.G_ema.parameters()), list(G.parameters()), 1.0 - beta)
        buffers = list(G.buffers())
        if buffers:  # an MLP has none, and the foreach kernels refuse empty lists
            torch._foreach_copy_(list(self.G_ema.buffers()), buffers)
        self.averaged.n_averaged.add_(1)
        self.updates += 1
