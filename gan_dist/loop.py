"""The training loop: `train(cfg)` sets up processes, data, networks and tracking, then alternates D and G steps.

Every rank runs every collective (reduce, save_state, wait_for_everyone); only file and network I/O is gated on
the main process. The GAN math lives in `losses.py`, the EMA in `ema.py`, checkpoint I/O in `checkpoint.py`.
"""

from __future__ import annotations

import math
import os
import secrets
import sys
import warnings
from contextlib import ExitStack
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm import tqdm

from gan_dist.augment import ADA, build_augment
from gan_dist.checkpoint import Resume, TrainState, choose_resume, export_final, nonfinite, resume_training, \
    save_training, training_tensors
from gan_dist.config import Config, TrainConfig, resolve_launch, to_dict, to_yaml
from gan_dist.distributed import StopVote, describe_launch, local_main_first, make_accelerator, on_main, step_marker, \
    sync_buffers, thread_warning
from gan_dist.data import CachedBatches, DeviceBatches, cache_position, decode_dataset, open_source, shard_batches, \
    spans_of, spans_tensor, start_positions, wants_device_cache
from gan_dist.ema import EMA
from gan_dist.evaluation import Evaluator, better, best_metric
from gan_dist.errors import UserError
from gan_dist.files import write_atomic
from gan_dist.lease import RunLease
from gan_dist.losses import Select, d_step, g_step, topk_count, topk_weights
from gan_dist.models import build_models
from gan_dist.optim import cosine, lr_factor, make_optimizers, schedule_progress, set_lr
from gan_dist.points import PointBatches, mixture_centers
from gan_dist.signals import StopFlag, requeue_or_rerun
from gan_dist.tracking import Meter, Tracker, prepare_run_dir, run_info

T = TypeVar("T")


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
    resume = choose_resume(cfg.run.dir, cfg.ckpt.resume, say)
    final = Path(cfg.run.dir) / "final"
    if resume.path is not None and resume.step >= cfg.train.steps and final.is_dir():
        say(f"run '{cfg.run.dir}' is complete (step {resume.step} of {cfg.train.steps}); final weights in {final}. "
            "Raise train.steps to train it further")
        return Resume(resume.path, resume.step, resume.origin, complete=True)
    return resume


def make_batches(cfg: Config, accelerator: Accelerator, batch: int, state: TrainState) -> DeviceBatches:
    """This rank's real batches on its device, continuing at the data position saved in `state`."""
    seed, rank, world, device = cfg.seed, accelerator.process_index, accelerator.num_processes, accelerator.device
    if cfg.data.dataset not in ("mnist", "webdataset"):
        return DeviceBatches(PointBatches(cfg.data, batch, seed, rank, state.batches), device, cfg.perf.prefetch)
    # Each node's main process writes MNIST's shards on first use while the other ranks wait.
    source = local_main_first(accelerator, lambda: open_source(cfg.data))
    epoch = state.nimg // (cfg.data.limit or sum(source.counts)) if source.counts else 0
    # data.limit's few samples are held too: on the host when the device cache is turned off.
    cached = wants_device_cache(cfg.data, source) or cfg.data.limit > 0
    held_on = device if cached and cfg.data.device_cache is not False else torch.device("cpu")
    saved_layout, state.data_layout = state.data_layout, "cache" if cached else "stream"
    if cached:
        try:
            images, labels, skipped = decode_dataset(source, cfg.data)
            held = torch.from_numpy(images).to(held_on), torch.from_numpy(labels).to(held_on)
        except (MemoryError, torch.cuda.OutOfMemoryError):
            raise UserError(f"data.device_cache={cfg.data.device_cache}: the decoded dataset does not fit in "
                            f"{device.type} memory; use data.device_cache=false (the loader)") from None
        subset = f"data.limit={cfg.data.limit} of {sum(source.counts)}: " if cfg.data.limit else ""
        accelerator.print(f"data: {subset}{len(images)} images ({images.nbytes / 2**20:.0f} MB) decoded once and "
                          f"held on {held_on.type} (data.device_cache={cfg.data.device_cache})")
        position = cache_position(state.data_pos, saved_layout, world, epoch, accelerator.print)
        state.data_spans = spans_tensor({})
        batches = CachedBatches(*held, cfg.data, batch, seed, rank, world, position, skipped)
        return DeviceBatches(batches, device, prefetch=held_on != device and cfg.perf.prefetch,
                             channels_last=cfg.perf.channels_last)
    stand_in = (torch.zeros(batch, cfg.data.channels, cfg.data.resolution, cfg.data.resolution, dtype=torch.uint8),
                torch.zeros(batch, dtype=torch.int64)) if world > 1 else None
    positions, spans = start_positions(state.data_pos, cfg.data.mode, rank, world, max(cfg.data.num_workers, 1),
                                       epoch, accelerator.print, same_layout=saved_layout != "cache",
                                       spans=spans_of(state.data_spans), total=sum(source.counts or []))
    state.data_spans = spans_tensor(spans)
    batches = shard_batches(source, cfg.data, batch, seed, rank, world, state.batches, positions, spans,
                            pin_memory=device.type == "cuda" and cfg.perf.prefetch)
    return DeviceBatches(batches, device, cfg.perf.prefetch, cfg.perf.channels_last, stand_in)


