"""Tests for gan_dist.losses and gan_dist.objective: the GAN losses of seed 000, and one D step / one G step (the
objective's phase, then its optimizer's step, as the loop takes them).

Covers: d_loss and g_loss values (binary cross-entropy with logits, computed here independently from the
definition), their signs and gradient directions; the label noise U(0, label_noise) added to D's 1/0 targets
(recovered exactly from the gradient, since BCE is linear in the target); g_loss staying finite for extreme
logits; d_step changing only D (G's parameters unchanged, no .grad anywhere on G) and lowering D's loss; g_step
changing only G (D's parameters unchanged, D's grads None), lowering G's loss, and restoring D.requires_grad even
when backward raises; R3GAN's relativistic pairing loss, R2 and the lazy R1 / R2 scaling; top-k's choice and its
k; the mode-seeking term's value and what it does to G.

Run from the repo root:

    . .venv/bin/activate && python -m pytest tests/test_losses.py -q
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gan_dist.config import LossConfig, ModelConfig
from gan_dist.losses import d_loss, g_loss, gradient_penalty, mode_seeking, overfitting, r1_penalty, topk_count, \
    topk_weights
from gan_dist.objective import GANObjective, Schedule
from gan_dist.models import MLPDiscriminator, MLPGenerator


def bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy of sigmoid(logits) against targets, straight from the definition (float64)."""
    p = torch.sigmoid(logits.double())
    t = targets.double()
    return -(t * torch.log(p) + (1 - t) * torch.log(1 - p)).mean()


def grads(fn, *xs):
    xs = [x.clone().requires_grad_(True) for x in xs]
    fn(*xs).backward()
    return [x.grad for x in xs]


REAL = torch.tensor([0.3, -1.2, 2.0, 0.0])
FAKE = torch.tensor([-0.5, 1.1, -2.2])


# ----------------------------------------------------------------------------------------------------------------
# Loss values and directions


def test_d_loss_without_noise_is_mean_bce_over_the_concatenated_batch():
    expected = bce(torch.cat([REAL, FAKE]), torch.cat([torch.ones(4), torch.zeros(3)]))
    assert d_loss(REAL, FAKE, label_noise=0.0).item() == pytest.approx(expected.item(), rel=1e-6)
    # mean over all 7 logits, not the average of a real mean and a fake mean
    halves = (bce(REAL, torch.ones(4)) + bce(FAKE, torch.zeros(3))) / 2
    assert d_loss(REAL, FAKE, label_noise=0.0).item() != pytest.approx(halves.item(), rel=1e-3)


def test_d_loss_gradients_push_real_up_and_fake_down():
    for noise in (0.0, 0.05):
        torch.manual_seed(0)
        g_real, g_fake = grads(lambda r, f: d_loss(r, f, label_noise=noise), REAL, FAKE)
        assert (g_real < 0).all(), "raising a real logit must lower D's loss"
        assert (g_fake > 0).all(), "lowering a fake logit must lower D's loss"


def test_d_loss_decreases_when_d_gets_more_confident():
    base = d_loss(REAL, FAKE, label_noise=0.0)
    assert d_loss(REAL + 1, FAKE, label_noise=0.0) < base
    assert d_loss(REAL, FAKE - 1, label_noise=0.0) < base
    assert d_loss(REAL - 1, FAKE + 1, label_noise=0.0) > base
    # a perfect D approaches zero loss; the ideal equilibrium D(x) = 1/2 costs log 2
    assert d_loss(torch.full((4,), 30.0), torch.full((3,), -30.0), label_noise=0.0) < 1e-6
    assert d_loss(torch.zeros(4), torch.zeros(3), label_noise=0.0).item() == pytest.approx(math.log(2), rel=1e-6)


