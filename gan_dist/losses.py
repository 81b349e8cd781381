"""The GAN math of one training step: D step, G step and their losses. Pure torch: the loop passes in
`backward` (accelerator.backward), so nothing here knows about processes or precision.

Seed 000's losses: D is trained on one concatenated batch with binary cross-entropy against targets 1 (real) and
0 (fake); G minimises the cross-entropy of D(G(z)) against 1 (non-saturating), with D frozen as Keras freezes it.
The seed adds U(0, 0.05) to both targets, which puts real targets above 1, where cross-entropy has no minimum: D's
loss then falls without bound (measured: -250 after 5k steps). The noise is kept, but moves each target towards
the other class (real 1 - U(0, n), fake U(0, n)), so targets stay probabilities.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from gan_dist.config import LossConfig

Backward = Callable[[torch.Tensor], None]


def d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor, label_noise: float) -> torch.Tensor:
    target = torch.cat([torch.ones_like(logits_real), torch.zeros_like(logits_fake)])
    if label_noise > 0:
        target = (target - label_noise * torch.rand_like(target)).abs()
    return F.binary_cross_entropy_with_logits(torch.cat([logits_real, logits_fake]), target)


def g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return F.softplus(-logits_fake).mean()  # BCE against 1, written so that it stays finite for any logit


def d_step(G: nn.Module, D: nn.Module, opt_D: torch.optim.Optimizer, real: torch.Tensor, z: torch.Tensor,
           cfg: LossConfig, backward: Backward) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        fake = G(z)
    # One forward over real and fake: BatchNorm sees the mixed batch as in the seed, and DDP syncs buffers once.
    logits = D(torch.cat([real, fake]))
    logits_real, logits_fake = logits[: len(real)], logits[len(real):]
    loss = d_loss(logits_real, logits_fake, cfg.label_noise)
    backward(loss)
    opt_D.step()
    opt_D.zero_grad(set_to_none=True)
    return {"loss_d": loss.detach(), "d_real": torch.sigmoid(logits_real.detach()).mean(),
            "d_fake": torch.sigmoid(logits_fake.detach()).mean()}


@contextmanager
def frozen(D: nn.Module) -> Iterator[None]:
    """D as a Keras model with `trainable=False` runs: no gradients, BatchNorm on its running statistics.

    All of D is frozen, not part of it: DDP's reducer must see either every D parameter or none in a backward.
    Batch statistics of an all-fake batch would differ from those of the mixed batch D is trained on, and G
    would learn to exploit that difference instead of D's judgement."""
    norms = [m for m in D.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    D.requires_grad_(False)
    for m in norms:
        m.eval()
    try:
        yield
    finally:
        D.requires_grad_(True)
        for m in norms:
            m.train()


def g_step(G: nn.Module, D: nn.Module, opt_G: torch.optim.Optimizer, z: torch.Tensor,
           backward: Backward) -> dict[str, torch.Tensor]:
    with frozen(D):
        loss = g_loss(D(G(z)))
        backward(loss)
    opt_G.step()
    opt_G.zero_grad(set_to_none=True)
    return {"loss_g": loss.detach()}
