"""Tests for gan_dist.ema: the StyleGAN-style decay `ema_beta` and the `EMA` holder of G_ema.

Covers: the half-life in images (after halflife_kimg * 1000 images, in steps of any batch size, the old weights
count half); the rampup cap min(halflife, nimg * rampup); the first update copying G; later updates equal to a
lerp computed here by hand; BatchNorm buffers copied, not averaged; G_ema frozen and in eval mode; a state_dict
round trip into a fresh EMA restoring the exact weights and the averaging count.

Run from the repo root:

    . .venv/bin/activate && python -m pytest tests/test_ema.py -q
"""

from __future__ import annotations


import pytest
import torch
from torch import nn

from gan_dist.config import EMAConfig
from gan_dist.ema import EMA, ema_beta


def tiny_g(seed: int = 0) -> nn.Module:
    """A small G with parameters and BatchNorm buffers."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2))


def perturb(G: nn.Module, scale: float = 1.0) -> None:
    with torch.no_grad():
        for p in G.parameters():
            p.add_(scale * torch.randn_like(p))
        G.train()(torch.randn(8, 3) * 3 + 1)  # moves the BatchNorm running statistics


# ----------------------------------------------------------------------------------------------------------------
# ema_beta


@pytest.mark.parametrize("halflife_kimg, batch", [(1.28, 128), (10.0, 128), (0.5, 32), (5.0, 256), (0.3, 7)])
def test_weights_halve_after_one_halflife_without_rampup(halflife_kimg, batch):
    cfg = EMAConfig(halflife_kimg=halflife_kimg, rampup=0.0)
    images = halflife_kimg * 1000
    steps = images / batch
    product = 1.0
    for i in range(int(steps)):
        product *= ema_beta(cfg, nimg=i * batch, batch=batch)
    # a fractional remaining step, so that the image count is exactly one half-life
    product *= ema_beta(cfg, nimg=int(steps) * batch, batch=batch) ** (steps - int(steps))
    assert product == pytest.approx(0.5, rel=1e-9)


def test_halflife_does_not_depend_on_batch_size():
    cfg = EMAConfig(halflife_kimg=2.0, rampup=0.0)
    # 4 steps of 250 images decay as much as 1 step of 1000
    assert ema_beta(cfg, 10**6, 250) ** 4 == pytest.approx(ema_beta(cfg, 10**6, 1000), rel=1e-12)
    assert ema_beta(cfg, 10**6, 1000) == pytest.approx(0.5 ** 0.5, rel=1e-12)


def test_rampup_caps_the_halflife_at_nimg_times_rampup():
    cfg = EMAConfig(halflife_kimg=10.0, rampup=0.05)
    batch = 64
    for nimg in (1000, 20_000, 100_000, 199_999, 200_000, 500_000, 10**7):
        halflife = min(10_000, nimg * 0.05)
        assert ema_beta(cfg, nimg, batch) == pytest.approx(0.5 ** (batch / halflife), rel=1e-12), nimg
    # early on the average follows G closely; late it uses the full half-life
    assert ema_beta(cfg, 1000, batch) < ema_beta(cfg, 100_000, batch) < ema_beta(cfg, 10**7, batch)
    assert ema_beta(cfg, 10**7, batch) == ema_beta(EMAConfig(halflife_kimg=10.0, rampup=0.0), 10**7, batch)


def test_rampup_with_no_images_seen_copies():
    assert ema_beta(EMAConfig(rampup=0.05), nimg=0, batch=128) == 0.0


def test_beta_is_a_decay_in_unit_interval():
    for cfg in (EMAConfig(), EMAConfig(rampup=0.0), EMAConfig(halflife_kimg=0.001)):
        for nimg in (0, 128, 10**5, 10**8):
            assert 0.0 <= ema_beta(cfg, nimg, 128) < 1.0


# ----------------------------------------------------------------------------------------------------------------
# EMA


def test_g_ema_is_frozen_and_in_eval_mode():
    G = tiny_g()
    ema = EMA(G, EMAConfig())
    assert not ema.G_ema.training
    assert all(not m.training for m in ema.G_ema.modules())
    assert all(not p.requires_grad for p in ema.G_ema.parameters())
    assert all(p.requires_grad for p in G.parameters()), "building the EMA must not freeze G"
    assert G.training
    ema.update(G, nimg=1000, batch=100)
    assert not ema.G_ema.training and all(not p.requires_grad for p in ema.G_ema.parameters())
    assert ema.G_ema is not G and all(a.data_ptr() != b.data_ptr()
                                      for a, b in zip(ema.G_ema.parameters(), G.parameters()))


def test_first_update_copies_g():
    G = tiny_g()
    ema = EMA(G, EMAConfig(halflife_kimg=10.0, rampup=0.0))  # beta close to 1, yet the first update copies
    perturb(G)
    ema.update(G, nimg=10**6, batch=128)
    for a, b in zip(ema.G_ema.state_dict().values(), G.state_dict().values()):
        assert torch.equal(a, b)


def test_later_updates_are_a_lerp_towards_g():
    cfg = EMAConfig(halflife_kimg=0.5, rampup=0.05)
    G = tiny_g()
    ema = EMA(G, cfg)
    ema.update(G, nimg=0, batch=32)
    expected = [p.detach().double().clone() for p in G.parameters()]
    nimg = 32
    for _ in range(5):
        perturb(G, 0.3)
        beta = 0.5 ** (32 / min(500.0, nimg * 0.05))  # by hand: half-life in images, capped by the rampup
        expected = [beta * e + (1 - beta) * p.detach().double() for e, p in zip(expected, G.parameters())]
        ema.update(G, nimg=nimg, batch=32)
        nimg += 32
        for e, q in zip(expected, ema.G_ema.parameters()):
            assert torch.allclose(q.double(), e, atol=1e-6)
    # and the average is not simply G
    assert any(not torch.allclose(q, p) for q, p in zip(ema.G_ema.parameters(), G.parameters()))


def test_batchnorm_buffers_are_copied_not_averaged():
    G = tiny_g()
    ema = EMA(G, EMAConfig(halflife_kimg=10.0, rampup=0.0))
    ema.update(G, nimg=0, batch=128)
    for _ in range(3):
        perturb(G)
        ema.update(G, nimg=10**6, batch=128)
        for name, b in G.named_buffers():
            assert torch.equal(dict(ema.G_ema.named_buffers())[name], b), name
    assert dict(ema.G_ema.named_buffers())["1.num_batches_tracked"] == 3


def test_state_dict_round_trip_restores_exact_weights():
    cfg = EMAConfig(halflife_kimg=0.2, rampup=0.0)
    G = tiny_g()
    ema = EMA(G, cfg)
    for i in range(4):
        perturb(G)
        ema.update(G, nimg=i * 64, batch=64)
    state = {k: v.clone() for k, v in ema.state_dict().items()}

    fresh = EMA(tiny_g(seed=1), cfg)  # different initial weights
    fresh.load_state_dict(state)
    for (k, a), (k2, b) in zip(ema.G_ema.state_dict().items(), fresh.G_ema.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    assert not fresh.G_ema.training and all(not p.requires_grad for p in fresh.G_ema.parameters())

    # the averaging count comes back too: the next update of the restored copy lerps like the original's,
    # rather than copying G as a first update would
    perturb(G)
    ema.update(G, nimg=4 * 64, batch=64)
    fresh.update(G, nimg=4 * 64, batch=64)
    for a, b in zip(ema.G_ema.parameters(), fresh.G_ema.parameters()):
        assert torch.equal(a, b)
    assert any(not torch.allclose(a, b) for a, b in zip(fresh.G_ema.parameters(), G.parameters()))


def test_a_g_without_buffers_is_averaged_too():
    G = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    ema = EMA(G, EMAConfig(halflife_kimg=0.1, rampup=0.0))
    ema.update(G, nimg=0, batch=100)
    before = [p.detach().clone() for p in G.parameters()]
    perturb(G)
    ema.update(G, nimg=100, batch=100)  # one half-life of images: halfway between the two
    for q, a, b in zip(ema.G_ema.parameters(), before, G.parameters()):
        assert torch.allclose(q, (a + b) / 2, atol=1e-6)
    assert ema.updates == 2 and int(ema.averaged.n_averaged) == 2
