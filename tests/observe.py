"""`python tests/observe.py WHAT STEP [train.py's arguments]`: train.py, with one of the run's observers failing on
the main process at its first log at or after STEP, for tests/test_observers.py:

- `kill-wandb`: kill -9 W&B's service processes (wandb-core and its helpers), as the OOM killer or a node's cleanup
  would;
- `raise-init`, `raise-log`, `raise-image`, `raise-histogram`, `raise-finish`: that W&B call raises (init at the
  start, finish at the end; the media ones as a full disk under W&B's media copies does, with ENOSPC);
- `sigpipe`: SIGPIPE to this process.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
from pathlib import Path

import psutil
import wandb
from wandb.sdk.wandb_run import Run

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train  # noqa: E402
from gan_dist.tracking import Tracker  # noqa: E402

what, at = sys.argv[1], int(sys.argv[2])
step = [0]


def injected(*args, **kwargs):
    if step[0] >= at:
        raise OSError(errno.ENOSPC, f"No space left on device (injected into {what})")


def wrap(owner, name: str) -> None:
    original = getattr(owner, name)

    def failing(*args, **kwargs):
        injected()
        return original(*args, **kwargs)

    setattr(owner, name, failing)


log = Tracker.log


def observed_log(self, metrics):
    step[0] = metrics["train/step"]
    if self.is_main and step[0] >= at and what == "kill-wandb":
        killed = []
        for child in psutil.Process().children(recursive=True):
            try:
                if child.name().startswith("wandb"):
                    child.kill()
                    killed.append(child)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(killed, timeout=10)
    if self.is_main and step[0] >= at and what == "sigpipe":
        os.kill(os.getpid(), signal.SIGPIPE)
    log(self, metrics)


Tracker.log = observed_log
if what == "raise-init":
    wrap(wandb, "init")
elif what == "raise-log":
    wrap(Run, "log")
elif what == "raise-image":
    wrap(wandb, "Image")
elif what == "raise-histogram":
    wrap(wandb, "Histogram")
elif what == "raise-finish":
    wrap(Run, "finish")
sys.argv = ["train.py", *sys.argv[3:]]
sys.exit(train.main())
