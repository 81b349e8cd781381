"""Run tracking on the main process: W&B (online, offline or disabled), `metrics.jsonl`, sample grids and D's
histograms; and the `Meter` that sums each log interval's metrics on every rank. Where those files lie, and the
metrics rows' format, are rundir.py's.

Other ranks get a tracker whose calls do nothing, so the loop calls it unconditionally. W&B only observes the run
and never ends it: without an API key or a network it falls back to offline and says how to sync later, and any
failure of W&B after that (a dead service process, a full disk under its media files, the network) turns W&B off
for the rest of the process with one warning, while the run goes on. No collective depends on W&B, so every rank
goes on alike. The steps W&B missed are kept in the run's wandb_gaps.json; the next job of the run that trains (a
requeue, a rerun with a higher train.steps) brings W&B back, logs their rows from metrics.jsonl and notes the gap in
the W&B summary. A resumed run reuses the W&B id stored in its checkpoint, and `metrics.jsonl` is cut back to the
resumed step, so both read as one run. A metrics line or grid that cannot be written (a full or read-only disk) is
not raised where main alone would stop: `failed` holds the error line, and the loop's next stop vote ends every
rank with it.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image
from tqdm import tqdm

from gan_dist.config import WandbConfig
from gan_dist.distributed import sync_buffers
from gan_dist.files import write_failure
from gan_dist.metric_names import METRICS
from gan_dist.models import conditioned, eval_mode
from gan_dist.rundir import append_metrics, metrics_file, read_metrics, read_wandb_gaps, sample_file, \
    wandb_dir, write_wandb_gaps
from gan_dist.viz import fixed_noise_grid

T = TypeVar("T")


WANDB_BINS = 512  # the most bins a W&B histogram holds


def _say(msg: str) -> None:
    tqdm.write(f"[gan-dist] {msg}", file=sys.stderr)  # on a line of its own, below the progress bar


def _init_wandb(cfg: WandbConfig, run_dir: Path, run_id: str, config: dict):
    import wandb

    kwargs = dict(project=cfg.project, entity=cfg.entity, name=cfg.name, group=cfg.group, tags=cfg.tags or None,
                  config=config, id=run_id, resume="allow", dir=str(run_dir))
    mode = cfg.mode
    if mode == "online" and os.environ.get("WANDB_MODE") in ("offline", "disabled"):
        mode = os.environ["WANDB_MODE"]
    try:
        run = wandb.init(mode=mode, settings=wandb.Settings(init_timeout=60, console="off", quiet=True,
                                                            finish_timeout=cfg.finish_timeout_s), **kwargs)
    except Exception as err:  # no API key, no network, W&B down: the dashboard can wait for `wandb sync`
        if mode != "online":
            raise
        _say(f"W&B online init failed ({_why(err)}); logging offline")
        run = wandb.init(mode="offline", settings=wandb.Settings(console="off", quiet=True,
                                                                 finish_timeout=cfg.finish_timeout_s), **kwargs)
    if run.settings.mode == "offline" or mode == "offline":
        _say(f"W&B is offline; upload later with: wandb sync {wandb_dir(run_dir)}/offline-run-*")
    # Every metric is plotted against train/step; train/kimg rides in every row, so the x axis can switch to it.
    run.define_metric("train/step")
    run.define_metric("*", step_metric="train/step")
    for m in METRICS:  # W&B's summary keeps each one's best value
        run.define_metric(f"eval/{m.key}", step_metric="train/step", summary="min" if m.lower_is_better else "max")
    return run


@torch.no_grad()
def d_histograms(G: torch.nn.Module, D: torch.nn.Module, real: torch.Tensor, z: torch.Tensor,
                 c_real: torch.Tensor | None = None, c_fake: torch.Tensor | None = None) -> dict[str, np.ndarray]:
    """D's probabilities for a real batch and for G's samples, judged in eval mode as in the G step."""
    with eval_mode(G, D):
        out = {"train/d_hist_real": torch.sigmoid(conditioned(D, real, c_real)),
               "train/d_hist_fake": torch.sigmoid(conditioned(D, conditioned(G, z, c_fake), c_fake))}
    return {k: v.float().cpu().numpy() for k, v in out.items()}


def _why(err: BaseException) -> str:
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}".rstrip(": ")


def _close_wandb(run) -> BaseException | None:
    """Finish `run` (if W&B started one) and shut W&B's service connection down, so that no exit hook of W&B's
    meets a dead service; returns the first error, raised by none."""
    import wandb

    error = None
    for close in ([run.finish] if run is not None else []) + [wandb.teardown]:
        try:
            close()
        except (Exception, SystemExit) as err:  # W&B's teardown exits with its service's non-zero status
            error = error or err
    return error


def _closer(run) -> tuple[threading.Thread, list[BaseException | None]]:
    """`_close_wandb(run)` started in a thread of its own, and the list its result lands in."""
    result: list[BaseException | None] = []
    thread = threading.Thread(target=lambda: result.append(_close_wandb(run)), name="wandb-close", daemon=True)
    thread.start()
    return thread, result


class Tracker:
    def __init__(self, is_main: bool, cfg: WandbConfig, run_dir: str | Path, run_id: str, config: dict, step: int,
                 centers: np.ndarray | None = None, classes: int = 0) -> None:
        self.is_main = is_main
        self.centers = centers  # 2-D data: the mixture's modes, drawn under the scatter plots
        self.classes = classes  # a conditional run: grids have one column per class
        self.run_dir = Path(run_dir)
        self.run = None
        self.step = step  # the step logged last: where a failure of W&B is placed
        self.finish_timeout_s = cfg.finish_timeout_s
        self.stalled = False  # W&B's finish did not return in time: the process must not wait for it at exit
        self.failed: str | None = None  # main: why a metrics line or grid could not be written
        self.closing: tuple[threading.Thread, list] | None = None  # a W&B run's close, under way (`_closer`)
        if not is_main:
            return
        self.jsonl = metrics_file(self.run_dir)
        if cfg.mode != "disabled":
            try:
                self.run = _init_wandb(cfg, self.run_dir, run_id, config)
                self._close_gap()
            except Exception as err:
                self._lose("starting", err, run_id)

    def _close_gap(self) -> None:
        """W&B is back after steps it missed: log their rows from metrics.jsonl (their grids are in samples/ alone)
        and note every gap so far in the run's summary. A job resumed from before W&B failed missed nothing."""
        off, gaps = read_wandb_gaps(self.run_dir)
        if off is None:
            return
        if self.step >= off:
            gaps.append([off, self.step])
            for row in read_metrics(self.run_dir):
                if off <= row.get("train/step", -1) <= self.step:
                    self.run.log(row)
            self.run.summary.update({"wandb/gaps": gaps, "wandb/gap_steps": sum(b - a + 1 for a, b in gaps)})
            _say(f"W&B is back; it missed steps {off} to {self.step}: their metrics rows are logged now from "
                 f"metrics.jsonl, their grids are in {self.run_dir / 'samples'}")
        try:
            write_wandb_gaps(self.run_dir, None, gaps)
        except OSError:
            pass  # a full run.dir is the metrics lines' and checkpoints' to report

    def _lose(self, what: str, err: BaseException, run_id: str | None = None) -> None:
        """W&B failed: off for the rest of this process, with one warning; the steps from the one it missed first
        are a gap. Its run is closed in the background, so that the other ranks are not kept waiting at their
        next collective; `finish` waits for that close."""
        run, self.run = self.run, None
        run_id = run_id or run.id
        _say(f"warning: W&B failed {what} at step {self.step} ({_why(err)}); W&B is off for the rest of this job, "
             f"and training goes on. metrics.jsonl, the grids in {self.run_dir / 'samples'} and the checkpoints "
             "still record the run; the next job of this run that trains (a requeue, a rerun with a higher "
             f"train.steps) resumes W&B run {run_id} and logs the rows it missed")
        first = self.step + 1 if what == "starting" else self.step  # rows up to the start step were logged before
        try:
            off, gaps = read_wandb_gaps(self.run_dir)
            write_wandb_gaps(self.run_dir, first if off is None else off, gaps)
        except OSError:
            pass  # a full disk: the next job then notes no gap, and metrics.jsonl still has the rows
        self.closing = _closer(run)

    def _wandb(self, what: str, call: Callable[[], object]) -> None:
        """One call into W&B, unless it is off; its failure turns it off (`_lose`)."""
        if self.run is None:
            return
        try:
            call()
        except Exception as err:
            self._lose(what, err)

    def log(self, metrics: dict[str, float]) -> None:
        """One row; `metrics` must hold 'train/step'."""
        if not self.is_main:
            return
        self.step = metrics["train/step"]
        self._write(self.jsonl, lambda: append_metrics(self.run_dir, metrics))
        self._wandb("logging metrics", lambda: self.run.log(metrics))

    def _write(self, path: Path, write: Callable[[], object]) -> None:
        """`write()` a file at `path`, unless a write has already failed; a failure is kept in `failed`."""
        if self.failed is not None:
            return
        try:
            write()
        except OSError as err:
            self.failed = f"cannot write {path} ({write_failure(err, path.parent)}); the checkpoints before it are " \
                          "intact. Free space or fix the folder, then rerun the same command to resume"

    def log_image(self, key: str, image: np.ndarray, step: int) -> None:
        """Log an HxWx3 uint8 picture under `key` and keep it as samples/<key>_<step>.png."""
        if not self.is_main:
            return
        self.step = step
        path = sample_file(self.run_dir, key, step)
        self._write(path, lambda: Image.fromarray(image).save(path))

        def log() -> None:
            import wandb

            self.run.log({key: wandb.Image(image), "train/step": step})

        self._wandb(f"logging {key}", log)

    def log_histograms(self, values: dict[str, np.ndarray], step: int) -> None:
        """Histograms (W&B only), e.g. D's outputs on real and fake samples."""
        def log() -> None:
            import wandb

            self.run.log({k: wandb.Histogram(v) for k, v in values.items()} | {"train/step": step})

        self._wandb("logging histograms", log)

    def log_bars(self, key: str, counts: np.ndarray, step: int) -> None:
        """One bar per index (W&B only; its histograms hold 512 bins at most, past which the counts' own
        distribution is shown), e.g. self-conditioning's cluster sizes."""
        def log() -> None:
            import wandb

            bars = wandb.Histogram(np_histogram=(counts.tolist(), list(range(len(counts) + 1)))) \
                if len(counts) <= WANDB_BINS else wandb.Histogram(counts)
            self.run.log({key: bars, "train/step": step})

        self._wandb(f"logging {key}", log)

    def log_samples(self, step: int, G_ema: torch.nn.Module, G: torch.nn.Module, D: torch.nn.Module,
                    z: torch.Tensor, c: torch.Tensor | None, real: torch.Tensor, c_real: torch.Tensor | None) -> None:
        """Grids (or 2-D scatter plots) from G_ema and G on the fixed noise `z` (labels `c`), and D's outputs on a
        real batch and on G's samples. All ranks call this: G_ema's BatchNorm statistics are first made rank 0's.
        Main alone then calls the unwrapped modules, which never runs a DDP hook or collective."""
        sync_buffers(G_ema)
        if not self.is_main:
            return
        self.log_image("samples/ema", fixed_noise_grid(G_ema, z, self.classes, self.centers), step)
        self.log_image("samples/G", fixed_noise_grid(G, z, self.classes, self.centers), step)
        self.log_histograms(d_histograms(G, D, real, z, c_real, c), step)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc) -> None:
        """On every way out, also an error's: W&B closed within its timeout, not by its own exit hook, unbounded."""
        self.finish()

    def finish(self) -> None:
        """Close the W&B run, or wait for the close of one that failed, within wandb.finish_timeout_s (a
        preempted job must requeue within its grace period). A close that hangs is left behind in its thread
        (`stalled`), and the process must not wait for it at exit. W&B gives up its uploads after that long itself;
        what is not uploaded stays in the local run files, for `wandb sync`. A second call does nothing."""
        ending = self.run is not None
        if ending:
            run, self.run = self.run, None
            self.closing = _closer(run)
        if self.closing is None:
            return
        (thread, errors), self.closing = self.closing, None
        thread.join(self.finish_timeout_s + 5)
        self.stalled = self.stalled or thread.is_alive()
        error = errors[0] if errors and ending else None  # a failed run's error was said when it failed
        if self.stalled:
            _say(f"W&B did not finish within wandb.finish_timeout_s={self.finish_timeout_s:g} s; the run's data is "
                 f"in {wandb_dir(self.run_dir)}: upload the rest with `wandb sync` on that folder")
        elif error is not None:
            _say(f"warning: W&B failed finishing its run at step {self.step} ({_why(error)}); the run's own files "
                 f"are all written, W&B's are in {wandb_dir(self.run_dir)}")


