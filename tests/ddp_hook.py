"""Run under `accelerate launch --multi_gpu --num_processes 2` by tests/test_losses_ddp.py.

For each `dist.comm_hook` (none, fp16, and bf16 where CUDA is), D is prepared by the trainer's own Accelerator (`make_accelerator`) and
takes one backward of its loss, each rank on its half of a fixed batch; each rank writes the all-reduced gradients to
OUT/hook_rank{R}.pt, and rank 0 also writes the gradients of one process on the whole batch (no DDP, no hook).
D has neither BatchNorm nor dropout here, so the halves' mean gradient is the whole batch's exactly.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from gan_dist.config import load_config, resolve_launch
from gan_dist.distributed import make_accelerator
from gan_dist.losses import d_loss
from gan_dist.models import build_models

HOOKS = ("none", "fp16", "bf16") if torch.cuda.is_available() else ("none", "fp16")  # torch's bf16 hook: NCCL only
BATCH = 16


def gradients(D: torch.nn.Module, images: torch.Tensor, prepared: torch.nn.Module | None = None) -> \
        dict[str, torch.Tensor]:
    """D's gradients of its loss on `images` (reals, then as many fakes), run through `prepared` (D in DDP) if given."""
    logits = (prepared or D)(images)
    half = len(images) // 2
    d_loss(logits[:half], logits[half:], "ns", 0.0).backward()
    return {k: p.grad.clone() for k, p in D.named_parameters()}


def main(out: Path) -> None:
    real = torch.rand(BATCH, 1, 28, 28, generator=torch.Generator().manual_seed(1)) * 2 - 1
    fake = torch.rand(BATCH, 1, 28, 28, generator=torch.Generator().manual_seed(2)) * 2 - 1
    grads, rank = {}, 0
    for hook in HOOKS:
        cfg = load_config([f"dist.comm_hook={hook}", "model.width=8", "model.d_norm=none", "model.dropout=0"])
        accelerator = make_accelerator(cfg, resolve_launch(cfg.train, cfg.perf))
        rank, world = accelerator.process_index, accelerator.num_processes
        torch.manual_seed(0)
        D = build_models(cfg.model)[1]
        mine = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        grads[hook] = gradients(D, torch.cat([real[mine], fake[mine]]), accelerator.prepare(D))
    torch.save(grads, out / f"hook_rank{rank}.pt")
    if rank == 0:
        torch.manual_seed(0)
        torch.save(gradients(build_models(cfg.model)[1], torch.cat([real, fake])), out / "hook_reference.pt")
    # Ended here, not by the interpreter's exit: a gloo thread still running then aborted a rank now and then
    # ("terminate called without an active exception").
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
