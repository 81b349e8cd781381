"""Evaluating a generator: the same noise for every sample index on any number of processes, each rank generating
its share, the shares gathered in index order, and the metrics of `metrics.py` beside their real-data floors.

- Stacked MNIST: the same classifier reads each channel's digit; modes covered (of 1,000) and the KL divergence of
  the mode histogram from uniform, beside real digit triples' (`stacked.py`).
- MNIST: the classifier's features and class probabilities (`classifier.py`; trained on first use). The training
  set's feature statistics (overall and per class), a fixed 5,000-image reference subset, and the floors (the real
  test set scored like a generator) are computed once per classifier and dataset (keyed by both files' contents)
  and cached beside it. A conditional G draws sample i with label i mod K (every class equally) and is also scored
  per class: the classifier's accuracy on the labels, and each class's FCD. A self-conditioned G draws its labels
  (clusters) from the cluster sizes it counts, as its samplers do, and is scored as an unconditional one, with the
  number of clusters in use and the largest one's share.
- 2-D mixtures: modes covered, % high-quality samples and reverse KL against the configured modes.
- RGB images: Inception FID against `eval.num_samples` real images, when StyleGAN's TorchScript Inception
  (`eval.inception`) is given; otherwise skipped with one line.

Which metrics each kind of data gets, and which way each one improves, is `metric_names.py`'s list.

No accelerate here: the caller passes `gather` (concatenate equal-shaped tensors of all ranks in rank order).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import sys
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from gan_dist import metric_names, metrics, mnist, stacked
from gan_dist.classifier import ensure_classifier
from gan_dist.config import IMAGE_DATASETS, DataConfig, EvalConfig
from gan_dist.data import open_source, shard_batches
from gan_dist.errors import UserError
from gan_dist.files import sha256_file
from gan_dist.models import eval_mode, latents
from gan_dist.points import mixture_centers

Gather = Callable[[torch.Tensor], torch.Tensor]
REFERENCE_SIZE = 5000
NOISE_SEED = 0x5EED  # added to the run's seed: evaluation noise never collides with training noise
REAL_SEED = 0  # the real digit triples Stacked MNIST's floor is scored on


def best_metric(cfg: EvalConfig, data: DataConfig) -> str:
    if cfg.best_metric != "auto":
        return cfg.best_metric
    return {"mnist": "fcd", "stacked_mnist": "kl", "webdataset": "fid"}.get(data.dataset, "hq")


def better(name: str, new: float, old: float | None) -> bool:
    return old is None or (new < old if metric_names.BY_KEY[name].lower_is_better else new > old)


def share(num: int, rank: int, world: int) -> torch.Tensor:
    """This rank's sample indices: equal-sized blocks (so gathers line up), wrapped past `num` and cut after."""
    per = math.ceil(num / world)
    return torch.arange(rank * per, (rank + 1) * per) % num