ENDLESS_EPOCH = 50_000  # images that count as an epoch for top-k's decay when the data has no epochs (2-D, resampled)


def fixed_labels(cfg: Config, n: int, device: torch.device) -> torch.Tensor | None:
    """Labels of the fixed-noise samples of a conditional run: column k of each grid is class k."""
    return torch.arange(n, device=device) % cfg.model.classes if cfg.model.cond else None


def topk_select(cfg: Config, accelerator: Accelerator, batch: int, epochs: float) -> Select | None:
    """Top-k G updates: each G micro-step keeps the k best-scored of the world x `batch` samples of all ranks."""
    if cfg.loss.topk_gamma == 1:
        return None
    rank, world = accelerator.process_index, accelerator.num_processes
    k = topk_count(world * batch, epochs, cfg.loss.topk_gamma, cfg.loss.topk_min)
    return lambda scores: topk_weights(scores, k, accelerator.gather, rank, world)


def build_networks(cfg: Config, accelerator: Accelerator) -> tuple:
    """G, D, their optimizers (prepared: DDP, compile), the EMA, and G and D unwrapped (no DDP or compile prefix: what
    final/ and best/ export and checkpoints hold the buffers of). Built from one seed on every rank, so G_ema starts
    identical everywhere."""
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
    return G, D, opt_G, opt_D, ema, G_raw, D_raw


def start_tracking(cfg: Config, accelerator: Accelerator, state: TrainState, batch: int) -> Tracker:
    """The run's config.yaml, its tracker (W&B, metrics.jsonl, grids) and the startup line."""
    world, device = accelerator.num_processes, accelerator.device
    info = run_info(world)
    on_main(accelerator, lambda: (write_atomic(Path(cfg.run.dir) / "config.yaml", to_yaml(cfg).encode()),
                                  prepare_run_dir(Path(cfg.run.dir), state.step, info["command"])))
    tracker = Tracker(accelerator.is_main_process, cfg.wandb, cfg.run.dir, state.wandb_id, to_dict(cfg) | info | {
        "micro_batch": batch, "mixed_precision": accelerator.mixed_precision},
                      mixture_centers(cfg.data), cfg.model.classes if cfg.model.cond else 0)
    accelerator.print(f"training: world size {world} on {device.type} ({accelerator.distributed_type.value}), "
                      f"{batch} images per process per micro-step, global batch {cfg.train.batch_size}, "
                      f"step {state.step} -> {cfg.train.steps}")
    return tracker


def evaluate(cfg: Config, accelerator: Accelerator, evaluator: Evaluator, exported: dict[str, torch.nn.Module],
             state: TrainState, tracker: Tracker) -> None:
    """Score G_ema (or G) on every rank's share of the samples, log the scores, and export `best/` when they improve
    on the best so far (all ranks call this)."""
    G_ema, G = exported["generator_ema"], exported["generator"]
    sync_buffers(G_ema, G)  # G's running statistics feed nothing in training but its eval mode
    scores = evaluator(G_ema if cfg.eval.model == "ema" else G, accelerator.process_index, accelerator.num_processes,
                       accelerator.gather, accelerator.device) | {"step": state.step, "kimg": state.nimg / 1000}
    tracker.log({"train/step": state.step, "train/kimg": state.nimg / 1000} |
                {f"eval/{k}": v for k, v in scores.items() if k not in ("step", "kimg")})
    name = best_metric(cfg.eval, cfg.data)
    improved = accelerator.is_main_process and better(name, scores[name], state.best)
    if accelerator.is_main_process:  # TrainState is saved by main only
        state.scores, state.best = scores, scores[name] if improved else state.best
    on_main(accelerator, lambda: improved and export_final(cfg.run.dir, exported, "best", scores, model=cfg.model,
                                                           step=state.step, nimg=state.nimg))


