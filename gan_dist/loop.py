"""The training loop: `train(cfg)` sets up processes, data, networks and tracking, then `run` alternates D and G
steps (`TrainStep`) and does the periodic work (logs, the stop vote, grids, evaluation, checkpoints) in between.

Every rank runs every collective (reduce, save_state, wait_for_everyone); only file and network I/O is gated on
the main process. Each concern has its own room, which the loop only calls: the GAN math in `objective.py` (over
`losses.py`), what is trained in `trained.py`, checkpoints in `checkpoint.py`, exports in `export.py`, the data
and its saved state in `data.py`, tracking in `tracking.py`, the distributed helpers in `distributed.py`.
"""

from __future__ import annotations

import math
import os
import secrets
import sys
import warnings
from contextlib import ExitStack
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast, set_seed
from tqdm import tqdm

from gan_dist.augment import build_augment
from gan_dist.checkpoint import Checkpointer, Resume, TrainState, choose_resume
from gan_dist.config import Config, TrainConfig, resolve_launch, to_dict
from gan_dist.console import keep_in
from gan_dist.data import DataState, DeviceBatches, open_batches
from gan_dist.distributed import StopVote, describe_launch, local_main_first, make_accelerator, on_main, step_marker, \
    sync_buffers, thread_warning
from gan_dist.ema import EMA
from gan_dist.errors import UserError
from gan_dist.evaluation import Evaluator, best_metric, better
from gan_dist.export import export_final
from gan_dist.lease import RunLease
from gan_dist.models import build_models, label_count
from gan_dist.objective import ENDLESS_EPOCH, GANObjective, Schedule
from gan_dist.optim import lr_factor, make_optimizers, schedule_progress, set_lr
from gan_dist.points import mixture_centers
from gan_dist.provenance import run_info
from gan_dist.rundir import console_file, prepare_run_dir, write_config
from gan_dist.selfcond import SelfCond
from gan_dist.signals import StopFlag, requeue_or_rerun
from gan_dist.tracking import Meter, Tracker
from gan_dist.trained import Trained
from gan_dist.viz import fixed_labels, fixed_noise


SAMPLE_DRAW = 512  # self-conditioning draws its sample in global batches of this many images (any world size <= 512)
SAMPLE_SEED = 0x5C  # added to the run's seed: the sample's stream is not the training stream


def micro_batch(cfg: TrainConfig, world: int) -> int:
    """Images per process per micro-step; the global batch must split evenly."""
    parts = world * cfg.grad_accum
    if cfg.batch_size % parts:
        raise UserError(f"train.batch_size={cfg.batch_size} does not split evenly over {world} processes x "
                        f"{cfg.grad_accum} accumulation steps; use a multiple of {parts}", code=2)
    return cfg.batch_size // parts


def open_run(cfg: Config, lease: RunLease, say: Callable[[str], None]) -> Resume:
    """Main process: take the run.dir's lease before anything there is read, then choose where to resume."""
    lease.acquire()
    keep_in(console_file(cfg.run.dir))  # what a lost console would have shown, from here on
    resume = choose_resume(cfg.run.dir, cfg.ckpt.resume, say)
    final = Path(cfg.run.dir) / "final"
    if resume.path is not None and resume.step >= cfg.train.steps and final.is_dir():
        say(f"run '{cfg.run.dir}' is complete (step {resume.step} of {cfg.train.steps}); final weights in {final}. "
            "Raise train.steps to train it further")
        return Resume(resume.path, resume.step, resume.origin, complete=True)
    return resume


def start_tracking(cfg: Config, accelerator: Accelerator, state: TrainState, batch: int) -> Tracker:
    """The run's config.yaml, its tracker (W&B, metrics.jsonl, grids) and the startup line."""
    world, device = accelerator.num_processes, accelerator.device
    info = run_info(world)
    on_main(accelerator, lambda: (write_config(cfg.run.dir, cfg), prepare_run_dir(cfg.run.dir, state.step,
                                                                                  info["command"])))
    config = to_dict(cfg) | info | {"micro_batch": batch, "mixed_precision": accelerator.mixed_precision}
    tracker = Tracker(accelerator.is_main_process, cfg.wandb, cfg.run.dir, state.wandb_id, config, state.step,
                      centers=mixture_centers(cfg.data), classes=label_count(cfg.model))
    accelerator.print(f"training: world size {world} on {device.type} ({accelerator.distributed_type.value}), "
                      f"{batch} images per process per micro-step, global batch {cfg.train.batch_size}, "
                      f"step {state.step} -> {cfg.train.steps}")
    return tracker


