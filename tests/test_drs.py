"""Tests for gan_dist.drs, discriminator rejection sampling (Azadi et al. 2019), on a toy where the answer is known:
G draws N(0, 1) and the target is N(0, 0.5^2), so log p_data / p_G = log 2 - 1.5 x^2 exactly.

Covers: the acceptance rule's values (gamma = 0 is plain rejection sampling, exp(l - M)); kept samples following
the target, not G; a larger percentile rejecting more; each sample depending on its own noise alone (batching);
calibration turning an uninformed D into the log-ratio; and scripts/sample.py / evaluate.py --sampler drs on a run.

    . .venv/bin/activate && python -m pytest tests/test_drs.py -q
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from gan_dist.drs import acceptance, calibrate, RejectionSampler


class Identity(nn.Linear):
    """G(z) = z for 1-D noise (a parameter, so the sampler finds G's device)."""

    def __init__(self) -> None:
        super().__init__(1, 1)
        with torch.no_grad():
            self.weight.fill_(1.0)
            self.bias.zero_()


class LogRatio(nn.Module):
    """The exact log-ratio of N(0, 0.5^2) to N(0, 1)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return math.log(2) - 1.5 * x[:, 0].square()


def test_acceptance_with_gamma_zero_is_exp_of_the_logit_below_its_bound():
    logits = torch.tensor([0.0, -1.0, -3.0, 0.5])
    p = acceptance(logits, max_logit=0.0, gamma=0.0)
    assert torch.allclose(p[:3], torch.exp(logits[:3]), atol=1e-5)
    assert p[3] == p[0]  # above the burn-in's bound counts as at it
    assert (acceptance(logits, 0.0, gamma=2.0) < p).all()


def test_kept_samples_follow_the_target_not_g():
    G, D = Identity(), LogRatio()
    sampler = RejectionSampler(G, D, z_dim=1, gamma=0.0, seed=0)
    assert sampler.max_logit == pytest.approx(math.log(2), abs=1e-3)
    z = torch.randn(4000, 1, generator=torch.Generator().manual_seed(1))
    kept = sampler(z)[:, 0]
    assert kept.std().item() == pytest.approx(0.5, abs=0.03) and abs(kept.mean().item()) < 0.03
    assert sampler.burn_in_rate == pytest.approx(0.5, abs=0.03)  # 1 / max ratio


def test_a_higher_percentile_rejects_more():
    G, D = Identity(), LogRatio()
    rates = [RejectionSampler(G, D, z_dim=1, percentile=p, burn_in=4000).burn_in_rate for p in (20, 50, 80, 95)]
    assert rates == sorted(rates, reverse=True) and rates[0] > rates[-1] + 0.2


def test_each_sample_depends_on_its_own_noise_alone():
    sampler = RejectionSampler(Identity(), LogRatio(), z_dim=1, burn_in=2000)
    z = torch.randn(64, 1, generator=torch.Generator().manual_seed(2))
    whole = sampler(z)
    assert torch.equal(torch.cat([sampler(z[:20]), sampler(z[20:])]), whole)
    assert torch.equal(sampler(z.flip(0)), whole.flip(0))


def test_calibration_learns_the_log_ratio():
    # real ~ N(0.5, 1), G ~ N(0, 1): log ratio = 0.5 x - 0.125, which a linear D can hold exactly.
    torch.manual_seed(0)
    D = nn.Sequential(nn.Linear(1, 1), nn.Flatten(0))
    with torch.no_grad():
        D[0].weight.zero_()
        D[0].bias.zero_()
    rng = torch.Generator().manual_seed(3)
    real = ((torch.randn(512, 1, generator=rng) + 0.5, None) for _ in iter(int, 1))
    D_cal = calibrate(D, Identity(), real, z_dim=1, steps=400, lr=0.02)
    assert D_cal[0].weight.item() == pytest.approx(0.5, abs=0.08)
    assert D_cal[0].bias.item() == pytest.approx(-0.125, abs=0.06)
    assert D[0].weight.item() == 0  # the run's D is left as it was


def test_sample_and_evaluate_scripts_use_drs_on_a_conditional_run(conditional_run, tmp_path):
    run = conditional_run
    out = tmp_path / "s.npz"
    proc = subprocess.run([sys.executable, "scripts/sample.py", "--run", str(run), "--num", "12", "--out", str(out),
                           "--sampler", "drs", "--calib-steps", "5", "--class", "4"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "DRS: D calibrated for 5 steps" in proc.stderr
    saved = np.load(out)
    assert saved["samples"].shape == (12, 28, 28, 1) and (saved["labels"] == 4).all()
    report = tmp_path / "drs.json"
    proc = subprocess.run([sys.executable, "scripts/evaluate.py", "--run", str(run), "--num", "200", "--out",
                           str(report), "--sampler", "drs", "--calib-steps", "5"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    scores = json.loads(report.read_text())
    assert scores["sampler"] == "drs" and 0 <= scores["class_acc"] <= 1 and "fcd_class9" in scores
