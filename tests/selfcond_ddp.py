"""Run under `accelerate launch --multi_gpu --num_processes 2` by tests/test_selfcond.py.

Self-conditioning on two processes against one: each rank holds its share of the clustered sample as the trainer
draws it (every global draw split between the ranks), the features are gathered and k-means run, twice (the second
a warm re-clustering after D moved). Each rank writes its centres, the sample's assignment, the labels it gives its
half of a real batch, and D's gradients of one self-conditioned D step on a DDP-wrapped D to OUT/rank{R}.pt; rank 0
also writes the same computed by one process on the whole sample and batch (OUT/reference.pt).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast

from gan_dist.config import LossConfig, ModelConfig
from gan_dist.models import build_models
from gan_dist.objective import GANObjective
from gan_dist.selfcond import SelfCond

CFG = ModelConfig(arch="mlp", z_dim=4, hidden=16, depth=2, out_act="none", self_cond=True, self_cond_k=5,
                  self_cond_images=96)
LOSS = LossConfig(kind="rpgan", label_noise=0.0, r1_gamma=1.0, r2_gamma=1.0)
DRAW, BATCH = 16, 8  # the sample's global draw, and the real batch of the D step


def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sample (5 blobs in the plane), a real batch from the same blobs, and the D step's noise."""
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(5, 2, generator=g) * 3
    pick = torch.randint(0, 5, (CFG.self_cond_images + BATCH,), generator=g)
    points = centres[pick] + 0.3 * torch.randn(len(pick), 2, generator=g)
    return points[:CFG.self_cond_images], points[CFG.self_cond_images:], torch.randn(BATCH, CFG.z_dim, generator=g)


def share(x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank `rank`'s part of rows drawn DRAW at a time, each draw split evenly between the ranks in rank order."""
    per = DRAW // world
    return torch.cat([d[rank * per:(rank + 1) * per] for d in x.split(DRAW)])


def run(rank: int, world: int, prepare, gather, bcast, backward) -> dict:
    torch.manual_seed(0)
    G, D = build_models(CFG)
    self_cond = SelfCond(CFG, D, seed=3)
    sample, real, z = data()
    mine = share(sample, rank, world)
    how = dict(gather=gather, broadcast=bcast, world=world, per_draw=DRAW // world, n=CFG.self_cond_images)
    recluster = [self_cond.recluster(D, mine, 0, **how).clone()]
    with torch.no_grad():  # D moves; the second clustering starts from the first one's clusters
        for p in D.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    recluster.append(self_cond.recluster(D, mine, 10, **how).clone())
    G, D = prepare(G), prepare(D)
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    objective = GANObjective(LOSS, G, D, backward=backward, conditional=True, labeler=self_cond.label)
    c = objective.labels(real[rows], torch.zeros(0))
    objective.d_phase(real[rows], c, z[rows], regularize=True)
    return {"sizes": recluster, "centres": self_cond.centres.clone(), "assign": self_cond.assign.clone(),
            "labels": gather(c), "grads": {k.removeprefix("module."): p.grad.clone() for k, p in D.named_parameters()}}


def main(out: Path) -> None:
    acc = Accelerator(cpu=True)
    result = run(acc.process_index, acc.num_processes, acc.prepare, acc.gather, broadcast, acc.backward)
    torch.save(result, out / f"rank{acc.process_index}.pt")
    if acc.is_main_process:
        torch.save(run(0, 1, lambda net: net, lambda x: x, lambda x: x, lambda loss: loss.backward()),
                   out / "reference.pt")
    acc.wait_for_everyone()
    acc.end_training()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