def evaluate(cfg: Config, accelerator: Accelerator, evaluator: Evaluator, trained: Trained, state: TrainState,
             tracker: Tracker) -> None:
    """Score G_ema (or G) on every rank's share of the samples, log the scores, and export `best/` when they improve
    on the best so far (all ranks call this)."""
    sync_buffers(trained.G_ema, trained.G_raw)  # G's running statistics feed nothing in training but its eval mode
    G = trained.G_ema if cfg.eval.model == "ema" else trained.G_raw
    scores = evaluator(G, accelerator.process_index, accelerator.num_processes, accelerator.gather,
                       accelerator.device) | {"step": state.step, "kimg": state.nimg / 1000}
    tracker.log({"train/step": state.step, "train/kimg": state.nimg / 1000} |
                {f"eval/{k}": v for k, v in scores.items() if k not in ("step", "kimg")})
    if trained.self_cond is not None and accelerator.is_main_process:  # the counts G draws its clusters from
        tracker.log_bars("eval/cluster_sizes", G.class_counts.cpu().numpy(), state.step)
    name = best_metric(cfg.eval, cfg.data)
    improved = accelerator.is_main_process and better(name, scores[name], state.best)
    if accelerator.is_main_process:  # TrainState is saved by main only
        state.scores, state.best = scores, scores[name] if improved else state.best
    on_main(accelerator, lambda: improved and export_final(cfg.run.dir, trained.exported(), "best", scores,
                                                           model=cfg.model, step=state.step, nimg=state.nimg))


def finish(cfg: Config, accelerator: Accelerator, trained: Trained, state: TrainState, tracker: Tracker,
           stopped_by: str | None) -> bool:
    """Export the final weights (unless a signal stopped the run early: `stopped_by` names it), then close the
    tracker and the processes. Returns whether W&B's finish hung."""
    if stopped_by:
        accelerator.print(f"stopped at step {state.step} by {stopped_by}; checkpoint saved")
    else:
        final = on_main(accelerator, lambda: export_final(cfg.run.dir, trained.exported(), scores=state.scores,
                                                          model=cfg.model, step=state.step, nimg=state.nimg))
        accelerator.print(f"done: step {state.step}, {state.nimg / 1000:.1f} kimg; final weights in {final}")
    tracker.finish()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return tracker.stalled


def train(cfg: Config) -> bool:
    """Train (or continue) the run `cfg` describes. Returns True when W&B's finish hung and was left behind: the
    process should then exit without waiting for W&B's exit hooks (os._exit)."""
    # Stop signals only set a flag while training runs; after it (or a crash) they act as usual again. `cleanup`
    # closes what the run opened (its progress bar, so that an error line starts a line of its own).
    with StopFlag() as flag, ExitStack() as cleanup:
        launch = resolve_launch(cfg.train, cfg.perf)
        accelerator = make_accelerator(cfg, launch)
        # Last on every way out (an error, a complete run, a stop): no process group is left for the interpreter's
        # exit, where a gloo thread finishing a collective aborts the process (see StopVote.close).
        cleanup.callback(accelerator.end_training)
        accelerator.print(describe_launch(launch, accelerator))
        warning = thread_warning(accelerator.device, accelerator.num_processes)
        if warning and accelerator.is_local_main_process:
            print(warning, file=sys.stderr, flush=True)
        # One writer per run.dir: the main process holds its lease from before it reads anything there to the end.
        lease = RunLease(cfg.run.dir, cfg.run.lease_timeout_s, accelerator.print) if accelerator.is_main_process \
            else None
        try:
            resume = on_main(accelerator, lambda: open_run(cfg, lease, accelerator.print))
            if resume.complete:
                return False
            outcome = run(cfg, accelerator, flag, resume, lease, cleanup)
        finally:
            if lease is not None:
                lease.release()
                if lease.lost:
                    keep_in(None)  # the run.dir is another run's now: its console.log too
        # Requeue last, once everything is written and the lease is free: SLURM cancels the job's processes at once.
        if outcome.stopped and accelerator.is_main_process:
            print(requeue_or_rerun(outcome.requeue and cfg.dist.requeue), flush=True)
        return outcome.stalled


