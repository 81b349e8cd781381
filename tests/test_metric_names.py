"""gan_dist/metric_names.py is the one list of evaluation metrics: the evaluator returns exactly the listed metrics
of a run's kind of data (each beside its floor where it has one), accepts exactly those as eval.best_metric, and
W&B run summaries keep each listed metric's best value in its direction. (The HTML and W&B reports are checked
against the list in test_report.py and test_wandb_report.py.) About 2 s.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

from gan_dist import metric_names
from conftest import MNIST
from gan_dist.config import DataConfig, EvalConfig, WandbConfig
from gan_dist.errors import UserError
from gan_dist.evaluation import Evaluator
from gan_dist.metric_names import METRICS, of
from gan_dist.tracking import _init_wandb



class Stub(torch.nn.Module):
    """A G of the right output shape: z (and, when conditional, labels) -> images or points in [-1, 1]."""

    def __init__(self, z_dim: int, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape = shape
        self.net = torch.nn.Linear(z_dim, int(torch.tensor(shape).prod()))

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return torch.tanh(self.net(z)).view(len(z), *self.shape)


def evaluate(data: DataConfig, shape: tuple[int, ...], classes: int = 0) -> dict[str, float]:
    evaluator = Evaluator(EvalConfig(every=1, num_samples=200, batch=100), data, 8, seed=0, classes=classes)
    return evaluator(Stub(8, shape), 0, 1, lambda x: x, torch.device("cpu"))


def listed(kind: str, conditional: bool = False) -> set[str]:
    return {key for m in of(kind, conditional) for key in (m.key, m.floor) if key}


def test_keys_are_unique_and_every_kind_has_metrics():
    assert len({m.key for m in METRICS}) == len(METRICS)
    assert all(of(kind) for kind in metric_names.KINDS)
    assert {kind for m in METRICS for kind in m.kinds} == set(metric_names.KINDS)


def test_a_2d_run_returns_the_listed_metrics():
    scores = evaluate(DataConfig(dataset="ring8"), (2,))
    assert set(scores) == listed("points") == {"modes", "hq", "reverse_kl"}


def test_an_mnist_run_returns_the_listed_metrics_and_their_floors(classifier):
    data = DataConfig(mnist_dir=str(MNIST))
    assert set(evaluate(data, (1, 28, 28))) == listed("mnist")
    # A conditional G adds the class metrics; the per-class FCDs they stand for ride along unlisted.
    per_class = {f"fcd_class{k}{real}" for k in range(10) for real in ("", "_real")}
    assert set(evaluate(data, (1, 28, 28), classes=10)) == listed("mnist", conditional=True) | per_class
    assert listed("mnist", conditional=True) > listed("mnist") >= {"fcd", "fcd_real", "precision", "recall"}


@pytest.mark.parametrize("dataset, cond, name, ok", [
    ("mnist", False, "kid", True), ("mnist", False, "class_acc", False), ("mnist", True, "class_acc", True),
    ("ring8", False, "reverse_kl", True), ("ring8", False, "fcd", False), ("webdataset", False, "fid", True)])
def test_best_metric_must_be_a_listed_metric_of_the_run(dataset, cond, name, ok):
    def make():
        return Evaluator(EvalConfig(every=0, best_metric=name), DataConfig(dataset=dataset), 8, 0, 10 * cond)

    if ok:
        make()
    else:
        with pytest.raises(UserError, match=f"eval.best_metric={name} is not computed"):
            make()


def test_wandb_summaries_keep_each_listed_metric_at_its_best(monkeypatch, tmp_path):
    summaries = {}

    class Run:
        settings = types.SimpleNamespace(mode="offline")

        def define_metric(self, name, step_metric=None, summary=None):
            summaries[name] = summary

    fake = types.SimpleNamespace(init=lambda **kwargs: Run(), Settings=lambda **kwargs: None)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    _init_wandb(WandbConfig(mode="offline"), tmp_path, "id", {})
    evals = {name: summary for name, summary in summaries.items() if name.startswith("eval/")}
    assert evals == {f"eval/{m.key}": "min" if m.lower_is_better else "max" for m in METRICS}
    assert evals["eval/fid"] == evals["eval/reverse_kl"] == "min" and evals["eval/class_acc"] == "max"
