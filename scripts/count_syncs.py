"""Count the host syncs a training run makes between its log steps: every read of a tensor's value on the host
(`.item()`, `.tolist()`, `bool()`, `int()`, `float()`) and every blocking copy of a device tensor to the host
(`.cpu()`, `.numpy()`), made outside torch itself, and, on a GPU, every synchronizing CUDA call
(`torch.cuda.set_sync_debug_mode`).

    accelerate launch scripts/count_syncs.py --out syncs.json [--config configs/X.yaml] [key=value ...]

The window counted starts when the loop takes its first batch and ends where the first log step begins, so choose
`log.every` (and sample, eval and checkpoint intervals) no smaller than `train.steps`; the run then counts
`train.steps - 1` whole steps and the last step's training part. Each rank writes its own count to `--out` with
the rank in the name (`syncs.rank0.json`); the exit status is 0 whatever the count. torch's own reads of CPU
scalars (Adam's step counters) are not counted: they never wait for a device.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import warnings
from pathlib import Path

import torch

from gan_dist.config import load_config
from gan_dist.errors import UserError

TORCH_DIR = str(Path(torch.__file__).parent)
READS = ("item", "tolist", "__bool__", "__int__", "__float__")
COPIES = ("cpu", "numpy")  # a sync only for a device tensor


class Counter:
    def __init__(self) -> None:
        self.on = self.done = False
        self.calls: list[str] = []
        self.batches = 0

    def start(self) -> None:
        if not self.done and not self.on:
            self.on = True
            if torch.cuda.is_available():
                torch.cuda.set_sync_debug_mode("warn")

    def stop(self) -> None:
        if self.on:
            self.on, self.done = False, True
            if torch.cuda.is_available():
                torch.cuda.set_sync_debug_mode(0)

    def record(self, what: str, depth: int = 2) -> None:
        caller = sys._getframe(depth)
        if self.on and threading.current_thread() is threading.main_thread() and \
                not caller.f_code.co_filename.startswith(TORCH_DIR):
            self.calls.append(f"{what} at {caller.f_code.co_filename}:{caller.f_lineno}")


def instrument(counter: Counter) -> None:
    """Patch the tensor methods that read values, and the loop's batch source to open and close the window."""
    from gan_dist.data import DeviceBatches

    def watch(name: str, device_only: bool) -> None:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, **kwargs):
            if counter.on and (not device_only or self.device.type != "cpu"):
                counter.record(f"Tensor.{name}")
            return original(self, *args, **kwargs)
        setattr(torch.Tensor, name, counted)

    for name in READS:
        watch(name, False)
    for name in COPIES:
        watch(name, True)

    next_batch = DeviceBatches.__next__

    def counted_next(self):
        counter.start()
        counter.batches += counter.on
        return next_batch(self)
    DeviceBatches.__next__ = counted_next

    # The log step's first act is to read the data skip count, before its reduce.
    skipped = DeviceBatches.skipped.fget

    def ending_skipped(self):
        counter.stop()
        return skipped(self)
    DeviceBatches.skipped = property(ending_skipped)

    shown = warnings.showwarning

    def cuda_sync(message, category, filename, lineno, *rest):
        if counter.on and "synchroniz" in str(message):
            counter.calls.append(f"CUDA sync at {filename}:{lineno}")
        else:
            shown(message, category, filename, lineno, *rest)
    warnings.showwarning = cuda_sync


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON path; each rank writes NAME.rank<R>.json")
    args, rest = parser.parse_known_args()
    try:
        cfg = load_config(rest)
        from gan_dist.loop import train

        counter = Counter()
        instrument(counter)
        train(cfg)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.code
    rank = int(os.environ.get("RANK", 0))
    out = Path(args.out)
    out.with_name(f"{out.stem}.rank{rank}{out.suffix}").write_text(json.dumps(
        {"rank": rank, "batches": counter.batches, "syncs": len(counter.calls), "calls": counter.calls}, indent=1))
    print(f"rank {rank}: {len(counter.calls)} host syncs over {counter.batches} batches between log steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