def open_data(cfg: Config, accelerator: Accelerator, batch: int, saved: DataState, nimg: int) -> DeviceBatches:
    """This rank's real batches on its device, continuing at the data's `saved` state. Each node's main process
    prepares the data first (MNIST's shards on first use) while the other ranks wait."""
    return open_batches(cfg.data, cfg.perf, batch=batch, seed=cfg.seed, rank=accelerator.process_index,
                        world=accelerator.num_processes, device=accelerator.device, saved=saved, nimg=nimg,
                        first=lambda fn: local_main_first(accelerator, fn), say=accelerator.print)


def build_trained(cfg: Config, accelerator: Accelerator) -> Trained:
    """G, D, their optimizers (prepared: DDP, compile), the EMA, G and D unwrapped, and the augmentation. Built from
    one seed on every rank, so G_ema starts identical everywhere."""
    set_seed(cfg.seed)
    G, D = build_models(cfg.model)
    memory_format = torch.channels_last if cfg.perf.channels_last else torch.preserve_format
    G, D = G.to(accelerator.device, memory_format=memory_format), D.to(accelerator.device, memory_format=memory_format)
    ema = EMA(G, cfg.ema)
    opt_G, opt_D = make_optimizers(G, D, cfg.optim)
    with warnings.catch_warnings():
        # torch 2.13 renames DDP's broadcast_buffers; accelerate's DDP handler passes only the old name, whose
        # False (no sync at init either) is right here: every rank builds the same networks from one seed.
        warnings.filterwarnings("ignore", "`broadcast_buffers` is deprecated", FutureWarning)
        G, D, opt_G, opt_D = accelerator.prepare(G, D, opt_G, opt_D)
    G_raw, D_raw = (accelerator.unwrap_model(net, keep_torch_compile=False) for net in (G, D))
    augment = build_augment(cfg.aug)
    # ADA's p and sums live on the device and are checkpointed per rank; DiffAugment has no state.
    augment = augment.to(accelerator.device) if isinstance(augment, torch.nn.Module) else augment
    self_cond = SelfCond(cfg.model, D_raw, cfg.seed).to(accelerator.device) if cfg.model.self_cond else None
    return Trained(G=G, D=D, opt_G=opt_G, opt_D=opt_D, ema=ema, G_raw=G_raw, D_raw=D_raw, augment=augment,
                   self_cond=self_cond)


def new_state(cfg: Config, resume: Resume) -> TrainState:
    """A run's loop state before any resume: the fixed noise of its grids (from the seed alone) and its W&B id (a
    W&B sweep's agent names the run it started in WANDB_RUN_ID: the run must log to that one)."""
    return TrainState(z_fixed=fixed_noise(cfg.log.num_samples, cfg.model.z_dim, cfg.seed),
                      wandb_id=os.environ.get("WANDB_RUN_ID") or secrets.token_hex(4),
                      origin=resume.origin)


def progress_bar(cfg: TrainConfig, step: int, is_main: bool) -> tqdm:
    """The main process's progress bar: redrawn often on a terminal, every 30 s into a log file (SLURM, CI)."""
    return tqdm(total=cfg.steps, initial=step, disable=not is_main, unit="step", dynamic_ncols=True,
                mininterval=0.5 if sys.stderr.isatty() else 30)


class StepEnd(NamedTuple):
    """What the periodic work reads of a step: its last losses (on the device) and the last real batch D saw."""

    loss_d: torch.Tensor
    loss_g: torch.Tensor
    real: torch.Tensor
    c: torch.Tensor | None


