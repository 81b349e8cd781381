"""Stacked MNIST (`data.dataset=stacked_mnist`, `gan_dist/stacked.py`): its images are the table's MNIST digits as
R, G, B with the mode as label, the stream is the same global sequence on any world size, and the evaluation scores
real digit triples near the published floor (1,000 modes, KL about 0.025 on 26,000) and a sampler of one triple at
one mode and log 1000.

Run: python -m pytest tests/test_stacked.py -q   (about 40 s; the metric test is slow)
"""

from __future__ import annotations

import math

import pytest
import torch

from gan_dist import mnist, stacked
from gan_dist.config import DataConfig, EvalConfig, PerfConfig
from gan_dist.data import DataState, open_batches
from gan_dist.evaluation import Evaluator, stacked_floor
from runs import MNIST, worker_cores

DATA = DataConfig(dataset="stacked_mnist", channels=3, mnist_dir=str(MNIST))


def stream(rank: int, world: int, steps: int, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    batches = open_batches(DATA, PerfConfig(), batch=batch, seed=4, rank=rank, world=world,
                           device=torch.device("cpu"), saved=DataState.fresh(), nimg=0, first=lambda fn: fn(),
                           say=lambda _: None)
    return [next(batches) for _ in range(steps)]


def test_images_are_three_training_digits_labelled_by_their_mode():
    digits, labels = mnist.load_mnist(MNIST)["train"]
    labels = labels.astype(int)
    table = stacked.triples(len(digits))
    images, modes = stacked.stacked(digits, labels, None)
    assert len(images) == stacked.TRIPLES and len(set(modes[:100_000].tolist())) == 1000
    rows = torch.tensor([0, 17, 999_999])
    picked = images[rows]
    assert picked.shape == (3, 3, 28, 28) and picked.dtype == torch.uint8
    for i, row in enumerate(rows.tolist()):
        for channel in range(3):
            assert torch.equal(picked[i, channel], torch.from_numpy(digits[table[row, channel]]))
        assert modes[row] == 100 * labels[table[row, 0]] + 10 * labels[table[row, 1]] + labels[table[row, 2]]


def test_the_stream_is_the_same_on_any_world_size():
    one = stream(0, 1, 3, 16)
    two = [stream(rank, 2, 3, 8) for rank in range(2)]
    for step in range(3):
        images = torch.cat([two[0][step][0], two[1][step][0]])
        assert images.shape == (16, 3, 28, 28) and images.min() >= -1 and images.max() <= 1
        assert torch.equal(images, one[step][0])
        assert torch.equal(torch.cat([two[0][step][1], two[1][step][1]]), one[step][1])


class OneTriple(torch.nn.Module):
    """A collapsed G: every sample is the same digit triple."""

    def __init__(self, image: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("image", image)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.image.expand(len(z), -1, -1, -1)


@pytest.mark.slow
def test_the_mode_metrics_score_real_triples_near_the_floor_and_one_triple_at_one_mode(classifier):
    evaluator = Evaluator(EvalConfig(every=1, num_samples=500, classifier=str(classifier)), DATA, 8, seed=0)
    image = stream(0, 1, 1, 1)[0][0][0]
    scores = evaluator(OneTriple(image), 0, 1, lambda x: x, torch.device("cpu"))
    assert scores["modes"] == 1 and math.isclose(scores["kl"], math.log(1000))
    # Real digit triples (26,000 of the table, read by the same classifier): every mode, and the KL that a finite
    # uniform sample shows, (1000 - 1) / (2 x 26,000) = 0.019, plus the classifier's few misreadings.
    with worker_cores():  # 78,000 classifier passes
        real = stacked_floor(evaluator.net, str(MNIST), 26_000, 1000, torch.device("cpu"))
    assert real["modes"] == 1000 and 0.015 < real["kl"] < 0.035
    assert scores["modes_real"] < 500 and scores["kl_real"] > 0.3  # the floor of 500 samples, as the run's
