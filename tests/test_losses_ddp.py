"""Every loss kind (R3GAN's rpgan too), R1, R2, spectral normalization and the mode-seeking term are correct under
DDP and gradient accumulation, for unconditional and class-conditional networks (class-conditional BatchNorm in G
too), with D's minibatch standard deviation and with top-k G updates chosen over both processes:
two processes, each accumulating two micro-batches, take the same D and G step as one process on the whole batch
(tests/ddp_losses.py, run under the real `accelerate launch` on CPU gloo). ADA's overfitting heuristic, summed over
both processes, gives every rank the r_t and p of one process.

With a DDP communication hook (`dist.comm_hook=fp16` or `bf16`, through the trainer's own Accelerator), D's gradients
on two processes stay within the format's precision of one process's on the whole batch (tests/ddp_hook.py).

Also one 2-process train.py run with every D option at once (WGAN-GP, n_critic, lazy R1, spectral norm, cosine
schedule, accumulation): optimizer step counts, learning rates and logged penalties.

Run: python -m pytest tests/test_losses_ddp.py -q   (about 30 s)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ddp_losses import CASES
from runs import REPO, free_port


def two_processes(script: str, out: Path) -> Path:
    """`script OUT` under the real `accelerate launch` with 2 CPU processes; OUT, once it exited cleanly."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), script, str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> Path:
    return two_processes("tests/ddp_losses.py", tmp_path_factory.mktemp("ddp_losses"))


@pytest.mark.parametrize("case", [f"{name}{sn}" for name in CASES for sn in ("", "_sn")])
def test_two_processes_with_accumulation_take_the_single_process_step(outputs, case):
    ranks = [torch.load(outputs / f"rank{r}.pt")[case] for r in range(2)]
    ref = torch.load(outputs / "reference.pt")[case]
    # Spectral norm's power iteration advances once per forward: 2 per rank here, 4 in the one-process reference,
    # so its singular-vector estimates (_u, _v) differ a little, and the weights they scale follow closely.
    atol = 5e-4 if case.endswith("_sn") else 1e-6
    for net in ("G", "D"):
        for k, v in ref[net].items():
            if k.endswith(("running_mean", "running_var", "num_batches_tracked")):
                continue  # BatchNorm's running statistics: under DDP, rank 0's are broadcast at each forward
            assert torch.equal(ranks[0][net][k], ranks[1][net][k]), f"{net}.{k} differs between ranks"
            if not k.endswith(("._u", "._v")):
                assert torch.allclose(ranks[0][net][k], v, atol=atol), f"{net}.{k} differs from the one-process step"
    # the step did something: D moved away from its initial weights
    from ddp_losses import nets  # noqa: PLC0415
    init = nets("_sn" in case, case)[1].state_dict()
    assert any(not torch.allclose(ranks[0]["D"][k], init[k]) for k in init if "weight" in k or "original" in k)


@pytest.fixture(scope="module")
def hook_outputs(tmp_path_factory) -> Path:
    return two_processes("tests/ddp_hook.py", tmp_path_factory.mktemp("ddp_hook"))


# The largest difference from one process's gradients, relative to the largest gradient: fp32 sums (no hook) to
# rounding; fp16 keeps 11 significant bits, bf16 8.
HOOK_TOLERANCE = {"none": 1e-5, "fp16": 1e-3, "bf16": 8e-3}


NCCL_ONLY = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch's bf16 hook runs on NCCL only")


@pytest.mark.parametrize("hook", [pytest.param(h, marks=NCCL_ONLY if h == "bf16" else ()) for h in HOOK_TOLERANCE])
def test_a_comm_hook_keeps_the_two_process_gradients_within_its_precision(hook_outputs, hook):
    ranks = [torch.load(hook_outputs / f"hook_rank{r}.pt") for r in range(2)]
    ref = torch.load(hook_outputs / "hook_reference.pt")
    for k, want in ref.items():
        assert torch.equal(ranks[0][hook][k], ranks[1][hook][k]), f"{k}: the ranks' gradients differ"
        error = (ranks[0][hook][k] - want).abs().max() / want.abs().max()
        assert error <= HOOK_TOLERANCE[hook], f"{k}: {error:.2e} of the largest gradient off one process's"
    if hook != "none":  # the hook ran: its rounding shows where fp32's sum has none
        assert any(not torch.equal(ranks[0][hook][k], ranks[0]["none"][k]) for k in ref)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the bf16 hook runs where CUDA is")
