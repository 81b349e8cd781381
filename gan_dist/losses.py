"""The GAN math as small pure functions: D's and G's losses, the penalties, top-k's weights, the mode-seeking term
and ADA's heuristic; `objective.GANObjective` puts them together into the phases of a step.

Seed 000's losses: D is trained on one concatenated batch with binary cross-entropy against targets 1 (real) and
0 (fake); G minimises the cross-entropy of D(G(z)) against 1 (non-saturating), with D frozen as Keras freezes it.
The seed adds U(0, 0.05) to both targets, which puts real targets above 1, where cross-entropy has no minimum: D's
loss then falls without bound (measured: -250 after 5k steps). The noise is kept, but moves each target towards
the other class (real 1 - U(0, n), fake U(0, n)), so targets stay probabilities.

Beyond the seeds (`loss.kind`): minimax, least squares, hinge and WGAN-GP losses, and R3GAN's relativistic pairing
loss (rpgan: D and G judge each fake against the real sample paired with it); the lazy R1 (real) and R2 (fake)
penalties; top-k G updates (Sinha et al. 2020), chosen over every process's samples; the mode-seeking term (Mao
et al. 2019), which keeps G from mapping different z (of one class) to one image. A conditional run passes labels
`c` to G and D; D's BatchNorm-free paths keep every sample's logit its own, which R1 / R2 per sample rely on.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn


Backward = Callable[[torch.Tensor], None]
Select = Callable[[torch.Tensor], torch.Tensor]  # D's scores of G's samples -> each sample's weight in G's loss
Augment = Callable[[torch.Tensor], torch.Tensor]  # what D sees of a batch (augment.py)


def d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor, kind: str = "ns",
           label_noise: float = 0.0) -> torch.Tensor:
    """D's loss for one batch; D lowers it by raising real logits and lowering fake ones.

    ns and minimax share D's cross-entropy; ls is Mao et al.'s least squares against targets 1 and 0; hinge
    is Lim & Ye's margin loss (SNGAN, BigGAN); wgan_gp is the critic's E[D(fake)] - E[D(real)], whose
    gradient penalty `gradient_penalty` adds; rpgan is R3GAN's softplus(D(fake) - D(real)) over pairs (real i,
    fake i). Label noise moves the ns/minimax/ls targets."""
    if kind == "rpgan":
        return F.softplus(logits_fake - logits_real).mean()
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


def g_terms(logits_fake: torch.Tensor, kind: str = "ns", logits_real: torch.Tensor | None = None) -> torch.Tensor:
    """G's loss per sample for D's logits on its samples; G lowers it by raising them. rpgan needs D's logits on
    the real samples paired with them: G's step sees real images too."""
    if kind == "ns":
        return F.softplus(-logits_fake)  # BCE against 1, written so that it stays finite for any logit
    if kind == "minimax":
        return -F.softplus(logits_fake)  # log(1 - sigmoid(l)) = -softplus(l): saturates when D is sure
    if kind == "ls":
        return 0.5 * (logits_fake - 1).square()
    if kind in ("hinge", "wgan_gp"):
        return -logits_fake
    if kind == "rpgan":
        return F.softplus(logits_real - logits_fake)
    raise ValueError(f"unknown loss kind {kind!r}")


def g_loss(logits_fake: torch.Tensor, kind: str = "ns", logits_real: torch.Tensor | None = None,
           weights: torch.Tensor | None = None) -> torch.Tensor:
    """The batch's G loss: the mean of `g_terms`, or their sum under `weights` (top-k)."""
    terms = g_terms(logits_fake, kind, logits_real)
    return terms.mean() if weights is None else (terms * weights).sum()


def topk_count(batch: int, epochs: float, gamma: float, floor: float) -> int:
    """Sinha et al.'s k for a global batch: the whole batch, shrinking by `gamma` per epoch down to `floor` of it."""
    return max(math.ceil(floor * batch), min(batch, math.ceil(batch * gamma ** epochs)))


def topk_weights(scores: torch.Tensor, k: int, gather: Callable[[torch.Tensor], torch.Tensor], rank: int,
                 world: int) -> torch.Tensor:
    """Weights that make G's loss the mean over the k samples D scores highest among every process's samples.

    `gather` concatenates every rank's scores in rank order, so each rank ranks the same global batch (ties broken
    by global index) and keeps its own part of the choice. DDP averages gradients over ranks, hence world / k:
    the gradient is the one a single process with the whole batch would get."""
    everyone = gather(scores.detach().float())
    chosen = torch.zeros_like(everyone)
    chosen[torch.argsort(everyone, descending=True, stable=True)[:k]] = world / k
    return chosen[rank * len(scores):(rank + 1) * len(scores)]


def mode_seeking(fake_a: torch.Tensor, fake_b: torch.Tensor, z_a: torch.Tensor, z_b: torch.Tensor,
                 eps: float = 1e-5) -> torch.Tensor:
    """Mao et al. 2019's mode-seeking term, 1 / (mean |G(z_a) - G(z_b)| / mean |z_a - z_b| + eps): large when two
    noises give one image. Taken per pair (i, i) and averaged over pairs, not over the batch's means as in MSGAN's
    code, so that it is a mean over samples: the same gradient on any number of processes."""
    ratio = (fake_a - fake_b).abs().flatten(1).mean(1) / (z_a - z_b).abs().flatten(1).mean(1)
    return (1 / (ratio + eps)).mean()


def overfitting(logits_real: torch.Tensor, logits_fake: torch.Tensor, kind: str) -> torch.Tensor:
    """ADA's r_t for one batch: E[sign(D(real))], near 0 while D cannot tell and 1 when it knows the training set
    by heart. rpgan's and WGAN's D may drift by any constant, so for them the sign is of D(real_i) - D(fake_i)."""
    margin = logits_real - logits_fake if kind in ("rpgan", "wgan_gp") else logits_real
    return margin.detach().float().sign().mean()


def input_gradient(logits: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """d(sum of logits)/d(inputs), kept in the graph so that a penalty on it trains D (double backward)."""
    (grad,) = torch.autograd.grad(logits.sum(), inputs, create_graph=True)
    return grad.flatten(1)


def r1_penalty(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of |grad_x D(x)|^2: R1 at real samples (Mescheder et al. 2018), R2 at fake ones (R3GAN
    uses both); gamma / 2 is applied by the caller. `x` must require grad and be the tensor `logits` came from."""
    return input_gradient(logits, x).square().sum(1).mean()


def gradient_penalty(logits_mix: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
    """WGAN-GP's E[(|grad_x D(x)| - 1)^2] at random interpolates between real and fake (Gulrajani et al. 2017)."""
    return (input_gradient(logits_mix, mix).norm(dim=1) - 1).square().mean()


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
