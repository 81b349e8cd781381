"""Run under `accelerate launch --multi_gpu --num_processes 2` by tests/test_losses_ddp.py.

For every loss kind, with R1 / R2, spectral normalization and gradient accumulation over 2 micro-batches, one D step
and one G step on DDP-wrapped MLPs must equal the same step taken by one process on the whole batch; also with
class-conditional networks (also with the mode-seeking term, and a small image G with class-conditional BatchNorm,
whose batch statistics are each micro-batch's in both), with D's minibatch standard deviation, and with top-k G
updates, whose k best samples of each micro-step are chosen over both processes (the reference chooses them among
the same micro-step's rows of the whole batch). Also ADA's heuristic: each rank's D steps observed, summed over both
processes, give the r_t and p of one process observing the whole batch. Each rank writes its updated weights (and
ADA's r_t and p) to OUT/rank{R}.pt; rank 0 also writes the single-process reference.
"""

from __future__ import annotations

import sys
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator

from gan_dist.augment import ADA
from gan_dist.config import AugConfig, LossConfig, ModelConfig
from gan_dist.models import build_models
from gan_dist.objective import GANObjective, Schedule

CASES = {
    "ns": LossConfig(kind="ns", label_noise=0.0),
    "minimax": LossConfig(kind="minimax", label_noise=0.0),
    "hinge": LossConfig(kind="hinge", label_noise=0.0),
    "ls": LossConfig(kind="ls", label_noise=0.0),
    "wgan_gp": LossConfig(kind="wgan_gp", label_noise=0.0),
    "ns_r1": LossConfig(kind="ns", label_noise=0.0, r1_gamma=1.0, r1_every=4),
    "rpgan_r1_r2": LossConfig(kind="rpgan", label_noise=0.0, r1_gamma=1.0, r2_gamma=2.0, r1_every=4),
    "cond_rpgan_r1_r2": LossConfig(kind="rpgan", label_noise=0.0, r1_gamma=1.0, r2_gamma=2.0, r1_every=4),
    "cond_ns": LossConfig(kind="ns", label_noise=0.0),
    "cond_ms_ns": LossConfig(kind="ns", label_noise=0.0, ms_weight=1.0),
    "cond_norm_ns": LossConfig(kind="ns", label_noise=0.0),
    "cond_norm_ms_rpgan": LossConfig(kind="rpgan", label_noise=0.0, r1_gamma=1.0, r2_gamma=2.0, ms_weight=0.5),
    "mbstd_rpgan": LossConfig(kind="rpgan", label_noise=0.0, r1_gamma=1.0, r2_gamma=2.0),
    # k = 3 of each micro-step's 4 samples over both ranks: top-k's floor once its decay has run (TOPK_LATE)
    "topk_ns": LossConfig(kind="ns", label_noise=0.0, topk_gamma=0.5, topk_min=0.75),
    "topk_rpgan": LossConfig(kind="rpgan", label_noise=0.0, topk_gamma=0.5, topk_min=0.75),
}
GLOBAL, ACCUM, LR, CLASSES = 8, 2, 0.1, 3
TOPK_LATE = Schedule(epochs=100.0)


class Summing:
    """The reference 'optimizer': gradients pile up over the chunks; the SGD update is applied at the end."""

    def step(self) -> None:
        pass

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass


def nets(spectral_norm: bool, case: str = ""):
    """The case's G and D: MLPs (conditional for cond_*), or 8x8 DCGANs with no BatchNorm in D (D's running
    statistics would be rank 0's under DDP), with class-conditional BatchNorm in G (cond_norm_*) or D's minibatch
    standard deviation over pairs (mbstd_*)."""
    torch.manual_seed(0)
    if case.startswith(("cond_norm", "mbstd")):
        cond = case.startswith("cond")
        return build_models(ModelConfig(z_dim=4, width=2, resolution=8, dropout=0.0, d_norm="none", cond=cond,
                                        cond_norm=cond, classes=CLASSES, spectral_norm=spectral_norm,
                                        mbstd_group=0 if cond else 2))
    return build_models(ModelConfig(arch="mlp", z_dim=4, hidden=16, depth=2, out_act="none",
                                    spectral_norm=spectral_norm, cond=case.startswith("cond"), classes=CLASSES))


