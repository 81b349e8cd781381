"""Where a run, an export or a result came from: the git commit of the code (and what of its checkout differs from
it), the command that started this process, and the versions it ran with.

Pure Python at import (the scripts that only need the commit do not pull in torch); git that is missing or a folder
outside a checkout read as "unknown".
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

CODE = Path(__file__).resolve().parent  # the gan_dist package: its checkout holds the code that runs


def _git(repo: Path, *args: str) -> str | None:
    """git's output in `repo`, or None when git is missing, fails or hangs."""
    try:
        done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


@functools.cache
def git_commit(short: bool = False, repo: Path = CODE) -> str:
    """The commit checked out in `repo` (by default the gan-dist code that runs), abbreviated with `short`; "unknown"
    outside a git checkout."""
    return (_git(repo, "rev-parse", *(["--short"] if short else []), "HEAD") or "").strip() or "unknown"


def changed_files(repo: Path = CODE) -> list[str] | None:
    """The paths (relative to the checkout's root) that differ from its commit, untracked files included; None
    outside a git checkout."""
    status = _git(repo, "status", "--porcelain", "--untracked-files=all")
    return None if status is None else [line[3:] for line in status.splitlines()]


# A parent process whose program (or `python -m` module) starts so is a launcher: accelerate,
# accelerate.commands.launch, torchrun, torch.distributed.run.
LAUNCHERS = ("accelerate", "torchrun", "torch.distributed.run")


def launch_command() -> dict:
    """The command that started this process: its own arguments (train.py's), the launcher's when its parent is
    `accelerate launch` or torchrun (read from /proc; None elsewhere, e.g. `python train.py` or SLURM's one process),
    and the folder it ran in, so that a model card can say how to train it again."""
    launcher = None
    try:
        parent = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        parent = []
    if any(Path(arg).name.startswith(LAUNCHERS) for arg in parent[:3]):
        launcher = parent
    return {"cwd": os.getcwd(), "launcher": launcher, "train": list(sys.argv)}


def run_info(world_size: int) -> dict:
    """What a reviewer needs beside the config: the code's commit, the versions it ran with, and its command."""
    import accelerate
    import torch
    import webdataset

    return {"git_commit": git_commit(), "world_size": world_size, "python": platform.python_version(),
            "versions": {"torch": torch.__version__, "accelerate": accelerate.__version__,
                         "webdataset": getattr(webdataset, "__version__", "?"),
                         "wandb": metadata.version("wandb")},  # not imported: 0.7 s of a run without W&B
            "command": launch_command()}
