"""Mistakes a user can make stop the run with one clear message, a non-zero exit, and nothing already written lost:
missing or corrupt MNIST, a batch that does not split over the processes, a `ckpt.resume` that points at nothing,
and a fresh start over existing checkpoints.

Run: python -m pytest tests/test_bad_input.py -q
"""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runs import MNIST, digest

REPO = Path(__file__).resolve().parents[1]


def train(*overrides: str, nproc: int = 1) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "train.py"]
    if nproc > 1:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", "29655", "train.py"]
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    return subprocess.run([*cmd, "--config", "configs/debug.yaml", "wandb.mode=disabled", f"data.mnist_dir={MNIST}",
                           *overrides], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, shards) -> tuple[Path, Path]:
    """A completed short run whose files the failing commands below must leave alone."""
    run_dir = tmp_path_factory.mktemp("run")
    proc = train(f"run.dir={run_dir}", f"data.cache_dir={shards}", "train.steps=10")
    assert proc.returncode == 0, proc.stderr
    return run_dir, shards


def assert_clean_failure(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    assert "Traceback" not in proc.stderr, proc.stderr


def test_missing_mnist_names_the_folder_and_the_fix(tmp_path, finished_run):
    run_dir, _ = finished_run
    before = digest(run_dir)
    proc = train(f"run.dir={run_dir}", f"data.mnist_dir={tmp_path / 'nowhere'}", "data.download=false",
                 f"data.cache_dir={tmp_path / 'shards'}", "train.steps=20")
    assert_clean_failure(proc, str(tmp_path / "nowhere"), "data.mnist_dir")
    assert digest(run_dir) == before


def test_missing_mnist_stops_both_ranks_without_a_hang(tmp_path):
    proc = train(f"run.dir={tmp_path / 'run'}", f"data.mnist_dir={tmp_path / 'nowhere'}", "data.download=false",
                 f"data.cache_dir={tmp_path / 'shards'}", nproc=2)
    assert proc.returncode != 0
    assert "error:" in proc.stderr and str(tmp_path / "nowhere") in proc.stderr
    assert not (tmp_path / "run").exists()


def test_corrupt_idx_names_the_file(tmp_path):
    src = tmp_path / "mnist"
    src.mkdir()
    for f in MNIST.glob("*.gz"):
        (src / f.name).write_bytes(f.read_bytes())
    images = gzip.decompress((src / "train-images-idx3-ubyte.gz").read_bytes())
    images = images[: len(images) // 2]  # truncated; bad magic and the other cases are in test_mnist.py
    (src / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(images))
    proc = train(f"run.dir={tmp_path / 'run'}", f"data.mnist_dir={src}", f"data.cache_dir={tmp_path / 'shards'}")
    assert_clean_failure(proc, "train-images-idx3-ubyte")
    assert not (tmp_path / "shards").exists() and not (tmp_path / "run").exists()


def test_batch_that_does_not_split_over_processes(tmp_path, finished_run):
    _, shards = finished_run
    proc = train(f"run.dir={tmp_path / 'run'}", f"data.cache_dir={shards}", "train.batch_size=33", nproc=2)
    assert proc.returncode != 0
    assert "error: train.batch_size=33 does not split evenly over 2 processes" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_resume_path_that_is_not_a_checkpoint(tmp_path, finished_run):
    run_dir, shards = finished_run
    before = digest(run_dir)
    proc = train(f"run.dir={run_dir}", f"data.cache_dir={shards}", f"ckpt.resume={tmp_path / 'nothing'}",
                 "train.steps=20")
    assert_clean_failure(proc, "ckpt.resume", str(tmp_path / "nothing"))
    assert digest(run_dir) == before


def test_fresh_start_over_existing_checkpoints_is_refused(finished_run):
    run_dir, shards = finished_run
    before = digest(run_dir)
    proc = train(f"run.dir={run_dir}", f"data.cache_dir={shards}", "ckpt.resume=none", "train.steps=20")
    assert_clean_failure(proc, str(run_dir), "ckpt.resume=auto")
    assert digest(run_dir) == before


def test_wandb_online_without_api_key_falls_back_to_offline(tmp_path, shards):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env |= {"OMP_NUM_THREADS": "1", "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"), "NETRC": str(tmp_path / "n")}
    proc = subprocess.run([sys.executable, "train.py", "--config", "configs/debug.yaml", "wandb.mode=online",
                           f"data.mnist_dir={MNIST}",
                           f"run.dir={tmp_path / 'run'}", f"data.cache_dir={shards}", "train.steps=10"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    assert "logging offline" in proc.stderr and "wandb sync" in proc.stderr
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert (tmp_path / "run" / "final" / "generator_ema.safetensors").exists()


@pytest.fixture(autouse=True, scope="module")
def _runs_find_the_classifier(classifier):
    """The debug config evaluates with the MNIST classifier; it is trained once per session, not by each run."""
