"""`python tests/diverge.py FIRST EVERY [train.py's arguments]`: train.py, with D's first weight set to NaN right
after the FIRST-th D phase of each process, and again every EVERY-th D phase after it (0: never again). A run that
diverges on cue, as a too-high learning rate or an fp16 overflow would make it, for tests/test_reliability.py."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train  # noqa: E402
from gan_dist.objective import GANObjective  # noqa: E402

first, every = int(sys.argv[1]), int(sys.argv[2])
calls = 0
d_phase = GANObjective.d_phase


def diverging_d_phase(self, *args, **kwargs):
    global calls
    calls += 1
    metrics = d_phase(self, *args, **kwargs)
    if calls == first or (every and calls > first and (calls - first) % every == 0):
        with torch.no_grad():
            next(self.D.parameters()).view(-1)[0] = float("nan")
    return metrics


GANObjective.d_phase = diverging_d_phase
sys.argv = ["train.py", *sys.argv[3:]]
sys.exit(train.main())