def train(cfg: Config) -> bool:
    """Train (or continue) the run `cfg` describes. Returns True when W&B's finish hung and was left behind: the
    process should then exit without waiting for W&B's exit hooks (os._exit)."""
    # Stop signals only set a flag while training runs; after it (or a crash) they act as usual again. `cleanup`
    # closes what the run opened (its progress bar, so that an error line starts a line of its own).
    with StopFlag() as flag, ExitStack() as cleanup:
        launch = resolve_launch(cfg.train, cfg.perf)
        accelerator = make_accelerator(cfg, launch)
        accelerator.print(describe_launch(launch, accelerator))
        warning = thread_warning(accelerator.device, accelerator.num_processes)
        if warning and accelerator.is_local_main_process:
            print(warning, file=sys.stderr, flush=True)
        # One writer per run.dir: the main process holds its lease from before it reads anything there to the end.
        lease = RunLease(cfg.run.dir, cfg.run.lease_timeout_s, accelerator.print) if accelerator.is_main_process \
            else None
        try:
            resume = on_main(accelerator, lambda: open_run(cfg, lease, accelerator.print))
            return False if resume.complete else run(cfg, accelerator, flag, resume, lease, cleanup)
        finally:
            if lease is not None:
                lease.release()


def roll_back(cfg: Config, accelerator: Accelerator, state: TrainState, ema: EMA, nets: dict[str, torch.nn.Module],
              bad: list[str], tracker: Tracker) -> None:
    """After the metrics or tensors `bad` turned non-finite: with train.on_nonfinite=rollback and rollbacks left,
    load the newest checkpoint into every rank and draw other noise from there, so that the run does not walk the
    same path again; otherwise stop with one error line (all ranks call this)."""
    what = f"training diverged at step {state.step}: {', '.join(bad)} non-finite (NaN or inf)"
    path = on_main(accelerator, lambda: choose_resume(cfg.run.dir, "auto", accelerator.print).path or (
        Path(state.origin) if state.origin else None))
    rollback = cfg.train.on_nonfinite == "rollback"
    if path is None or not rollback or state.rollbacks >= cfg.train.max_rollbacks:
        tracker.finish()
        if path is None:
            raise UserError(f"{what}, before the run's first checkpoint: there is nothing to go back to, and nothing "
                            "was written from it. Rerun with lower learning rates (optim.lr_G, optim.lr_D)",
                            quiet=not accelerator.is_main_process)
        tried = f" again after {state.rollbacks} rollback(s) (train.max_rollbacks={cfg.train.max_rollbacks})" \
            if rollback else ""
        raise UserError(f"{what}{tried}; nothing was written from it, and the newest checkpoint {path} is finite. "
                        "Lower the learning rates (optim.lr_G and optim.lr_D may change on resume) and rerun the same "
                        f"command to resume from it{'' if rollback else ', or set train.on_nonfinite=rollback'}",
                        quiet=not accelerator.is_main_process)
    rollbacks = state.rollbacks + 1
    resume_training(accelerator, path, state, ema, nets, to_dict(cfg))
    state.rollbacks = rollbacks
    set_seed(int(np.random.SeedSequence([cfg.seed, rollbacks]).generate_state(1)[0] % 2**31), device_specific=True)
    on_main(accelerator, lambda: prepare_run_dir(Path(cfg.run.dir), state.step))
    accelerator.print(f"{what}; rolled back to step {state.step} (rollback {rollbacks} of train.max_rollbacks="
                      f"{cfg.train.max_rollbacks}), drawing other noise from there")


