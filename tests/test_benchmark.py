"""scripts/benchmark.py on the debug config with 1 and 2 processes and one switch: the JSON's ratio and scaling follow
from its own timings, the table prints every run, and a bad switch name fails in one line.

Run: python -m pytest tests/test_benchmark.py -q   (about 40 s on 2 cores)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def benchmark(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/benchmark.py", "--config", "configs/debug.yaml", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=400)


@pytest.mark.slow
def test_ratio_scaling_and_switch_follow_from_the_timings(tmp_path, shards):
    out = tmp_path / "bench.json"
    proc = benchmark("--batch", "16", "--steps", "3", "--warmup", "1", "--processes", "1,2", "--switches",
                     "ema_every_4", "--out", str(out), f"data.cache_dir={shards}")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    one, two = result["runs"]["1"], result["runs"]["2"]
    for run, processes in ((one, 1), (two, 2)):
        bare, trainer = run["bare"], run["trainer"]
        # With 1 process the bare loop ran before and after the trainer; the ratio is over their mean time.
        assert len(bare["runs"]) == 3 - processes and bare["seconds"] == pytest.approx(
            sum(r["seconds"] for r in bare["runs"]) / len(bare["runs"]))
        assert run["ratio"] == pytest.approx(trainer["seconds"] / bare["seconds"])
        # Each timed phase lies inside its launch's wall time.
        assert 0 < trainer["seconds"] + sum(r["seconds"] for r in bare["runs"]) < run["launch_s"]
        assert 0 <= trainer["data_wait_frac"] <= 1 and trainer["peak_mb"] > 0 and bare["peak_mb"] > 0
    assert two["trainer"]["efficiency"] == pytest.approx(
        two["trainer"]["img_per_sec"] / (2 * one["trainer"]["img_per_sec"]))
    assert two["bare"]["efficiency"] == pytest.approx(two["bare"]["img_per_sec"] / (2 * one["bare"]["img_per_sec"]))
    switch = result["switches"]["ema_every_4"]
    assert switch["overrides"] == ["perf.ema_every=4"] and switch["processes"] == 1
    assert switch["speedup"] == pytest.approx(switch["trainer"]["img_per_sec"] / one["trainer"]["img_per_sec"])
    for row in ("| bare loop | 1 | 16 |", "| trainer | 1 | 16 |", "| bare loop | 2 | 32 |", "| trainer | 2 | 32 |",
                "| ema_every_4 | `perf.ema_every=4` | 1 |"):
        assert row in proc.stdout, row


def test_unknown_switch_fails_in_one_line():
    proc = benchmark("--switches", "turbo")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "unknown switch turbo; choose from step_sync," in proc.stderr


@pytest.mark.parametrize("setting", ["loss.r1_gamma=1", "model.cond=true"])
def test_what_the_bare_loop_does_not_do_is_refused_before_any_launch(setting):
    proc = benchmark(setting)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "the bare loop has plain unconditional D and G steps" in proc.stderr
