"""Faults of round two, each in real runs of `train.py` on CPU (the README's "What survives what" points here):

- a resume whose config differs from the checkpoint's names the keys: one error line when the networks no longer
  fit, a line (and a warning for keys not meant to change) when they do;
- a run whose weights turn NaN (tests/diverge.py poisons D on cue) stops with one error line and keeps its good
  checkpoints, or rolls back to the newest one on every rank and ends finite, at most train.max_rollbacks times;
- a disk that fills up or turns read-only mid-run (a real tmpfs, tests/small_disk.sh), and a run.dir that cannot be
  created: one error line naming the file and the cause, a non-zero exit, every older checkpoint intact; a quota
  (EDQUOT, which a tmpfs cannot impose here) is injected where metrics lines, checkpoints and exports are written;
- shutdown: a rank that an error ends with a stop vote in flight, and resumed 2-process runs with loader workers,
  exit without a rank dying of SIGABRT (a gloo thread finishing a collective as the interpreter exits).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gan_dist import export
from gan_dist.checkpoint import verify
from gan_dist.config import MAY_CHANGE, WandbConfig
from gan_dist.errors import UserError
from gan_dist.export import export_final
from gan_dist.files import write_failure
from gan_dist.rundir import checkpoints
from gan_dist.tracking import Tracker

from runs import REPO, assert_same_weights, free_port, jsonl, kill_tree, launch, newest, wait, weights

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


def diverging(run: Path, shards: Path, nproc: int, first: int, every: int, *overrides: str):
    """A run whose D turns NaN after its `first`-th D step (and every `every`-th after it) on each process."""
    return launch(run, shards, nproc, *FAST, *overrides, script=("tests/diverge.py", str(first), str(every)),
                  check=False)


def assert_finite(run: Path) -> list[str]:
    """Every tensor of every checkpoint and export of `run` is finite; returns the folders checked."""
    folders = [*checkpoints(run), *(run / name for name in ("final", "best") if (run / name).exists())]
    for folder in folders:
        for file in folder.iterdir():
            if file.suffix == ".safetensors":
                tensors = load_file(file).values()
            elif file.suffix == ".bin":
                state = torch.load(file, weights_only=True)["state"]
                tensors = [t for moments in state.values() for t in moments.values()]
            else:
                continue
            assert all(torch.isfinite(t).all() for t in tensors), f"{file} holds a NaN or an inf"
    return [f.name for f in folders]


def test_a_diverged_run_stops_with_one_line_and_keeps_its_good_checkpoints(tmp_path, shards):
    """NaN weights from step 25, found at step 30's checkpoint (no log there): without the check, the run trained on
    and rotated every good checkpoint away (ckpt.keep=2)."""
    run = tmp_path / "run"
    done = diverging(run, shards, 1, 25, 0, "log.every=40", "ckpt.every=10", "ckpt.keep=2")
    output = done.stdout + done.stderr
    assert done.returncode == 1 and "Traceback" not in output
    (line,) = errors(output)
    assert line.startswith("error: training diverged at step 30: G, D, G_ema, opt_G, opt_D non-finite (NaN or inf); "
                           "nothing was written from it, and the newest checkpoint ")
    assert "step_00000020 is finite" in line
    assert "set train.on_nonfinite=rollback" in line
    assert assert_finite(run) == ["step_00000010", "step_00000020"], "no final/ or best/ from NaN weights"


@pytest.mark.slow
def test_a_rollback_goes_back_on_every_rank_and_the_run_ends_finite(tmp_path, shards):
    """2 processes: NaN at step 25, logged at step 30; both ranks go back to step 20 and train on to the end."""
    run = tmp_path / "run"
    done = diverging(run, shards, 2, 25, 0, "train.on_nonfinite=rollback", "eval.every=40")
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    rolled = [line for line in output.splitlines() if "rolled back to" in line]
    assert len(rolled) == 1 and rolled[0].startswith("training diverged at step 30: train/")
    assert rolled[0].endswith("rolled back to step 20 (rollback 1 of train.max_rollbacks=3), drawing other noise from "
                              "there")
    assert assert_finite(run) == ["step_00000030", "step_00000040", "final", "best"]
    rows = [row for row in jsonl(run) if "train/loss_d" in row]
    assert [row["train/step"] for row in rows] == [10, 20, 30, 40], "metrics.jsonl reads as the run after the rollback"
    assert all(torch.isfinite(torch.tensor(list(row.values()), dtype=torch.float64)).all() for row in rows)
    assert json_state(run / "checkpoints" / "step_00000040")["rollbacks"] == 1


def test_rollbacks_are_bounded(tmp_path, shards):
    """A run that diverges again after every rollback stops after train.max_rollbacks of them."""
    run = tmp_path / "run"
    done = diverging(run, shards, 1, 25, 3, "train.on_nonfinite=rollback", "train.max_rollbacks=2")
    output = done.stdout + done.stderr
    assert done.returncode == 1 and "Traceback" not in output
    assert len([line for line in output.splitlines() if "rolled back to step 20" in line]) == 2
    (line,) = errors(output)
    assert "non-finite (NaN or inf) again after 2 rollback(s) (train.max_rollbacks=2)" in line
    assert assert_finite(run) == ["step_00000010", "step_00000020"]


def json_state(folder: Path) -> dict:
    return json.loads((folder / "train_state.json").read_text())


def test_an_export_of_non_finite_weights_is_refused_and_the_old_one_stays(tmp_path):
    G = torch.nn.Linear(2, 2)
    export_final(tmp_path, {"generator": G})
    before = load_file(tmp_path / "final" / "generator.safetensors")
    with torch.no_grad():
        G.weight[0, 0] = float("inf")
    with pytest.raises(UserError, match=r"refusing to write .*final: generator hold non-finite values"):
        export_final(tmp_path, {"generator": G})
    assert load_file(tmp_path / "final" / "generator.safetensors")["weight"].equal(before["weight"])


SMALL_DISK = str(REPO / "tests" / "small_disk.sh")
NAMESPACES = shutil.which("unshare") is not None and subprocess.run(
    ["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True).returncode == 0
needs_namespaces = pytest.mark.skipif(not NAMESPACES, reason="no unprivileged user and mount namespaces here "
                                      "(unshare --user --mount) to give a run a small disk of its own")


def on_small_disk(tmp_path: Path, shards: Path, nproc: int, action: str, *overrides: str):
    """A run on a 16 MB disk of its own that `action` fills up or makes read-only after the first checkpoint (see
    tests/small_disk.sh); returns its output and exit status, and the disk's files copied to tmp_path/disk."""
    disk = tmp_path / "disk"
    disk.mkdir()
    done = launch("{DISK}/run", shards, nproc, *FAST, "train.steps=100000", *overrides, check=False,
                  wrap=(SMALL_DISK, "16m", action, str(disk)))
    return done.stdout + done.stderr, done.returncode, disk / "run"