class Meter:
    """The training metrics of one log interval, summed on the device (no host sync per step) and reduced over every
    rank at each log, with the interval's throughput and data wait. Checkpointable, as StyleGAN2-ADA's
    `training_stats.Collector` is: an interval a checkpoint cut logs after a resume as if it had never been cut."""

    def __init__(self, accelerator: Accelerator, nimg: int, saved: dict[str, torch.Tensor], saved_steps: int) -> None:
        self.accelerator = accelerator
        rank, world = accelerator.process_index, accelerator.num_processes
        self.sums = {k: v[rank].to(accelerator.device) for k, v in saved.items() if len(v) == world}
        self.steps = saved_steps if self.sums else 0  # G micro-steps in the sums
        self.wait, self.start, self.nimg = 0.0, time.perf_counter(), nimg

    def fetch(self, batches: Iterator[T]) -> T:
        """The next batch, its wait counted as data time."""
        start = time.perf_counter()
        item = next(batches)
        self.wait += time.perf_counter() - start
        return item

    def add(self, metrics: dict[str, torch.Tensor], per_step: int = 1) -> None:
        """Add one micro-step's metrics; D's are added with `per_step`=n_critic so that every key averages per step."""
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0) + v.float() / per_step

    def tick(self) -> None:
        self.steps += 1

    def row(self, step: int, nimg: int, skipped: int, epoch_size: int | None) -> dict[str, float]:
        """The log row of the interval ending now (all ranks call this: one reduce); starts the next interval."""
        keys = sorted(self.sums)
        device, world = self.accelerator.device, self.accelerator.num_processes
        local = torch.stack([self.sums[k] / self.steps for k in keys] + [
            torch.tensor(self.wait, device=device), torch.tensor(float(skipped), device=device)])
        *means, wait, skipped_mean = self.accelerator.reduce(local, "mean").tolist()
        elapsed = max(time.perf_counter() - self.start, 1e-9)  # after the reduce waited for the queued work
        row = {"train/step": step, "train/kimg": nimg / 1000} | {f"train/{k}": v for k, v in zip(keys, means)}
        row["perf/img_per_sec"] = (nimg - self.nimg) / elapsed
        row["perf/data_wait_frac"] = wait / elapsed  # share of time in next(batches), mean of ranks
        row["data/skipped"] = round(skipped_mean * world)  # bad samples and lost shard tails so far, all ranks
        if epoch_size:
            row["data/epoch"] = nimg / epoch_size
        self.sums, self.steps, self.wait, self.start, self.nimg = {}, 0, 0.0, time.perf_counter(), nimg
        return row

    def state(self) -> tuple[dict[str, torch.Tensor], int]:
        """Every rank's sums of the interval so far, metric -> (world,), and its micro-steps, for a checkpoint
        (all ranks call this: one gather)."""
        keys = sorted(self.sums)
        if not keys:
            return {}, self.steps
        rows = self.accelerator.gather(torch.stack([self.sums[k] for k in keys])[None]).cpu()
        return {k: rows[:, i] for i, k in enumerate(keys)}, self.steps
