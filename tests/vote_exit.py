"""`python tests/vote_exit.py` as each rank of 2 (RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set): the stop vote
as the loop runs it, its newest vote left in flight (`now=False`), and then an error ending the rank the way one
ends `train()`: out through the cleanup stack (the vote, then the process group), at once into the interpreter's
exit. A gloo thread still finishing the vote there aborted the rank now and then (SIGABRT, "terminate called
without an active exception"); tests/test_reliability.py runs this a few times and asks for exit status 1 each.
"""

from __future__ import annotations

import sys
from contextlib import ExitStack
from datetime import timedelta
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gan_dist.distributed import StopVote  # noqa: E402

torch.distributed.init_process_group("gloo", timeout=timedelta(seconds=60))
with ExitStack() as cleanup:
    cleanup.callback(torch.distributed.destroy_process_group)  # train()'s end_training
    vote = cleanup.enter_context(StopVote(2, 60))
    for _ in range(20):
        vote((False, False, False, False), now=False)
    sys.exit(1)
