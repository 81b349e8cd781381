"""Settings both the launcher and the config carry: `accelerate launch --mixed_precision` / `--dynamo_backend` (or
`accelerate config`) apply unless the config says otherwise, and the startup line says which applied; a CPU process
left with one thread on a bigger machine is warned about."""

from __future__ import annotations

import os

import pytest
import torch
from runs import launch, weights

from gan_dist.config import PerfConfig, TrainConfig, load_config, resolve_launch
from gan_dist.errors import UserError
from gan_dist.distributed import thread_warning

LAUNCHED_BF16 = {"ACCELERATE_MIXED_PRECISION": "bf16", "ACCELERATE_DYNAMO_BACKEND": "NO"}


def test_auto_takes_the_launchers_precision_and_an_explicit_key_overrides_it():
    launch_ = resolve_launch(TrainConfig(), PerfConfig(), LAUNCHED_BF16)
    assert (launch_.precision, launch_.precision_from) == ("bf16", "accelerate launch --mixed_precision or "
                                                           "accelerate config")
    launch_ = resolve_launch(TrainConfig(mixed_precision="no"), PerfConfig(), LAUNCHED_BF16)
    assert (launch_.precision, launch_.precision_from) == ("no", "train.mixed_precision")
    assert resolve_launch(TrainConfig(), PerfConfig(), {}).precision == "no"  # python train.py: fp32


def test_no_is_a_precision_not_a_boolean(tmp_path):
    assert load_config(["train.mixed_precision=no"]).train.mixed_precision == "no"  # YAML reads a bare no as false
    (tmp_path / "c.yaml").write_text("train: {mixed_precision: no}\n")
    assert load_config(["--config", str(tmp_path / "c.yaml")]).train.mixed_precision == "no"


def test_a_launcher_precision_gan_dist_cannot_train_is_one_error():
    with pytest.raises(UserError, match="mixed precision 'fp8'.*--mixed_precision no, bf16 or fp16"):
        resolve_launch(TrainConfig(), PerfConfig(), {"ACCELERATE_MIXED_PRECISION": "fp8"})


def test_the_launchers_dynamo_backend_compiles_unless_perf_compile_says_otherwise(monkeypatch):
    env = {"ACCELERATE_DYNAMO_BACKEND": "INDUCTOR", "ACCELERATE_DYNAMO_MODE": "max-autotune"}
    launched = resolve_launch(TrainConfig(), PerfConfig(), env)
    assert (launched.compile, launched.compile_backend, launched.compile_mode) == (True, "INDUCTOR", "max-autotune")
    assert not resolve_launch(TrainConfig(), PerfConfig(compile=False), env).compile
    assert resolve_launch(TrainConfig(), PerfConfig(compile=True), {}).compile
    # The launcher's compile meets the same checks as perf.compile=true: no double backward through it.
    monkeypatch.setitem(os.environ, "ACCELERATE_DYNAMO_BACKEND", "INDUCTOR")
    with pytest.raises(UserError, match=r"compiling \(accelerate launch --dynamo_backend.*perf.compile=false"):
        load_config(["loss.r1_gamma=1"])
    assert load_config(["loss.r1_gamma=1", "perf.compile=false"]).loss.r1_gamma == 1


def test_one_cpu_thread_on_a_bigger_machine_is_warned_about(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        warning = thread_warning(torch.device("cpu"), 2)
        assert "1 CPU thread" in warning and "--num_cpu_threads_per_process 8" in warning
        assert thread_warning(torch.device("cuda"), 2) is None  # a GPU run's threads only feed the GPU
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
        assert thread_warning(torch.device("cpu"), 16) is None  # one core each is all there is
        torch.set_num_threads(4)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        assert thread_warning(torch.device("cpu"), 2) is None
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_accelerate_launch_mixed_precision_bf16_trains_bf16(tmp_path, shards):
    short = ("train.steps=4", "eval.every=0", "wandb.mode=disabled", "log.every=2", "log.sample_every=4")
    out = launch(tmp_path / "launcher", shards, 1, *short, precision="bf16")
    assert "precision bf16 (from accelerate launch --mixed_precision or accelerate config)" in out
    out = launch(tmp_path / "override", shards, 1, *short, "train.mixed_precision=no", precision="bf16")
    assert "precision no (from train.mixed_precision)" in out
    # Both ran from the same seed and data: only the precision differs, and it shows in every network.
    bf16, fp32 = weights(tmp_path / "launcher"), weights(tmp_path / "override")
    for name in bf16:
        assert any(not bf16[name][k].equal(fp32[name][k]) for k in bf16[name]), name
