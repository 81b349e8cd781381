"""The GAN math of one training step: D step, G step and their losses. Pure torch: the loop passes in
`backward` (accelerator.backward), so nothing here knows about processes or precision.

Seed 000's losses: D is trained on one concatenated batch with binary cross-entropy against targets 1 (real) and
0 (fake); G minimises the cross-entropy of D(G(z)) against 1 (non-saturating), with D frozen as Keras freezes it.
The seed adds U(0, 0.05) to both targets, which puts real targets above 1, where cross-entropy has no minimum: D's
loss then falls without bound (measured: -250 after 5k steps). The noise is kept, but moves each target towards
the other class (real 1 - U(0, n), fake U(0, n)), so targets stay probabilities.

Beyond the seeds (`loss.kind`): minimax, least squares, hinge and WGAN-GP losses; the lazy R1 penalty. Penalties
join D's loss in the same backward as the loss itself, so DDP reduces D's gradients once per micro-step.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from gan_dist.config import LossConfig

Backward = Callable[[torch.Tensor], None]


def d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor, kind: str = "ns",
           label_noise: float = 0.0) -> torch.Tensor:
    """D's loss for one batch; D lowers it by raising real logits and lowering fake ones.

    ns and minimax share D's cross-entropy; ls is Mao et al.'s least squares against targets 1 and 0; hinge
    is Lim & Ye's margin loss (SNGAN, BigGAN); wgan_gp is the critic's E[D(fake)] - E[D(real)], whose
    gradient penalty `gradient_penalty` adds. Label noise moves the ns/minimax/ls targets."""
    logits = torch.cat([logits_real, logits_fake])
    if kind in ("ns", "minimax", "ls"):
        target = torch.cat([torch.ones_like(logits_real), torch.zeros_like(logits_fake)])
        if label_noise > 0:
            target = (target - label_noise * torch.rand_like(target)).abs()
        if kind == "ls":
            return 0.5 * (logits - target).square().mean()
        return F.binary_cross_entropy_with_logits(logits, target)
    if kind == "hinge":
        return torch.cat([F.relu(1 - logits_real), F.relu(1 + logits_fake)]).mean()
    if kind == "wgan_gp":
        return logits_fake.mean() - logits_real.mean()
    raise ValueError(f"unknown loss kind {kind!r}")


def g_loss(logits_fake: torch.Tensor, kind: str = "ns") -> torch.Tensor:
    """G's loss for D's logits on its samples; G lowers it by raising them."""
    if kind == "ns":
        return F.softplus(-logits_fake).mean()  # BCE against 1, written so that it stays finite for any logit
    if kind == "minimax":
        return -F.softplus(logits_fake).mean()  # log(1 - sigmoid(l)) = -softplus(l): saturates when D is sure
    if kind == "ls":
        return 0.5 * (logits_fake - 1).square().mean()
    if kind in ("hinge", "wgan_gp"):
        return -logits_fake.mean()
    raise ValueError(f"unknown loss kind {kind!r}")


def input_gradient(logits: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """d(sum of logits)/d(inputs), kept in the graph so that a penalty on it trains D (double backward)."""
    (grad,) = torch.autograd.grad(logits.sum(), inputs, create_graph=True)
    return grad.flatten(1)


def r1_penalty(logits_real: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of |grad_x D(x)|^2 at real samples (Mescheder et al. 2018); gamma / 2 is applied by
    the caller. `real` must require grad and be the tensor D's logits were computed from."""
    return input_gradient(logits_real, real).square().sum(1).mean()


def gradient_penalty(logits_mix: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
    """WGAN-GP's E[(|grad_x D(x)| - 1)^2] at random interpolates between real and fake (Gulrajani et al. 2017)."""
    return (input_gradient(logits_mix, mix).norm(dim=1) - 1).square().mean()


def d_step(G: nn.Module, D: nn.Module, opt_D: torch.optim.Optimizer, real: torch.Tensor, z: torch.Tensor,
           cfg: LossConfig, backward: Backward, r1_due: bool = False,
           set_to_none: bool = True) -> dict[str, torch.Tensor]:
    """One D step (or one accumulation micro-step of it). `r1_due` marks the lazy R1 steps: the penalty is then
    scaled by r1_every, so that on average it weighs gamma / 2 per step (StyleGAN2's lazy regularization).
    `set_to_none` is zero_grad's: free the gradients, or keep their memory and fill it with zeros."""
    with torch.no_grad():
        fake = G(z)
    parts = [real.detach().requires_grad_(r1_due), fake]
    if cfg.kind == "wgan_gp":
        alpha = torch.rand(len(real), *[1] * (real.ndim - 1), device=real.device, dtype=real.dtype)
        parts.append(torch.lerp(real.detach(), fake, alpha).requires_grad_(True))
    # One forward over all parts: BatchNorm sees the mixed batch as in the seed, DDP syncs buffers once, and
    # every D parameter's gradient is reduced in a single backward (penalties included).
    logits = D(torch.cat(parts)).split([len(p) for p in parts])
    loss = d_loss(logits[0], logits[1], cfg.kind, cfg.label_noise)
    out = {"loss_d": loss.detach(), "d_real": torch.sigmoid(logits[0].detach()).mean(),
           "d_fake": torch.sigmoid(logits[1].detach()).mean()}
    if cfg.kind == "wgan_gp":
        gp = gradient_penalty(logits[2], parts[2])
        loss = loss + cfg.gp_weight * gp
        out["gp"] = gp.detach()
    if cfg.r1_gamma > 0:  # logged on every step (0 between lazy ones), so its mean over steps is the unscaled R1
        r1 = r1_penalty(logits[0], parts[0]) * cfg.r1_every if r1_due else torch.zeros((), device=real.device)
        loss = loss + cfg.r1_gamma / 2 * r1
        out["r1"] = r1.detach()
    backward(loss)
    opt_D.step()
    opt_D.zero_grad(set_to_none=set_to_none)
    return out


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


def g_step(G: nn.Module, D: nn.Module, opt_G: torch.optim.Optimizer, z: torch.Tensor, kind: str,
           backward: Backward, set_to_none: bool = True) -> dict[str, torch.Tensor]:
    with frozen(D):
        loss = g_loss(D(G(z)), kind)
        backward(loss)
    opt_G.step()
    opt_G.zero_grad(set_to_none=set_to_none)
    return {"loss_g": loss.detach()}
