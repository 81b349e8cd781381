"""What training trains, owned in one place: G and D as the step runs them (DDP-wrapped, perhaps compiled) and
unwrapped, their optimizers, the EMA generator, the augmentation (ADA's p and sums are state too) and
self-conditioning's clusters; and what of
them a checkpoint keeps per rank, what an export writes and which tensors the non-finite check reads.

Built by the loop (accelerate wraps the networks there); nothing here knows about processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gan_dist.augment import ADA, DiffAugment
from gan_dist.ema import EMA
from gan_dist.selfcond import SelfCond


@dataclass
class Trained:
    """`G`, `D`: what the step runs; `G_raw`, `D_raw`: the same modules without DDP's or compile's wrapper (no
    prefix in their state_dicts: what exports hold, and whose buffers checkpoints keep)."""

    G: nn.Module
    D: nn.Module
    opt_G: torch.optim.Optimizer
    opt_D: torch.optim.Optimizer
    ema: EMA
    G_raw: nn.Module
    D_raw: nn.Module
    augment: DiffAugment | ADA | None = None
    self_cond: SelfCond | None = None  # self-conditioning's clusters (the same on every rank)

    @property
    def G_ema(self) -> nn.Module:
        return self.ema.G_ema

    @property
    def ada(self) -> ADA | None:
        return self.augment if isinstance(self.augment, ADA) else None

    def per_rank(self) -> dict[str, nn.Module]:
        """The modules whose buffers are each rank's own (BatchNorm statistics without DDP's broadcasts, ADA's
        sums), by the names a checkpoint keeps them under; G_ema's are rank 0's everywhere."""
        return {"G": self.G_raw, "D": self.D_raw} | ({"aug": self.ada} if self.ada is not None else {})

    def exported(self) -> dict[str, nn.Module]:
        """What `final/` and `best/` hold, by file name."""
        return {"generator": self.G_raw, "generator_ema": self.G_ema, "discriminator": self.D_raw}

    def tensors(self) -> dict[str, list[torch.Tensor]]:
        """What a checkpoint holds of each network (weights and buffers) and optimizer (its moments), by name: the
        tensors the non-finite check reads before anything is written from them."""
        modules = self.per_rank() | {"G_ema": self.ema}
        optimizers = {"opt_G": self.opt_G, "opt_D": self.opt_D}
        return {name: [*m.parameters(), *m.buffers()] for name, m in modules.items()} | {
            name: [t for state in opt.state.values() for t in state.values() if torch.is_tensor(t)]
            for name, opt in optimizers.items()}

    def update_ema(self, nimg: int, batch: int) -> None:
        """Fold G into G_ema after a step of `batch` images, `nimg` seen before it."""
        self.ema.update(self.G_raw, nimg, batch)
