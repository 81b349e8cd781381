"""Faults of round two, each in real runs of `train.py` on CPU (the README's "What survives what" points here):

- a resume whose config differs from the checkpoint's names the keys: one error line when the networks no longer
  fit, a line (and a warning for keys not meant to change) when they do;
"""

from __future__ import annotations

import pytest

from gan_dist.checkpoint import verify
from gan_dist.config import MAY_CHANGE

from runs import REPO, launch, newest

FAST = ("eval.every=0", "wandb.mode=disabled")


def errors(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def test_a_resume_names_the_config_keys_that_changed(tmp_path, shards):
    run = tmp_path / "run"
    launch(run, shards, 1, *FAST)
    refused = launch(run, shards, 1, *FAST, "model.width=12", "train.steps=60", check=False)
    output = refused.stdout + refused.stderr
    assert refused.returncode == 1 and "Traceback" not in output
    (line,) = errors(output)
    assert "does not fit this run's networks" in line and "changed since it was written: model.width: 8 -> 12." in line
    assert "train.steps" not in line, "a key that may change is not what stopped it"
    assert newest(run) == 40 and verify(run / "checkpoints" / "step_00000040")["step"] == 40

    output = launch(run, shards, 1, *FAST, "train.steps=60", "optim.lr_G=1e-4", "loss.label_noise=0.1")
    assert ("changed since the checkpoint: optim.lr_G: 0.0002 -> 0.0001, loss.label_noise: 0.05 -> 0.1, "
            "train.steps: 40 -> 60") in output
    (warning,) = [line for line in output.splitlines() if "changed since the checkpoint, and" in line]
    assert warning.startswith("warning: loss.label_noise changed since the checkpoint, and is not among the keys")
    assert newest(run) == 60


def test_the_readme_lists_the_keys_that_may_change_on_resume():
    text = (REPO / "README.md").read_text()
    start = text.index("Keys that may change on resume:")
    listed = text[start:text.index("\n\n", start)]
    assert [key.strip("`") for key in listed.split(":", 1)[1].strip(" .\n").split(", ")] == list(MAY_CHANGE)
