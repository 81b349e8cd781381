"""The review tools on real runs: scripts/evaluate.py gives the same metrics on 1 and 2 processes and writes the
flat JSON; scripts/sample.py writes grids, PNG folders, .npz arrays (images and 2-D points) and interpolation
strips, the same for the same seed; scripts/report.py renders a real debug run.

Run: python -m pytest tests/test_review_tools.py -q   (about a minute on 2 cores)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from runs import MNIST, REPO
ENV = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")


def run(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert (proc.returncode == 0) == ok, proc.stdout + proc.stderr
    return proc


@pytest.fixture(scope="module")
def mnist_run(tmp_path_factory, shards, classifier) -> Path:
    run_dir = tmp_path_factory.mktemp("review") / "mnist"
    run("train.py", "--config", "configs/debug.yaml", f"run.dir={run_dir}", f"data.cache_dir={shards}",
        f"data.mnist_dir={MNIST}", "train.steps=20", "eval.every=10", "wandb.mode=disabled")
    return run_dir


@pytest.fixture(scope="module")
def ring_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("review") / "ring"
    run("train.py", "--config", "configs/ring8.yaml", f"run.dir={run_dir}", "train.steps=30", "train.batch_size=64",
        "model.hidden=32", "eval.every=15", "eval.num_samples=500", "log.sample_every=15", "wandb.mode=disabled")
    return run_dir


@pytest.mark.slow
def test_evaluate_gives_the_same_metrics_on_one_and_two_processes(mnist_run, tmp_path):
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    printed = run("scripts/evaluate.py", "--run", str(mnist_run), "--checkpoint", "best", "--num", "600",
                  "--out", str(one)).stdout
    run("-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29671",
        "scripts/evaluate.py", "--run", str(mnist_run), "--checkpoint", "best", "--num", "600", "--out", str(two))
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert a.keys() == b.keys() >= {"fcd", "kid", "is", "class_kl", "class_min", "class_max", "precision", "recall",
                                    "fcd_real", "is_real", "num_samples", "checkpoint"}
    for key, value in a.items():
        assert b[key] == (pytest.approx(value, rel=1e-6, abs=1e-9) if isinstance(value, float) else value), key
    assert "fcd" in printed and "real data" in printed
    # The best checkpoint evaluated again with its own sample count gives what training logged for it.
    best = json.loads((mnist_run / "best" / "metrics.json").read_text())
    again = tmp_path / "again.json"
    run("scripts/evaluate.py", "--run", str(mnist_run), "--checkpoint", "best", "--out", str(again))
    assert json.loads(again.read_text())["fcd"] == pytest.approx(best["fcd"], rel=1e-6)


def test_evaluate_names_a_missing_checkpoint(mnist_run):
    err = run("scripts/evaluate.py", "--run", str(mnist_run), "--checkpoint", "7", ok=False).stderr
    assert err.startswith("error:") and "no complete checkpoint at step 7" in err and "step_00000020" in err


def test_sample_writes_grids_folders_arrays_and_strips(mnist_run, tmp_path):
    run("scripts/sample.py", "--run", str(mnist_run), "--num", "9", "--out", str(tmp_path / "grid.png"))
    assert np.asarray(Image.open(tmp_path / "grid.png")).shape == (3 * 30 + 2, 3 * 30 + 2, 3)
    run("scripts/sample.py", "--run", str(mnist_run), "--num", "5", "--out", str(tmp_path / "pngs"))
    assert sorted(p.name for p in (tmp_path / "pngs").iterdir()) == [f"{i:06d}.png" for i in range(5)]
    for name in ("a.npz", "b.npz"):
        run("scripts/sample.py", "--run", str(mnist_run), "--checkpoint", "10", "--num", "7", "--seed", "3",
            "--out", str(tmp_path / name))
    a = np.load(tmp_path / "a.npz")["samples"]
    assert a.shape == (7, 28, 28, 1) and a.dtype == np.uint8
    assert np.array_equal(a, np.load(tmp_path / "b.npz")["samples"]), "same seed, same samples"
    assert np.array_equal(np.asarray(Image.open(tmp_path / "pngs" / "000000.png")),
                          np.asarray(Image.open(tmp_path / "pngs" / "000000.png")))
    run("scripts/sample.py", "--run", str(mnist_run), "--num", "2", "--interpolate", "--out", str(tmp_path / "s.png"))
    assert np.asarray(Image.open(tmp_path / "s.png")).shape == (2 * 30 + 2, 10 * 30 + 2, 3)


def test_one_loader_takes_every_place_a_generator_is_kept(mnist_run, tmp_path):
    """gan_dist.load_generator on a run directory, final/, best/, a step checkpoint (G_ema and G), and what
    save_pretrained writes of it: the weights each holds; the scripts load through it."""
    from safetensors.torch import load_file

    from gan_dist import load_generator

    final, step = mnist_run / "final", mnist_run / "checkpoints" / "step_00000020"  # the last step: final's weights
    ema = {k.removeprefix("averaged.module."): v for k, v in load_file(step / "ema.safetensors").items()}
    for place in (mnist_run, final, mnist_run / "best", step):
        G = load_generator(place)
        assert G.cfg.z_dim == 32 and not G.training
        if place != mnist_run / "best":
            assert all(v.equal(ema[k]) for k, v in G.state_dict().items()), place
    G_raw = load_generator(step, ema=False)
    assert all(v.equal(load_file(step / "model.safetensors")[k]) for k, v in G_raw.state_dict().items())
    assert all(v.equal(load_file(final / "generator.safetensors")[k]) for k, v in G_raw.state_dict().items())
    load_generator(final).save_pretrained(tmp_path / "hub")
    z = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(load_generator(tmp_path / "hub")(z), load_generator(step)(z))
    # The scripts take any of them as --run; a checkpoint of a step is the one --checkpoint STEP names.
    places = (["--run", str(step)], ["--run", str(mnist_run), "--checkpoint", "20"], ["--run", str(tmp_path / "hub")])
    for i, where in enumerate(places):
        run("scripts/sample.py", *where, "--num", "4", "--out", str(tmp_path / f"{i}.npz"))
    drawn = [np.load(tmp_path / f"{i}.npz")["samples"] for i in range(len(places))]
    assert all(np.array_equal(drawn[0], d) for d in drawn[1:]), "the same weights, the same samples"
    err = run("scripts/evaluate.py", "--run", str(tmp_path / "hub"), ok=False).stderr
    assert err.startswith(f"error: {tmp_path / 'hub'} is no run directory") and err.count("\n") == 1


def test_truncation_draws_closer_latents_in_sample_and_evaluate(mnist_run, tmp_path):
    """--truncation PSI: sample.py's images move toward G's typical one as PSI shrinks, and evaluate.py records it."""
    for psi in ("0.2", "1", None):
        run("scripts/sample.py", "--run", str(mnist_run), "--num", "64", "--out", str(tmp_path / f"{psi}.npz"),
            *(["--truncation", psi] if psi else []))
    spread = {psi: np.load(tmp_path / f"{psi}.npz")["samples"].astype(float).std(0).mean()
              for psi in ("0.2", "1", None)}
    assert spread["0.2"] < spread["1"] < spread[None], spread
    err = run("scripts/sample.py", "--run", str(mnist_run), "--num", "4", "--truncation", "0", "--out",
              str(tmp_path / "x.npz"), ok=False).stderr
    assert err == "error: truncation 0.0 must be a positive number of standard deviations (e.g. 0.7)\n"
    run("scripts/evaluate.py", "--run", str(mnist_run), "--num", "300", "--truncation", "0.5", "--out",
        str(tmp_path / "t.json"))
    scores = json.loads((tmp_path / "t.json").read_text())
    assert scores["truncation"] == 0.5 and 0 <= scores["precision"] <= 1 and scores["num_samples"] == 300


def test_sample_writes_2d_points_as_float32(ring_run, tmp_path):
    run("scripts/sample.py", "--run", str(ring_run), "--num", "100", "--out", str(tmp_path / "p.npz"))
    points = np.load(tmp_path / "p.npz")["samples"]
    assert points.shape == (100, 2) and points.dtype == np.float32
    err = run("scripts/sample.py", "--run", str(ring_run), "--num", "4", "--out", str(tmp_path / "dir"), ok=False)
    assert "2-D samples are points" in err.stderr
    rows = [json.loads(x) for x in (ring_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/step"] for r in rows if "eval/modes" in r] == [15, 30]
    assert json.loads((ring_run / "best" / "metrics.json").read_text()).keys() >= {"modes", "hq", "reverse_kl"}


def test_html_report_of_a_real_run(mnist_run, tmp_path):
    out = tmp_path / "report.html"
    run("scripts/report.py", str(mnist_run), "--out", str(out))
    html = out.read_text()
    assert html.count("data:image/png;base64") == 2 and "step 20" in html  # G_ema and G grids (sample_every 20)
    for key in ("train/loss_d", "eval/fcd", "eval/precision", "perf/img_per_sec"):
        assert key in html, key
    assert "http://" not in html and "https://" not in html
