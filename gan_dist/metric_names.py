"""The one list of evaluation metrics: for each, its key (logged as `eval/<key>`, saved as `<key>` in
`best/` and `final/metrics.json`), a human label, whether lower is better, the data kinds it is computed for, and
its real-data floor (`<key>_real`: the metric of held-out real data, scored like a generator).

The evaluator (which metrics a run gets, which may pick `best/`), W&B run summaries (`tracking.py`), the HTML report
(`scripts/report.py`) and the W&B report (`scripts/wandb_report.py`) all read it, so they cannot disagree: a metric
`metrics.py` starts computing needs one entry here to be accepted as eval.best_metric, summarised in W&B and shown
in both reports. A metric of several kinds (modes) is shown with each. A conditional G's per-class FCDs
(`fcd_class<k>`, with floors) ride along unlisted: `fcd_class_mean` and `fcd_class_max` stand for them.

Plain Python, no torch: the report scripts import it on machines without the training stack.
"""

from __future__ import annotations

from dataclasses import dataclass

# data kind -> its name in reports
KINDS = {"mnist": "MNIST", "stacked": "Stacked MNIST", "webdataset": "RGB images", "points": "2-D mixtures"}


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    lower_is_better: bool
    kinds: tuple[str, ...]
    has_floor: bool = False
    conditional: bool = False  # computed only for a class-conditional G (samples drawn with labels)
    self_cond: bool = False  # computed only for a self-conditioned G (its clusters)
    plot: str = ""  # a plot title shared with metrics on the same scale; empty: a plot of its own, titled `label`

    @property
    def floor(self) -> str | None:
        return f"{self.key}_real" if self.has_floor else None


METRICS = (  # in the order reports show them
    Metric("fcd", "FCD", True, ("mnist",), has_floor=True),
    Metric("fid", "FID (Inception)", True, ("webdataset",)),
    Metric("kid", "KID", True, ("mnist",), has_floor=True),
    Metric("is", "Inception score", False, ("mnist",), has_floor=True),
    Metric("precision", "Precision", False, ("mnist",), has_floor=True, plot="Precision / recall"),
    Metric("recall", "Recall", False, ("mnist",), has_floor=True, plot="Precision / recall"),
    Metric("class_kl", "Class KL to uniform", True, ("mnist",), has_floor=True),
    Metric("class_min", "Smallest class share", False, ("mnist",), has_floor=True, plot="Class shares"),
    Metric("class_max", "Largest class share", True, ("mnist",), has_floor=True, plot="Class shares"),
    Metric("class_acc", "Class accuracy", False, ("mnist",), has_floor=True, conditional=True),
    Metric("fcd_class_mean", "Per-class FCD, mean", True, ("mnist",), has_floor=True, conditional=True,
           plot="Per-class FCD"),
    Metric("fcd_class_max", "Per-class FCD, worst class", True, ("mnist",), has_floor=True, conditional=True,
           plot="Per-class FCD"),
    Metric("modes", "Modes covered", False, ("points", "stacked")),
    Metric("kl", "Mode KL to uniform", True, ("stacked",), has_floor=True),
    Metric("hq", "High-quality samples %", False, ("points",)),
    Metric("reverse_kl", "Reverse KL", True, ("points",)),
    Metric("clusters", "Clusters in use", False, tuple(KINDS), self_cond=True),
    Metric("cluster_max", "Largest cluster share", True, tuple(KINDS), self_cond=True),
)
BY_KEY = {m.key: m for m in METRICS}


def data_kind(dataset: str) -> str:
    """The data kind of `data.dataset`: every dataset other than the image ones is a 2-D mixture."""
    return {"mnist": "mnist", "stacked_mnist": "stacked", "webdataset": "webdataset"}.get(dataset, "points")


def of(kind: str, conditional: bool = False, self_cond: bool = False) -> list[Metric]:
    """The metrics evaluation computes for data of `kind` (with a conditional G's class metrics if `conditional`,
    a self-conditioned G's cluster metrics if `self_cond`)."""
    return [m for m in METRICS if kind in m.kinds and (conditional or not m.conditional) and
            (self_cond or not m.self_cond)]
