"""What only watches a run never ends it (the README's "What survives what" points here), in real runs of train.py:

- W&B's service process killed mid-run (kill -9 of wandb-core, 1 and 2 processes), an exception out of each W&B call
  (init, a metrics row, a grid, a histogram, finish; tests/observe.py injects them), W&B's files on a full disk of
  their own (tests/small_disk.sh): one warning, W&B off for the rest of the job, the run to its end with the final
  weights and metrics of an undisturbed run, and a rerun that resumes the W&B run and logs the steps it missed;
- stdout into a pipe closed early (`train.py | head -c 10`, and SIGPIPE mid-run), stdout and stderr on a full disk:
  the run goes on, and the run directory's console.log has the rest.

A full disk under run.dir itself, W&B on, still ends the run with one error line: test_reliability.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gan_dist.config import WandbConfig
from gan_dist.rundir import read_wandb_gaps, write_wandb_gaps
from gan_dist.tracking import Tracker

from runs import MNIST, REPO, assert_same_weights, jsonl, launch, weights, without_timing
from test_reliability import SMALL_DISK, needs_namespaces
from test_train import wandb_files
from wandb_records import history, summary

ARGS = ("eval.every=0", "train.steps=20", "log.sample_every=10")
WARNING = "warning: W&B failed "


@pytest.fixture(scope="module")
def undisturbed(shards, tmp_path_factory):
    """The reference of each world size, without W&B: observers must not touch the RNG or the data order."""
    done = {}

    def reference(nproc: int) -> Path:
        if nproc not in done:
            done[nproc] = tmp_path_factory.mktemp("undisturbed") / "run"
            launch(done[nproc], shards, nproc, *ARGS, "wandb.mode=disabled")
        return done[nproc]

    return reference


def assert_undisturbed(run: Path, reference: Path) -> None:
    assert_same_weights(weights(run), weights(reference))
    assert without_timing(jsonl(run)) == without_timing(jsonl(reference))


def observed(run: Path, shards: Path, nproc: int, what: str, step: int, *overrides: str) -> str:
    """A run (W&B offline) whose observer `what` fails at `step` (tests/observe.py); its output, which must show no
    traceback and at most one W&B warning."""
    output = launch(run, shards, nproc, *ARGS, *overrides, script=("tests/observe.py", what, str(step)))
    assert "Traceback" not in output and "Exception" not in output, output
    assert output.count(WARNING) <= 1, output
    return output


@pytest.mark.parametrize("nproc", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_wandb_killed_mid_run_costs_a_warning_and_the_rerun_logs_the_gap(tmp_path, shards, undisturbed, nproc):
    """kill -9 of W&B's service at step 10: without the handling, the next row ended the run with
    ConnectionResetError and a traceback."""
    run = tmp_path / "run"
    output = observed(run, shards, nproc, "kill-wandb", 10)
    (warning,) = [line for line in output.splitlines() if WARNING in line]
    assert re.search(r"W&B failed logging (metrics|samples/\w+|histograms) at step 10 \(", warning), warning
    assert "metrics.jsonl, the grids in" in warning and "resumes W&B run" in warning
    assert_undisturbed(run, undisturbed(nproc))
    if nproc > 1:
        return
    # A rerun that trains on brings W&B back: it logs the rows W&B missed and notes the gap in the summary.
    output = launch(run, shards, 1, *ARGS, "train.steps=30")
    assert "W&B is back; it missed steps 10 to 20" in output
    first, second = wandb_files(run)
    assert first.name == second.name, "the same W&B run, resumed by id"
    assert {k: v for k, v in summary(second).items() if k.startswith("wandb/")} == {"wandb/gaps": [[10, 20]],
                                                                                    "wandb/gap_steps": 11}
    rows = [r for r in jsonl(run) if "train/loss_d" in r]
    logged = [{k: r[k] for k in rows[0]} for r in history(second) if "train/loss_d" in r]
    assert logged == rows[:3], "the rows of steps 10 and 20 from metrics.jsonl, then step 30's"
    assert json.loads((run / "wandb_gaps.json").read_text()) == {"off_since": None, "gaps": [[10, 20]]}


@pytest.mark.parametrize("what, step, said", [
    ("raise-init", 0, "starting at step 0"),
    ("raise-log", 10, "logging metrics at step 10"),
    ("raise-image", 10, "logging samples/ema at step 10"),
    ("raise-histogram", 10, "logging histograms at step 10"),
    ("raise-finish", 20, "finishing its run at step 20")])
def test_an_exception_from_any_wandb_call_turns_wandb_off_and_the_run_goes_on(tmp_path, shards, undisturbed, what,
                                                                              step, said):
    run = tmp_path / "run"
    output = observed(run, shards, 1, what, step)
    (warning,) = [line for line in output.splitlines() if WARNING in line]
    assert f"W&B failed {said} (OSError: [Errno 28] No space left on device (injected into {what}))" in warning
    assert_undisturbed(run, undisturbed(1))
    assert ("wandb_gaps.json" in os.listdir(run)) == (what != "raise-finish"), "finish misses no step"


@needs_namespaces
def test_wandb_files_on_a_full_disk_cost_a_warning(tmp_path, shards, undisturbed):
    """W&B's folder on a disk of its own that fills after the first checkpoint: its media copy of the next grid
    raised ENOSPC out of W&B's code."""
    run, disk = tmp_path / "run", tmp_path / "disk"
    disk.mkdir()
    link = f"mkdir -p {run} {{DISK}}/wandb && ln -s {{DISK}}/wandb {run}/wandb && exec \"$@\""
    output = launch(run, shards, 1, *ARGS, "log.sample_every=1",
                    env={"SMALL_DISK_AFTER": f"{run}/checkpoints/step_*/meta.json"},
                    wrap=(SMALL_DISK, "4m", "fill", str(disk), "sh", "-c", link, "sh"))
    assert "Traceback" not in output
    (warning,) = [line for line in output.splitlines() if WARNING in line]
    assert "No space left on device" in warning and "media" in warning
    assert_same_weights(weights(run), weights(undisturbed(1)))
    assert json.loads((run / "wandb_gaps.json").read_text())["off_since"] >= 10