@torch.no_grad()
def _in_batches(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([fn(x[i:i + batch]) for i in range(0, len(x), batch)])


REFERENCE_KEYS = ("mu", "cov", "ref", "radii", "class_mu", "class_cov")


def _reference(net: torch.nn.Module, classifier: Path, mnist_dir: str, batch: int) -> dict[str, torch.Tensor]:
    """Training-set statistics and real-data floors for `net`, cached beside the classifier under a name and a
    metadata key made of the classifier's and the data's sha256: another classifier or other data never reuses
    them, and a damaged cache is rebuilt (written by the caller's rank)."""
    data = mnist.load_mnist(mnist_dir)
    digest = hashlib.sha256(sha256_file(classifier).encode())
    for split in sorted(data):
        for array in data[split]:
            digest.update(array.tobytes())
    key = digest.hexdigest()
    path = classifier.with_name(f"{classifier.stem}.reference-{key[:16]}.safetensors")
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("key") == key:
                    cached = {k: f.get_tensor(k) for k in f.keys()}
                    if all(k in cached for k in REFERENCE_KEYS):
                        return cached
        except (OSError, SafetensorError):
            pass
        print(f"[gan-dist] warning: the evaluation cache {path} is damaged or stale; rebuilding it", file=sys.stderr)
    feats, probs, labels = {}, {}, {}
    for split, (images, y) in data.items():
        labels[split] = torch.from_numpy(y.astype("int64"))
        x = torch.from_numpy(images).float().div(127.5).sub(1).unsqueeze(1)
        feats[split] = _in_batches(net.features, x, batch)
        probs[split] = _in_batches(lambda b: net(b).softmax(1), x, batch)
    mu, cov = metrics.gaussian_stats(feats["train"])
    ref = feats["train"][torch.randperm(len(feats["train"]), generator=torch.Generator().manual_seed(0))
                         [:REFERENCE_SIZE]].double()
    radii = metrics.knn_radii(ref)
    class_mu, class_cov = metrics.class_stats(feats["train"], labels["train"], 10)
    floors = metrics.image_metrics(mu, cov, ref, feats["test"], probs["test"], radii) | metrics.class_metrics(
        feats["test"], probs["test"], labels["test"], class_mu, class_cov)
    out = {"mu": mu, "cov": cov, "ref": ref, "radii": radii, "class_mu": class_mu, "class_cov": class_cov} | {
        f"{k}_real": torch.tensor(v) for k, v in floors.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"  # nodes sharing a filesystem may write it at once
    save_file(out, str(tmp), metadata={"key": key})
    os.replace(tmp, path)
    return out


class Evaluator:
    """Loads what the metrics need once (call it on each node's main process first); `__call__` evaluates."""

    def __init__(self, cfg: EvalConfig, data: DataConfig, z_dim: int, seed: int, classes: int = 0,
                 truncation: float | None = None, self_cond: bool = False) -> None:
        """`classes`: a conditional G's number of classes (0: unconditional), or with `self_cond` its clusters;
        `truncation`: draw the samples' noise from the normal truncated at that many standard deviations
        (`models.latents`), for review, never in training."""
        self.cfg, self.data, self.z_dim, self.classes, self.self_cond = cfg, data, z_dim, classes, self_cond
        self.z = latents(cfg.num_samples, z_dim, truncation, torch.Generator().manual_seed(seed + NOISE_SEED))
        self.label_seed = seed + NOISE_SEED + 1
        self.net = self.ref = self.inception = self.real_stats = self.stacked_real = None
        names = [m.key for m in metric_names.of(metric_names.data_kind(data.dataset),
                                                conditional=classes > 0 and not self_cond, self_cond=self_cond)]
        if best_metric(cfg, data) not in names:
            raise UserError(f"eval.best_metric={cfg.best_metric} is not computed for data.dataset={data.dataset}; "
                            f"choose one of auto, {', '.join(names)}", code=2)
        self.enabled = cfg.every > 0
        if not self.enabled:
            return
        if data.dataset == "mnist":
            self.net, _ = ensure_classifier(cfg.classifier, data.mnist_dir)
            self.ref = _reference(self.net, Path(cfg.classifier), data.mnist_dir, cfg.batch)
        elif data.dataset == "stacked_mnist":
            self.net, _ = ensure_classifier(cfg.classifier, data.mnist_dir)
        elif data.dataset == "webdataset":
            if not cfg.inception:
                print("[gan-dist] eval: no eval.inception weights given, so no FID for these images (give "
                      "StyleGAN's inception-2015-12-05.pt to compute it)", file=sys.stderr)
            else:
                self.inception = _load_inception(cfg.inception)

    @property
    def active(self) -> bool:
        return self.enabled and (self.data.dataset != "webdataset" or self.inception is not None)

    @torch.no_grad()
    def __call__(self, G: torch.nn.Module, rank: int, world: int, gather: Gather, device: torch.device,
                 real_stats: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None) -> dict[str, float]:
        """Every rank generates its share; rank 0 returns the metrics of the gathered samples, the others {}."""
        n, idx = self.cfg.num_samples, share(self.cfg.num_samples, rank, world)
        z = self.z[idx].to(device)
        if self.classes:  # the labels ride along as z's last column, so every batching below splits them alike
            c = torch.multinomial(G.class_freqs().cpu(), n, replacement=True, generator=torch.Generator().manual_seed(
                self.label_seed))[idx] if self.self_cond else idx % self.classes
            z = torch.cat([z, c.to(z)[:, None]], 1)

        def draw(b: torch.Tensor) -> torch.Tensor:
            return G(b) if not self.classes else G(b[:, :-1], b[:, -1].long())

        with eval_mode(G):
            clusters = cluster_metrics(G.class_freqs()) if self.self_cond else {}
            if self.data.dataset == "stacked_mnist":
                return self._stacked(draw, z, n, rank, gather, device) | clusters
            if self.net is not None:
                net = self.net.to(device)

                def judge(b: torch.Tensor) -> torch.Tensor:
                    x = draw(b)
                    return torch.cat([net.features(x), net(x).softmax(1)], 1)

                both = gather(_in_batches(judge, z, self.cfg.batch))[:n].cpu()
                if rank:
                    return {}
                feats, probs = both[:, :-10], both[:, -10:]
                out = metrics.image_metrics(self.ref["mu"], self.ref["cov"], self.ref["ref"], feats, probs,
                                            self.ref.get("radii"))
                if self.classes and not self.self_cond:
                    out |= metrics.class_metrics(feats, probs, torch.arange(n) % self.classes, self.ref["class_mu"],
                                                 self.ref["class_cov"])
                # Each computed metric's floor beside it: an unconditional G gets no class metrics, nor their floors.
                return out | {k: float(v) for k, v in self.ref.items() if k.endswith("_real") and k[:-5] in out} | \
                    clusters
            if self.data.dataset not in IMAGE_DATASETS:
                points = gather(_in_batches(draw, z, self.cfg.batch))[:n].cpu()
                if rank:
                    return {}
                centers = torch.from_numpy(mixture_centers(self.data))
                std = 1.0 if self.data.dataset == "gaussian" else self.data.std
                return metrics.mixture_metrics(points, centers, std) | clusters
            if self.inception is None:
                return {}
            inception = self.inception.to(device)
            fake = gather(_in_batches(lambda b: _inception_features(inception, draw(b)), z, self.cfg.batch))[:n]
            mu, cov = metrics.gaussian_stats(fake.cpu())
            if self.real_stats is None:
                self.real_stats = self._real_stats(inception, rank, world, gather, device)
            return {} if rank else {"fid": metrics.frechet_distance(mu, cov, *self.real_stats)}

    def _stacked(self, draw: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, n: int, rank: int,
                 gather: Gather, device: torch.device) -> dict[str, float]:
        """Modes and KL of the samples, each channel read by the classifier, beside those of `n` real triples."""
        net = self.net.to(device)
        modes = gather(_in_batches(lambda b: stacked.modes_of(stacked.channel_digits(net, draw(b))), z,
                                   self.cfg.batch))[:n].cpu()
        if rank:
            return {}
        if self.stacked_real is None:
            self.stacked_real = {f"{k}_real": v for k, v in stacked_floor(net, self.data.mnist_dir, n, self.cfg.batch,
                                                                          device).items()}
        return stacked.mode_metrics(modes) | self.stacked_real

    def _real_stats(self, inception, rank: int, world: int, gather: Gather, device) -> tuple:
        """Inception statistics of `eval.num_samples` training images (each rank reads its own share)."""
        per = math.ceil(self.cfg.num_samples / world)
        data = dataclasses.replace(self.data, num_workers=0, mode="resampled", hflip=False)
        batches = shard_batches(open_source(data), data, self.cfg.batch, seed=1, rank=rank, world=world)
        feats, have = [], 0
        while have < per:
            images = next(batches)[0].to(device).float().div(127.5).sub(1)
            feats.append(_inception_features(inception, images))
            have += len(images)
        return metrics.gaussian_stats(gather(torch.cat(feats)[:per]).cpu())


def stacked_floor(net: torch.nn.Module, mnist_dir: str, n: int, batch: int, device: torch.device) -> dict[str, float]:
    """Modes and KL of `n` real digit triples (a fixed draw from the Stacked MNIST table), read by `net`."""
    images, _ = stacked.stacked(*mnist.load_mnist(mnist_dir)["train"], None)
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(REAL_SEED))[:n]
    modes = _in_batches(lambda i: stacked.modes_of(stacked.channel_digits(
        net, images[i.cpu()].to(device).float().div(127.5).sub(1))), pick.to(device), batch)
    return stacked.mode_metrics(modes.cpu())


def cluster_metrics(freqs: torch.Tensor) -> dict[str, float]:
    """A self-conditioned G's clusters: how many are in use (hold any of the sample), and the largest one's share."""
    return {"clusters": int((freqs > 0).sum()), "cluster_max": float(freqs.max())}


def _load_inception(path: str) -> torch.nn.Module:
    if not Path(path).is_file():
        raise UserError(f"eval.inception={path} does not exist; give the path of StyleGAN's TorchScript "
                        f"inception-2015-12-05.pt, or leave eval.inception empty to skip FID")
    try:
        return torch.jit.load(path, map_location="cpu").eval()
    except (RuntimeError, ValueError) as err:
        raise UserError(f"eval.inception={path} is not a TorchScript model ({str(err).splitlines()[0]})") from None


def _inception_features(inception: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    # StyleGAN's network takes uint8-range RGB images of any size and resizes them to 299 itself.
    x = ((images + 1) * 127.5).clamp(0, 255)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    return inception(x, return_features=True).double()
