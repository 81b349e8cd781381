"""A checkpoint written by an earlier gan-dist resumes with this one and continues bit-exactly.

`tests/fixtures/checkpoint_f094314/` holds a checkpoint written at step 20 by the code of commit f094314 (before the
trainer's anatomy was reorganised: the objective, the trained state, the checkpointer, the data's state), on two
processes, with the loader, ADA and a log interval cut mid-way; and, in `expected/`, what that code's own run made
of it by step 30: the final weights and metrics.jsonl. This code must load the checkpoint unchanged and reach the
same weights, bit for bit, and log the same values.

The run, as that code was started:

    accelerate launch --multi_gpu --num_processes 2 train.py --config configs/debug.yaml data.device_cache=false \
        model.z_dim=8 model.width=4 aug.kind=ada aug.interval=2 aug.target=0.1 train.steps=30 ckpt.every=10 \
        ckpt.keep=5 log.every=7 log.sample_every=100 eval.every=0 wandb.mode=disabled
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from runs import WEIGHTS, launch

FIXTURE = Path(__file__).parent / "fixtures" / "checkpoint_f094314"
OVERRIDES = ("data.device_cache=false", "model.z_dim=8", "model.width=4", "aug.kind=ada", "aug.interval=2",
             "aug.target=0.1", "train.steps=30", "ckpt.every=10", "ckpt.keep=5", "log.every=7",
             "log.sample_every=100", "eval.every=0", "wandb.mode=disabled")


def rows(path: Path) -> dict[int, dict]:
    """metrics.jsonl's rows by step, without the timings (perf/*), which no two runs share."""
    found = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        found[row["train/step"]] = {k: v for k, v in row.items() if not k.startswith("perf/")}
    return found


@pytest.mark.slow
def test_a_checkpoint_of_the_code_before_resumes_and_continues_bit_exactly(tmp_path, shards):
    run = tmp_path / "run"
    shutil.copytree(FIXTURE / "run", run)
    out = launch(run, shards, 2, *OVERRIDES)
    assert f"resumed from {run / 'checkpoints' / 'step_00000020'} (step 20" in out
    for name in WEIGHTS:
        got, want = load_file(str(run / "final" / f"{name}.safetensors")), \
            load_file(str(FIXTURE / "expected" / f"{name}.safetensors"))
        assert got.keys() == want.keys()
        unequal = [k for k in want if not torch.equal(got[k], want[k])]
        assert not unequal, f"{name}: {unequal} differ from what the code before made of the same checkpoint"
    logged, expected = rows(run / "metrics.jsonl"), rows(FIXTURE / "expected" / "metrics.jsonl")
    assert sorted(logged) == [21, 28, 30]
    assert all(logged[step] == expected[step] for step in logged)