def test_g_loss_is_bce_against_ones_and_decreases_as_fake_logits_rise():
    assert g_loss(FAKE).item() == pytest.approx(bce(FAKE, torch.ones(3)).item(), rel=1e-6)
    (g_fake,) = grads(g_loss, FAKE)
    assert (g_fake < 0).all()
    assert g_loss(FAKE + 1) < g_loss(FAKE)
    # non-saturating: at a confident D (fake logit -10) the gradient is still about -1/B, not vanishing
    (g_conf,) = grads(g_loss, torch.full((4,), -10.0))
    assert torch.allclose(g_conf, torch.full((4,), -0.25), atol=1e-4)


def test_g_loss_stays_finite_for_extreme_logits():
    extreme = torch.tensor([-1000.0, 1000.0])
    loss = g_loss(extreme)
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(1000.0 / 2, rel=1e-6)  # softplus(1000) = 1000, softplus(-1000) = 0
    (g,) = grads(g_loss, extreme)
    assert torch.isfinite(g).all()


def _targets(real: torch.Tensor, fake: torch.Tensor, noise: float) -> torch.Tensor:
    # d/dx_i of mean BCE-with-logits = (sigmoid(x_i) - t_i) / N, so t_i = sigmoid(x_i) - N * grad_i.
    x = torch.cat([real, fake]).double()
    g_real, g_fake = grads(lambda r, f: d_loss(r, f, label_noise=noise), real.double(), fake.double())
    return torch.sigmoid(x) - len(x) * torch.cat([g_real, g_fake])


def test_label_noise_moves_targets_towards_the_other_class():
    # The seed's U(0, n) noise, applied so that targets stay probabilities: real in [1-n, 1], fake in [0, n].
    n, noise = 2000, 0.05
    real, fake = torch.linspace(-3, 3, n), torch.linspace(-3, 3, n)
    torch.manual_seed(0)
    t = _targets(real, fake, noise)
    t_real, t_fake = t[:n], t[n:]
    eps = 1e-9
    assert t_real.min() >= 1 - noise - eps and t_real.max() <= 1 + eps
    assert t_fake.min() >= -eps and t_fake.max() <= noise + eps
    # uniform noise: mean n/2, spread over the whole interval, different for every target
    for part in (1 - t_real, t_fake):
        assert part.mean().item() == pytest.approx(noise / 2, abs=0.003)
        assert part.min() < 0.05 * noise and part.max() > 0.95 * noise
    assert len(torch.unique(t)) > 0.99 * 2 * n


def test_label_noise_zero_gives_exact_targets():
    t = _targets(REAL, FAKE, 0.0)
    assert torch.allclose(t, torch.cat([torch.ones(4), torch.zeros(3)]).double(), atol=1e-9)


def test_label_noise_draws_from_the_global_rng():
    # Resume restores torch's RNG, so the noise must come from it to be reproducible.
    torch.manual_seed(5)
    a = d_loss(REAL, FAKE, label_noise=0.05)
    torch.manual_seed(5)
    b = d_loss(REAL, FAKE, label_noise=0.05)
    c = d_loss(REAL, FAKE, label_noise=0.05)
    assert a == b and b != c


# ----------------------------------------------------------------------------------------------------------------
# The objective's phases, each followed by its optimizer's step as the loop takes it


def backward(loss: torch.Tensor) -> None:
    loss.backward()


def d_step(G, D, opt_D, real, z, cfg: LossConfig, backward=backward, regularize: bool = False,
           schedule: Schedule = Schedule()) -> dict[str, torch.Tensor]:
    out = GANObjective(cfg, G, D, backward=backward).d_phase(real, None, z, schedule, regularize)
    opt_D.step()
    opt_D.zero_grad(set_to_none=True)
    return out


def g_step(G, D, opt_G, z, cfg: LossConfig, backward=backward, real: torch.Tensor | None = None,
           schedule: Schedule = Schedule()) -> dict[str, torch.Tensor]:
    real = torch.zeros(len(z), 2) if real is None else real
    out = GANObjective(cfg, G, D, backward=backward).g_phase(real, None, z, schedule)
    opt_G.step()
    opt_G.zero_grad(set_to_none=True)
    return out


