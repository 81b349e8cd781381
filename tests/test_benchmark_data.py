"""scripts/benchmark_data.py on the debug config: it reports loader rates per worker count, what the model
consumes, and the data wait of a real run, as a table and as JSON.

Run: python -m pytest tests/test_benchmark_data.py -q   (about 20 s on 2 cores)
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from runs import MNIST, REPO


@pytest.mark.slow
def test_benchmark_reports_loader_trainer_and_data_wait(tmp_path, shards):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "scripts/benchmark_data.py", "--config", "configs/debug.yaml", f"data.cache_dir={shards}",
         f"data.mnist_dir={MNIST}", "--workers", "0,2", "--batches", "10", "--train-steps", "2", "--steps", "6",
         "--log-every", "2", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert [r["workers"] for r in result["loaders"]] == [0, 2]
    assert all(r["img_per_sec"] > 0 and r["first_batch_s"] > 0 for r in result["loaders"])
    assert result["trainer_img_per_sec"] > 0 and result["batch"] == 32
    run = result["run"]
    assert run["workers"] == 2 and run["steps"] == 6
    assert 0 <= run["wait_frac_steady"] <= run["wait_frac_max_steady"] <= 1 and 0 <= run["wait_frac_run"] <= 1
    for row in ("trainer consumes", "loader, 0 workers", "loader, 2 workers", "data wait"):
        assert row in proc.stdout, row
