"""Augmentations of what D sees (`aug.*`): DiffAugment's transforms and ADA's pipeline keep each image's shape and
range and pass gradients (double backward too, as R1 through them needs); ADA at p = 0 is the identity; one seed
gives one augmentation; p follows the overfitting heuristic at the paper's speed; and an ADA run on a `data.limit`
subset, killed (-9) on 2 processes mid-way and rerun, ends bit-identical to the uninterrupted run with p moved.
The heuristic's average over processes is checked against one process in test_losses_ddp.py.

    . .venv/bin/activate && python -m pytest tests/test_augment.py -q
"""

from __future__ import annotations

import pytest
import torch

from gan_dist.augment import ADA, DIFFAUG_FNS, DiffAugment, brightness, contrast, cutout, saturation, translation
from gan_dist.config import AugConfig
from runs import assert_same_weights, jsonl, kill_tree, launch, newest, wait, weights, without_timing


def batch(channels: int = 1, n: int = 32, side: int = 16) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.rand(n, channels, side, side) * 2 - 1


def flows_twice(fn, x: torch.Tensor) -> None:
    """Gradients reach x through `fn`, and a penalty on them (R1's double backward) reaches D's weight."""
    x = x.clone().requires_grad_(True)
    w = torch.randn(x[0].numel(), requires_grad=True)
    logits = (fn(x).flatten(1) @ w).tanh()
    (grad,) = torch.autograd.grad(logits.sum(), x, create_graph=True)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    grad.square().sum().backward()
    assert torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0


@pytest.mark.parametrize("fn", [brightness, saturation, contrast, translation, cutout])
def test_diffaugment_transforms_keep_shape_and_pass_gradients(fn):
    x = batch(3)
    out = fn(x)
    assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()
    flows_twice(fn, x)


def test_diffaugment_colour_transforms_are_the_papers_per_image_maps():
    x = batch(3)
    torch.manual_seed(1)
    shift = (brightness(x) - x).flatten(1)  # one offset per image, in [-0.5, 0.5]
    assert torch.allclose(shift, shift[:, :1].expand_as(shift), atol=1e-6) and shift.abs().max() <= 0.5
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    factor = ((contrast(x) - mean) / (x - mean)).flatten(1)  # contrast scales about the image mean by 0.5..1.5
    assert torch.allclose(factor, factor[:, :1].expand_as(factor), atol=1e-3)
    assert factor.min() >= 0.5 - 1e-4 and factor.max() <= 1.5 + 1e-4
    grey = batch(1)
    assert torch.equal(saturation(grey), grey)  # a grey image has no saturation to change


def test_diffaugment_translation_and_cutout_move_or_zero_pixels_only():
    x = batch(1) * 0.5 + 0.5  # in (0, 1]: a zero in the output is a pixel set to zero
    for fn in (translation, cutout):
        out = fn(x)
        kept = out != 0
        assert out.min() >= 0 and out.max() <= x.max()
        assert all(torch.isin(out[i][kept[i]], x[i]).all() for i in range(len(x))), fn.__name__
    torch.manual_seed(2)
    holes = (cutout(x) == 0).flatten(1).sum(1)
    assert holes.max() == 8 * 8 and holes.min() > 0  # a square of half the side, cut where it reaches the border
    shifted = translation(x)
    assert not torch.equal(shifted, x) and (shifted == 0).flatten(1).sum(1).max() <= 16 * 16 - 14 * 14


def test_diffaugment_applies_its_policy_in_order():
    x = batch(3)
    torch.manual_seed(3)
    out = DiffAugment("translation, cutout")(x)
    torch.manual_seed(3)
    assert torch.equal(out, cutout(translation(x)))
    assert [f.__name__ for f in DiffAugment("color").fns] == [f.__name__ for f in DIFFAUG_FNS["color"]]


@pytest.mark.parametrize("channels", [1, 3])
def test_ada_warp_keeps_the_range_and_recolour_is_one_affine_map_per_image(channels):
    x = batch(channels)
    ada = ADA(AugConfig(kind="ada", p=1.0))
    torch.manual_seed(4)
    warped = ada.warp(x)
    assert warped.shape == x.shape and not torch.equal(warped, x)
    # Bilinear interpolation with reflection: every pixel lies between the image's own extremes.
    lo, hi = x.flatten(1).min(1).values, x.flatten(1).max(1).values
    flat = warped.flatten(1)
    assert (flat >= lo[:, None] - 1e-5).all() and (flat <= hi[:, None] + 1e-5).all()
    recoloured = ada.recolour(x)
    assert not torch.equal(recoloured, x)
    for i in range(len(x)):  # each image's colours through one affine map: least squares fits them exactly
        pixels = torch.cat([x[i].flatten(1).T, torch.ones(x[i][0].numel(), 1)], 1).double()
        target = recoloured[i].flatten(1).T.double()
        fit = torch.linalg.lstsq(pixels, target).solution
        assert torch.allclose(pixels @ fit, target, atol=1e-4)
    flows_twice(ada, x)