def nets() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    cfg = ModelConfig(arch="mlp", z_dim=8, hidden=16, out_act="none")
    return MLPGenerator(cfg), MLPDiscriminator(cfg)


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(module: nn.Module, snap: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, snap[k]) for k, v in module.state_dict().items())


def test_d_step_updates_only_d():
    G, D = nets()
    opt_D = torch.optim.SGD(D.parameters(), lr=0.1)
    real, z = torch.randn(16, 2), torch.randn(16, 8)
    g0, d0 = snapshot(G), snapshot(D)
    out = d_step(G, D, opt_D, real, z, LossConfig(label_noise=0.0), backward)
    assert same(G, g0), "d_step must not change G"
    assert all(p.grad is None for p in G.parameters()), "d_step must not leave gradients on G"
    assert all(p.grad is None for p in D.parameters()), "D's gradients are cleared after its step"
    changed = [k for k, v in D.state_dict().items() if not torch.equal(v, d0[k])]
    assert changed == list(d0), "every D parameter moves"
    assert set(out) == {"loss_d", "d_real", "d_fake", "rt"} and not out["loss_d"].requires_grad


def test_d_step_lowers_d_loss_and_reports_its_metrics():
    G, D = nets()
    opt_D = torch.optim.SGD(D.parameters(), lr=1e-3)
    real, z = torch.randn(16, 2) + 3, torch.randn(16, 8)
    with torch.no_grad():
        fake = G(z)
        before_real, before_fake = D(real), D(fake)
    out = d_step(G, D, opt_D, real, z, LossConfig(label_noise=0.0), backward)
    assert out["loss_d"].item() == pytest.approx(bce(torch.cat([before_real, before_fake]),
                                                     torch.cat([torch.ones(16), torch.zeros(16)])).item(), rel=1e-5)
    assert out["d_real"].item() == pytest.approx(torch.sigmoid(before_real).mean().item(), rel=1e-5)
    assert out["d_fake"].item() == pytest.approx(torch.sigmoid(before_fake).mean().item(), rel=1e-5)
    with torch.no_grad():
        after = d_loss(D(real), D(fake), label_noise=0.0)
    assert after < out["loss_d"]


def test_g_step_updates_only_g_and_lowers_g_loss():
    G, D = nets()
    opt_G = torch.optim.SGD(G.parameters(), lr=1e-3)
    z = torch.randn(16, 8)
    g0, d0 = snapshot(G), snapshot(D)
    with torch.no_grad():
        before = g_loss(D(G(z)))
    out = g_step(G, D, opt_G, z, LossConfig(), backward)
    assert same(D, d0), "g_step must not change D"
    assert all(p.grad is None for p in D.parameters()), "g_step must not leave gradients on D"
    assert all(p.requires_grad for p in D.parameters()), "D is trainable again after the G step"
    assert all(p.grad is None for p in G.parameters()), "G's gradients are cleared after its step"
    assert not same(G, g0)
    assert out["loss_g"].item() == pytest.approx(before.item(), rel=1e-6)
    with torch.no_grad():
        assert g_loss(D(G(z))) < before


def test_g_step_gradient_reaches_g_through_frozen_d():
    # With D frozen, G must still get the full gradient: compare with a hand-made copy of the step.
    G, D = nets()
    z = torch.randn(16, 8)
    G_ref = MLPGenerator(ModelConfig(arch="mlp", z_dim=8, hidden=16, out_act="none"))
    G_ref.load_state_dict(G.state_dict())
    g_loss(D(G_ref(z))).backward()
    expected = [p.detach() - 0.01 * p.grad for p in G_ref.parameters()]
    g_step(G, D, torch.optim.SGD(G.parameters(), lr=0.01), z, LossConfig(), backward)
    for p, e in zip(G.parameters(), expected):
        assert torch.allclose(p, e, atol=1e-6)


