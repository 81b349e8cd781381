"""Tests for gan_dist.metrics and the sample split of gan_dist.evaluation, on inputs with known answers:
FCD of a set with itself and of two known Gaussians, KID near 0 for one distribution and positive for a shift,
IS and class coverage of confident / collapsed class probabilities, precision and recall of identical, shifted and
collapsed feature sets, the 2-D protocol on points placed at, near and far from the modes, and evaluation giving
the same metrics however the samples are split over processes.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gan_dist import metrics
from gan_dist.config import DataConfig, EvalConfig
from gan_dist.errors import UserError
from gan_dist.evaluation import Evaluator, better, share
from gan_dist.points import mixture_centers


def gaussian(n: int, d: int, shift: float = 0.0, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale + shift


def test_frechet_distance_of_known_gaussians():
    x = gaussian(4000, 8)
    mu, cov = metrics.gaussian_stats(x)
    assert metrics.frechet_distance(mu, cov, mu, cov) == pytest.approx(0, abs=1e-8)
    # N(0, I) vs N(m, s^2 I) in d dims: |m|^2 + d (1 - s)^2.
    d, m, s = 8, 0.5, 2.0
    eye = torch.eye(d, dtype=torch.float64)
    exact = metrics.frechet_distance(torch.zeros(d), eye, torch.full((d,), m, dtype=torch.float64), s ** 2 * eye)
    assert exact == pytest.approx(d * m ** 2 + d * (1 - s) ** 2)


def test_kid_is_near_zero_for_one_distribution_and_grows_with_a_shift():
    real = gaussian(2000, 16, seed=1)
    same = metrics.kernel_inception_distance(real, gaussian(2000, 16, seed=2), subsets=5, size=500)
    shifted = metrics.kernel_inception_distance(real, gaussian(2000, 16, shift=0.5, seed=3), subsets=5, size=500)
    assert abs(same) < 0.01 and shifted > 10 * max(abs(same), 1e-4)
    assert metrics.kernel_inception_distance(real, real[:300], subsets=2) == metrics.kernel_inception_distance(
        real, real[:300], subsets=2), "fixed subsets: deterministic"


def test_inception_score_and_class_coverage():
    confident = torch.eye(10).repeat(100, 1) * 0.999 + 0.0001  # every class, each predicted with certainty
    assert metrics.inception_score(confident) == pytest.approx(10, rel=0.01)
    collapsed = confident[::10]  # one class only
    assert metrics.inception_score(collapsed) == pytest.approx(1, rel=0.01)
    even = metrics.class_coverage(confident)
    assert even == pytest.approx({"class_kl": 0.0, "class_min": 0.1, "class_max": 0.1})
    one = metrics.class_coverage(collapsed)
    assert one["class_kl"] == pytest.approx(math.log(10)) and one["class_min"] == 0 and one["class_max"] == 1


def test_precision_and_recall():
    real = gaussian(600, 4, seed=4)
    assert metrics.precision_recall(real, real) == {"precision": 1.0, "recall": 1.0}
    far = metrics.precision_recall(real, gaussian(600, 4, shift=10, seed=5))
    assert far == {"precision": 0.0, "recall": 0.0}
    # A generator that draws only a small part of the data: precise, but it recalls little.
    part = real[real[:, 0] > 1.0]
    pr = metrics.precision_recall(real, part)
    assert pr["precision"] == 1.0 and pr["recall"] < 0.4


def test_mixture_protocol_on_points_at_near_and_far_from_the_modes():
    cfg = DataConfig(dataset="ring8", radius=1.0, std=0.01)
    centers = torch.from_numpy(mixture_centers(cfg))
    at = centers.repeat(100, 1) + 0.005
    scores = metrics.mixture_metrics(at, centers, 0.01)
    assert scores == pytest.approx({"modes": 8, "hq": 100.0, "reverse_kl": 0.0}, abs=1e-9)
    # Half the samples at one mode, half off the ring: 1 mode, 50% high quality, a collapsed histogram.
    half = torch.cat([centers[:1].repeat(50, 1), torch.zeros(50, 2) + 0.3])
    scores = metrics.mixture_metrics(half, centers, 0.01)
    assert scores["modes"] == 1 and scores["hq"] == 50.0 and scores["reverse_kl"] > 1.0


@pytest.mark.parametrize("num, world", [(10, 1), (10, 3), (7, 2), (2500, 4)])
def test_each_rank_gets_an_equal_share_and_the_shares_cover_every_index_in_order(num, world):
    shares = [share(num, r, world) for r in range(world)]
    assert len({len(s) for s in shares}) == 1
    assert torch.cat(shares)[:num].tolist() == list(range(num))


def test_evaluation_is_the_same_on_one_and_on_three_processes():
    from gan_dist.config import ModelConfig
    from gan_dist.models import build_models

    torch.manual_seed(0)
    G, _ = build_models(ModelConfig(arch="mlp", z_dim=4, hidden=16, out_act="none"))
    data = DataConfig(dataset="grid25", std=0.5)
    evaluator = Evaluator(EvalConfig(every=1, num_samples=1000, batch=128), data, 4, seed=0)
    alone = evaluator(G, 0, 1, lambda x: x, torch.device("cpu"))
    # Three "processes" in turn; gather concatenates their equal-sized shares in rank order.
    parts = {}

    def gather(x: torch.Tensor) -> torch.Tensor:
        parts[rank] = x
        return torch.cat([parts.get(r, x) for r in range(3)])

    for rank in (1, 2, 0):  # rank 0 last, once the others have produced their shares
        split = evaluator(G, rank, 3, gather, torch.device("cpu"))
    assert split == pytest.approx(alone, abs=1e-9)
    assert better("fcd", 1.0, 2.0) and not better("hq", 1.0, 2.0) and better("hq", 1.0, None)


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")  # StyleGAN's network is TorchScript
def test_inception_fid_on_rgb_shards_with_a_torchscript_feature_network(tmp_path):
    """The FID path with a stand-in for StyleGAN's TorchScript Inception (same call: uint8-range RGB in,
    `return_features=True`): real statistics from the shards, computed once; other noise, another FID."""
    import io

    import webdataset as wds
    from PIL import Image

    from gan_dist.config import ModelConfig
    from gan_dist.models import build_models

    class Features(torch.nn.Module):
        def forward(self, x: torch.Tensor, return_features: bool = True) -> torch.Tensor:
            return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1) / 255

    net = tmp_path / "inception.pt"
    torch.jit.script(Features()).save(str(net))
    rng = np.random.default_rng(0)
    with wds.TarWriter(str(tmp_path / "train-00000.tar")) as writer:
        for i in range(80):
            png = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(png, format="PNG")
            writer.write({"__key__": f"s{i:03d}", "png": png.getvalue()})
    data = DataConfig(dataset="webdataset", shards=str(tmp_path / "train-00000.tar"), mode="resampled",
                      resolution=16, channels=3, num_workers=0, shuffle_buffer=10)
    torch.manual_seed(0)
    G, _ = build_models(ModelConfig(arch="radford", z_dim=8, width=4, resolution=16, channels=3))
    cfg = EvalConfig(every=1, num_samples=60, batch=16, inception=str(net))
    evaluator = Evaluator(cfg, data, 8, seed=0)
    first = evaluator(G, 0, 1, lambda x: x, torch.device("cpu"))
    assert first.keys() == {"fid"} and 0 < first["fid"] < float("inf")
    assert evaluator(G, 0, 1, lambda x: x, torch.device("cpu")) == first, "same noise, cached real statistics"
    assert Evaluator(cfg, data, 8, seed=1)(G, 0, 1, lambda x: x, torch.device("cpu")) != first
    assert Evaluator(EvalConfig(every=1, inception=""), data, 8, seed=0).active is False
    with pytest.raises(UserError, match="eval.inception=.*does not exist"):
        Evaluator(EvalConfig(every=1, inception=str(tmp_path / "missing.pt")), data, 8, seed=0)


class _Features(torch.nn.Module):
    """The MNIST classifier's penultimate features, in float64, as torchmetrics' custom feature extractor."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net, self.num_features = net.eval(), 128

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(x).double()


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save all extracted features")
def test_fcd_and_kid_agree_with_torchmetrics_on_the_same_features_and_samples(classifier):
    """FID's formula and KID's estimator against torchmetrics (the `test` extra; its FID and KID take a
    custom feature network), on the classifier's features of 1,000 real MNIST training images and 1,000 test
    images with noise added as the "generated" set. KID: torchmetrics averages over random subsets drawn with the
    global RNG and ours over subsets of a fixed seed, so the two agree where both take every sample (one subset
    of all of them): the unbiased MMD^2 of the whole sets."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    from gan_dist import mnist
    from gan_dist.classifier import ensure_classifier
    from runs import MNIST

    data = mnist.load_mnist(MNIST)
    real = torch.from_numpy(data["train"][0][:1000]).float()[:, None] / 127.5 - 1
    test = torch.from_numpy(data["test"][0][:1000]).float()[:, None] / 127.5 - 1
    fake = (test + 0.3 * torch.randn(test.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    features = _Features(ensure_classifier(classifier, MNIST, train_if_missing=False)[0])
    f_real, f_fake = features(real), features(fake)

    fid = FrechetInceptionDistance(feature=features)
    fid.update(real, real=True)
    fid.update(fake, real=False)
    ours = metrics.frechet_distance(*metrics.gaussian_stats(f_fake), *metrics.gaussian_stats(f_real))
    assert ours > 1, "the noisy set is far from the real one: the comparison means something"
    assert ours == pytest.approx(float(fid.compute()), rel=1e-6)

    kid = KernelInceptionDistance(feature=features, subsets=1, subset_size=len(real))
    kid.update(real, real=True)
    kid.update(fake, real=False)
    ours = metrics.kernel_inception_distance(f_real, f_fake, subsets=1, size=len(real))
    assert ours > 0.01 and ours == pytest.approx(float(kid.compute()[0]), rel=1e-6)
    # Our default (10 subsets of 1,000 of a fixed seed) takes every sample here too: the same number.
    assert metrics.kernel_inception_distance(f_real, f_fake) == pytest.approx(ours, rel=1e-9)