class TrainStep:
    """One training step: n_critic D steps, each on its own real batches, then one G step on the last one's. Each
    optimizer steps once per grad_accum micro-batches; accelerate counts micro-batches across both blocks, so each
    block is exactly grad_accum long. Metrics stay on the device until the next log: no host sync per step."""

    def __init__(self, cfg: Config, accelerator: Accelerator, trained: Trained) -> None:
        self.cfg, self.accelerator, self.trained = cfg, accelerator, trained
        self.objective = GANObjective(cfg.loss, trained.G, trained.D, backward=accelerator.backward,
                                      augment=trained.augment, gather=accelerator.gather,
                                      rank=accelerator.process_index, world=accelerator.num_processes,
                                      conditional=label_count(cfg.model) > 0,
                                      labeler=trained.self_cond.label if trained.self_cond else None)
        self.mark = step_marker(accelerator)

    def recluster(self, step: int) -> None:
        """Self-conditioning: cluster the fixed sample of real images again with D as it is (every rank at the same
        step; the sample is the first images of the data's stream under its own seed, the same every time), and
        start G's cluster counts, which its samplers draw labels from, at the sample's cluster sizes."""
        cfg, acc = self.cfg, self.accelerator
        per_draw = math.ceil(SAMPLE_DRAW / acc.num_processes)
        sample = open_batches(cfg.data, cfg.perf, batch=per_draw, seed=cfg.seed + SAMPLE_SEED,
                              rank=acc.process_index, world=acc.num_processes, device=acc.device,
                              saved=DataState.fresh(), nimg=0, first=lambda fn: local_main_first(acc, fn),
                              say=lambda _: None)
        n = min(cfg.model.self_cond_images, sample.epoch_size or cfg.model.self_cond_images)
        try:
            images = torch.cat([next(sample)[0] for _ in range(math.ceil(n / (per_draw * acc.num_processes)))])
        finally:
            sample.close()
        sizes = self.trained.self_cond.recluster(self.trained.D_raw, images, step, gather=acc.gather,
                                                 broadcast=broadcast, world=acc.num_processes, per_draw=per_draw, n=n)
        self.trained.G_raw.recount(sizes.to(torch.float64))

    def __call__(self, state: TrainState, batches: DeviceBatches, meter: Meter) -> StepEnd:
        """Train `state.step` on `batches`, adding its metrics to `meter`."""
        cfg, t, objective = self.cfg, self.trained, self.objective
        if t.self_cond is not None and t.self_cond.due(state.step):
            self.recluster(state.step)
        set_lr(t.opt_G, t.opt_D, lr_factor(state.step, cfg.train.steps, cfg.optim, state.nimg), cfg.optim)
        schedule = Schedule(schedule_progress(state.step, cfg.train.steps, cfg.optim, state.nimg),
                            state.nimg / (batches.epoch_size or ENDLESS_EPOCH))
        for i in range(cfg.loss.n_critic):
            regularize = objective.regularize(state.step * cfg.loss.n_critic + i)
            pairs = []  # the last D step's real batches and labels: G's micro-steps pair with them
            for _ in range(cfg.train.grad_accum):
                real, c = meter.fetch(batches)
                c = objective.labels(real, c)
                self.mark()
                with self.accelerator.accumulate(t.D):
                    z = torch.randn(len(real), cfg.model.z_dim, device=real.device)
                    metrics = objective.d_phase(real, c, z, schedule, regularize)
                    t.opt_D.step()
                    t.opt_D.zero_grad(set_to_none=cfg.optim.set_to_none)
                meter.add(metrics, cfg.loss.n_critic)
                if c is not None:
                    t.G_raw.count(c)
                pairs.append((real, c))
        for real, c in pairs:
            self.mark()
            with self.accelerator.accumulate(t.G):
                z = torch.randn(len(real), cfg.model.z_dim, device=real.device)
                g_metrics = objective.g_phase(real, c, z, schedule)
                t.opt_G.step()
                t.opt_G.zero_grad(set_to_none=cfg.optim.set_to_none)
            meter.add(g_metrics)
            meter.tick()
        step_nimg = cfg.train.batch_size * cfg.loss.n_critic  # real images shown to D
        if (state.step + 1) % cfg.perf.ema_every == 0 and not t.opt_G.step_was_skipped:
            t.update_ema(state.nimg, step_nimg * cfg.perf.ema_every)
        state.step, state.nimg = state.step + 1, state.nimg + step_nimg
        # ADA: p moves on every rank alike, from the heuristic's sums over every rank (a reduce; no host sync).
        if t.ada is not None and state.step % cfg.aug.interval == 0:
            t.ada.adjust(self.accelerator.reduce(t.ada.sums, "sum"), step_nimg * cfg.aug.interval)
        return StepEnd(metrics["loss_d"], g_metrics["loss_g"], real, c)


class Outcome(NamedTuple):
    """How `run` ended: whether W&B's finish hung, whether a signal stopped it early and asked for a requeue."""

    stalled: bool
    stopped: bool
    requeue: bool