def test_g_step_restores_d_requires_grad_when_backward_raises():
    G, D = nets()
    opt_G = torch.optim.SGD(G.parameters(), lr=0.1)
    g0 = snapshot(G)

    def failing_backward(loss):
        assert not any(p.requires_grad for p in D.parameters()), "D is frozen during G's backward"
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        g_step(G, D, opt_G, torch.randn(4, 8), LossConfig(), failing_backward)
    assert all(p.requires_grad for p in D.parameters())
    assert same(G, g0), "no optimizer step after a failed backward"


def test_d_step_then_g_step_leave_no_stale_gradients():
    G, D = nets()
    opt_G = torch.optim.SGD(G.parameters(), lr=0.1)
    opt_D = torch.optim.SGD(D.parameters(), lr=0.1)
    for _ in range(2):
        d_step(G, D, opt_D, torch.randn(8, 2), torch.randn(8, 8), LossConfig(), backward)
        g_step(G, D, opt_G, torch.randn(8, 8), LossConfig(), backward)
        assert all(p.grad is None for p in list(G.parameters()) + list(D.parameters()))
        assert all(p.requires_grad for p in list(G.parameters()) + list(D.parameters()))


def test_d_loss_with_label_noise_is_bounded_below():
    # Targets above 1 (the seed's literal rule) let D's loss fall without bound as real logits grow.
    torch.manual_seed(0)
    huge = torch.full((64,), 1e4)
    assert d_loss(huge, -huge, label_noise=0.05).item() >= 0


def test_g_step_runs_d_batchnorm_on_running_statistics():
    # As Keras runs a frozen D: BatchNorm uses its running statistics in the G step and does not update them.
    torch.manual_seed(0)
    cfg = ModelConfig(arch="dcgan", z_dim=8, width=4)
    from gan_dist.models import DCGANDiscriminator, DCGANGenerator
    G, D = DCGANGenerator(cfg), DCGANDiscriminator(cfg)
    opt_G = torch.optim.Adam(G.parameters())
    before = {k: v.clone() for k, v in D.state_dict().items() if "running" in k}
    seen = []
    hook = D.net[2].register_forward_hook(lambda m, i, o: seen.append(m.training))
    g_step(G, D, opt_G, torch.randn(6, 8), LossConfig(), backward)
    hook.remove()
    assert seen == [False]
    assert all(torch.equal(D.state_dict()[k], v) for k, v in before.items())
    assert all(m.training for m in D.modules()), "D is back in training mode after the G step"


# ----------------------------------------------------------------------------------------------------------------
# The other losses (loss.kind), R1 and the WGAN gradient penalty

KINDS = ("ns", "minimax", "hinge", "ls", "wgan_gp")


@pytest.mark.parametrize("kind", KINDS)
def test_every_d_loss_pushes_real_logits_up_and_fake_logits_down(kind):
    # Logits inside hinge's margin and between least squares' targets 0 and 1, where every loss has a gradient.
    real, fake = torch.tensor([0.3, -0.5, 0.9]), torch.tensor([0.4, 0.6])
    g_real, g_fake = grads(lambda r, f: d_loss(r, f, kind), real, fake)
    assert (g_real < 0).all() and (g_fake > 0).all()
    assert d_loss(real + 0.05, fake - 0.05, kind) < d_loss(real, fake, kind)


@pytest.mark.parametrize("kind", KINDS)
def test_every_g_loss_pushes_fake_logits_up(kind):
    fake = torch.tensor([-0.4, 0.6, 0.2])
    (g_fake,) = grads(lambda f: g_loss(f, kind), fake)
    assert (g_fake < 0).all()
    assert g_loss(fake + 0.1, kind) < g_loss(fake, kind)