def assert_intact(run: Path) -> None:
    """The run's checkpoints all verify, and no part of a failed one is left behind."""
    assert checkpoints(run) and all(verify(path) for path in checkpoints(run))
    assert not list((run / "checkpoints").glob(".tmp-*")), "the part written of a failed checkpoint is deleted"


@needs_namespaces
@pytest.mark.parametrize("nproc, interval, fails", [
    (1, "log.sample_every=100000", r"a checkpoint in \S+/run/checkpoints"),
    # A grid every step: the first write after the disk fills is a grid of main's, whatever the machine's load.
    pytest.param(2, "log.sample_every=1", r"\S+/run/samples/samples_(ema|G)_\d{8}.png", marks=pytest.mark.slow)])
def test_a_full_disk_ends_the_run_with_one_line_naming_what_failed(tmp_path, shards, nproc, interval, fails):
    """Without the handling, a full disk ended in safetensors' and PIL's tracebacks (and on 2 processes left the
    other rank waiting). W&B (offline, its files on the same disk) adds at most a warning."""
    output, status, run = on_small_disk(tmp_path, shards, nproc, "fill", interval, "wandb.mode=offline")
    assert status != 0 and "Traceback" not in output and output.count("warning: W&B failed") <= 1
    (line,) = errors(output)
    assert re.fullmatch(f"error: cannot write {fails} \\(No space left on device\\); the checkpoints before it are "
                        "intact. Free space or fix the folder, then rerun the same command to resume", line), line
    assert_intact(run)


@needs_namespaces
def test_a_disk_gone_read_only_ends_the_run_with_one_line(tmp_path, shards):
    output, status, run = on_small_disk(tmp_path, shards, 1, "readonly", "log.every=1")
    assert status != 0 and "Traceback" not in output
    (line,) = errors(output)
    assert re.match(r"error: cannot write \S+/run/metrics.jsonl \(Read-only file system\); the checkpoints", line)
    assert_intact(run)


