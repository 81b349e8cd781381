"""Stop signals for preemption: the handlers only set a flag, which the loop reads at step boundaries.

- SIGUSR1 / SIGUSR2: SLURM's early warning (`#SBATCH --signal=USR2@90`): save a checkpoint, requeue the job
  (`scontrol requeue`, when running under SLURM) and exit.
- SIGTERM / SIGINT / SIGHUP / SIGQUIT: save a checkpoint and exit (no requeue: a SLURM preemption that sends SIGTERM
  requeues the job itself, and a person pressing Ctrl-C wants it to stop). `torchrun` and `accelerate launch` forward
  all four to every rank; SIGHUP also comes from a closed terminal or ssh session. A second SIGINT interrupts at once.

Loader worker processes ignore them all (see `ignore_in_worker`): `torchrun` forwards a signal to each rank's whole
process group, and a worker killed by it would crash the rank before it reaches the checkpoint. No torch here.
"""

from __future__ import annotations

import os
import signal
import subprocess

REQUEUE_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)


class StopFlag:
    """A context (main thread only) in which the stop and requeue signals set `requested`: 0 (run on), 1 (save and
    exit) or 2 (also requeue). On leaving it, also by an exception, they act as before again, so that a crashed rank
    still dies when its launcher sends SIGTERM."""

    def __init__(self) -> None:
        self.requested = 0
        self.name = ""
        self.previous: dict[int, object] = {}

    def __enter__(self) -> StopFlag:
        self.previous = {sig: signal.signal(sig, self._handle) for sig in REQUEUE_SIGNALS + STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame) -> None:
        self.requested = max(self.requested, 2 if signum in REQUEUE_SIGNALS else 1)
        self.name = self.name or signal.Signals(signum).name
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)


def ignore_in_worker(_worker_id: int) -> None:
    """DataLoader `worker_init_fn`: workers leave stopping to their rank."""
    for sig in REQUEUE_SIGNALS + STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def slurm_job_id() -> str | None:
    """The id `scontrol requeue` takes (`JOB_TASK` for array jobs), or None outside SLURM."""
    if "SLURM_ARRAY_JOB_ID" in os.environ and "SLURM_ARRAY_TASK_ID" in os.environ:
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def requeue(job_id: str) -> str:
    """Ask SLURM to requeue the job; returns a line for the log (never raises: the checkpoint is already safe)."""
    try:
        done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"could not requeue SLURM job {job_id} ({err}); resubmit it to continue"
    if done.returncode:
        return (f"`scontrol requeue {job_id}` failed ({done.stderr.strip() or done.returncode}); does the job have "
                f"--requeue? Resubmit it to continue")
    return f"requeued SLURM job {job_id}; it continues from this checkpoint when it restarts"


def requeue_or_rerun(requeue_asked: bool) -> str:
    """What a stopped run does last: requeue its SLURM job when asked (SIGUSR1/SIGUSR2 and dist.requeue), or say how
    to continue; a line for the log."""
    job = slurm_job_id() if requeue_asked else None
    return requeue(job) if job else "rerun the same command to continue from it"