def test_loss_values_follow_their_definitions():
    r, f = REAL.double(), FAKE.double()
    assert d_loss(r, f, "ls").item() == pytest.approx(0.5 * torch.cat([(r - 1) ** 2, f ** 2]).mean().item())
    assert g_loss(f, "ls").item() == pytest.approx(0.5 * ((f - 1) ** 2).mean().item())
    hinge = torch.cat([torch.clamp(1 - r, min=0), torch.clamp(1 + f, min=0)]).mean()
    assert d_loss(r, f, "hinge").item() == pytest.approx(hinge.item())
    assert d_loss(r, f, "wgan_gp").item() == pytest.approx((f.mean() - r.mean()).item())
    assert g_loss(f, "hinge").item() == g_loss(f, "wgan_gp").item() == pytest.approx(-f.mean().item())
    assert d_loss(r, f, "minimax").item() == d_loss(r, f, "ns").item()
    assert g_loss(f, "minimax").item() == pytest.approx(torch.log(1 - torch.sigmoid(f)).mean().item())


def test_hinge_and_ls_are_zero_at_their_targets():
    assert d_loss(torch.full((3,), 2.0), torch.full((3,), -2.0), "hinge").item() == 0  # outside the margin
    assert d_loss(torch.ones(3), torch.zeros(3), "ls").item() == 0
    assert g_loss(torch.ones(3), "ls").item() == 0


def test_minimax_saturates_where_non_saturating_does_not():
    # Goodfellow et al.'s reason for the ns loss: when D rejects fakes confidently, minimax gives G no gradient.
    confident = torch.full((4,), -10.0)
    (mm,) = grads(lambda f: g_loss(f, "minimax"), confident)
    (ns,) = grads(lambda f: g_loss(f, "ns"), confident)
    assert mm.abs().max() < 1e-4 and ns.abs().min() > 0.24


def test_label_noise_moves_least_squares_targets_too():
    torch.manual_seed(0)
    real, fake = torch.ones(1000).double(), torch.zeros(1000).double()
    g_real, g_fake = grads(lambda r, f: d_loss(r, f, "ls", 0.05), real, fake)
    # d/dl of 0.5 (l - t)^2 / N is (l - t) / N: with l on the clean target it is the noise itself
    assert 0 < (2000 * g_real).min() and (2000 * g_real).max() <= 0.05
    assert -0.05 <= (2000 * g_fake).min() and (2000 * g_fake).max() < 0


def test_r1_penalty_matches_per_sample_input_gradients_from_autograd():
    torch.manual_seed(0)
    D = MLPDiscriminator(ModelConfig(arch="mlp", hidden=16, depth=2))
    x = torch.randn(6, 2)
    expected = torch.stack([torch.autograd.functional.jacobian(lambda p: D(p[None])[0], row).square().sum()
                            for row in x]).mean()
    real = x.clone().requires_grad_(True)
    assert r1_penalty(D(real), real).item() == pytest.approx(expected.item(), rel=1e-5)


def linear_d(w: list[float]) -> nn.Module:
    D = nn.Sequential(nn.Linear(2, 1), nn.Flatten(0))
    with torch.no_grad():
        D[0].weight.copy_(torch.tensor([w]))
        D[0].bias.zero_()
    return D


def test_r1_and_gradient_penalty_of_a_linear_d():
    # D(x) = w.x: the input gradient is w everywhere, so R1 = |w|^2 and GP = (|w| - 1)^2.
    D = linear_d([3.0, 4.0])
    x = torch.randn(5, 2, requires_grad=True)
    assert r1_penalty(D(x), x).item() == pytest.approx(25.0)
    assert gradient_penalty(D(x), x).item() == pytest.approx(16.0)
    assert gradient_penalty(linear_d([0.6, 0.8])(x), x).item() == pytest.approx(0.0, abs=1e-12)