def run(cfg: Config, accelerator: Accelerator, flag: StopFlag, resume: Resume, lease: RunLease | None,
        cleanup: ExitStack) -> bool:
    device, world, is_main = accelerator.device, accelerator.num_processes, accelerator.is_main_process
    batch = micro_batch(cfg.train, world)

    G, D, opt_G, opt_D, ema, G_raw, D_raw = build_networks(cfg, accelerator)
    augment = build_augment(cfg.aug)
    ada = augment.to(device) if isinstance(augment, ADA) else None  # its p and sums are checkpointed per rank
    nets = {"G": G_raw, "D": D_raw} | ({"aug": ada} if ada is not None else {})
    exported = {"generator": G_raw, "generator_ema": ema.G_ema, "discriminator": D_raw}
    z_fixed = torch.randn(cfg.log.num_samples, cfg.model.z_dim, generator=torch.Generator().manual_seed(cfg.seed))
    # A W&B sweep's agent names the run it started (WANDB_RUN_ID); the run must log to that one.
    state = TrainState(z_fixed=z_fixed, wandb_id=os.environ.get("WANDB_RUN_ID") or secrets.token_hex(4),
                       origin=resume.origin)

    # Resume (the checkpoint main chose and verified; every rank's RNG exactly), or seed each rank's noise apart.
    set_seed(cfg.seed, device_specific=True)
    if resume.path is not None:
        resume_training(accelerator, resume.path, state, ema, nets, to_dict(cfg))
        state.origin = resume.origin
    z_fixed, c_fixed = state.z_fixed.to(device), fixed_labels(cfg, len(state.z_fixed), device)

    # Data: each rank draws from the dataset held on its device, or reads its own slice of the shards, continuing
    # at its saved position either way. Evaluation needs the MNIST classifier, which each node's main process
    # trains on first use while the other ranks wait.
    batches = make_batches(cfg, accelerator, batch, state)
    evaluator = local_main_first(accelerator, lambda: Evaluator(cfg.eval, cfg.data, cfg.model.z_dim, cfg.seed,
                                                                cfg.model.classes if cfg.model.cond else 0))
    tracker = start_tracking(cfg, accelerator, state, batch)
    meter = Meter(accelerator, state.nimg, state.log_sums, state.log_steps)
    # Redrawn often on a terminal, every 30 s into a log file (SLURM output, CI).
    progress = cleanup.enter_context(tqdm(total=cfg.train.steps, initial=state.step, disable=not is_main, unit="step",
                                          dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30))
    vote, stop, requeue_asked = StopVote(world, cfg.dist.timeout_s), False, False
    mark_step = step_marker(accelerator)
    while state.step < cfg.train.steps:
        # One step: n_critic D steps, each on its own real batches, then one G step. Each optimizer steps once
        # per grad_accum micro-batches; accelerate counts micro-batches across both blocks, so each block is
        # exactly grad_accum long. Metrics stay on the device until the next log: no host sync per step.
        set_lr(opt_G, opt_D, lr_factor(state.step, cfg.train.steps, cfg.optim, state.nimg), cfg.optim)
        gamma_scale = cosine(schedule_progress(state.step, cfg.train.steps, cfg.optim, state.nimg), cfg.loss.gamma_end)
        for i in range(cfg.loss.n_critic):
            r1_due = (state.step * cfg.loss.n_critic + i) % cfg.loss.r1_every == 0
            pairs = []  # the last D step's real batches and labels: G's micro-steps pair with them
            for _ in range(cfg.train.grad_accum):
                real, c = meter.fetch(batches)
                c = c if cfg.model.cond else None
                mark_step()
                with accelerator.accumulate(D):
                    z = torch.randn(len(real), cfg.model.z_dim, device=device)
                    metrics = d_step(G, D, opt_D, real, z, cfg.loss, accelerator.backward, r1_due,
                                     cfg.optim.set_to_none, c, gamma_scale, augment)
                meter.add(metrics, cfg.loss.n_critic)
                if ada is not None:
                    ada.observe(metrics["rt"])
                if c is not None:
                    G_raw.count(c)
                pairs.append((real, c))
                state.batches += 1
        select = topk_select(cfg, accelerator, batch, state.nimg / (batches.epoch_size or ENDLESS_EPOCH))
        for real, c in pairs:
            mark_step()
            with accelerator.accumulate(G):
                z = torch.randn(batch, cfg.model.z_dim, device=device)
                z_pair = torch.randn_like(z) if cfg.loss.ms_weight > 0 else None
                g_metrics = g_step(G, D, opt_G, z, cfg.loss.kind, accelerator.backward, cfg.optim.set_to_none,
                                   real if cfg.loss.kind == "rpgan" else None, c, select, cfg.loss.ms_weight, z_pair,
                                   augment)
            loss_g = g_metrics["loss_g"]
            meter.add(g_metrics)
            meter.tick()
        step_nimg = cfg.train.batch_size * cfg.loss.n_critic  # real images shown to D
        if (state.step + 1) % cfg.perf.ema_every == 0 and not opt_G.step_was_skipped:
            ema.update(G_raw, state.nimg, step_nimg * cfg.perf.ema_every)
        state.step, state.nimg = state.step + 1, state.nimg + step_nimg
        progress.update(1)
        # ADA: p moves on every rank alike, from the heuristic's sums over every rank (a reduce; no host sync).
        if ada is not None and state.step % cfg.aug.interval == 0:
            ada.adjust(accelerator.reduce(ada.sums, "sum"), step_nimg * cfg.aug.interval)
        if cfg.perf.step_sync:
            progress.set_postfix(loss_d=f"{metrics['loss_d'].item():.3f}", loss_g=f"{loss_g.item():.3f}", refresh=False)
        is_last = state.step == cfg.train.steps
        ckpt_due = state.step % cfg.ckpt.every == 0 or is_last
        sample_due = state.step % cfg.log.sample_every == 0 or is_last
        eval_due = cfg.eval.every and (state.step % cfg.eval.every == 0 or is_last) and evaluator.active

        # Log the interval's means over micro-steps and ranks; a non-finite one is a divergence.
        bad = []
        if state.step % cfg.log.every == 0 or is_last:
            row = meter.row(state.step, state.nimg, batches.skipped, batches.epoch_size)
            if ada is not None:
                row |= {"aug/p": ada.p.item(), "aug/rt": ada.rt.item()}
            tracker.log(row)
            progress.set_postfix(loss_d=f"{row['train/loss_d']:.3f}", loss_g=f"{row['train/loss_g']:.3f}",
                                 img_s=f"{row['perf/img_per_sec']:.0f}", refresh=False)
            bad = [k for k, v in row.items() if not math.isfinite(v)]

        # Stop signals, a lost lease, files main could not write and a rank's data fault: all ranks agree in one
        # vote, so all of them stop at the same step, and no checkpoint holds a step after a fault.
        if state.step % cfg.dist.stop_check_every == 0 or ckpt_due:
            stop, requeue_asked = vote.poll(flag, lease, cfg.run.dir, ckpt_due, tracker.failed or batches.failed)

        # Nothing is written from non-finite weights: stop, or go back to the newest checkpoint (train.on_nonfinite).
        if not bad and (ckpt_due or stop or sample_due or eval_due):
            bad = nonfinite(accelerator, training_tensors(nets | {"G_ema": ema}, {"opt_G": opt_G, "opt_D": opt_D}))
        if bad:
            roll_back(cfg, accelerator, state, ema, nets, bad, tracker)
            batches = make_batches(cfg, accelerator, batch, state)
            meter = Meter(accelerator, state.nimg, state.log_sums, state.log_steps)
            progress.n = state.step
            continue

        # Grids and histograms on the fixed noise; evaluation (every rank generates its share, the main process
        # scores them) and the best weights; the checkpoint.
        if sample_due:
            tracker.log_samples(state.step, ema.G_ema, G_raw, D_raw, z_fixed, c_fixed, real, c)
        if eval_due:
            evaluate(cfg, accelerator, evaluator, exported, state, tracker)
        if ckpt_due or stop:
            save_training(accelerator, cfg.run.dir, state, ema, cfg.ckpt.keep, batches.state(), meter.state(), nets,
                          to_yaml(cfg))
        if stop:
            break
    # A grid or metrics line of the last step unwritten, or a data fault in its batches.
    vote.poll(flag, lease, cfg.run.dir, True, tracker.failed or batches.failed)
    vote.close()
    progress.close()

    # Export the final weights of the unwrapped modules, unless a signal stopped the run early.
    if stop:
        accelerator.print(f"stopped at step {state.step} by {flag.name or 'a signal to a peer rank'}; checkpoint saved")
    else:
        final = on_main(accelerator, lambda: export_final(cfg.run.dir, exported, scores=state.scores,
                                                          model=cfg.model, step=state.step, nimg=state.nimg))
        accelerator.print(f"done: step {state.step}, {state.nimg / 1000:.1f} kimg; final weights in {final}")
    tracker.finish()
    accelerator.wait_for_everyone()
    accelerator.end_training()

    # Requeue last, once everything is written and the lease is free: SLURM cancels the job's processes at once.
    if lease is not None:
        lease.release()
    if stop and is_main:
        print(requeue_or_rerun(requeue_asked and cfg.dist.requeue), flush=True)
    return tracker.stalled
