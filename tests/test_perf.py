"""The speed switches, each against the plain path: Adam's kernels (`optim.impl`), zero-filled gradients
(`optim.set_to_none=false`), `perf.channels_last`, `perf.prefetch` (DeviceBatches), `perf.ema_every` and
`perf.compile` (a real `train.py` run). Each must train (finite losses, weights move) and give the plain path's
result: bit for bit where only the memory layout of the work changes, within a tolerance where the arithmetic does.
DDP's options, per-step host syncs and prefetch in a 2-process run are checked bit for bit in tests/test_train.py
(the SIGTERM resume case); bf16 autocast trains in its RGB run. No host sync between log steps, with 1 and 2
processes, the loader or the device-resident data (scripts/count_syncs.py).

Run: python -m pytest tests/test_perf.py -q   (about 40 s on 2 cores, most of it compiling)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gan_dist.config import EMAConfig, LossConfig, ModelConfig, OptimConfig, load_config
from gan_dist.data import DeviceBatches, open_source, shard_batches
from gan_dist.ema import EMA, ema_beta
from gan_dist.errors import UserError
from gan_dist.objective import GANObjective
from gan_dist.models import build_models
from gan_dist.optim import make_optimizers
from gan_dist.points import PointBatches

from runs import launch

REPO = Path(__file__).resolve().parents[1]
MODEL = ModelConfig(arch="dcgan", z_dim=8, width=4, channels=1, resolution=8)


def train_steps(steps: int = 3, impl: str = "auto", set_to_none: bool = True, channels_last: bool = False):
    """`steps` D and G steps of a small DCGAN from seed 0; its weights and the losses."""
    torch.manual_seed(0)
    G, D = build_models(MODEL)
    if channels_last:
        G, D = G.to(memory_format=torch.channels_last), D.to(memory_format=torch.channels_last)
    opt_G, opt_D = make_optimizers(G, D, OptimConfig(impl=impl, set_to_none=set_to_none))
    objective = GANObjective(LossConfig(), G, D, backward=torch.Tensor.backward)
    losses = []
    for _ in range(steps):
        real = torch.rand(16, 1, 8, 8) * 2 - 1
        if channels_last:
            real = real.contiguous(memory_format=torch.channels_last)
        d = objective.d_phase(real, None, torch.randn(16, 8))
        opt_D.step()
        opt_D.zero_grad(set_to_none=set_to_none)
        g = objective.g_phase(real, None, torch.randn(16, 8))
        opt_G.step()
        opt_G.zero_grad(set_to_none=set_to_none)
        losses += [d["loss_d"].item(), g["loss_g"].item()]
    grads = [p.grad for p in [*G.parameters(), *D.parameters()]]
    weights = {f"G.{k}": v for k, v in G.state_dict().items()} | {f"D.{k}": v for k, v in D.state_dict().items()}
    return weights, losses, grads


@pytest.fixture(scope="module")
def plain():
    return train_steps()


def assert_trained(weights: dict, losses: list[float]) -> None:
    torch.manual_seed(0)
    G0, D0 = build_models(MODEL)
    init = {f"G.{k}": v for k, v in G0.state_dict().items()} | {f"D.{k}": v for k, v in D0.state_dict().items()}
    assert all(torch.isfinite(torch.tensor(losses)))
    moved = [k for k in init if k.endswith("weight") and not weights[k].equal(init[k])]
    assert len(moved) == len([k for k in init if k.endswith("weight")]), "every weight moves"


def assert_close(a: dict, b: dict, atol: float) -> None:
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=atol, rtol=0), k


@pytest.mark.parametrize("impl", ["foreach", "fused", "single"])
def test_every_adam_implementation_takes_the_same_steps(plain, impl):
    weights, losses, _ = train_steps(impl=impl)
    assert_trained(weights, losses)
    assert_close(weights, plain[0], atol=1e-6)  # the kernels round differently, the update is the same
    assert losses == pytest.approx(plain[1], abs=1e-5)


def test_zero_filled_gradients_give_the_same_bits(plain):
    weights, losses, grads = train_steps(set_to_none=False)
    assert_trained(weights, losses)
    assert all(weights[k].equal(plain[0][k]) for k in weights) and losses == plain[1]
    # The memory stays, zeroed, for the next backward to write into; by default it is freed.
    assert all(g is not None and not g.any() for g in grads) and all(g is None for g in plain[2])


def test_channels_last_trains_like_the_contiguous_layout(plain):
    weights, losses, _ = train_steps(channels_last=True)
    assert_trained(weights, losses)
    assert weights["D.net.0.weight"].is_contiguous(memory_format=torch.channels_last)
    assert_close(weights, plain[0], atol=1e-5)  # convolutions sum in another order
    assert losses == pytest.approx(plain[1], abs=1e-4)


def test_prefetch_hands_out_the_same_batches_and_positions(shards):
    cfg = load_config(["--config", "configs/debug.yaml", f"data.cache_dir={shards}"])
    source = open_source(cfg.data)
    plain = DeviceBatches(shard_batches(source, cfg.data, 32, 0, 0, 1), torch.device("cpu"), prefetch=False)
    ahead = DeviceBatches(shard_batches(source, cfg.data, 32, 0, 0, 1), torch.device("cpu"), prefetch=True)
    for _ in range(4):
        (a, a_labels), (b, b_labels) = next(plain), next(ahead)
        # Positions are those of the batches handed out, not of the one fetched ahead: a checkpoint resumes there.
        assert a.equal(b) and a_labels.equal(b_labels) and plain.state().pos.equal(ahead.state().pos) \
            and plain.state().batches == ahead.state().batches and ahead.skipped == 0
        assert a.dtype == torch.float32 and a.min() >= -1 and a.max() <= 1


class RGBBatches:
    """Three RGB uint8 batches and a position per batch, as ShardBatches hands them out."""

    epoch_size = 0

    def __init__(self) -> None:
        self.index = 0

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.index += 1
        return torch.full((2, 3, 4, 4), self.index, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64)

    def state(self) -> torch.Tensor:
        return torch.tensor([[0, self.index, 0]])


def test_channels_last_batches_are_nhwc_with_the_same_values():
    plain, nhwc = DeviceBatches(RGBBatches(), torch.device("cpu")), DeviceBatches(
        RGBBatches(), torch.device("cpu"), channels_last=True)
    for _ in range(2):
        a, b = next(plain)[0], next(nhwc)[0]
        assert a.equal(b) and b.is_contiguous(memory_format=torch.channels_last) and not a.is_contiguous(
            memory_format=torch.channels_last)


def test_prefetched_points_keep_their_batch_index():
    cfg = load_config(["--config", "configs/toy2d.yaml"]).data
    plain = DeviceBatches(PointBatches(cfg, 8, 0, 0, 5), torch.device("cpu"), prefetch=False)
    ahead = DeviceBatches(PointBatches(cfg, 8, 0, 0, 5), torch.device("cpu"), prefetch=True)
    for i in range(3):
        (a, a_labels), (b, b_labels) = next(plain), next(ahead)
        assert a.equal(b) and a_labels.equal(b_labels) and ahead.state().pos.tolist() == [[5 + i + 1, 0, 0]]


def test_ema_every_k_steps_follows_the_every_step_average():
    """G drifts with noise for 64 steps; G_ema updated every 4 steps (with 4 steps' decay) stays within a few percent
    of the every-step G_ema, measured against how far G_ema moved."""
    cfg, batch = EMAConfig(halflife_kimg=0.5, rampup=0.0), 32
    assert ema_beta(cfg, 0, 4 * batch) == pytest.approx(ema_beta(cfg, 0, batch) ** 4, rel=1e-12)
    torch.manual_seed(0)
    G = torch.nn.Linear(16, 16)
    every, sparse = EMA(G, cfg), EMA(G, cfg)
    start = every.G_ema.weight.clone()
    for step in range(64):
        with torch.no_grad():
            G.weight.add_(0.01 + 0.05 * torch.randn_like(G.weight))
        every.update(G, step * batch, batch)
        if (step + 1) % 4 == 0:
            sparse.update(G, step * batch, 4 * batch)
    moved = (every.G_ema.weight - start).norm()
    assert moved > 0.5
    assert (sparse.G_ema.weight - every.G_ema.weight).norm() < 0.05 * moved


def test_compile_refuses_a_gradient_penalty():
    with pytest.raises(UserError, match="perf.compile=true cannot train with a gradient penalty"):
        load_config(["perf.compile=true", "loss.r1_gamma=1"])


def run_train(run_dir: Path, *overrides: str) -> list[dict]:
    cmd = [sys.executable, "train.py", "--config", "configs/toy2d.yaml", f"run.dir={run_dir}", "train.steps=4",
           "log.every=2", "eval.every=0", "wandb.mode=disabled", "ckpt.every=4", "log.sample_every=4", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path):
    """With CUDA graphs asked for (on a CPU inductor compiles without them), two optimizers, the frozen D of the G
    step, EMA, and a resume half-way: the same training as eager, within float tolerance."""
    fast = ("perf.compile=true", "perf.compile_mode=reduce-overhead")
    run_train(tmp_path / "compiled", *fast, "train.steps=2")
    compiled = run_train(tmp_path / "compiled", *fast)
    eager = run_train(tmp_path / "eager")
    assert [r["train/step"] for r in compiled] == [2, 4] == [r["train/step"] for r in eager]
    for a, b in zip(compiled, eager):
        assert a["train/loss_d"] == pytest.approx(b["train/loss_d"], abs=1e-4)
        assert a["train/loss_g"] == pytest.approx(b["train/loss_g"], abs=1e-4)
    for name in ("generator", "discriminator", "generator_ema"):
        a = load_file(tmp_path / "compiled" / "final" / f"{name}.safetensors")
        b = load_file(tmp_path / "eager" / "final" / f"{name}.safetensors")
        assert a.keys() == b.keys(), "exported without torch.compile's '_orig_mod.' prefix"
        assert_close(a, b, atol=1e-5)
    torch.manual_seed(0)  # as the run's seed=0 builds its networks
    G0 = build_models(load_config(["--config", "configs/toy2d.yaml"]).model)[0]
    assert not load_file(tmp_path / "compiled" / "final" / "generator.safetensors")["net.0.weight"].equal(
        G0.state_dict()["net.0.weight"]), "G trained"


# Host syncs between log steps, counted by scripts/count_syncs.py: every log, sample, evaluation and checkpoint
# falls on the last step, and a stop vote runs every 2 steps. One process reads the shards through a loader worker,
# two draw from the device-resident dataset (also with ADA adjusting p every 2 steps); per-step losses on the
# progress bar (perf.step_sync) show the count is real: 2 reads per step.
SYNC_RUN = ("train.steps=30", "log.every=30", "log.sample_every=30", "eval.every=0", "ckpt.every=30",
            "dist.stop_check_every=2", "wandb.mode=disabled")


@pytest.mark.parametrize("nproc, overrides, per_step", [
    (1, ("data.device_cache=false", "data.num_workers=1"), 0),
    (2, ("data.device_cache=true",), 0),
    (2, ("data.device_cache=true", "aug.kind=ada", "aug.p=0.3", "aug.interval=2"), 0),
    (1, ("data.device_cache=true", "perf.step_sync=true"), 2),
])
def test_no_host_sync_between_log_steps(tmp_path, shards, nproc, overrides, per_step):
    launch(tmp_path / "run", shards, nproc, *SYNC_RUN, *overrides,
           script=("scripts/count_syncs.py", "--out", str(tmp_path / "syncs.json")))
    for rank in range(nproc):
        counted = json.loads((tmp_path / f"syncs.rank{rank}.json").read_text())
        assert counted["batches"] == 30 and counted["syncs"] == 30 * per_step, counted["calls"]