def test_lazy_r1_in_d_step_is_scaled_by_its_interval():
    # D's gradient on an R1 step = the loss's gradient + gamma / 2 * r1_every * dR1/dw, with dR1/dw = 2w.
    G, _ = nets()
    real, z = torch.randn(8, 2), torch.randn(8, 8)
    cfg = LossConfig(label_noise=0.0, r1_gamma=0.5, r1_every=4)
    D_ref = linear_d([0.3, -0.2])
    with torch.no_grad():
        fake = G(z)
    d_loss(D_ref(real), D_ref(fake)).backward()
    expected = D_ref[0].weight.grad + cfg.r1_gamma / 2 * cfg.r1_every * 2 * D_ref[0].weight.detach()
    for due, want in ((True, expected), (False, D_ref[0].weight.grad)):
        D = linear_d([0.3, -0.2])
        seen = {}
        out = d_step(G, D, _Keep(seen, D), real, z, cfg, backward, regularize=due)
        assert torch.allclose(seen["weight"], want, atol=1e-6)
        assert out["r1"].item() == pytest.approx(0.13 * cfg.r1_every if due else 0.0, rel=1e-5)


class _Keep:
    """An optimizer stand-in that records D's weight gradient at step time."""

    def __init__(self, seen: dict, D: nn.Module) -> None:
        self.seen, self.D = seen, D

    def step(self) -> None:
        self.seen["weight"] = self.D[0].weight.grad.clone()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.D.zero_grad(set_to_none=set_to_none)


def test_wgan_gp_d_step_adds_the_weighted_penalty_and_reports_it():
    G, _ = nets()
    real, z = torch.randn(8, 2), torch.randn(8, 8)
    D, seen = linear_d([3.0, 4.0]), {}
    out = d_step(G, D, _Keep(seen, D), real, z, LossConfig(kind="wgan_gp", label_noise=0.0, gp_weight=10.0),
                 backward)
    assert out["gp"].item() == pytest.approx(16.0, rel=1e-5)
    with torch.no_grad():
        fake = G(z)
    # d/dw of E[D(fake)] - E[D(real)] + 10 (|w| - 1)^2 = mean(fake) - mean(real) + 20 (|w| - 1) w / |w|
    w = torch.tensor([3.0, 4.0])
    expected = fake.mean(0) - real.mean(0) + 20 * (5 - 1) * w / 5
    assert torch.allclose(seen["weight"][0], expected, atol=1e-4)
    # the logged loss_d is the critic's loss alone, without the penalty (w.x before the step: 3 x + 4 y)
    assert out["loss_d"].item() == pytest.approx((fake - real).mean(0).dot(w).item(), rel=1e-5)


# R3GAN: the relativistic pairing loss and R2; top-k G updates (Sinha et al. 2020)


def test_rpgan_losses_are_softplus_of_the_paired_differences():
    r, f = REAL[:2].double(), FAKE[:2].double()
    assert d_loss(r, f, "rpgan").item() == pytest.approx(torch.log1p(torch.exp(f - r)).mean().item())
    assert g_loss(f, "rpgan", r).item() == pytest.approx(torch.log1p(torch.exp(r - f)).mean().item())
    # Only the pairs' differences count: shifting both logits of every pair changes nothing.
    assert d_loss(r + 3, f + 3, "rpgan").item() == pytest.approx(d_loss(r, f, "rpgan").item())


def test_rpgan_pushes_each_pair_apart_for_d_and_together_for_g():
    real, fake = torch.tensor([0.3, -0.5, 0.9]), torch.tensor([0.4, 0.6, -1.0])
    g_real, g_fake = grads(lambda r, f: d_loss(r, f, "rpgan"), real, fake)
    assert (g_real < 0).all() and (g_fake > 0).all() and torch.allclose(g_real, -g_fake)
    g_fake, g_real = grads(lambda f, r: g_loss(f, "rpgan", r), fake, real)
    assert (g_fake < 0).all() and (g_real > 0).all()
    # The pair whose fake already scores above its real (0.6 against -0.5) moves G least.
    assert g_fake.abs().argmin() == 1


