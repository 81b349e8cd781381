"""The distributed helpers: the Accelerator's construction, running a step on the main process (or each node's
first) with every rank agreeing on its outcome, and `StopVote`, the one agreement every rank reaches on whether to
stop. The loop, checkpointing and the scripts that evaluate on several processes use these; nothing else here
touches torch.distributed.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Callable, TypeVar

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DDPCommunicationHookType, DistributedDataParallelKwargs, GradientAccumulationPlugin, \
    InitProcessGroupKwargs, TorchDynamoPlugin, broadcast, broadcast_object_list

from gan_dist.config import Config, Launch
from gan_dist.errors import UserError
from gan_dist.lease import RunLease
from gan_dist.signals import StopFlag

T = TypeVar("T")


def local_main_first(accelerator: Accelerator, fn: Callable[[], T]) -> T:
    """Run `fn` on each node's main process, then on the others; if it fails there, every rank stops with the
    failure instead of waiting for it forever."""
    result = error = None
    if accelerator.is_local_main_process:
        try:
            result = fn()
        except UserError as err:
            error = err
    failed = accelerator.reduce(torch.tensor(float(error is not None), device=accelerator.device), "sum")
    if error is not None:
        raise error
    if failed.item() > 0:
        raise UserError("data preparation failed on a node's main process (its message is above)")
    return result if accelerator.is_local_main_process else fn()


def on_main(accelerator: Accelerator, fn: Callable[[], T]) -> T:
    """`fn()` on the main process alone, its result handed to every rank. A UserError there is raised on every rank
    (quietly on the others: main prints it), so no rank is left waiting in a collective for a main that gave up."""
    box = [None, None]
    if accelerator.is_main_process:
        try:
            box[0] = fn()
        except UserError as err:
            box[1] = (str(err), err.code)
        except OSError as err:  # run.dir not writable, a full disk
            box[1] = (f"cannot write {err.filename or 'in run.dir'} ({err.strerror or err})", 1)
    broadcast_object_list(box)
    if box[1] is not None:
        raise UserError(*box[1], quiet=not accelerator.is_main_process)
    return box[0]


class StopVote:
    """Whether any rank was asked to stop (or to requeue), lost the run.dir lease, could not write a file there or
    met a fault in its data, agreed by every rank.

    With one process the answer is the local one: no collective, no tensor. With more, a vote is an all-reduce of
    a host tensor over a gloo group of its own, so it never waits for the GPU's queue. Between checkpoints a vote's
    result is read at the next vote (dist.stop_check_every steps later, when it has long arrived); at a checkpoint
    the vote is waited for, so every rank agrees before anything is written."""

    def __init__(self, world: int, timeout_s: int) -> None:
        self.group = torch.distributed.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s)) \
            if world > 1 else None
        self.pending: list[tuple[torch.Tensor, torch.distributed.Work]] = []

    def poll(self, flag: StopFlag, lease: RunLease | None, run_dir: str, now: bool, failed: str | None) -> \
            tuple[bool, bool]:
        """(stop, requeue) as every rank agrees. A lease another run took over (seen by main) stops every rank, and
        so does a rank that `failed` (main could not write a file, or a rank's data stopped it), with its line."""
        stop, requeue_asked, lost, broken = self((flag.requested > 0, flag.requested == 2,
                                                  lease is not None and lease.lost, failed is not None), now)
        if lost:
            raise UserError(f"another run took over run.dir '{run_dir}' (its lease went stale); this one stops "
                            "without writing anything more", quiet=lease is None)
        if broken:
            raise UserError(failed or "another rank could not go on (its message is above)", quiet=failed is None)
        return stop, requeue_asked

    def __call__(self, local: tuple[bool, ...], now: bool) -> tuple[bool, ...]:
        if self.group is None:
            return local
        votes = torch.tensor(local, dtype=torch.int32)
        self.pending.append((votes, torch.distributed.all_reduce(votes, group=self.group, async_op=True)))
        ready, self.pending = (self.pending, []) if now else (self.pending[:-1], self.pending[-1:])
        return tuple(bool(x) for x in sum((self._wait(*vote) for vote in ready), np.zeros(len(local), dtype=np.int32)))

    @staticmethod
    def _wait(votes: torch.Tensor, work: torch.distributed.Work) -> np.ndarray:
        work.wait()
        return votes.numpy()  # a host tensor: .numpy() refuses a device one, so this can never sync

    def close(self) -> None:
        """Wait for the votes still in flight, then end the vote's group and let go of it, which joins its gloo
        threads while the interpreter is whole. A gloo thread that drops a finished vote's tensor once Python has
        begun to finalize must take the GIL there and is ended inside a destructor: std::terminate ("terminate
        called without an active exception"), and the rank dies of SIGABRT. Every rank votes at the same steps, so
        a vote in flight is one every rank has sent. A second call does nothing."""
        pending, self.pending = self.pending, []
        try:
            for vote in pending:
                self._wait(*vote)
        finally:
            group, self.group = self.group, None
            if group is not None and torch.distributed.is_initialized():  # else ended with the default group
                torch.distributed.destroy_process_group(group)

    def __enter__(self) -> StopVote:
        return self

    def __exit__(self, kind, err, tb) -> None:
        """On an error, the votes in flight are waited for too, and a failure there (a rank gone) is dropped: the
        error that ended the run is the one to report."""
        try:
            self.close()
        except Exception:
            if kind is None:
                raise


def make_accelerator(cfg: Config, launch: Launch) -> Accelerator:
    """Without CUDA the Accelerator must be told to use the CPU, or `accelerate launch --multi_gpu` starts ranks that
    each believe they are alone. A collective waiting on a dead rank fails after dist.timeout_s, so the whole job
    ends instead of hanging. When compiling, accelerate compiles G and D after wrapping them in DDP."""
    if cfg.dist.comm_hook == "bf16" and not torch.cuda.is_available():
        raise UserError("dist.comm_hook=bf16 needs CUDA GPUs (torch's bf16 hook runs on NCCL 2.10 or later only); "
                        "without them use dist.comm_hook=fp16 or none", code=2)
    ddp = DistributedDataParallelKwargs(bucket_cap_mb=cfg.dist.bucket_cap_mb, static_graph=cfg.dist.static_graph,
                                        gradient_as_bucket_view=cfg.dist.gradient_as_bucket_view,
                                        broadcast_buffers=cfg.dist.broadcast_buffers,
                                        comm_hook=DDPCommunicationHookType(cfg.dist.comm_hook.replace("none", "no")))
    # An explicit plugin even when off: accelerate would otherwise compile whatever the launcher asked for.
    dynamo = TorchDynamoPlugin(backend=launch.compile_backend if launch.compile else "no", mode=launch.compile_mode)
    return Accelerator(
        cpu=not torch.cuda.is_available(), mixed_precision=launch.precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=cfg.train.grad_accum, sync_with_dataloader=False),
        dynamo_plugin=dynamo,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.dist.timeout_s)), ddp])


