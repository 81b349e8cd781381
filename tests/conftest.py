"""Shared pytest setup: one intra-op thread, so test results and timings do not depend on OMP_NUM_THREADS or on
the number of cores of the machine running them; and MNIST shards written once for every end-to-end test."""

from pathlib import Path

import pytest
import torch

from gan_dist import mnist

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "mnist-shards"
    mnist.write_shards(MNIST, out)
    return out
