"""The run directory's files as every reader sees them: metrics rows without a line torn by a kill, a running
training's rows read as they complete, metrics.jsonl cut back to the step a run resumes from, the command that started
a run kept across resumes, and checkpoints listed only when complete, in step order past step 1e8."""

from __future__ import annotations

import json

import pytest

from gan_dist import rundir
from gan_dist.errors import UserError
from gan_dist.rundir import CheckpointError


def rows(*steps: int) -> str:
    return "".join(json.dumps({"train/step": s, "train/loss_d": 0.5}) + "\n" for s in steps)


def test_metrics_rows_read_back_without_a_torn_last_line(tmp_path):
    for step in (1, 2):
        rundir.append_metrics(tmp_path, {"train/step": step, "train/loss_d": 0.5})
    with rundir.metrics_file(tmp_path).open("a") as f:
        f.write('{"train/step": 3, "train/lo')  # killed mid-write
    assert rundir.read_metrics(tmp_path) == [{"train/step": 1, "train/loss_d": 0.5},
                                             {"train/step": 2, "train/loss_d": 0.5}]


def test_a_running_trainings_rows_are_read_once_each_when_complete(tmp_path):
    assert rundir.metrics_since(tmp_path, 0) == ([], 0), "no metrics.jsonl yet"
    path = rundir.metrics_file(tmp_path)
    path.write_text(rows(1) + '{"train/step": 2')
    got, offset = rundir.metrics_since(tmp_path, 0)
    assert [r["train/step"] for r in got] == [1] and offset == len(rows(1))
    with path.open("a") as f:
        f.write(', "train/loss_d": 0.5}\n' + rows(3))
    got, offset = rundir.metrics_since(tmp_path, offset)
    assert [r["train/step"] for r in got] == [2, 3] and offset == path.stat().st_size
    assert rundir.metrics_since(tmp_path, offset) == ([], offset)


def test_a_resumed_run_reads_as_one_run_and_keeps_the_command_that_started_it(tmp_path, capsys):
    rundir.metrics_file(tmp_path).write_text(rows(10, 20, 30) + '{"train/st')
    rundir.prepare_run_dir(tmp_path, 20, {"cwd": "/work", "launcher": None, "train": ["train.py", "seed=1"]})
    assert [r["train/step"] for r in rundir.read_metrics(tmp_path)] == [10, 20]
    assert rundir.metrics_file(tmp_path).read_text() == rows(10, 20)
    assert "dropped 1 unreadable line(s)" in capsys.readouterr().err
    assert rundir.samples_dir(tmp_path).is_dir()
    rundir.prepare_run_dir(tmp_path, 20, {"cwd": "/elsewhere", "launcher": None, "train": ["train.py", "seed=2"]})
    assert rundir.read_command(tmp_path) == {"cwd": "/work", "launcher": None, "train": ["train.py", "seed=1"]}


def test_a_command_file_that_does_not_read_as_one_is_none(tmp_path):
    assert rundir.read_command(tmp_path) is None
    rundir.command_file(tmp_path).write_text(json.dumps({"cwd": "/work", "train": "train.py"}))
    assert rundir.read_command(tmp_path) is None


def test_checkpoints_are_listed_when_complete_in_step_order_past_step_1e8(tmp_path):
    for step in (100_000_000, 5, 99_999_999, 7):
        folder = rundir.step_dir(tmp_path, step)
        folder.mkdir(parents=True)
        if step != 7:  # step 7's meta.json was never written: a checkpoint cut short
            (folder / rundir.META).write_text(json.dumps({"step": step, "world_size": 2, "files": {}}))
    (rundir.checkpoints_dir(tmp_path) / ".tmp-step_00000009").mkdir()
    found = rundir.checkpoints(tmp_path)
    assert [p.name for p in found] == ["step_00000005", "step_99999999", "step_100000000"]
    assert [rundir.step_of(p) for p in found] == [5, 99_999_999, 100_000_000]
    assert rundir.read_meta(found[-1])["world_size"] == 2
    assert rundir.checkpoints(tmp_path / "nowhere") == []


@pytest.mark.parametrize("meta, message", [
    ("{", "meta.json is unreadable"),
    (json.dumps({"step": 3, "world_size": 0, "files": {}}), "lacks a valid step and world_size"),
    (json.dumps({"step": 3, "world_size": 1}), "lists no files"),
])
def test_a_meta_json_that_cannot_be_trusted_is_a_checkpoint_error(tmp_path, meta, message):
    folder = rundir.step_dir(tmp_path, 3)
    folder.mkdir(parents=True)
    (folder / rundir.META).write_text(meta)
    with pytest.raises(CheckpointError, match=message):
        rundir.read_meta(folder)


def test_checkpoint_paths_and_the_run_that_owns_them(tmp_path):
    run = tmp_path / "run"
    assert rundir.checkpoint_path(run, "best") == run / "best"
    assert rundir.checkpoint_path(run, "1200") == run / "checkpoints" / "step_00001200"
    with pytest.raises(UserError, match="--checkpoint latest is not final, best or a step number"):
        rundir.checkpoint_path(run, "latest")
    step = rundir.step_dir(run, 1200)
    step.mkdir(parents=True)
    (step / rundir.META).write_text("{}")
    (step / rundir.CONFIG).write_text("seed: 0\n")  # a checkpoint keeps its own config.yaml: it is no run
    assert rundir.owning_run(step) is None
    rundir.config_file(run).write_text("seed: 0\n")
    (run / "final").mkdir()
    assert rundir.owning_run(step) == rundir.owning_run(run / "final") == rundir.owning_run(run) == run
    assert rundir.config_text(run) == "seed: 0\n" and rundir.config_text(tmp_path) is None
    with pytest.raises(UserError, match="is not a run directory"):
        rundir.read_config(tmp_path)


def test_sample_grids_are_found_by_kind_and_step_past_step_1e8(tmp_path):
    rundir.samples_dir(tmp_path).mkdir()
    for step in (100, 100_000_000):
        rundir.sample_file(tmp_path, "samples/ema", step).write_bytes(b"png")
    rundir.sample_file(tmp_path, "samples/G", 100).write_bytes(b"png")
    grids = rundir.sample_grids(tmp_path)
    assert sorted(grids) == ["G", "ema"] and sorted(grids["ema"]) == [100, 100_000_000]
    assert grids["ema"][100].name == "samples_ema_00000100.png"
