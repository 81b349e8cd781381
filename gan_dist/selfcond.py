"""Self-conditioning (Liu et al., "Diverse Image Generation via Self-Conditioned GANs", CVPR 2020): labels without
labels. A fixed sample of real images is clustered by k-means on D's own penultimate features (`Discriminator.
features`); each real batch is labelled by its nearest centre, and G and D are conditioned on those labels as a
class-conditional pair is (`model.self_cond`), so G's fakes take the clusters in the data's proportions.

Every `model.self_cond_every` steps the sample is clustered again with the D of that moment: k-means starts from
the means of the new features under the old assignment, and the new clusters are matched to the old ones (the
Hungarian assignment that keeps the most images in place), so a cluster keeps its id and G its meaning. Between
re-clusterings the batches are labelled by the snapshot of D taken with the centres (the features the centres live
in), on the device, with no host sync.

Under DDP every rank holds its share of the sample; the features are gathered in the sample's order, k-means runs
once per rank on the same numbers, and rank 0's result is broadcast, so every rank labels with the same centres.
The state (the D snapshot, centres, cluster sizes, the sample's assignment, the step) is a checkpoint's, so a resume
labels exactly as the uninterrupted run. Pure torch and numpy: `gather` and `broadcast` are passed in.
"""

from __future__ import annotations

import copy
from typing import Callable

import numpy as np
import torch
from torch import nn

from gan_dist.config import ModelConfig
from gan_dist.errors import UserError
from gan_dist.models import eval_mode

INITS = 3  # k-means++ starts of the first clustering (the best kept); later ones start from the previous clusters
MAX_ITERS = 100  # Lloyd iterations at most
SETTLED = 1e-3  # ... stopping once fewer than this fraction of the images change cluster
CHUNK = 4096  # images per distance block: N x k distances, never N x F copies


