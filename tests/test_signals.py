"""Tests for gan_dist.signals: what each stop signal asks for, handlers restored afterwards (also after a crash),
loader workers ignoring the signals, the job id `scontrol requeue` gets, and a requeue that cannot happen.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from gan_dist.signals import StopFlag, requeue, slurm_job_id


def test_usr_signals_ask_for_requeue_and_term_for_a_stop():
    with StopFlag() as flag:
        assert flag.requested == 0
        os.kill(os.getpid(), signal.SIGTERM)
        assert (flag.requested, flag.name) == (1, "SIGTERM")
        os.kill(os.getpid(), signal.SIGUSR2)
        assert flag.requested == 2 and flag.name == "SIGTERM", "the first signal names the stop; requeue wins"
    with StopFlag() as flag:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert (flag.requested, flag.name) == (2, "SIGUSR1")


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGQUIT])
def test_hangup_and_quit_stop_like_sigterm(sig):
    """The launchers forward SIGHUP and SIGQUIT to every rank (a closed ssh session sends SIGHUP): a stop, no
    requeue."""
    with StopFlag() as flag:
        os.kill(os.getpid(), sig)
        assert (flag.requested, flag.name) == (1, sig.name)


def test_handlers_are_restored_on_leaving_even_after_an_exception():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT,
                                                signal.SIGHUP, signal.SIGQUIT)}
    with pytest.raises(RuntimeError):
        with StopFlag():
            assert signal.getsignal(signal.SIGTERM) is not before[signal.SIGTERM]
            raise RuntimeError("a crashed rank")
    assert {s: signal.getsignal(s) for s in before} == before


def test_second_ctrl_c_interrupts_at_once():
    with StopFlag() as flag:
        os.kill(os.getpid(), signal.SIGINT)
        assert flag.requested == 1
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def test_loader_workers_ignore_the_stop_signals():
    code = ("import os, signal, time; from gan_dist.signals import ignore_in_worker; ignore_in_worker(0); "
            "[os.kill(os.getpid(), s) for s in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT, "
            "signal.SIGHUP, signal.SIGQUIT)]; "
            "time.sleep(0.1); print('alive')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "alive"


def test_slurm_job_id_names_array_tasks(monkeypatch):
    for var in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(var, raising=False)
    assert slurm_job_id() is None
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    assert slurm_job_id() == "42"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "40")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert slurm_job_id() == "40_3"


def test_requeue_without_scontrol_says_to_resubmit(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert "could not requeue SLURM job 7" in requeue("7") and "resubmit" in requeue("7")
    fake = tmp_path / "scontrol"
    fake.write_text("#!/bin/sh\necho 'Requeue of job 7 not allowed' >&2\nexit 1\n")
    fake.chmod(0o755)
    assert "failed (Requeue of job 7 not allowed); does the job have --requeue?" in requeue("7")