def test_d_steps_r2_is_the_input_gradient_norm_at_g_samples_from_autograd():
    torch.manual_seed(0)
    G, D = nets()
    z = torch.randn(5, 8)
    with torch.no_grad():
        fake = G(z)
    expected = torch.stack([torch.autograd.functional.jacobian(lambda p: D(p[None])[0], row).square().sum()
                            for row in fake]).mean()
    cfg = LossConfig(kind="rpgan", label_noise=0.0, r2_gamma=1.0, r1_every=3)
    out = d_step(G, D, torch.optim.SGD(D.parameters(), lr=0.0), torch.randn(5, 2), z, cfg, backward, regularize=True)
    assert out["r2"].item() == pytest.approx(3 * expected.item(), rel=1e-5) and "r1" not in out


def test_lazy_r1_and_r2_in_d_step_add_both_penalties_scaled_by_the_gamma_schedule():
    # D(x) = w.x: R1 = R2 = |w|^2 on every sample, each adding gamma * scale / 2 * r1_every * 2w to D's gradient.
    G, _ = nets()
    real, z = torch.randn(8, 2), torch.randn(8, 8)
    cfg = LossConfig(kind="rpgan", label_noise=0.0, r1_gamma=0.5, r2_gamma=2.0, r1_every=4, gamma_end=0.25)
    D_ref = linear_d([0.3, -0.2])
    with torch.no_grad():
        fake = G(z)
    d_loss(D_ref(real), D_ref(fake), "rpgan").backward()
    w = D_ref[0].weight.detach()
    for due in (True, False):
        D, seen = linear_d([0.3, -0.2]), {}
        out = d_step(G, D, _Keep(seen, D), real, z, cfg, backward, regularize=due, schedule=Schedule(progress=1.0))
        extra = (cfg.r1_gamma + cfg.r2_gamma) * 0.25 / 2 * cfg.r1_every * 2 * w if due else 0
        assert torch.allclose(seen["weight"], D_ref[0].weight.grad + extra, atol=1e-6)
        assert out["r1"].item() == out["r2"].item() == pytest.approx(0.13 * cfg.r1_every if due else 0, rel=1e-5)


def test_rpgan_g_step_uses_the_real_batch_and_the_others_ignore_it():
    G, D = nets()
    opt_G = torch.optim.SGD(G.parameters(), lr=0.0)
    z, real = torch.randn(6, 8), torch.randn(6, 2)
    with torch.no_grad():
        want = g_loss(D(G(z)), "rpgan", D(real))
    rpgan = LossConfig(kind="rpgan")
    assert g_step(G, D, opt_G, z, rpgan, backward, real=real)["loss_g"].item() == pytest.approx(want.item())
    assert g_step(G, D, opt_G, z, LossConfig(), backward, real=real)["loss_g"].item() == \
        g_step(G, D, opt_G, z, LossConfig(), backward, real=real + 5)["loss_g"].item()


def test_topk_weights_keep_the_k_best_scored_of_all_ranks():
    scores = torch.tensor([0.1, 0.9, -0.3, 0.5, 0.5, 0.2])

    def gather(_: torch.Tensor) -> torch.Tensor:
        return scores  # as if two ranks held three scores each

    w0 = topk_weights(scores[:3], 3, gather, rank=0, world=2)
    w1 = topk_weights(scores[3:], 3, gather, rank=1, world=2)
    # Global top 3: 0.9 (rank 0), then the tie 0.5 / 0.5 on rank 1, broken by global index; world / k each.
    assert w0.tolist() == [0, pytest.approx(2 / 3), 0] and w1.tolist() == [pytest.approx(2 / 3)] * 2 + [0]
    alone = topk_weights(scores, 3, lambda s: s, rank=0, world=1)
    assert alone.sum().item() == pytest.approx(1.0) and alone.nonzero().flatten().tolist() == [1, 3, 4]


