"""Discriminator rejection sampling (Azadi et al., ICLR 2019): G's samples kept with a probability that D's
calibrated density-ratio estimate sets. Pure torch, no accelerate.

- Calibration (`calibrate`): the paper keeps training D alone after GAN training, with the logistic loss, on real
  samples against samples of the final G, so that its logit estimates log p_data(x) / p_G(x). A copy of D is
  trained that way (BatchNorm on its running statistics, no dropout); the run's D is left as it was.
- Burn-in (`RejectionSampler.__init__`): D's logits on `burn_in` samples give the bound M (their maximum) and gamma
  (the `percentile`-th percentile of F below).
- Acceptance (`acceptance`): F(x) = l - M - log(1 - exp(l - M - eps)), p = sigmoid(F(x) - gamma). With gamma = 0,
  p = exp(l - M): exact rejection sampling when l is the true log-ratio and M its maximum; a larger gamma rejects
  more. M stays the burn-in's (the paper raises it during sampling, which would make samples depend on order):
  a logit above it is accepted with probability sigmoid(F(M) - gamma).
- Sampling (`RejectionSampler.forward`): sample i's candidates and coin flips come from a generator seeded by its
  own noise vector, so the kept sample depends on i's noise alone, not on batching or the number of processes.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import itertools
import sys
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gan_dist import mnist, stacked
from gan_dist.config import IMAGE_DATASETS, DataConfig
from gan_dist.data import open_source, shard_batches, to_real
from gan_dist.errors import UserError
from gan_dist.export import load_run_discriminator
from gan_dist.models import conditioned, eval_mode, label_count
from gan_dist.points import PointBatches

Batches = Iterator[tuple[torch.Tensor, torch.Tensor | None]]  # real samples in D's range, labels or None
EPS = 1e-6
MAX_ROUNDS = 200  # candidates per sample before the best-scored one so far is kept


def acceptance(logits: torch.Tensor, max_logit: float, gamma: float, eps: float = EPS) -> torch.Tensor:
    """DRS's acceptance probability of each sample from D's calibrated logits."""
    shifted = (logits.double() - max_logit).clamp(max=0)
    f = shifted - torch.log1p(-torch.exp(shifted - eps))
    return torch.sigmoid(f - gamma).to(logits.dtype)


def calibrate(D: nn.Module, G: nn.Module, real: Batches, z_dim: int, steps: int, lr: float = 1e-4,
              seed: int = 0) -> nn.Module:
    """A copy of D trained `steps` more steps with the logistic loss on `real` against G's samples (same labels)."""
    D_cal = copy.deepcopy(D).requires_grad_(True)
    opt = torch.optim.Adam(D_cal.parameters(), lr=lr, betas=(0.5, 0.999))
    rng = torch.Generator().manual_seed(seed)
    with eval_mode(G, D_cal), torch.enable_grad():
        for _ in range(steps):
            x, c = next(real)
            with torch.no_grad():
                fake = conditioned(G, torch.randn(len(x), z_dim, generator=rng).to(x.device), c)
            logits = conditioned(D_cal, torch.cat([x, fake]), None if c is None else torch.cat([c, c]))
            target = torch.cat([torch.ones(len(x)), torch.zeros(len(fake))]).to(logits)
            loss = F.binary_cross_entropy_with_logits(logits, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return D_cal.requires_grad_(False).eval()


def _row_seed(row: torch.Tensor) -> int:
    return int.from_bytes(hashlib.sha256(row.detach().cpu().float().numpy().tobytes()).digest()[:8], "little")


class RejectionSampler(nn.Module):
    """G's samples filtered by DRS: called like G (`sampler(z)` or `sampler(z, c)`), it returns one kept sample
    per row of z."""

    def __init__(self, G: nn.Module, D: nn.Module, z_dim: int, percentile: float = 80.0, burn_in: int = 10000,
                 classes: int = 0, seed: int = 0, batch: int = 500, gamma: float | None = None) -> None:
        """`gamma` overrides the percentile's (0: plain rejection sampling by exp(l - M))."""
        super().__init__()
        self.G, self.D, self.z_dim = G, D, z_dim
        rng = torch.Generator().manual_seed(seed)
        z = torch.randn(burn_in, z_dim, generator=rng)
        c = torch.randint(0, classes, (burn_in,), generator=rng) if classes else None
        device = next(G.parameters()).device
        logits = torch.cat([self._logits(z[i:i + batch].to(device), None if c is None else c[i:i + batch].to(device))
                            for i in range(0, burn_in, batch)]).double().cpu()
        self.max_logit = float(logits.max())
        shifted = logits - self.max_logit
        f = shifted - torch.log1p(-torch.exp(shifted - EPS))
        self.gamma = float(torch.quantile(f, percentile / 100)) if gamma is None else gamma
        self.burn_in_rate = float(acceptance(logits, self.max_logit, self.gamma).mean())

    @torch.no_grad()
    def _logits(self, z: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        with eval_mode(self.G, self.D):
            return conditioned(self.D, conditioned(self.G, z, c), c)

    @torch.no_grad()
    def forward(self, z: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        rngs = [torch.Generator().manual_seed(_row_seed(row)) for row in z]
        out = best = best_p = None
        pending = torch.arange(len(z))
        for _ in range(MAX_ROUNDS):
            cand = torch.stack([torch.randn(self.z_dim, generator=rngs[i]) for i in pending.tolist()]).to(z)
            coins = torch.tensor([float(torch.rand(1, generator=rngs[i])) for i in pending.tolist()])
            rows_c = None if c is None else c[pending.to(c.device)]
            with eval_mode(self.G, self.D):
                x = conditioned(self.G, cand, rows_c)
                p = acceptance(conditioned(self.D, x, rows_c), self.max_logit, self.gamma).cpu()
            if out is None:
                out, best, best_p = torch.empty(len(z), *x.shape[1:], dtype=x.dtype, device=x.device), \
                    torch.empty(len(z), *x.shape[1:], dtype=x.dtype, device=x.device), torch.full((len(z),), -1.0)
            better = p > best_p[pending]
            best[pending[better].to(x.device)], best_p[pending[better]] = x[better.to(x.device)], p[better]
            keep = coins < p
            out[pending[keep].to(x.device)] = x[keep.to(x.device)]
            pending = pending[~keep]
            if not len(pending):
                return out
        out[pending.to(out.device)] = best[pending.to(out.device)]
        return out


def real_batches(cfg: DataConfig, device: torch.device, batch: int = 128, seed: int = 0,
                 labels: bool = False) -> Batches:
    """Endless batches of the run's real data for calibration: fresh 2-D points, MNIST's training images straight
    from its IDX files (stacked for Stacked MNIST), or random draws from the shards."""
    if cfg.dataset not in IMAGE_DATASETS:
        source = PointBatches(cfg, batch, seed, rank=1, start_batch=0)
    elif cfg.dataset == "stacked_mnist":
        images, y = stacked.stacked(*mnist.load_mnist(cfg.mnist_dir)["train"], None)
        rng = np.random.default_rng(seed)
        draws = (torch.from_numpy(rng.integers(len(images), size=batch)) for _ in itertools.count())
        source = ((images[i], torch.from_numpy(y[i.numpy()])) for i in draws)
    elif cfg.dataset == "mnist" and (cfg.resolution, cfg.channels) == (28, 1) and mnist.files_present(cfg.mnist_dir):
        images, y = mnist.load_mnist(cfg.mnist_dir)["train"]
        rng = np.random.default_rng(seed)
        draws = (rng.integers(len(images), size=batch) for _ in itertools.count())
        source = ((torch.from_numpy(images[i][:, None]), torch.from_numpy(y[i].astype(np.int64))) for i in draws)
    else:
        data = dataclasses.replace(cfg, num_workers=0, mode="resampled", hflip=False)
        source = shard_batches(open_source(data), data, batch, seed=seed, rank=0, world=1)
    for x, c in source:
        yield to_real(x, device), c.to(device) if labels else None


def rejection_sampler(G: nn.Module, D: nn.Module, real: Batches, z_dim: int, classes: int = 0,
                      calib_steps: int = 500, percentile: float = 80.0, seed: int = 0,
                      say: Callable[[str], None] = print) -> RejectionSampler:
    """Calibrate D on `real` against G, then burn in: the sampler the review scripts use."""
    D_cal = calibrate(D, G, real, z_dim, calib_steps, seed=seed)
    sampler = RejectionSampler(G, D_cal, z_dim, percentile, classes=classes, seed=seed)
    say(f"DRS: D calibrated for {calib_steps} steps; burn-in max logit {sampler.max_logit:.3f}, gamma "
        f"{sampler.gamma:.3f} ({percentile:g}th percentile), acceptance {100 * sampler.burn_in_rate:.1f}%")
    return sampler


def add_sampler_args(parser: argparse.ArgumentParser) -> None:
    """The review scripts' sampler options."""
    parser.add_argument("--sampler", choices=("plain", "drs"), default="plain",
                        help="plain: G's samples as drawn; drs: discriminator rejection sampling (calibrates D on "
                        "the run's training data first)")
    parser.add_argument("--drs-percentile", type=float, default=80.0,
                        help="DRS's gamma: this percentile of F over the burn-in (higher rejects more)")
    parser.add_argument("--calib-steps", type=int, default=500, help="DRS: steps of D's calibration")


def make_sampler(args: argparse.Namespace, G: torch.nn.Module, cfg, device: torch.device,
                 say: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr)) -> RejectionSampler:
    """The review scripts' DRS sampler (their --sampler drs): G with the run's D (checkpoint `args.checkpoint`),
    calibrated on the run's data."""
    if not 0 <= args.drs_percentile < 100 or args.calib_steps < 0:
        raise UserError("--drs-percentile must be from 0 to below 100 and --calib-steps at least 0")
    if cfg.model.self_cond:
        raise UserError(f"--sampler drs calibrates D on real images with their labels, and {args.run} is "
                        "self-conditioned (its labels are D's clusters, which exports do not keep); use --sampler "
                        "plain")
    D = load_run_discriminator(args.run, cfg, args.checkpoint).to(device)
    classes = label_count(cfg.model)
    seed = getattr(args, "seed", 0)
    real = real_batches(cfg.data, device, seed=seed, labels=bool(classes))
    return rejection_sampler(G, D, real, cfg.model.z_dim, classes, args.calib_steps, args.drs_percentile, seed, say)