@pytest.mark.parametrize("channels", [1, 3])
def test_ada_at_p_zero_is_the_identity_and_at_p_one_changes_every_image(channels):
    x = batch(channels)
    assert torch.equal(ADA(AugConfig(kind="ada", p=0.0))(x), x)
    out = ADA(AugConfig(kind="ada", p=1.0))(x)
    assert all(not torch.equal(out[i], x[i]) for i in range(len(x)))
    some = ADA(AugConfig(kind="ada", p=0.05))(batch(channels, n=256))
    untouched = sum(torch.equal(a, b) for a, b in zip(some, batch(channels, n=256)))
    assert 0 < untouched < 256  # each transform on about 5% of the images: some untouched, some not


@pytest.mark.parametrize("make", [lambda: DiffAugment("color,translation,cutout"),
                                  lambda: ADA(AugConfig(kind="ada", p=0.5))])
def test_a_channels_last_batch_stays_channels_last(make):
    x = batch(3).contiguous(memory_format=torch.channels_last)
    out = make()(x)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    assert make()(batch(3)).is_contiguous()


@pytest.mark.parametrize("make", [lambda: DiffAugment("color,translation,cutout"),
                                  lambda: ADA(AugConfig(kind="ada", p=0.5))])
def test_the_same_seed_gives_the_same_augmentation(make):
    x = batch(3)
    runs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        runs.append(make()(x))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_ada_moves_p_towards_the_target_at_the_papers_speed():
    ada = ADA(AugConfig(kind="ada", p=0.5, target=0.6, speed_kimg=500))
    for sign in (0.9, 0.8, 0.7, 0.9):  # four D steps whose real logits are mostly positive: D overfits
        ada.observe(torch.tensor(sign))
    ada.adjust(ada.sums.clone(), nimg=256)
    assert ada.rt.item() == pytest.approx(0.825) and ada.p.item() == pytest.approx(0.5 + 256 / 500_000)
    assert ada.sums.tolist() == [0.0, 0.0]
    ada.observe(torch.tensor(0.2))
    ada.adjust(ada.sums.clone(), nimg=256)
    assert ada.p.item() == pytest.approx(0.5)  # below the target: back down by as much
    full = ADA(AugConfig(kind="ada", p=0.999, speed_kimg=1))
    full.observe(torch.tensor(1.0))
    full.adjust(full.sums.clone(), nimg=10_000)
    assert full.p.item() == 1.0  # p stays a probability


ADA_RUN = ("aug.kind=ada", "aug.p=0.2", "aug.interval=3", "aug.speed_kimg=2", "aug.target=0.1", "data.limit=256",
           "train.steps=40", "ckpt.every=10", "eval.every=0", "log.every=4", "log.sample_every=40",
           "wandb.mode=disabled")


@pytest.fixture(scope="module")
def ada_run(tmp_path_factory, shards):
    run = tmp_path_factory.mktemp("ada")
    out = launch(run, shards, 2, *ADA_RUN)
    assert "data: data.limit=256 of 60000: 256 images" in out
    return run


def test_an_ada_run_logs_p_and_rt_and_moves_p(ada_run):
    rows = [r for r in jsonl(ada_run) if "aug/p" in r]
    assert [r["train/step"] for r in rows] == list(range(4, 41, 4))
    assert all(0 <= r["aug/p"] <= 1 and -1 <= r["aug/rt"] <= 1 for r in rows)
    assert len({r["aug/p"] for r in rows}) > 1 and rows[-1]["data/epoch"] == pytest.approx(40 * 32 / 256)


def test_an_ada_run_killed_mid_way_resumes_bit_exactly(ada_run, shards, tmp_path):
    # kill -9 of both processes as soon as the step-20 checkpoint is complete: p and each rank's sums of the interval
    # begun at step 18 come back from it, so p, the augmentations and the weights go on as if never cut.
    run = tmp_path / "run"
    proc = launch(run, shards, 2, *ADA_RUN, background=True)
    wait(proc, lambda: newest(run) >= 20)
    kill_tree(proc)
    proc.communicate(timeout=60)
    assert proc.returncode and 20 <= newest(run) < 40 and not (run / "final").exists()
    assert "resumed from" in launch(run, shards, 2, *ADA_RUN)
    assert_same_weights(weights(run), weights(ada_run))
    assert without_timing(jsonl(run)) == without_timing(jsonl(ada_run))