def test_the_bf16_hook_without_cuda_is_one_error_line(tmp_path):
    from runs import launch  # noqa: PLC0415
    done = launch(tmp_path, tmp_path / "no-shards", 2, "dist.comm_hook=bf16", check=False)
    assert done.returncode != 0 and "Traceback" not in done.stdout + done.stderr
    assert "error: dist.comm_hook=bf16 needs CUDA GPUs (torch's bf16 hook runs on NCCL 2.10 or later only); without " \
           "them use dist.comm_hook=fp16 or none" in done.stderr


def test_ada_heuristic_is_averaged_over_both_processes(outputs):
    # Each rank's own D steps alone would give another r_t; summed over both, every rank holds the r_t and the p of
    # one process that saw the whole batch.
    ranks = [torch.load(outputs / f"rank{r}.pt")["ada"] for r in range(2)]
    ref = torch.load(outputs / "reference.pt")["ada"]
    assert any(not torch.allclose(r["local_rt"], ref["rt"]) for r in ranks)
    for r in ranks:
        assert torch.allclose(r["rt"], ref["rt"], atol=1e-6) and torch.equal(r["p"], ref["p"])
    assert ref["p"] > 0  # p moved


def test_two_process_run_with_every_d_option_counts_its_steps(tmp_path):
    # WGAN-GP with 2 critic steps, lazy R1, spectral norm, cosine decay after warmup and 2 accumulation
    # micro-batches, through the real train.py: D's optimizer steps n_critic times per G step, both end at the
    # scheduled rates, and every penalty is logged.
    from runs import jsonl, launch  # noqa: PLC0415
    steps, batch = 12, 32
    launch(tmp_path, tmp_path / "no-shards", 2, f"train.steps={steps}", f"train.batch_size={batch}", "train.grad_accum=2",
           "loss.kind=wgan_gp", "loss.label_noise=0", "loss.n_critic=2", "loss.r1_gamma=1", "loss.r1_every=3",
           "model.spectral_norm=true", "model.hidden=32", "optim.schedule=cosine", "optim.warmup_steps=4",
           "log.every=4", "log.sample_every=12", "eval.every=0", f"ckpt.every={steps}", config="configs/ring8.yaml")
    ckpt = tmp_path / "checkpoints" / f"step_{steps:08d}"
    opt_G, opt_D = torch.load(ckpt / "optimizer.bin"), torch.load(ckpt / "optimizer_1.bin")
    assert {s["step"].item() for s in opt_G["state"].values()} == {steps}
    assert {s["step"].item() for s in opt_D["state"].values()} == {2 * steps}
    from gan_dist.config import OptimConfig  # noqa: PLC0415
    from gan_dist.optim import lr_factor  # noqa: PLC0415
    factor = lr_factor(steps - 1, steps, OptimConfig(schedule="cosine", warmup_steps=4))
    assert opt_G["param_groups"][0]["lr"] == pytest.approx(1e-3 * factor)
    assert opt_D["param_groups"][0]["lr"] == pytest.approx(1e-3 * factor)
    rows = [r for r in jsonl(tmp_path) if "train/loss_d" in r]
    assert [r["train/step"] for r in rows] == [4, 8, 12]
    assert rows[-1]["train/kimg"] == pytest.approx(steps * batch * 2 / 1000)  # real images: n_critic per step
    for key in ("train/loss_d", "train/loss_g", "train/gp", "train/r1"):
        assert all(np.isfinite(r[key]) for r in rows), key
    assert all(r["train/r1"] > 0 for r in rows)  # each 4-step interval holds lazy R1 steps (every 3rd D step)
    assert any("parametrizations" in k for k in load_file(tmp_path / "final" / "discriminator.safetensors"))
