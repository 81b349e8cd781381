"""The GAN objective: one object, built once from `cfg.loss`, that holds G, D, the augmentation and the loss's
settings, and accumulates the gradients of one phase of a step (StyleGAN2-ADA's `StyleGAN2Loss` is the model).

The loop fetches the real batch, draws z, calls `d_phase` (with or without the lazy R1 / R2 pass) or `g_phase`
inside accelerate's accumulation context, then steps and zeroes the optimizer itself. Everything the loss decides
lives here: when the penalties are due and how much they weigh, the gamma schedule's factor, top-k's k, the
mode-seeking pair, whether G's step sees the real batch (rpgan), whether the networks take labels, and ADA's
overfitting heuristic. A new loss term touches this file, `losses.py` (its pure math) and `LossConfig`.

Pure torch: `backward` (accelerator.backward) and `gather` (accelerator.gather) are passed in, so nothing here
knows about processes or precision. Penalties join D's loss in the same backward as the loss itself, so DDP
reduces D's gradients once per micro-step.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import nn

from gan_dist.augment import ADA
from gan_dist.config import LossConfig
from gan_dist.losses import Augment, Backward, Select, d_loss, frozen, g_loss, gradient_penalty, mode_seeking, \
    overfitting, r1_penalty, topk_count, topk_weights
from gan_dist.models import conditioned
from gan_dist.optim import cosine

Metrics = dict[str, torch.Tensor]

ENDLESS_EPOCH = 50_000  # images that count as an epoch for top-k's decay when the data has no epochs (2-D, resampled)


class Schedule(NamedTuple):
    """Where the run is, for the terms that change over it: `progress` the optimizer schedule's (0 to 1, the gamma
    schedule follows it) and `epochs` the epochs of real data seen (top-k's k shrinks per epoch)."""

    progress: float = 0.0
    epochs: float = 0.0


def _same(scores: torch.Tensor) -> torch.Tensor:
    return scores


class GANObjective:
    """G's and D's losses for `cfg` (LossConfig) over `G` and `D` as the step runs them (DDP-wrapped or not).
    `augment` transforms everything D sees; ADA's heuristic is fed from every D phase. `gather` concatenates a
    tensor of every rank in rank order (top-k ranks the global batch); `rank` and `world` place this process in
    it. `conditional`: the networks take the real batch's labels, which G's samples then share; `labeler` gives
    those labels from the images instead (self-conditioning's clusters)."""

    def __init__(self, cfg: LossConfig, G: nn.Module, D: nn.Module, *, backward: Backward,
                 augment: Augment | None = None, gather: Callable[[torch.Tensor], torch.Tensor] = _same,
                 rank: int = 0, world: int = 1, conditional: bool = False,
                 labeler: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.cfg, self.G, self.D, self.backward, self.augment = cfg, G, D, backward, augment
        self.gather, self.rank, self.world, self.conditional = gather, rank, world, conditional
        self.labeler = labeler

    def regularize(self, d_step: int) -> bool:
        """Whether D step `d_step` (counted over the run) takes the lazy R1 / R2 pass (StyleGAN2's lazy
        regularization: every r1_every-th D step, its weight scaled by r1_every)."""
        return d_step % self.cfg.r1_every == 0

    def labels(self, real: torch.Tensor, c: torch.Tensor) -> torch.Tensor | None:
        """The labels the networks take of a real batch `real` labelled `c` (every source has labels): none unless
        they are conditional, the labeler's when there is one. The phases take what this returns."""
        if self.labeler is not None:
            return self.labeler(real)
        return c if self.conditional else None

    def _d(self, x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        return conditioned(self.D, x if self.augment is None else self.augment(x), c)

    def d_phase(self, real: torch.Tensor, c: torch.Tensor | None, z: torch.Tensor, schedule: Schedule = Schedule(),
                regularize: bool = False) -> Metrics:
        """Accumulate D's gradients for one (micro-)batch: the loss on `real` against G's samples of `z` (labelled
        `c` alike, when conditional), with the R1 / R2 pass when `regularize`. R1 / R2 are taken with respect to
        the images before the augmentation, through it (StyleGAN2-ADA). `rt` is ADA's overfitting heuristic: the
        mean sign of D's real logits, or for the losses blind to a constant added to every logit (rpgan, wgan_gp)
        of each real logit less its paired fake one."""
        cfg = self.cfg
        with torch.no_grad():
            fake = conditioned(self.G, z, c)
        r2_due = regularize and cfg.r2_gamma > 0
        parts = [real.detach().requires_grad_(regularize and cfg.r1_gamma > 0), fake.requires_grad_(r2_due)]
        if cfg.kind == "wgan_gp":
            alpha = torch.rand(len(real), *[1] * (real.ndim - 1), device=real.device, dtype=real.dtype)
            parts.append(torch.lerp(real.detach(), fake, alpha).requires_grad_(True))
        # One forward over all parts: BatchNorm sees the mixed batch as in the seed, DDP syncs buffers once, and
        # every D parameter's gradient is reduced in a single backward (penalties included).
        labels = None if c is None else torch.cat([c] * len(parts))
        logits = self._d(torch.cat(parts), labels).split([len(p) for p in parts])
        loss = d_loss(logits[0], logits[1], cfg.kind, cfg.label_noise)
        out = {"loss_d": loss.detach(), "d_real": torch.sigmoid(logits[0].detach()).mean(),
               "d_fake": torch.sigmoid(logits[1].detach()).mean(), "rt": overfitting(logits[0], logits[1], cfg.kind)}
        if cfg.kind == "wgan_gp":
            gp = gradient_penalty(logits[2], parts[2])
            loss = loss + cfg.gp_weight * gp
            out["gp"] = gp.detach()
        gamma_scale = cosine(schedule.progress, cfg.gamma_end)
        # Logged on every step (0 between lazy ones), so their means over steps are the unscaled penalties.
        for name, gamma, i in (("r1", cfg.r1_gamma, 0), ("r2", cfg.r2_gamma, 1)):
            if gamma > 0:
                r = r1_penalty(logits[i], parts[i]) * cfg.r1_every if regularize else \
                    torch.zeros((), device=real.device)
                loss = loss + gamma * gamma_scale / 2 * r
                out[name] = r.detach()
        self.backward(loss)
        if isinstance(self.augment, ADA):
            self.augment.observe(out["rt"])
        return out

    def _select(self, n: int, schedule: Schedule) -> Select | None:
        """Top-k G updates: the k best-scored of the world x `n` samples of every rank keep their weight."""
        if self.cfg.topk_gamma == 1:
            return None
        k = topk_count(self.world * n, schedule.epochs, self.cfg.topk_gamma, self.cfg.topk_min)
        return lambda scores: topk_weights(scores, k, self.gather, self.rank, self.world)

    def g_phase(self, real: torch.Tensor, c: torch.Tensor | None, z: torch.Tensor,
                schedule: Schedule = Schedule()) -> Metrics:
        """Accumulate G's gradients for one (micro-)batch of samples of `z`, judged by a frozen D. rpgan pairs
        them with `real`, the real batch of the last D step (its labels `c` label G's samples too). With
        loss.ms_weight, G also draws each label from a second noise (in the same forward, so BatchNorm sees one
        batch) and pays the mode-seeking term for pairs that look alike; only the first half meets D."""
        cfg, G = self.cfg, self.G
        z_pair = torch.randn_like(z) if cfg.ms_weight > 0 else None
        real = real.detach() if cfg.kind == "rpgan" else None
        select = self._select(len(z), schedule)
        out = {}
        with frozen(self.D):
            if z_pair is not None:
                fake, fake_pair = conditioned(G, torch.cat([z, z_pair]), None if c is None else torch.cat([c, c])) \
                    .split([len(z), len(z_pair)])
            else:
                fake = conditioned(G, z, c)
            x = fake if real is None else torch.cat([fake, real])
            logits = self._d(x, c if c is None or real is None else torch.cat([c, c]))
            logits_fake, logits_real = (logits, None) if real is None else logits.split([len(fake), len(real)])
            loss = g_loss(logits_fake, cfg.kind, logits_real, None if select is None else select(logits_fake))
            out["loss_g"] = loss.detach()
            if z_pair is not None:
                ms = mode_seeking(fake, fake_pair, z, z_pair)
                loss = loss + cfg.ms_weight * ms
                out["ms"] = ms.detach()
            self.backward(loss)
        return out