def describe_launch(launch: Launch, accelerator: Accelerator) -> str:
    """What the startup line says of precision, compilation and CPU threads, and where each setting came from."""
    compiled = f"{launch.compile_backend.lower()} {launch.compile_mode}" if launch.compile else "off"
    return (f"precision {accelerator.mixed_precision} (from {launch.precision_from}), compile {compiled} (from "
            f"{launch.compile_from}), {torch.get_num_threads()} CPU thread(s) per process")


def thread_warning(device: torch.device, world: int) -> str | None:
    """`accelerate launch` without --num_cpu_threads_per_process sets OMP_NUM_THREADS=1 on a machine without GPUs,
    which leaves a CPU run on one core of many (on 2 cores: 185 img/s against 325 for `python train.py`)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    share = cores // int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if device.type != "cpu" or torch.get_num_threads() > 1 or share < 2:
        return None
    return (f"warning: this process trains on 1 CPU thread while this node has {cores} cores; launch with "
            f"`accelerate launch --num_cpu_threads_per_process {share} ...` (or set OMP_NUM_THREADS={share})")


def step_marker(accelerator: Accelerator) -> Callable[[], None]:
    """CUDA graphs (compile mode reduce-overhead) replay into the same output memory: each step must tell them that
    the last one's outputs are done."""
    dynamo = accelerator.state.dynamo_plugin
    return torch.compiler.cudagraph_mark_step_begin if dynamo.backend != "NO" and dynamo.mode == "reduce-overhead" \
        else lambda: None


def sync_buffers(*modules: torch.nn.Module) -> None:
    """Make every rank's buffers of `modules` rank 0's. BatchNorm statistics are each rank's own
    (dist.broadcast_buffers=false), or drift between DDP's broadcasts; rank 0's copy is the one grids, evaluations,
    exports and the checkpoint's model files hold."""
    for b in (b for m in modules for b in m.buffers()):
        b.copy_(broadcast(b, from_process=0))
