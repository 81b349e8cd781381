"""Shared pytest setup: one intra-op thread, so test results and timings do not depend on OMP_NUM_THREADS or on
the number of cores of the machine running them (the suite runs on two workers: pyproject.toml's addopts); MNIST
where `runs.MNIST` says (downloaded if missing), its shards written once per worker for every end-to-end test; and
the evaluation classifier (with its cached real-data statistics) trained once where the runs look for it."""

import fcntl
from pathlib import Path

import pytest
import torch

from runs import MNIST, worker_cores

from gan_dist import mnist, mnist_shards

torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def mnist_files() -> Path:
    """MNIST where the tests read it (`runs.MNIST`), downloaded there first when it is missing."""
    if not mnist.files_present(MNIST):
        mnist.download_mnist(MNIST)
    return MNIST


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "mnist-shards"
    mnist_shards.write_shards(MNIST, out)
    return out


@pytest.fixture(scope="session")
def classifier() -> Path:
    """The MNIST classifier at the default `eval.classifier` path of runs started in the repo root (a cache:
    trained here only when absent), with its reference statistics, so no run under test trains it."""
    from gan_dist.classifier import DEFAULT_PATH
    from gan_dist.config import DataConfig, EvalConfig
    from gan_dist.evaluation import Evaluator

    path = Path(__file__).resolve().parents[1] / DEFAULT_PATH
    path.parent.mkdir(parents=True, exist_ok=True)
    # One worker trains it (a fresh clone, CI); the other waits on the lock, then loads it.
    with open(path.parent / ".train.lock", "w") as lock, worker_cores():
        fcntl.flock(lock, fcntl.LOCK_EX)
        Evaluator(EvalConfig(every=1, classifier=str(path)), DataConfig(mnist_dir=str(MNIST)), z_dim=8, seed=0)
    return path


@pytest.fixture(scope="session")
def conditional_run(tmp_path_factory, shards, classifier) -> Path:
    """One short class-conditional MNIST run with R3GAN's loss, R1 + R2, a BatchNorm-free D and top-k G updates,
    evaluated at its end (shared by the tests of the conditional path and of rejection sampling)."""
    from runs import launch

    run = tmp_path_factory.mktemp("conditional")
    launch(run, shards, 1, *CONDITIONAL)
    return run


CONDITIONAL = ("model.cond=true", "loss.kind=rpgan", "loss.label_noise=0", "loss.r1_gamma=1", "loss.r2_gamma=1",
               "loss.r1_every=2", "model.d_norm=none", "model.dropout=0", "loss.topk_gamma=0.5", "loss.topk_min=0.5",
               "optim.beta1=0", "optim.beta2=0.99", "optim.schedule=cosine", "optim.lr_end=0.1",
               "optim.schedule_kimg=1", "loss.gamma_end=0.1", "wandb.mode=disabled")