# Python's own buffering, as a user gets it: the console is made line-buffered by train.py, not by the environment.
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"} | {"OMP_NUM_THREADS": "1"}


def train_command(run: Path, shards: Path, *script: str) -> list[str]:
    return [sys.executable, *(script or ["train.py"]), "--config", "configs/debug.yaml", f"run.dir={run}",
            f"data.cache_dir={shards}", f"data.mnist_dir={MNIST}", "wandb.mode=disabled", *ARGS]


def test_stdout_into_a_pipe_closed_early_and_sigpipe_do_not_end_the_run(tmp_path, shards, undisturbed):
    """`train.py | head -c 10`, and SIGPIPE at step 10: without the handling, BrokenPipeError and a traceback at
    the first print, before the run directory existed."""
    run = tmp_path / "run"
    proc = subprocess.Popen(train_command(run, shards, "tests/observe.py", "sigpipe", "10"), cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert len(proc.stdout.read(10)) == 10
    proc.stdout.close()  # as `head -c 10` exits
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 0 and "Traceback" not in err and "BrokenPipe" not in err, err
    assert_undisturbed(run, undisturbed(1))
    note, *rest = (run / "console.log").read_text().splitlines()
    assert re.fullmatch(r"\[gan-dist\] \S+ \S+: stdout could not be written \(BrokenPipeError: Broken pipe\); "
                        r"training goes on, and what it would have shown follows here", note), note
    assert rest[-1] == f"done: step 20, 0.6 kimg; final weights in {run / 'final'}"


@needs_namespaces
def test_stdout_and_stderr_on_a_full_disk_do_not_end_the_run(tmp_path, shards, undisturbed):
    run, disk = tmp_path / "run", tmp_path / "disk"
    disk.mkdir()
    into_full = ["sh", "-c", 'exec "$@" >{DISK}/console.txt 2>&1', "sh"]
    done = subprocess.run([SMALL_DISK, "1m", "full-first", str(disk), *into_full, *train_command(run, shards)],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout + done.stderr == ""
    assert (disk / "console.txt").stat().st_size == 0, "nothing could be written there"
    assert_undisturbed(run, undisturbed(1))
    log = (run / "console.log").read_text()
    assert "Traceback" not in log and f"done: step 20, 0.6 kimg; final weights in {run / 'final'}" in log
    notes = re.findall(r"(stdout|stderr) could not be written \(OSError: No space left on device\)", log)
    assert sorted(notes) == ["stderr", "stdout"]


class FakeRun:
    """What the tracker uses of a W&B run, recording it."""

    id = "abc"

    def __init__(self) -> None:
        self.rows, self.summary = [], {}

    def log(self, row: dict) -> None:
        self.rows.append(row)


@pytest.mark.parametrize("off_since, resumed, gap", [(30, 50, [30, 50]), (30, 30, [30, 30]), (30, 20, None),
                                                     (None, 50, None)])
def test_a_gap_is_noted_only_for_steps_wandb_missed(tmp_path, monkeypatch, off_since, resumed, gap):
    """W&B failed at step `off_since` (None: never) in an earlier job, and this job resumes at step `resumed`: a job
    resumed from a checkpoint before the failure logs those steps again itself, so W&B missed nothing."""
    run = FakeRun()
    monkeypatch.setattr("gan_dist.tracking._init_wandb", lambda *args: run)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"train/step": s, "train/loss_d": s / 10}) + "\n"
                                                    for s in range(10, 60, 10)))
    write_wandb_gaps(tmp_path, off_since, [[5, 8]])
    Tracker(True, WandbConfig(mode="offline"), tmp_path, "abc", {}, resumed)
    if gap is None:
        assert run.rows == [] and run.summary == {}
        assert read_wandb_gaps(tmp_path) == (None, [[5, 8]])
        return
    assert [row["train/step"] for row in run.rows] == list(range(gap[0], gap[1] + 1, 10))
    assert run.summary == {"wandb/gaps": [[5, 8], gap], "wandb/gap_steps": 4 + gap[1] - gap[0] + 1}
    assert read_wandb_gaps(tmp_path) == (None, [[5, 8], gap])


def test_a_damaged_gap_record_reads_as_no_gap(tmp_path):
    for text in ("{", '{"off_since": "x", "gaps": []}', '{"off_since": 3, "gaps": [[1]]}', "[]"):
        (tmp_path / "wandb_gaps.json").write_text(text)
        assert read_wandb_gaps(tmp_path) == (None, [])
