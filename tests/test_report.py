"""Tests for scripts/report.py: the offline HTML report of fake run directories (no training, no torch, < 1 s), its
evaluation plots and summary rows in the order and under the labels of gan_dist/metric_names.py.

    . .venv/bin/activate && python -m pytest tests/test_report.py -q
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gan_dist.metric_names import METRICS

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "report.py"
_spec = importlib.util.spec_from_file_location("report", SCRIPT)
report = sys.modules["report"] = importlib.util.module_from_spec(_spec)  # dataclasses look their module up
_spec.loader.exec_module(report)


def make_run(root: Path, name: str, steps: int = 200, every: int = 10, eval_every: int = 50,
             grids: tuple[int, ...] = (0, 100, 200), with_g: bool = True, with_eval: bool = True) -> Path:
    run = root / name
    (run / "samples").mkdir(parents=True)
    (run / "config.yaml").write_text(f"model:\n  arch: dcgan\n  z_dim: 100\ndata:\n  dataset: mnist\n  resolution: 28\n"
                                     f"  channels: 1\ntrain:\n  steps: {steps}\n  batch_size: 64\n"
                                     f"wandb:\n  name: {name}-wb\n")
    rows = []
    for s in range(every, steps + 1, every):
        rows.append({"train/step": s, "train/kimg": s * 64 / 1000, "train/loss_d": 1.2 - s / 1000,
                     "train/loss_g": 0.8 + s / 1000, "train/d_real": 0.6, "train/d_fake": 0.4,
                     "perf/img_per_sec": 5000.0 + s, "data/epoch": 0})
        if with_eval and s % eval_every == 0:
            rows.append({"train/step": s, "train/kimg": s * 64 / 1000, "eval/fcd": 100.0 / s, "eval/fcd_real": 0.5,
                         "eval/is": 1 + s / 100})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"train/step": 2')  # torn line
    rng = np.random.default_rng(0)
    for s in grids:
        for kind in ("ema", "G") if with_g else ("ema",):
            Image.fromarray(rng.integers(0, 255, (56, 56), dtype=np.uint8)).save(
                run / "samples" / f"samples_{kind}_{s:08d}.png")
    if with_eval:
        (run / "final").mkdir()
        (run / "final" / "metrics.json").write_text(json.dumps({"eval/fcd": 0.61, "eval/is": 3.0}))
        (run / "best").mkdir()
        (run / "best" / "metrics.json").write_text(json.dumps({"step": 150, "eval/fcd": 0.5432}))
    return run


def plots(page: str) -> dict[str, str]:
    return dict(re.findall(r'<svg class="plot" data-metric="([^"]+)"(.*?)</svg>', page, re.DOTALL))


@pytest.fixture()
def page(tmp_path) -> str:
    a = make_run(tmp_path, "run_a", grids=tuple(range(0, 2001, 100)))  # 21 grids: only 12 are shown
    b = make_run(tmp_path, "run_b", steps=100, grids=(), with_eval=False)
    assert report.main([str(a), str(b)]) == 0
    return (a / "report.html").read_text()


def test_plots_one_line_per_run_and_floor(page):
    svgs = plots(page)
    for key in ("train/loss_d", "train/loss_g", "train/d_real", "train/d_fake", "perf/img_per_sec"):
        assert svgs[key].count("<polyline") == 2, key  # both runs overlaid
    for key in ("eval/fcd", "eval/is"):
        assert svgs[key].count("<polyline") == 1, key  # run_b logged no eval
    assert "eval/fcd_real" not in svgs  # drawn inside eval/fcd's plot instead
    assert svgs["eval/fcd"].count('class="floor"') == 1 and "floor (real data)" in svgs["eval/fcd"]
    assert 'class="floor"' not in svgs["eval/is"]
    assert "data/epoch" in svgs  # unknown keys are plotted too (in the folded section)


def test_samples_embedded_evenly(page):
    # run_a: 12 of its 21 steps, ema and G at each; run_b has none and says so
    assert page.count("data:image/png;base64,") == 24
    assert "step 0<" in page and "step 2000<" in page and "12 of 21 grids" in page
    assert "no sample grids logged" in page
    assert report.pick_evenly(list(range(21)), 12)[::11] == [0, 20]


def test_summary_and_offline(page):
    summary = page.split('<table class="summary">')[1].split("</table>")[0]
    assert "run_a" in summary and "run_b" in summary and "run_a-wb" in summary
    assert re.search(r"best step</th><td>150</td>", summary)
    assert re.search(r"best eval/fcd</th><td>0.5432</td>", summary)
    assert re.search(r"steps \(done / planned\)</th><td>200 / 200</td><td>100 / 100</td>", summary)
    assert "dcgan" in summary and "mnist 28px" in summary
    assert "http://" not in page and "https://" not in page
    assert page.count("<details><summary>run_") == 2 and "arch: dcgan" in page


def test_every_listed_metric_in_the_lists_order_and_words(tmp_path):
    """A run logging every listed metric (here in reverse) and one the list does not know (a per-class FCD): a plot
    for each listed one, in the list's order, titled with its label and direction, its floor drawn inside where it
    has one; the unknown one after them; the summary's final rows in the same order."""
    run = make_run(tmp_path, "all", grids=(), with_eval=False)
    scores = {m.key: 2.0 + i for i, m in enumerate(reversed(METRICS))} | {m.floor: 1.0 for m in METRICS if m.floor}
    scores["fcd_class3"] = 5.0
    (run / "metrics.jsonl").write_text("".join(json.dumps({"train/step": s, "train/kimg": s / 10} | {
        f"eval/{k}": v for k, v in scores.items()}) + "\n" for s in (10, 20)))
    (run / "final").mkdir()
    (run / "final" / "metrics.json").write_text(json.dumps(scores))
    assert report.main([str(run)]) == 0
    page = (run / "report.html").read_text()
    svgs = plots(page)
    assert [k for k in svgs if k.startswith("eval/")] == [f"eval/{m.key}" for m in METRICS] + ["eval/fcd_class3"]
    for m in METRICS:
        svg = svgs[f"eval/{m.key}"]
        assert f'class="title">{m.label} {"↓" if m.lower_is_better else "↑"}</text>' in svg, m.key
        assert svg.count('class="floor"') == (m.floor is not None), m.key
    assert 'class="title">eval/fcd_class3</text>' in svgs["eval/fcd_class3"]
    summary = page.split('<table class="summary">')[1].split("</table>")[0]
    assert re.findall(r"<th>final ([^<]+)</th>", summary) == [m.key for m in METRICS] + ["fcd_class3"]
    assert re.search(r"final fcd</th><td>[\d.]+ \(real data 1\)</td>", summary)


def test_run_without_samples_or_eval(tmp_path):
    run = make_run(tmp_path, "bare", grids=(), with_eval=False)
    out = tmp_path / "sub" / "r.html"
    assert report.main([str(run), "--out", str(out)]) == 0
    page = out.read_text()
    assert "no eval/* metrics logged" in page and "no sample grids logged" in page
    assert "no final/metrics.json" in page and "data:image" not in page


def test_not_a_run_dir(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "nope")], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {tmp_path / 'nope'}: not a run directory (no metrics.jsonl)"


def test_nice_ticks():
    assert report.nice_ticks(0.13, 0.97) == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert report.nice_ticks(3.0, 3.0)[0] < 3.0 < report.nice_ticks(3.0, 3.0)[-1]  # flat series still gets a range
    assert report.fmt_tick(12000.0, 2000.0) == "12k" and report.fmt_tick(0.25, 0.25) == "0.25"
