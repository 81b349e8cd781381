"""Tests for gan_dist.lease: one writer per run.dir.

Covers: a free run.dir is taken and given back without a trace; a live holder (this process, another host with a
fresh heartbeat, the same SLURM job not requeued) is refused at once, naming host, pid and job; a holder that is gone
(its process ended or is a zombie on this host, a requeue of its SLURM job, no heartbeat for the timeout, an
unreadable old file) is taken over with a message; a holder that stalled past the timeout finds out it lost the
lease; of many processes racing for one run.dir exactly one wins.

Run: python -m pytest tests/test_lease.py -q
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from gan_dist.errors import UserError
from gan_dist.lease import Holder, RunLease


def plant(run_dir: Path, generation: int = 1, **fields) -> Path:
    """A lease file as another run would have left it."""
    holder = Holder(host="node-7", pid=4242, job="", restart=0, token="t" * 16, heartbeat=time.time())
    for k, v in fields.items():
        setattr(holder, k, v)
    path = run_dir / "lease" / f"{generation:08d}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(holder)))
    return path


def test_a_free_run_dir_is_taken_and_given_back_without_a_trace(tmp_path):
    run_dir = tmp_path / "run"
    lease = RunLease(run_dir, 8)
    lease.acquire()
    held = json.loads((run_dir / "lease" / "00000001.json").read_text())
    assert held["pid"] == os.getpid() and held["host"] and lease.holds()
    lease.release()
    assert not run_dir.exists(), "a run.dir that only the lease created is removed again"
    (run_dir / "metrics.jsonl").parent.mkdir()
    (run_dir / "metrics.jsonl").write_text("")
    lease = RunLease(run_dir, 8)
    lease.acquire()
    lease.release()
    assert [p.name for p in run_dir.iterdir()] == ["metrics.jsonl"]


def test_a_live_holder_is_refused_at_once_naming_it(tmp_path, monkeypatch):
    first = RunLease(tmp_path, 8)
    first.acquire()
    start = time.time()
    with pytest.raises(UserError, match=rf"is in use by another run \(host \S+, pid {os.getpid()}, last heartbeat"):
        RunLease(tmp_path, 8).acquire()
    first.release()
    plant(tmp_path, job="777", restart=2)  # another node, beating now
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")  # the same job, not requeued: a second srun, not a restart
    with pytest.raises(UserError, match="host node-7, pid 4242, SLURM job 777, last heartbeat 0 s ago"):
        RunLease(tmp_path, 8).acquire()
    assert time.time() - start < 2


@pytest.mark.parametrize("case", ["ended", "zombie", "requeued", "silent", "unreadable"])
def test_a_holder_that_is_gone_is_taken_over_with_a_message(tmp_path, monkeypatch, case):
    said = []
    if case in ("ended", "zombie"):  # a zombie: killed, not yet reaped by its parent
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        if case == "ended":
            dead.wait()
        else:
            time.sleep(1)
        plant(tmp_path, host=socket.gethostname(), pid=dead.pid)
        why = f"its process {dead.pid} on"
    elif case == "requeued":
        plant(tmp_path, job="777", restart=0)
        monkeypatch.setenv("SLURM_JOB_ID", "777")
        monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
        why = "SLURM job 777 was requeued (restart 0 -> 1)"
    elif case == "silent":
        plant(tmp_path, heartbeat=time.time() - 100)
        why = "no heartbeat for 10"
    else:
        path = plant(tmp_path)
        path.write_text("{torn")
        os.utime(path, (time.time() - 100, time.time() - 100))
        why = "its file 00000001.json is unreadable"
    lease = RunLease(tmp_path, 8, said.append)
    lease.acquire()
    assert lease.path.name == "00000002.json" and [p.name for p in (tmp_path / "lease").iterdir()] == \
        ["00000002.json"]
    assert len(said) == 1 and "taking over the lease" in said[0] and why in said[0], said
    lease.release()


def test_a_holder_that_stalled_past_the_timeout_learns_it_lost_the_lease(tmp_path):
    first = RunLease(tmp_path, 8)
    first.acquire()
    first._stop.set()  # its heartbeat stops, as in a process stopped for longer than the timeout
    first._thread.join()
    held = json.loads(first.path.read_text())
    held["host"], held["heartbeat"] = "node-7", time.time() - 100
    first.path.write_text(json.dumps(held))
    second = RunLease(tmp_path, 8)
    second.acquire()
    assert second.holds() and not first.holds()
    first.release()  # gives back nothing: the lease is no longer its own
    assert second.holds()
    second.release()


def _race(run_dir: str, go, out) -> None:
    go.wait()
    try:
        lease = RunLease(run_dir, 8)
        lease.acquire()
        out.put("won")
        time.sleep(1)
    except UserError:
        out.put("refused")


def test_of_many_runs_racing_for_one_run_dir_exactly_one_wins(tmp_path):
    ctx = multiprocessing.get_context("fork")
    go, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(str(tmp_path), go, out)) for _ in range(6)]
    for p in procs:
        p.start()
    go.set()
    results = sorted(out.get(timeout=30) for _ in procs)
    for p in procs:
        p.join()
    assert results == ["refused"] * 5 + ["won"]
