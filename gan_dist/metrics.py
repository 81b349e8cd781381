"""Sample-quality metrics as pure functions of features, class probabilities and 2-D points (torch, float64).

Images are judged in the feature space of the MNIST classifier (`classifier.py`), not Inception's, which means
little on MNIST:

- FCD: the Fréchet distance between Gaussians fitted to real and generated penultimate features (FID's formula);
- KID: the unbiased squared MMD with the cubic polynomial kernel (x.y / d + 1)^3, averaged over fixed subsets;
- IS: exp(E_x KL(p(y|x) || p(y))) of the classifier's softmax over all samples (one split);
- class coverage: the histogram of predicted classes, its KL to uniform, and the smallest and largest class share;
- precision / recall (Kynkäänniemi et al. 2019): the share of generated samples inside the real k-NN manifold,
  and of real samples inside the generated one (k = 3);
- per class, for samples drawn with labels (a conditional G): the share the classifier assigns to their label
  (class_acc) and each class's FCD against that class's real features (fcd_class<k>, their mean and maximum).

2-D mixtures follow the Unrolled GAN / VEEGAN / PacGAN protocol: a sample is high quality when it lies within
3 standard deviations of its nearest mode; a mode is covered when it is the nearest mode of at least one high
quality sample; reverse KL is KL(generated || true) of the nearest-mode histogram of all samples.

Every function is deterministic and independent of how samples were split over processes: callers gather all
samples in index order first. Subset draws use a fixed seed.
"""

from __future__ import annotations

import math

import torch


def gaussian_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    f = features.double()
    mu = f.mean(0)
    centered = f - mu
    return mu, centered.T @ centered / (len(f) - 1)


def frechet_distance(mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor) -> float:
    # tr sqrt(cov1 cov2) from the eigenvalues of the product: real and non-negative for two PSD matrices.
    eig = torch.linalg.eigvals(cov1 @ cov2).real.clamp(min=0)
    return float((mu1 - mu2).square().sum() + cov1.trace() + cov2.trace() - 2 * eig.sqrt().sum())


def _poly_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x @ y.T / x.shape[1] + 1) ** 3


def kernel_inception_distance(real: torch.Tensor, fake: torch.Tensor, subsets: int = 10, size: int = 1000,
                              seed: int = 0) -> float:
    """Mean unbiased MMD^2 over `subsets` pairs of random subsets of `size` (fewer when there are fewer samples)."""
    real, fake = real.double(), fake.double()
    m = min(size, len(real), len(fake))
    rng = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(subsets):
        x = real[torch.randperm(len(real), generator=rng)[:m]]
        y = fake[torch.randperm(len(fake), generator=rng)[:m]]
        kxx, kyy, kxy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
        off = m * (m - 1)
        total += float((kxx.sum() - kxx.diagonal().sum()) / off + (kyy.sum() - kyy.diagonal().sum()) / off
                       - 2 * kxy.mean())
    return total / subsets


def inception_score(probs: torch.Tensor) -> float:
    p = probs.double().clamp(min=1e-12)
    marginal = p.mean(0, keepdim=True)
    return math.exp(float((p * (p.log() - marginal.log())).sum(1).mean()))


def _kl_to_uniform(share: torch.Tensor) -> float:
    p = share[share > 0]
    return float((p * (p * len(share)).log()).sum())


def class_coverage(probs: torch.Tensor) -> dict[str, float]:
    share = torch.bincount(probs.argmax(1), minlength=probs.shape[1]).double() / len(probs)
    return {"class_kl": _kl_to_uniform(share), "class_min": float(share.min()), "class_max": float(share.max())}


def knn_radii(features: torch.Tensor, k: int = 3) -> torch.Tensor:
    """Each point's distance to its k-th nearest neighbour: the radius of its ball in the k-NN manifold."""
    d = torch.cdist(features.double(), features.double())
    return d.kthvalue(k + 1, dim=1).values  # the 0th neighbour is the point itself


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3,
                     real_radii: torch.Tensor | None = None) -> dict[str, float]:
    """`real_radii` (knn_radii(real, k)) can be passed in when `real` is a fixed reference set."""
    real, fake = real.double(), fake.double()
    r_real = knn_radii(real, k) if real_radii is None else real_radii
    r_fake = knn_radii(fake, k)
    d = torch.cdist(fake, real)  # (fake, real)
    precision = (d <= r_real[None, :]).any(1).double().mean()
    recall = (d.T <= r_fake[None, :]).any(1).double().mean()
    return {"precision": float(precision), "recall": float(recall)}


def image_metrics(real_mu: torch.Tensor, real_cov: torch.Tensor, real_ref: torch.Tensor, features: torch.Tensor,
                  probs: torch.Tensor, real_radii: torch.Tensor | None = None) -> dict[str, float]:
    """All image metrics of samples (`features`, class `probs`) against the real training set's statistics and a
    fixed reference subset of its features (and, when given, that subset's k-NN radii)."""
    mu, cov = gaussian_stats(features)
    return {"fcd": frechet_distance(mu, cov, real_mu, real_cov),
            "kid": kernel_inception_distance(real_ref, features),
            "is": inception_score(probs), **class_coverage(probs),
            **precision_recall(real_ref, features, real_radii=real_radii)}


def class_stats(features: torch.Tensor, labels: torch.Tensor, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class Gaussian statistics: means (K, D) and covariances (K, D, D)."""
    stats = [gaussian_stats(features[labels == k]) for k in range(classes)]
    return torch.stack([m for m, _ in stats]), torch.stack([c for _, c in stats])


def class_metrics(features: torch.Tensor, probs: torch.Tensor, labels: torch.Tensor, class_mu: torch.Tensor,
                  class_cov: torch.Tensor) -> dict[str, float]:
    """How well samples drawn with `labels` show their class: the classifier's accuracy on them, and each class's
    FCD against the real statistics of that class."""
    fcd = [frechet_distance(*gaussian_stats(features[labels == k]), class_mu[k], class_cov[k])
           for k in range(len(class_mu))]
    return {"class_acc": float((probs.argmax(1) == labels).double().mean()),
            "fcd_class_mean": sum(fcd) / len(fcd), "fcd_class_max": max(fcd),
            **{f"fcd_class{k}": v for k, v in enumerate(fcd)}}


def mixture_metrics(points: torch.Tensor, centers: torch.Tensor, std: float) -> dict[str, float]:
    points, centers = points.double(), centers.double()
    dist = torch.cdist(points, centers)
    nearest, mode = dist.min(1)
    high = nearest <= 3 * std
    share = torch.bincount(mode, minlength=len(centers)).double() / len(points)
    return {"modes": float(len(mode[high].unique())), "hq": float(high.double().mean() * 100),
            "reverse_kl": _kl_to_uniform(share)}