def data(name: str, real: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    return images if name.startswith(("cond_norm", "mbstd")) else real


def d_step(G, D, opt_D, real, z, cfg: LossConfig, backward, c=None, augment=None) -> dict:
    """One D step with the R1 / R2 pass, as the loop takes it: the objective's phase, then the optimizer's step."""
    out = GANObjective(cfg, G, D, backward=backward, augment=augment).d_phase(real, c, z, regularize=True)
    opt_D.step()
    opt_D.zero_grad(set_to_none=True)
    return out


def g_step(G, D, opt_G, z, cfg: LossConfig, backward, real, c=None, rank: int = 0, world: int = 1,
           gather=lambda x: x) -> dict:
    """One G step as the loop takes it; top-k ranks the samples of every rank that `gather` brings together."""
    objective = GANObjective(cfg, G, D, backward=backward, gather=gather, rank=rank, world=world)
    out = objective.g_phase(real, c, z, TOPK_LATE)
    opt_G.step()
    opt_G.zero_grad(set_to_none=True)
    return out


def chunks(ranks: list[int], world: int) -> dict[tuple[int, int], slice]:
    """(rank, micro) -> its rows of the global batch: each rank's share split into ACCUM micro-batches."""
    size = GLOBAL // (world * ACCUM)
    return {(r, m): slice((r * ACCUM + m) * size, (r * ACCUM + m + 1) * size) for r in ranks for m in range(ACCUM)}


def seeded(rank: int, micro: int) -> None:
    # WGAN-GP's interpolation weights and the mode-seeking pair's noise, the same in the reference
    torch.manual_seed(1000 + 10 * rank + micro)


def reference(name: str, cfg: LossConfig, sn: bool, real, c, z_d, z_g, world: int) -> dict:
    G, D = nets(sn, name)
    c = c if name.startswith("cond") else None
    cut = chunks(list(range(world)), world)
    parts = world * ACCUM
    for (r, m), rows in cut.items():
        seeded(r, m)
        d_step(G, D, Summing(), real[rows], z_d[rows], cfg, lambda loss: (loss / parts).backward(),
               c=None if c is None else c[rows])
    with torch.no_grad():
        for p in D.parameters():
            p -= LR * p.grad
            p.grad = None
    if name.startswith("topk"):  # micro-step m: the m-th micro-batch of every rank, top-k chosen among them all
        for m in range(ACCUM):
            rows = torch.cat([torch.arange(GLOBAL)[cut[r, m]] for r in range(world)])
            g_step(G, D, Summing(), z_g[rows], cfg, lambda loss: (loss / ACCUM).backward(), real[rows])
    for (r, m), rows in cut.items() if not name.startswith("topk") else ():
        seeded(r, m)
        g_step(G, D, Summing(), z_g[rows], cfg, lambda loss: (loss / parts).backward(), real[rows],
               c=None if c is None else c[rows])
    with torch.no_grad():
        for p in G.parameters():
            p -= LR * p.grad
    return {"G": G.state_dict(), "D": D.state_dict()}


# p = 0: D sees each batch as it is, so both sides score the same logits; the target sits below their r_t, so p rises
# (by a quarter: 8 images of 32). The ns loss: its r_t is the sign of D(real) alone, which D's moved bias splits.
ADA_CFG = AugConfig(kind="ada", p=0.0, target=-0.4, speed_kimg=0.032)
ADA_LOSS = LossConfig(kind="ns", label_noise=0.0)


def ada_nets():
    """mbstd's nets, D's last bias moved so that its logits on the test images take both signs (r_t inside -1..1)."""
    G, D = nets(False, "mbstd_rpgan")
    with torch.no_grad():
        list(D.parameters())[-1].sub_(0.2)
    return G, D


def ada_interval(G, D, opt_D, rows: list[slice], images, z_d, backward, accumulate, reduce) -> dict:
    """One ADA interval of D steps on `rows` of the batch, then p's adjustment from the `reduce`d sums."""
    ada = ADA(ADA_CFG)
    for part in rows:
        with accumulate(D):
            d_step(G, D, opt_D, images[part], z_d[part], ADA_LOSS, backward, augment=ada)  # observes r_t
    local = ada.sums[0] / ada.sums[1]
    ada.adjust(reduce(ada.sums), GLOBAL)
    return {"rt": ada.rt.clone(), "p": ada.p.clone(), "local_rt": local}


def main(out: Path) -> None:
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=ACCUM)
    rank, world = accelerator.process_index, accelerator.num_processes
    torch.manual_seed(7)
    real, z_d, z_g = torch.randn(GLOBAL, 2), torch.randn(GLOBAL, 4), torch.randn(GLOBAL, 4)
    labels, images = torch.randint(0, CLASSES, (GLOBAL,)), torch.randn(GLOBAL, 1, 8, 8)
    results, refs = {}, {}
    for name, cfg in CASES.items():
        c = labels if name.startswith("cond") else None
        x = data(name, real, images)
        for sn in (False, True):
            G, D = nets(sn, name)
            opt_G, opt_D = torch.optim.SGD(G.parameters(), lr=LR), torch.optim.SGD(D.parameters(), lr=LR)
            G, D, opt_G, opt_D = accelerator.prepare(G, D, opt_G, opt_D)
            cut = chunks([rank], world)
            for (r, m), rows in cut.items():
                seeded(r, m)
                with accelerator.accumulate(D):
                    d_step(G, D, opt_D, x[rows], z_d[rows], cfg, accelerator.backward,
                           c=None if c is None else c[rows])
            for (r, m), rows in cut.items():
                seeded(r, m)
                with accelerator.accumulate(G):
                    g_step(G, D, opt_G, z_g[rows], cfg, accelerator.backward, x[rows],
                           c=None if c is None else c[rows], rank=rank, world=world, gather=accelerator.gather)
            key = f"{name}{'_sn' if sn else ''}"
            results[key] = {"G": accelerator.unwrap_model(G).state_dict(),
                            "D": accelerator.unwrap_model(D).state_dict()}
            if rank == 0:
                refs[key] = reference(name, cfg, sn, x, labels, z_d, z_g, world)
    G, D = ada_nets()
    opt_D = torch.optim.SGD(D.parameters(), lr=LR)
    G, D, opt_D = accelerator.prepare(G, D, opt_D)
    results["ada"] = ada_interval(G, D, opt_D, list(chunks([rank], world).values()), images, z_d,
                                  accelerator.backward, accelerator.accumulate, lambda t: accelerator.reduce(t, "sum"))
    if rank == 0:
        G, D = ada_nets()
        refs["ada"] = ada_interval(G, D, Summing(), list(chunks(list(range(world)), world).values()), images, z_d,
                                   lambda loss: loss.backward(), lambda _: nullcontext(), lambda t: t)
    torch.save(results, out / f"rank{rank}.pt")
    if rank == 0:
        torch.save(refs, out / "reference.pt")
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