def test_topk_count_decays_per_epoch_to_its_floor():
    assert topk_count(64, 0.0, 0.99, 0.5) == 64
    assert topk_count(64, 10.0, 0.99, 0.5) == math.ceil(64 * 0.99 ** 10)
    assert topk_count(64, 1000.0, 0.99, 0.5) == 32
    assert topk_count(64, 3.0, 1.0, 0.5) == 64


def test_topk_g_step_moves_g_only_through_the_chosen_samples():
    G, D = nets()
    z = torch.randn(6, 8)
    with torch.no_grad():
        scores = D(G(z))
    best = int(scores.argmax())
    opt_G = torch.optim.SGD(G.parameters(), lr=0.0)
    # k shrinks to 1 of 6 after this many epochs; one process, so the global batch is the local one
    out = g_step(G, D, opt_G, z, LossConfig(topk_gamma=0.5, topk_min=0.0), backward, schedule=Schedule(epochs=100))
    assert out["loss_g"].item() == pytest.approx(g_loss(scores[best:best + 1], "ns").item(), rel=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Mode seeking (loss.ms_weight)


def test_mode_seeking_is_the_inverse_ratio_of_image_to_noise_distance_per_pair():
    a, b = torch.zeros(2, 1, 2, 2), torch.tensor([0.5, 2.0]).view(2, 1, 1, 1).expand(2, 1, 2, 2)
    za, zb = torch.zeros(2, 3), torch.tensor([[1.0, 1.0, 1.0], [0.5, 0.5, 0.5]])
    # pair 0: images 0.5 apart per pixel for noises 1 apart -> 1 / 0.5; pair 1: 2.0 for 0.5 -> 1 / 4
    assert mode_seeking(a, b, za, zb, eps=0.0).item() == pytest.approx((2 + 0.25) / 2)
    # a mean over pairs: any split of the batch averages to the whole batch's value
    halves = (mode_seeking(a[:1], b[:1], za[:1], zb[:1]) + mode_seeking(a[1:], b[1:], za[1:], zb[1:])) / 2
    assert halves.item() == pytest.approx(mode_seeking(a, b, za, zb).item())


def test_g_step_with_mode_seeking_pushes_images_of_different_noise_apart():
    G, D = nets()
    z = torch.randn(16, 8)
    torch.manual_seed(1)  # the pair's noise the objective draws
    z_pair = torch.randn_like(z)
    with torch.no_grad():  # D blind: the loss' gradient is the mode-seeking term's alone
        for p in D.parameters():
            p.zero_()
    with torch.no_grad():
        before = mode_seeking(G(z), G(z_pair), z, z_pair)
    opt_G = torch.optim.SGD(G.parameters(), lr=1e-2)
    torch.manual_seed(1)
    out = g_step(G, D, opt_G, z, LossConfig(ms_weight=1.0), backward)
    assert out["ms"].item() == pytest.approx(before.item(), rel=1e-5)
    assert out["loss_g"].item() == pytest.approx(math.log(2), rel=1e-5)  # D's 0 logit: the ns loss alone is logged
    with torch.no_grad():
        assert mode_seeking(G(z), G(z_pair), z, z_pair) < before
    G2, D2 = nets()
    assert set(g_step(G2, D2, torch.optim.SGD(G2.parameters(), lr=1e-2), z, LossConfig(), backward)) == {"loss_g"}


def test_ada_heuristic_is_the_sign_of_real_logits_or_of_each_pairs_margin():
    real, fake = torch.tensor([2.0, 1.0, 0.5, -1.0]), torch.tensor([1.0, 3.0, 0.0, -2.0])
    assert overfitting(real, fake, "ns").item() == 0.5  # three of four real logits above 0
    # rpgan's D is blind to a constant added to every logit: its r_t is of the pairs, and the constant changes nothing
    assert overfitting(real, fake, "rpgan").item() == 0.5 == overfitting(real - 10, fake - 10, "rpgan").item()
    assert overfitting(real - 10, fake - 10, "ns").item() == -1.0
