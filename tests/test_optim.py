"""Tests for gan_dist.optim (learning-rate schedules, TTUR) and spectral normalization of D (gan_dist.models).

Run from the repo root:

    . .venv/bin/activate && python -m pytest tests/test_optim.py -q
"""

from __future__ import annotations

import math

import pytest
import torch

from gan_dist.config import ModelConfig, OptimConfig
from gan_dist.models import build_models
from gan_dist.optim import lr_factor, make_optimizers, set_lr


def factors(cfg: OptimConfig, total: int) -> list[float]:
    return [lr_factor(step, total, cfg) for step in range(total)]


def test_constant_schedule_keeps_the_base_rates():
    assert factors(OptimConfig(), 50) == [1.0] * 50


def test_warmup_rises_linearly_to_the_base_rate_and_never_starts_at_zero():
    f = factors(OptimConfig(warmup_steps=4), 10)
    assert f[:5] == [0.25, 0.5, 0.75, 1.0, 1.0]


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_decays_fall_monotonically_from_one_towards_zero_after_warmup(schedule):
    f = factors(OptimConfig(schedule=schedule, warmup_steps=10), 110)
    after = f[10:]
    assert after[0] == 1.0 and all(a > b for a, b in zip(after, after[1:]))
    assert 0 < after[-1] < 0.02
    mid = after[50]
    assert mid == pytest.approx(0.5 if schedule == "linear" else 0.5 * (1 + math.cos(math.pi / 2)))


def test_cosine_stays_above_linear_in_the_first_half():
    lin, cos = factors(OptimConfig(schedule="linear"), 100), factors(OptimConfig(schedule="cosine"), 100)
    assert all(c > lin_ for c, lin_ in zip(cos[1:50], lin[1:50]))


def test_set_lr_scales_g_and_d_rates_separately():
    G, D = build_models(ModelConfig(arch="mlp", hidden=8))
    cfg = OptimConfig(lr_G=1e-4, lr_D=4e-4)
    opt_G, opt_D = make_optimizers(G, D, cfg)
    set_lr(opt_G, opt_D, 0.5, cfg)
    assert opt_G.param_groups[0]["lr"] == pytest.approx(5e-5) and opt_D.param_groups[0]["lr"] == pytest.approx(2e-4)


@pytest.mark.parametrize("arch", ["mlp", "dcgan"])
def test_spectral_norm_bounds_every_d_weight_by_one(arch):
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, width=8, hidden=32, spectral_norm=True)
    _, D = build_models(cfg)
    x = torch.randn(4, 2) if arch == "mlp" else torch.randn(4, 1, 28, 28)
    for _ in range(30):  # power iterations converge as D trains
        D(x)
    D.eval()
    layers = [m for m in D.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert layers and all(torch.nn.utils.parametrize.is_parametrized(m, "weight") for m in layers)
    for m in layers:
        sigma = torch.linalg.matrix_norm(m.weight.detach().flatten(1), ord=2)
        assert sigma.item() == pytest.approx(1.0, abs=0.02)
    _, plain = build_models(ModelConfig(arch=arch, width=8, hidden=32))
    assert not any(torch.nn.utils.parametrize.is_parametrized(m) for m in plain.modules())


def test_decay_ends_at_lr_end_and_can_run_over_images_seen():
    cfg = OptimConfig(schedule="cosine", lr_end=0.25)
    assert lr_factor(0, 100, cfg) == 1.0 and lr_factor(100, 100, cfg) == pytest.approx(0.25)
    assert lr_factor(50, 100, OptimConfig(schedule="linear", lr_end=0.5)) == pytest.approx(0.75)
    # R3GAN's way: the decay runs over schedule_kimg thousand images, whatever the step count, then holds.
    by_images = OptimConfig(schedule="cosine", lr_end=0.1, schedule_kimg=2.0)
    assert lr_factor(5, 10**6, by_images, nimg=1000) == pytest.approx(0.55)
    assert lr_factor(5, 10**6, by_images, nimg=5000) == pytest.approx(0.1)
