"""End-to-end runs of the real `accelerate launch train.py` on CPU (gloo): outputs, W&B offline logs, SIGTERM and
bit-exact resume with 2 processes and 2 loader workers each, with every speed switch that must not change a bit
(kill -9 at random moments is tests/test_faults.py's chaos test); RGB shards written by scripts/make_shards.py from a
folder of PNG and JPEG files, trained at 32x32 with the speed switches that change the arithmetic, also with a
truncated shard.

Run: python -m pytest tests/test_train.py -q   (about 2 minutes on 2 cores)
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from gan_dist.checkpoint import verify

from runs import WEIGHTS, jsonl, launch, newest, wait, weights, without_timing
from wandb_records import config, history, run_id

def wandb_files(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))


def test_two_process_run_writes_outputs_and_wandb_log(tmp_path, shards):
    run_dir = tmp_path / "run"
    log = launch(run_dir, shards, 2, "train.steps=20", "log.sample_every=10", "train.grad_accum=2", "eval.every=10")
    assert "world size 2" in log and "MULTI_CPU" in log and "8 images per process per micro-step" in log

    # With 2 accumulation micro-steps, each optimizer still steps exactly once per training step.
    for opt in ("optimizer.bin", "optimizer_1.bin"):
        state = torch.load(run_dir / "checkpoints" / "step_00000020" / opt, weights_only=False)["state"]
        assert {int(s["step"]) for s in state.values()} == {20}, opt

    # Final weights are plain state_dicts of the unwrapped modules (no DDP 'module.' prefix).
    final = weights(run_dir)
    assert all(not k.startswith("module.") for sd in final.values() for k in sd)
    assert final["generator"].keys() == final["generator_ema"].keys()
    assert (run_dir / "config.yaml").read_text().count("steps: 20") == 1
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000010", "step_00000020"]

    rows = [r for r in jsonl(run_dir) if "train/loss_d" in r]
    assert [r["train/step"] for r in rows] == [10, 20]
    for key in ("train/loss_d", "train/loss_g", "train/d_real", "train/d_fake", "perf/img_per_sec"):
        assert all(key in r for r in rows), key
    assert 0 < rows[-1]["train/d_real"] < 1 and rows[-1]["train/kimg"] == 20 * 32 / 1000

    # Evaluations at steps 10 and 20: every MNIST metric beside its real-data floor, the best one exported.
    evals = [r for r in jsonl(run_dir) if "eval/fcd" in r]
    assert [r["train/step"] for r in evals] == [10, 20]
    for name in ("fcd", "kid", "is", "class_kl", "class_min", "class_max", "precision", "recall"):
        assert all(f"eval/{name}" in r and f"eval/{name}_real" in r for r in evals), name
    assert evals[0]["eval/fcd_real"] < 1 < 20 < evals[0]["eval/fcd"], "an untrained G is far from the floor"
    best = min(evals, key=lambda r: r["eval/fcd"])
    best_json = json.loads((run_dir / "best" / "metrics.json").read_text())
    assert best_json["step"] == best["train/step"] and best_json["fcd"] == best["eval/fcd"]
    assert json.loads((run_dir / "final" / "metrics.json").read_text())["fcd"] == evals[-1]["eval/fcd"]
    best_G = load_file(run_dir / "best" / "generator_ema.safetensors")
    assert best_G.keys() == final["generator_ema"].keys()

    # The offline W&B run holds the same scalars, the evaluations, both sample grids and D's histograms.
    (run_file,) = wandb_files(run_dir)
    wb = history(run_file)
    wb_scalars = [{k: r[k] for k in rows[0]} for r in wb if "train/loss_d" in r]
    assert wb_scalars == rows
    assert [{k: r[k] for k in evals[0]} for r in wb if "eval/fcd" in r] == evals
    for key in ("samples/ema", "samples/G"):
        grids = [r for r in wb if r.get(f"{key}/_type") == "image-file"]
        assert [g["train/step"] for g in grids] == [10, 20], key
    hists = [r for r in wb if r.get("train/d_hist_real/_type") == "histogram"]
    assert [h["train/step"] for h in hists] == [10, 20] and all("train/d_hist_fake/bins" in h for h in hists)
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == [
        "samples_G_00000010.png", "samples_G_00000020.png", "samples_ema_00000010.png", "samples_ema_00000020.png"]
    wb_config = config(run_file)
    assert wb_config["world_size"] == 2 and wb_config["train"]["steps"] == 20
    assert len(wb_config["git_commit"]) == 40 and wb_config["versions"]["torch"] == torch.__version__


# DDP's options, the loader without prefetch, per-step host syncs and zero-filled gradients must not change a bit:
# the SIGTERM case trains with them all, and its resumed run must equal the reference run without them. (kill -9 at
# random moments, with 1 and 2 processes, is tests/test_faults.py's chaos test.)
SAME_RESULT_SWITCHES = ("dist.gradient_as_bucket_view=true", "dist.static_graph=true", "dist.bucket_cap_mb=1",
                        "perf.prefetch=false", "perf.step_sync=true", "optim.set_to_none=false")


@pytest.mark.slow
def test_sigterm_then_rerun_is_bit_identical(tmp_path, shards):
    """SIGTERM to the launcher alone (which then checkpoints at once), 2 processes with 2 loader workers each."""
    # 60 steps of 32 images stop mid-epoch (MNIST has 60,000), so resume continues inside an epoch.
    args = ("data.device_cache=false", "data.num_workers=2", "train.steps=60", "ckpt.every=10", "ckpt.keep=10")
    reference = tmp_path / "reference"
    launch(reference, shards, 2, *args)

    # Stop the launch once a checkpoint is complete.
    run_dir = tmp_path / "stopped"
    proc = launch(run_dir, shards, 2, *args, *SAME_RESULT_SWITCHES, background=True)
    deadline = time.time() + 240
    while not list(run_dir.glob("checkpoints/step_*/meta.json")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert list(run_dir.glob("checkpoints/step_*/meta.json")), f"the run wrote no checkpoint:\n{output}"
    assert not (run_dir / "final").exists(), "the run finished before it could be stopped"
    (line,) = [x for x in output.splitlines() if x.startswith("stopped at step")]
    step = int(line.split()[3])
    assert line.endswith("by SIGTERM; checkpoint saved") and (run_dir / "checkpoints" / f"step_{step:08d}").is_dir()
    assert "rerun the same command to continue from it" in output

    log = launch(run_dir, shards, 2, *args, *SAME_RESULT_SWITCHES)
    assert "resumed from" in log
    resumed, expected = weights(run_dir), weights(reference)
    for name in WEIGHTS:
        assert resumed[name].keys() == expected[name].keys()
        for key in expected[name]:
            assert resumed[name][key].equal(expected[name][key]), f"{name}.{key} differs after resume"
    # The logged curve reads as one run, and W&B continues the same run id.
    assert without_timing(jsonl(run_dir)) == without_timing(jsonl(reference))
    # (The stopped run's file may hold no run record yet: its id is read from the name W&B gave it.)
    stopped_file, resumed_file = wandb_files(run_dir)
    assert run_id(resumed_file) == stopped_file.stem.removeprefix("run-")


@pytest.mark.slow
@pytest.mark.parametrize("sig, nproc", [(signal.SIGHUP, 2), (signal.SIGQUIT, 1)])
def test_hangup_and_quit_checkpoint_like_sigterm(tmp_path, shards, sig, nproc):
    """SIGHUP or SIGQUIT to the launcher, which forwards it to every rank (to the one process without a launcher):
    every rank checkpoints at the step it stopped, instead of dying with nothing saved since the last checkpoint."""
    run_dir = tmp_path / "run"
    proc = launch(run_dir, shards, nproc, "train.steps=100000", "ckpt.every=7", "eval.every=0", background=True)
    wait(proc, lambda: newest(run_dir) >= 7, timeout=240)
    proc.send_signal(sig)
    output = proc.communicate(timeout=120)[0]
    (line,) = [x for x in output.splitlines() if x.startswith("stopped at step")]
    step = int(line.split()[3])
    assert line.endswith(f"by {sig.name}; checkpoint saved"), output
    assert newest(run_dir) == step, "the stop's own checkpoint, not only a periodic one"
    assert verify(run_dir / "checkpoints" / f"step_{step:08d}")["world_size"] == nproc


@pytest.fixture(scope="module")
def rgb_shards(tmp_path_factory) -> Path:
    """120 RGB images of mixed sizes and formats in 2 class folders, written as 5 shards (25, 25, 25, 25, 20)."""
    root = tmp_path_factory.mktemp("rgb")
    rng = np.random.default_rng(0)
    for i in range(120):
        folder = root / "images" / ("red" if i % 2 else "blue")
        folder.mkdir(parents=True, exist_ok=True)
        h, w = [(32, 32), (40, 36), (48, 64)][i % 3]
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"im{i:03d}.{'png' if i % 4 else 'jpg'}")
    out = root / "shards"
    made = subprocess.run([sys.executable, "scripts/make_shards.py", "--src", str(root / "images"), "--out", str(out),
                           "--max-count", "25", "--workers", "2"], cwd=Path(__file__).parents[1], capture_output=True,
                          text=True)
    assert made.returncode == 0, made.stderr
    assert [s["num_samples"] for s in json.loads((out / "manifest.json").read_text())["splits"]["train"]["shards"]] \
        == [25, 25, 25, 25, 20]
    return out


RGB_ARGS = ("model.width=8", "model.z_dim=16", "train.batch_size=16", "data.num_workers=2", "data.shuffle_buffer=40",
            "ckpt.every=10", "log.every=10", "log.sample_every=10", "log.num_samples=16", "wandb.mode=offline")


def test_shards_from_an_image_folder_train_rgb32_on_two_processes(tmp_path, shards, rgb_shards):
    run_dir = tmp_path / "run"
    # With bf16 autocast, NHWC tensors, fused Adam and G_ema updated every 3 steps: all must still train.
    log = launch(run_dir, shards, 2, *RGB_ARGS, "train.steps=20", f"data.shards={rgb_shards}",
                 "train.mixed_precision=bf16", "perf.channels_last=true", "optim.impl=fused", "perf.ema_every=3",
                 config="configs/cifar32.yaml")
    assert "world size 2" in log
    G = load_file(run_dir / "final" / "generator.safetensors")
    assert G["net.10.weight"].shape == (8, 3, 4, 4), "G ends in 3 channels (RGB): 4x4 up to 32x32"
    # Every weight of G, D and G_ema moved between the checkpoints of steps 10 and 20.
    step10 = run_dir / "checkpoints" / "step_00000010"
    ema = load_file(step10 / "ema.safetensors")
    for name, before in (("generator", load_file(step10 / "model.safetensors")),
                         ("discriminator", load_file(step10 / "model_1.safetensors")),
                         ("generator_ema", {k.removeprefix("averaged.module."): v for k, v in ema.items()})):
        after = weights(run_dir)[name]
        assert all(not before[k].equal(after[k]) for k in after if k.endswith("weight")), name
    rows = jsonl(run_dir)
    assert all(math.isfinite(r[k]) for r in rows for k in ("train/loss_d", "train/loss_g"))
    # 20 steps x 16 images of a 120-image epoch; nothing skipped.
    assert rows[-1]["data/epoch"] == pytest.approx(20 * 16 / 120) and rows[-1]["data/skipped"] == 0
    grid = np.asarray(Image.open(run_dir / "samples" / "samples_ema_00000020.png"))
    assert grid.shape == (4 * 34 + 2, 4 * 34 + 2, 3)


def test_resampled_run_over_a_truncated_shard_finishes_and_reports_the_skip(tmp_path, shards, rgb_shards):
    broken = tmp_path / "broken"
    shutil.copytree(rgb_shards, broken)
    raw = (broken / "train-00002.tar").read_bytes()
    (broken / "train-00002.tar").write_bytes(raw[: len(raw) // 3])
    run_dir = tmp_path / "run"
    args = (*RGB_ARGS, "train.steps=40", "data.mode=resampled", f"data.shards={broken}")
    # Its offset index no longer fits it: with data.on_error=raise, every rank stops before training, with one line
    # naming the shard.
    refused = launch(run_dir, shards, 2, *args, "data.on_error=raise", config="configs/cifar32.yaml", check=False)
    assert refused.returncode != 0 and "Traceback" not in refused.stdout + refused.stderr
    assert f"train-00002.tar: has {len(raw) // 3} bytes but its index train-00002.tar.idx says" in refused.stderr
    assert not (run_dir / "checkpoints").exists()
    # With warn (the default), it is streamed without its index, as that line advises: its intact head is read and
    # the rest skipped, counted and warned about, naming the shard and why its index was not used. 40 steps x 8
    # images per rank: each of the 4 slots draws about 10 shards, so the broken one is met.
    log = launch(run_dir, shards, 2, *args, config="configs/cifar32.yaml")
    said = [line for line in log.splitlines() if "train-00002.tar" in line]
    assert said and all("is truncated or corrupt" in line and "skipped" in line for line in said), log
    assert "streamed without its offset index (has " in said[0]
    rows = jsonl(run_dir)
    assert rows[-1]["data/skipped"] > 0 and "data/epoch" not in rows[-1]
    assert (run_dir / "final" / "generator_ema.safetensors").exists()


@pytest.fixture(autouse=True, scope="module")
def _runs_find_the_classifier(classifier):
    """The debug config evaluates with the MNIST classifier; it is trained once per session, not by each run."""


@pytest.mark.slow
def test_wandb_history_of_a_run_resumed_past_its_last_checkpoint_repeats_the_lost_rows(tmp_path, shards):
    """What the README's W&B section says: a run that died after logging past its last checkpoint logs those steps
    again when it resumes. metrics.jsonl is cut back and holds each step once; W&B, which appends to the same run
    id (its rewind is a private preview, online only), holds the redone steps twice, the resumed run's last."""
    run_dir = tmp_path / "run"
    short = ("train.steps=20", "log.every=10", "ckpt.every=10", "eval.every=0", "log.sample_every=20")
    launch(run_dir, shards, 1, *short)
    # As if it had died just after logging step 20, before its checkpoint and final weights were written.
    shutil.rmtree(run_dir / "checkpoints" / "step_00000020")
    (run_dir / "final").unlink()
    launch(run_dir, shards, 1, *short)

    files = wandb_files(run_dir)
    assert len(files) == 2 and run_id(files[0]) == run_id(files[1]), "both segments log to one W&B run"
    first, resumed = ([r for r in history(f) if "train/loss_d" in r] for f in files)
    assert [r["train/step"] for r in first + resumed] == [10, 20, 20], "W&B: step 20 once per segment"
    rows = [r for r in jsonl(run_dir) if "train/loss_d" in r]
    assert [r["train/step"] for r in rows] == [10, 20], "metrics.jsonl: each step once"
    assert rows[-1] == {k: resumed[-1][k] for k in rows[-1]}, "metrics.jsonl keeps the resumed run's row"
    # Resume is exact, so the repeated row carries the same values: W&B plots one point twice, not a jump.
    assert [{k: v for k, v in r.items() if not k.startswith(("_", "perf/"))} for r in (first[-1], resumed[-1])] == \
        [{k: v for k, v in rows[-1].items() if not k.startswith("perf/")}] * 2
