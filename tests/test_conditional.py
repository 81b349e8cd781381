"""The class-conditional path (model.cond=true) through the real train.py and the review scripts, on 1 and 2
processes: labels from the data reach G and D, G counts them (the class frequencies samplers draw from), each grid
column is one class, the evaluation scores every class (the classifier's accuracy on the labels and per-class FCD
beside their real-data floors), and scripts/sample.py draws one class (`--class`) with the labels in its .npz.
A conditional G whose label enters only by concatenation to z learns to ignore z (one image per class, measured in
docs/results.md); class-conditional BatchNorm or the mode-seeking term keeps each class's images varied.
The DDP step math of conditional networks (and of top-k) is checked against one process in test_losses_ddp.py.

    . .venv/bin/activate && python -m pytest tests/test_conditional.py -q
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import CONDITIONAL
from gan_dist import load_generator
from gan_dist.mnist import load_mnist
from runs import MNIST, assert_same_weights, jsonl, launch, weights, without_timing


def test_a_conditional_run_is_scored_per_class(conditional_run):
    row = [r for r in jsonl(conditional_run) if "eval/fcd" in r][-1]
    assert 0 <= row["eval/class_acc"] <= 1 and row["eval/class_acc_real"] > 0.95
    fcd = [row[f"eval/fcd_class{k}"] for k in range(10)]
    assert row["eval/fcd_class_mean"] == pytest.approx(sum(fcd) / 10) and row["eval/fcd_class_max"] == max(fcd)
    assert all(row[f"eval/fcd_class{k}_real"] < row[f"eval/fcd_class{k}"] for k in range(10))
    assert "train/r2" in jsonl(conditional_run)[0]


def test_g_counts_the_labels_it_was_trained_on(conditional_run):
    counts = load_file(conditional_run / "final" / "generator_ema.safetensors")["class_counts"]
    assert counts.sum().item() == 40 * 32  # debug.yaml: 40 steps of 32 images, each label counted once
    assert (counts > 0).all()


def test_each_grid_column_is_one_class(conditional_run):
    grid = Image.open(conditional_run / "samples" / "samples_ema_00000040.png")
    assert grid.width == 10 * (28 + 2) + 2  # 16 fixed samples, 10 columns (one per class), 2-pixel padding


def test_sample_script_draws_one_class_or_the_data_frequencies(conditional_run, tmp_path):
    def sample(*args: str) -> np.lib.npyio.NpzFile:
        out = tmp_path / "s.npz"
        proc = subprocess.run([sys.executable, "scripts/sample.py", "--run", str(conditional_run), "--num", "300",
                               "--out", str(out), *args], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        return np.load(out)

    one = sample("--class", "7")
    assert one["samples"].shape == (300, 28, 28, 1) and (one["labels"] == 7).all()
    mixed = sample("--seed", "1")["labels"]
    assert set(np.unique(mixed)) == set(range(10))  # MNIST's ten classes at roughly equal frequencies
    proc = subprocess.run([sys.executable, "scripts/sample.py", "--run", str(conditional_run), "--num", "3",
                           "--out", str(tmp_path / "x.npz"), "--class", "10"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --class 10 is not a class")


def test_conditional_r3gan_top_k_run_resumes_bit_exactly(conditional_run, shards, tmp_path):
    # The run's folder as a preemption after step 30 would leave it: continued to 40, labels, class counts, top-k's
    # k and the gamma and rate schedules over images seen pick up where they were, so the weights and the logged
    # rows equal the uninterrupted run's.
    run = tmp_path / "run"
    shutil.copytree(conditional_run, run, symlinks=True)
    for name in ("final", "best"):
        (run / name).unlink()
    shutil.rmtree(run / "checkpoints" / "step_00000040")
    assert "resumed from" in launch(run, shards, 1, *CONDITIONAL)
    assert_same_weights(weights(run), weights(conditional_run))
    assert without_timing(jsonl(run)) == without_timing(jsonl(conditional_run))


def test_two_process_conditional_run_with_r3gan_and_top_k(tmp_path):
    steps, batch = 12, 64
    launch(tmp_path, tmp_path / "no-shards", 2, f"train.steps={steps}", f"train.batch_size={batch}",
           "model.cond=true", "loss.kind=rpgan", "loss.r1_gamma=0.1", "loss.r2_gamma=0.1", "loss.r1_every=2",
           "loss.topk_gamma=0.5", "optim.beta1=0", "optim.beta2=0.99", "model.hidden=32", "log.every=4",
           "log.sample_every=12", "eval.every=12", "eval.num_samples=400", f"ckpt.every={steps}",
           config="configs/ring8.yaml")
    row = [r for r in jsonl(tmp_path) if "eval/hq" in r][-1]
    assert row["train/step"] == steps and 0 <= row["eval/modes"] <= 8 and np.isfinite(row["eval/reverse_kl"])
    # G_ema's counts are rank 0's (its buffers are the ones exported): half of each step's global batch.
    counts = load_file(tmp_path / "final" / "generator_ema.safetensors")["class_counts"]
    assert counts.sum().item() == steps * batch // 2 and len(counts) == 8


def within_class_std(images: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over classes of the per-pixel standard deviation among a class's images: 0 for one image per class."""
    flat = images.reshape(len(images), -1).float()
    return float(np.mean([flat[labels == k].std(0).mean().item() for k in labels.unique()]))


@pytest.mark.slow
@pytest.mark.parametrize("fix, varied", [((), False), (("model.cond_norm=true",), True),
                                         (("loss.ms_weight=1",), True)])
def test_conditional_g_draws_varied_images_of_each_class_only_with_a_fix(shards, tmp_path, fix, varied):
    # 600 steps of the debug config: G_ema's images of one class differ from each other about as much as real
    # digits of one class do with either fix, while the label concatenated to z alone collapses each class to one
    # image (measured: 0.08 of real data's spread; 0.87 with class-conditional BatchNorm, 1.0 with mode seeking).
    launch(tmp_path, shards, 1, "model.cond=true", "train.steps=600", "ckpt.every=600", "eval.every=0",
           "log.sample_every=600", "wandb.mode=disabled", *fix)
    G = load_generator(tmp_path)
    labels = torch.arange(10).repeat_interleave(50)
    with torch.no_grad():
        fake = G(torch.randn(len(labels), G.cfg.z_dim, generator=torch.Generator().manual_seed(0)), labels)
    images, digits = load_mnist(MNIST)["test"]
    real = within_class_std(torch.from_numpy(images).float() / 127.5 - 1, torch.from_numpy(digits).long())
    spread = within_class_std(fake, labels) / real
    assert (spread > 0.5) == varied, f"G_ema's within-class spread is {spread:.2f} of real data's"