@needs_namespaces
def test_a_run_dir_that_cannot_be_created_says_so_before_training(tmp_path, shards):
    output, status, _ = on_small_disk(tmp_path, shards, 1, "readonly-first")
    assert status != 0 and "Traceback" not in output and "training:" not in output
    assert re.fullmatch(r"error: cannot write /\S+/run \(Read-only file system\)", errors(output)[0])


QUOTA = OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))


def test_a_quota_on_metrics_lines_and_grids_is_kept_for_the_stop_vote(tmp_path, monkeypatch):
    tracker = Tracker(True, WandbConfig(mode="disabled"), tmp_path, "id", {}, 0)
    tracker.log({"train/step": 1})

    def over_quota(*args):
        raise QUOTA

    monkeypatch.setattr("gan_dist.tracking.append_metrics", over_quota)
    tracker.log({"train/step": 2})
    assert tracker.failed.startswith(f"cannot write {tmp_path / 'metrics.jsonl'} (Disk quota exceeded); the "
                                     "checkpoints before it are intact")
    monkeypatch.undo()
    tracker.log({"train/step": 3})
    assert jsonl(tmp_path) == [{"train/step": 1}], "nothing more is written once a write failed: the run is ending"


def test_a_quota_on_an_export_keeps_the_export_before_it(tmp_path, monkeypatch):
    G = torch.nn.Linear(2, 2)
    export_final(tmp_path, {"generator": G})
    before = sorted(p.name for p in tmp_path.iterdir())

    def over_quota(*args, **kwargs):
        raise QUOTA

    monkeypatch.setattr(export, "save_file", over_quota)
    with pytest.raises(UserError, match=r"cannot write \S+/final \(Disk quota exceeded\); \S+/final as it was is "
                                        r"kept"):
        export_final(tmp_path, {"generator": G})
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "no part of the failed export is left"


def test_a_write_failure_that_a_library_hides_is_named_from_the_filesystem(tmp_path, monkeypatch):
    """torch's writer reports a full disk as 'unexpected pos'; the filesystem says why."""
    err = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 203584 vs 203472")
    assert write_failure(QUOTA, tmp_path) == "Disk quota exceeded"
    real = os.statvfs(tmp_path)
    fields = {name: getattr(real, name) for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
                                                     "f_files", "f_ffree", "f_favail", "f_flag", "f_namemax")}
    for change, cause in [({"f_bavail": 0}, "No space left on device"),
                          ({"f_flag": real.f_flag | os.ST_RDONLY}, "Read-only file system"),
                          ({}, err.args[0])]:
        monkeypatch.setattr(os, "statvfs", lambda path, c=change: os.statvfs_result(
            tuple((fields | c)[name] for name in fields)))
        assert write_failure(err, tmp_path / "not" / "yet") == cause


# ----------------------------------------------------------------------------------------------------------------
# Shutdown


def test_a_vote_in_flight_when_an_error_ends_a_rank_does_not_abort_it():
    """tests/vote_exit.py eight times: each rank of two exits with status 1, never by SIGABRT. With the vote's gloo
    group left to the interpreter's exit, about 3 ranks in 10 aborted."""
    for attempt in range(8):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2",
                   OMP_NUM_THREADS="1")
        ranks = [subprocess.Popen([sys.executable, "tests/vote_exit.py"], cwd=REPO, env=env | {"RANK": str(rank)},
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
        for rank in ranks:
            output = rank.communicate(timeout=120)[0]
            assert rank.returncode == 1 and "terminate called" not in output and "Traceback" not in output, \
                (attempt, rank.returncode, output)


@pytest.mark.slow
def test_resumed_two_process_runs_with_loader_workers_end_without_an_abort(tmp_path, shards):
    """What once ended with a rank dying of SIGABRT at exit, twice: 2 processes with 2 loader workers each, killed
    -9 after the first checkpoint, then rerun to the end. Every rerun exits 0 with the same final weights."""
    args = (*FAST, "data.num_workers=2", "data.device_cache=false")
    finals = []
    for cycle in range(2):
        run = tmp_path / f"run{cycle}"
        killed = launch(run, shards, 2, *args, background=True)
        wait(killed, lambda: newest(run) >= 10, timeout=120)
        kill_tree(killed)
        killed.communicate(timeout=60)
        rerun = launch(run, shards, 2, *args, check=False)
        output = rerun.stdout + rerun.stderr
        assert rerun.returncode == 0 and "resumed from" in output and "done: step 40" in output, output
        assert "terminate called" not in output and "Traceback" not in output, output
        finals.append(weights(run))
    for final in finals[1:]:
        assert_same_weights(final, finals[0])