@torch.no_grad()
def nearest(x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """(N,) int64: each row of x's nearest centre (squared Euclidean distance)."""
    c2 = (centres * centres).sum(1)
    return torch.cat([(c2 - 2 * part @ centres.T).argmin(1) for part in x.split(CHUNK)])


@torch.no_grad()
def lloyd(x: torch.Tensor, centres: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means from `centres`: (centres, assignment) once the assignment settles (or MAX_ITERS). An empty cluster
    keeps its centre."""
    k, assign = len(centres), None
    for _ in range(MAX_ITERS):
        new = nearest(x, centres)
        settled = assign is not None and int((new != assign).sum()) <= SETTLED * len(x)
        assign = new
        if settled:
            break
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        centres = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centres)
    return centres, assign


def inertia(x: torch.Tensor, centres: torch.Tensor, assign: torch.Tensor) -> float:
    return float(((x - centres[assign]) ** 2).sum())


@torch.no_grad()
def plus_plus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): each next centre drawn with probability proportional to its
    squared distance to the nearest centre so far. Draws on the host from `generator` (a CPU generator)."""
    first = int(torch.randint(len(x), (1,), generator=generator))
    centres = x[first:first + 1]
    d2 = ((x - centres) ** 2).sum(1)
    for _ in range(k - 1):
        weights = d2.double().cpu()
        pick = int(torch.multinomial(weights / weights.sum(), 1, generator=generator)) if weights.sum() > 0 else \
            int(torch.randint(len(x), (1,), generator=generator))
        centres = torch.cat([centres, x[pick:pick + 1]])
        d2 = torch.minimum(d2, ((x - x[pick]) ** 2).sum(1))
    return centres


def kmeans(x: torch.Tensor, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best of INITS k-means++ runs on x (lowest inertia), seeded by `seed`: (centres, assignment)."""
    generator = torch.Generator().manual_seed(seed)
    runs = [lloyd(x, plus_plus(x, k, generator)) for _ in range(INITS)]
    return min(runs, key=lambda run: inertia(x, *run))


def warm_start(x: torch.Tensor, old: torch.Tensor, k: int, centres: torch.Tensor) -> torch.Tensor:
    """The means of x under the old assignment `old` (a cluster left empty keeps its centre `centres`)."""
    counts = torch.bincount(old, minlength=k).to(x.dtype)
    sums = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, old, x)
    return torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centres)


def assignment(cost: np.ndarray) -> np.ndarray:
    """The column of each row of the square `cost` that minimizes their total (the Hungarian method with
    potentials, O(k^3): Kuhn 1955, Munkres 1957; the shortest augmenting path form, each row's scan vectorized)."""
    k = len(cost)
    u, v = np.zeros(k + 1), np.zeros(k + 1)
    owner, way = np.zeros(k + 1, dtype=np.int64), np.zeros(k + 1, dtype=np.int64)  # column j's row (1-based); 0: none
    for row in range(1, k + 1):
        owner[0], col = row, 0
        slack, used = np.full(k + 1, np.inf), np.zeros(k + 1, dtype=bool)
        while owner[col]:
            used[col] = True
            reduced = cost[owner[col] - 1] - u[owner[col]] - v[1:]
            closer = ~used[1:] & (reduced < slack[1:])
            slack[1:][closer], way[1:][closer] = reduced[closer], col
            free = np.where(used[1:], np.inf, slack[1:])
            nxt = int(free.argmin()) + 1
            delta = free[nxt - 1]
            u[owner[used]] += delta
            v[used] -= delta
            slack[1:][~used[1:]] -= delta
            col = nxt
        while col:  # flip the augmenting path
            owner[col], col = owner[way[col]], way[col]
    cols = np.empty(k, dtype=np.int64)
    cols[owner[1:] - 1] = np.arange(k)
    return cols


def match(new: torch.Tensor, old: torch.Tensor, k: int) -> torch.Tensor:
    """(k,) int64: the old id each new cluster takes, maximizing the images that keep their id (Hungarian)."""
    overlap = torch.zeros(k, k, dtype=torch.float64)
    overlap.index_put_((new.cpu(), old.cpu()), torch.ones(len(new), dtype=torch.float64), accumulate=True)
    return torch.from_numpy(assignment(-overlap.numpy()))


def in_sample_order(feats: torch.Tensor, world: int, per_draw: int) -> torch.Tensor:
    """Features gathered in rank order (world x this rank's draws of `per_draw`) back in the order of the data's
    stream, where each draw of the world's ranks is one global batch in rank order: the same rows on any world
    size that splits the global draw evenly."""
    return feats.view(world, -1, per_draw, feats.shape[1]).transpose(0, 1).reshape(-1, feats.shape[1])


class SelfCond(nn.Module):
    """The clustering of one run: `label(real)` gives each real image its cluster; `recluster` clusters the sample
    again with the current D. Its buffers (D's snapshot included) are what a checkpoint keeps (`state`, `load`)."""

    def __init__(self, cfg: ModelConfig, D: nn.Module, seed: int) -> None:
        super().__init__()
        self.k, self.every, self.seed = cfg.self_cond_k, cfg.self_cond_every, seed
        self.D = copy.deepcopy(D).requires_grad_(False)
        with eval_mode(self.D):
            width = self.D.features(torch.zeros(2, cfg.channels, cfg.resolution, cfg.resolution) if
                                    cfg.arch != "mlp" else torch.zeros(2, 2)).shape[1]
        self.register_buffer("centres", torch.zeros(self.k, width))
        self.register_buffer("sizes", torch.zeros(self.k, dtype=torch.int64))  # the sample's images per cluster
        self.register_buffer("assign", torch.zeros(0, dtype=torch.int64))  # each sample image's cluster
        self.register_buffer("step", torch.tensor(-1, dtype=torch.int64))  # of the last clustering; -1: none yet
        self.last = -1  # `step` on the host

    @torch.no_grad()
    def label(self, real: torch.Tensor) -> torch.Tensor:
        """(B,) int64 cluster ids of a real batch, on its device (no host sync)."""
        with eval_mode(self.D):
            return nearest(self.D.features(real).float(), self.centres)

    def due(self, step: int) -> bool:
        """Whether the run clusters before step `step`: its first step (after any resume without a clustering),
        and every `every` steps."""
        return self.last < 0 or (step % self.every == 0 and step > self.last)

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
        with eval_mode(self.D):
            return torch.cat([self.D.features(b).float() for b in images.split(batch)])

    @torch.no_grad()
    def recluster(self, D: nn.Module, sample: torch.Tensor, step: int, *,
                  gather: Callable[[torch.Tensor], torch.Tensor], broadcast: Callable[[torch.Tensor], torch.Tensor],
                  world: int, per_draw: int, n: int) -> torch.Tensor:
        """Cluster the sample's first `n` images (this rank's share `sample`, drawn `per_draw` images at a time)
        with D's current weights, which the snapshot takes; keep ids stable against the last clustering. Returns
        the cluster sizes (k,) on every rank."""
        self.D.load_state_dict(D.state_dict())
        x = in_sample_order(gather(self.features(sample)), world, per_draw)[:n]
        if self.last < 0 or len(self.assign) != len(x):
            centres, assign = kmeans(x, self.k, self.seed + step)
        else:
            old = self.assign.to(x.device)
            centres, assign = lloyd(x, warm_start(x, old, self.k, self.centres.to(x.dtype)))
            ids = match(assign, old, self.k).to(x.device)
            centres = torch.empty_like(centres).index_copy_(0, ids, centres)
            assign = ids[assign]
        self.centres.copy_(broadcast(centres.contiguous()))
        self.assign = broadcast(assign.contiguous())
        self.sizes.copy_(torch.bincount(self.assign, minlength=self.k))
        self.step.fill_(step)
        self.last = step
        return self.sizes

    def state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.state_dict().items()}

    def load(self, saved: dict[str, torch.Tensor]) -> None:
        """Restore a checkpoint's `state()`; an empty one (a checkpoint from before the run clustered) leaves the
        run to cluster at its next step."""
        if not saved:
            return
        try:
            self.assign = torch.empty_like(saved["assign"], device=self.centres.device)
            self.load_state_dict(saved)
        except (KeyError, RuntimeError) as err:
            raise UserError(f"the checkpoint's self-conditioning state does not fit this run's D and "
                            f"model.self_cond_k ({str(err).strip().splitlines()[-1][:200]}); resume with the config "
                            "it was written with, or start a new run.dir") from None
        self.last = int(self.step)