def run(cfg: Config, accelerator: Accelerator, flag: StopFlag, resume: Resume, lease: RunLease | None,
        cleanup: ExitStack) -> Outcome:
    device, world, is_main = accelerator.device, accelerator.num_processes, accelerator.is_main_process
    batch = micro_batch(cfg.train, world)
    trained = build_trained(cfg, accelerator)
    state = new_state(cfg, resume)
    ckpt = Checkpointer(accelerator, cfg, trained, state)

    # Resume (the checkpoint main chose and verified; every rank's RNG exactly), or seed each rank's noise apart.
    set_seed(cfg.seed, device_specific=True)
    saved = ckpt.resume(resume)
    z_fixed, c_fixed = state.z_fixed.to(device), fixed_labels(len(state.z_fixed), label_count(cfg.model), device)

    # Data: each rank draws from the dataset held on its device, or reads its own slice of the shards, continuing
    # at its saved position either way. Evaluation needs the MNIST classifier, which each node's main process
    # trains on first use while the other ranks wait.
    batches = open_data(cfg, accelerator, batch, saved, state.nimg)
    cleanup.callback(lambda: batches.close())  # the loader's workers, also after an error (the newest `batches`)
    evaluator = local_main_first(accelerator, lambda: Evaluator(cfg.eval, cfg.data, cfg.model.z_dim, cfg.seed,
                                                                label_count(cfg.model), self_cond=cfg.model.self_cond))
    tracker = cleanup.enter_context(start_tracking(cfg, accelerator, state, batch))
    meter = Meter(accelerator, state.nimg, state.log_sums, state.log_steps)
    progress = cleanup.enter_context(progress_bar(cfg.train, state.step, is_main))
    vote, stop, requeue_asked = cleanup.enter_context(StopVote(world, cfg.dist.timeout_s)), False, False
    train_step = TrainStep(cfg, accelerator, trained)
    while state.step < cfg.train.steps:
        last = train_step(state, batches, meter)
        progress.update(1)
        if cfg.perf.step_sync:
            progress.set_postfix(loss_d=f"{last.loss_d.item():.3f}", loss_g=f"{last.loss_g.item():.3f}",
                                 refresh=False)
        is_last = state.step == cfg.train.steps
        ckpt_due = state.step % cfg.ckpt.every == 0 or is_last
        sample_due = state.step % cfg.log.sample_every == 0 or is_last
        eval_due = cfg.eval.every and (state.step % cfg.eval.every == 0 or is_last) and evaluator.active

        # Log the interval's means over micro-steps and ranks; a non-finite one is a divergence.
        bad = []
        if state.step % cfg.log.every == 0 or is_last:
            row = meter.row(state.step, state.nimg, batches.skipped, batches.epoch_size)
            if trained.ada is not None:
                row |= {"aug/p": trained.ada.p.item(), "aug/rt": trained.ada.rt.item()}
            tracker.log(row)
            progress.set_postfix(loss_d=f"{row['train/loss_d']:.3f}", loss_g=f"{row['train/loss_g']:.3f}",
                                 img_s=f"{row['perf/img_per_sec']:.0f}", refresh=False)
            bad = [k for k, v in row.items() if not math.isfinite(v)]

        # Stop signals, a lost lease, files main could not write and a rank's data fault: all ranks agree in one
        # vote, so all of them stop at the same step, and no checkpoint holds a step after a fault.
        if state.step % cfg.dist.stop_check_every == 0 or ckpt_due:
            stop, requeue_asked = vote.poll(flag, lease, cfg.run.dir, ckpt_due, tracker.failed or batches.failed)

        # Nothing is written from non-finite weights: stop, or go back to the newest checkpoint (train.on_nonfinite).
        bad = bad or (ckpt.nonfinite() if ckpt_due or stop or sample_due or eval_due else [])
        if bad:
            batches = open_data(cfg, accelerator, batch, ckpt.roll_back(bad, tracker.finish), state.nimg)
            meter = Meter(accelerator, state.nimg, state.log_sums, state.log_steps)
            progress.n = state.step
            continue

        # Grids and histograms on the fixed noise; evaluation (every rank generates its share, the main process
        # scores them) and the best weights; the checkpoint.
        if sample_due:
            tracker.log_samples(state.step, G_ema=trained.G_ema, G=trained.G_raw, D=trained.D_raw, z=z_fixed,
                                c=c_fixed, real=last.real, c_real=last.c)
        if eval_due:
            evaluate(cfg, accelerator, evaluator, trained, state, tracker)
        if ckpt_due or stop:
            ckpt.save(batches.state(), meter.state())
        if stop:
            break
    # A grid or metrics line of the last step unwritten, or a data fault in its batches.
    vote.poll(flag, lease, cfg.run.dir, True, tracker.failed or batches.failed)
    vote.close()
    batches.close()
    progress.close()
    stalled = finish(cfg, accelerator, trained, state, tracker, (flag.name or "a signal to a peer rank") if stop
                     else None)
    return Outcome(stalled, stop, requeue_asked)
