"""W&B sweeps: each file in configs/sweeps/ is a sweep `wandb sweep` takes (method, a logged metric, parameters
that are config keys), and the command line the agent builds from it for one set of parameters trains, offline.
The command line is built by wandb's own code for it (`create_sweep_command`, `create_sweep_command_args`), as
`wandb agent` does."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import yaml
from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

from gan_dist.config import load_config
from gan_dist.metric_names import BY_KEY
from runs import MNIST, REPO

SWEEPS = sorted((REPO / "configs" / "sweeps").glob("*.yaml"))


def one_value(spec: dict):
    """A value the sweep could pick for one parameter."""
    if "value" in spec:
        return spec["value"]
    if "values" in spec:
        return spec["values"][0]
    return math.sqrt(spec["min"] * spec["max"]) if spec["distribution"].startswith("log") else spec["min"]


def agent_command(sweep: dict, values: dict) -> list[str]:
    """The command `wandb agent` runs for `values`: its macros expanded as its `_command_run` expands them."""
    sweep_vars = create_sweep_command_args({"args": {k: {"value": v} for k, v in values.items()}})
    sweep_vars |= {"env": ["/usr/bin/env"], "interpreter": [sys.executable], "program": [sweep["program"]]}
    command = []
    for chunk in create_sweep_command(list(sweep["command"])):
        chunk = str(chunk)
        command += (sweep_vars.get(chunk[2:-1]) or []) if chunk.startswith("${") and chunk.endswith("}") else [chunk]
    return command


def test_there_is_a_sweep():
    assert SWEEPS, "configs/sweeps/ holds an example sweep"


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_a_sweep_file_runs_as_the_agent_starts_it(path, tmp_path, shards):
    sweep = yaml.safe_load(path.read_text())
    assert sweep["method"] in ("grid", "random", "bayes") and sweep["program"] == "train.py"
    assert sweep["metric"]["name"].startswith("eval/") and sweep["metric"]["name"][5:] in BY_KEY
    assert sweep["metric"]["goal"] == ("minimize" if BY_KEY[sweep["metric"]["name"][5:]].lower_is_better
                                       else "maximize")
    values = {key: one_value(spec) for key, spec in sweep["parameters"].items()}
    command = agent_command(sweep, values)
    assert command[:3] == ["/usr/bin/env", sys.executable, "train.py"]
    assert [f"--{k}={v}" for k, v in values.items()] == command[-len(values):], "W&B's --key=value, after --config"

    # Each run in its own run.dir, named by the W&B run id the agent sets for it.
    os.environ["WANDB_RUN_ID"] = "sweep123"
    try:
        cfg = load_config(command[3:])
    finally:
        del os.environ["WANDB_RUN_ID"]
    assert cfg.run.dir == "runs/sweeps/sweep123"
    for key, value in values.items():
        section, name = key.split(".")
        assert getattr(getattr(cfg, section), name) == pytest.approx(value), key

    # The same command, with a few steps in a temporary run.dir (later overrides win), offline.
    run = tmp_path / "run"
    fast = [f"run.dir={run}", "train.steps=4", "ckpt.every=4", "log.every=2", "log.sample_every=4", "eval.every=0",
            "wandb.mode=offline", "data.num_workers=0", f"data.mnist_dir={MNIST}", f"data.cache_dir={shards}",
            "model.self_cond_images=1000"]  # a self-conditioned config's first clustering, on fewer images
    env = dict(os.environ, WANDB_RUN_ID="sweep123", OMP_NUM_THREADS="1", WANDB_SILENT="true")
    proc = subprocess.run(command + fast, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    trained = yaml.safe_load((run / "config.yaml").read_text())
    for key, value in values.items():
        section, name = key.split(".")
        assert trained[section][name] == pytest.approx(value), key
    assert [p.name.split("-")[-1] for p in (run / "wandb").glob("offline-run-*")] == ["sweep123"], \
        "the W&B run is the one the agent made"
    assert (run / "final" / "generator_ema.safetensors").is_file()
