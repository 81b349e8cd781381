"""The quality protocol: train each config of a suite from scratch, score it, and write markdown tables.

    python scripts/quality.py --suite 2d|mnist|stacked|limited|all [--seeds N] [--jobs J] [--out docs/results.md]
                              [--runs DIR] [--configs FILE ...] [--set KEY=VALUE ...] [--no-drs] [--resume]

`2d` trains ring8 and grid25 for seeds 0..N-1 and reports each seed's last evaluation beside the published numbers;
`mnist` trains `configs/mnist_cpu.yaml` and `configs/mnist_cond_cpu.yaml` for seeds 0..N-1 (default 3), with CUDA
also the seed DCGAN and `configs/mnist_best.yaml`, and reports each seed's last evaluation, their mean and worst and
the goals on the worst, then every evaluation of the first seed, the minute it appeared, and the real-data floors;
`stacked` trains `configs/stacked_mnist_cpu.yaml` for seeds 0..N-1 (default 3) and reports each seed's modes and KL
on 26,000 samples, their mean and worst, real digit triples' and the published rows;
`limited` trains `configs/mnist_cpu.yaml` for seeds 0..N-1 (default 3) on 1,000 images (`data.limit`) without
augmentation and with ADA (`ADA_SMALL`'s target and speed), self-conditioned and not (`model.self_cond=false`), 2 at
a time like the 2-D suite; it reports each variant's last evaluation over seeds and ADA's p, and judges ADA against
no augmentation seed by seed. After each 2-D
or `mnist` training, `scripts/evaluate.py --sampler drs` scores its final G_ema through discriminator rejection
sampling: those numbers are a row (2-D: columns) of their own, apart from the training-time ones (`--no-drs` skips
them). Each training is `python train.py --config FILE seed=S run.dir=RUNS/<name>/seed<S> wandb.mode=disabled [the
variant's keys] [--set overrides]` (name: the config's stem, and `limited`'s variant), started afresh, its output
kept in `train.log` there; `--jobs` of them run at once (default: 2-D, `stacked` and `limited` 2 on a CPU with 2+
cores, else 1), each with OMP_NUM_THREADS = cores // jobs (a suite of one training gives it every core). SIGTERM or
Ctrl-C stops every training at a checkpoint; `--resume` then reads back the trainings already finished
(`quality.json` in each run folder) and goes on with the others from their checkpoints; one it cannot continue
(another command, or its config's settings changed) trains afresh, the earlier run kept in `<run>.replaced`.
`--configs` replaces the suite's configs (the tests train short runs with it). The suite's section of `--out` is
replaced, the rest of the file kept, and the same text printed. Beside it,
`images/<name>.png` shows what the final G_ema of each config's first seed (`limited`: of its 1,000-image runs)
draws: 100 samples in a grid (a conditional run's column k is class k), or 2,500 points of a 2-D run over the
mixture's modes (`scripts/sample.py --seed 0`); the section shows them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
import yaml

from gan_dist.bench import hardware
from gan_dist.errors import UserError
from gan_dist.provenance import changed_files, git_commit
from gan_dist.files import write_atomic
from gan_dist.rundir import metrics_file, read_config, read_metrics

REPO = Path(__file__).resolve().parents[1]
SUITES = ("2d", "mnist", "stacked", "limited")
CONFIGS_2D = ("configs/ring8_best.yaml", "configs/grid25_best.yaml")
MNIST_CPU = ("configs/mnist_cpu.yaml", "configs/mnist_cond_cpu.yaml")
MNIST_GPU = ("configs/mnist_dcgan.yaml", "configs/mnist_best.yaml")
CONFIGS_STACKED = ("configs/stacked_mnist_cpu.yaml",)
GOAL_STACKED = (1000, 0.05)  # every seed: all modes, KL at most this
# Published Stacked MNIST rows, modes / KL on 26,000 samples: (method, modes, KL, source)
PUBLISHED_STACKED = (("DCGAN", "99", "3.4", "VEEGAN Table 2"), ("VEEGAN", "150", "2.95", "VEEGAN Table 2"),
                     ("WGAN-GP", "995", "0.148", "GDPP Table 3"), ("GDPP", "1000", "0.135", "GDPP Table 3"),
                     ("PacDCGAN2", "1000", "0.06", "PacGAN Table 2"),
                     ("R3GAN loss (RpGAN + R1 + R2)", "1000", "0.078", "R3GAN's ablation, secondary source"))
STACKED_MINUTES = 60  # a CPU Stacked MNIST training's budget, two side by side
GOALS_2D = {"ring8": (8, 98.0), "grid25": (25, 95.0)}  # every seed: all modes, and at least this % high quality
GOALS_DRS = {"ring8": 99.5, "grid25": 99.0}  # ... with rejection sampling
PUBLISHED = (("PacGAN4", "7.8 / 95.9", "24.8 / 93.6"), ("VEEGAN", "8 / 52.9", "24.6 / 40.0"),
             ("GDPP", "8.0 / 71.7", "24.8 / 68.5"))
PUBLISHED_NOTE = ("Published, modes / high quality % (2,500 samples; high quality = within 3 standard deviations of "
                  "the nearest mode; a mode is covered if it is nearest to at least one high-quality sample): "
                  "PacGAN (Lin et al. 2018, Table 1), VEEGAN (Srivastava et al. 2017, Table 1) and GDPP "
                  "(Elfeki et al. 2019, Table 1).")
MNIST_IMAGES = 60000
LIMITED_CONFIG = "configs/mnist_cpu.yaml"
SELF_COND = ("model.self_cond=true", "model.cond_norm=true")
PLAIN = ("model.self_cond=false", "model.cond_norm=false")
# ADA at 1,000 images: p can go from 0 to 1 in 100 of the run's 384 kimg (StyleGAN2-ADA's 500 kimg is for runs of
# 25,000), and holds the relativistic r_t at 0.4; unaugmented, r_t climbs to 0.97 there (about 0.6 on all 60,000).
ADA_SMALL = ("aug.target=0.4", "aug.speed_kimg=100")
# (training images, aug.kind, the variant's other keys)
LIMITED = ((1000, "none", SELF_COND), (1000, "ada", ADA_SMALL + SELF_COND), (1000, "none", PLAIN),
           (1000, "ada", ADA_SMALL + PLAIN))
LIMITED_DRAWN = 1000  # the images whose runs' grids the section shows
ADA_GOAL_SMALL = 0.6  # at 1,000 images ADA's FCD at most this x the unaugmented run's (and its recall above it)
CPU_MINUTES = 30  # a CPU MNIST row's budget per training, evaluations included, two trainings side by side
# samples in a picture: the 2-D protocol's; a 10 x 10 grid
PICTURE = {"2d": 2500, "mnist": 100, "stacked": 100, "limited": 100}
POLL_S = 2.0  # how often a running training's metrics.jsonl is checked, to time each evaluation
STATE = "quality.json"  # in each run folder: what --resume reads back
TAIL = 20  # lines of a failed training's log shown
INTRO = """# Results

Sample quality under a fixed protocol: each config is trained from scratch for every seed and scored by the
trainer's own evaluation (`eval/*` in each run's `metrics.jsonl`, see the README's Evaluation): modes covered and %
high-quality samples of 2,500 for the 2-D mixtures, the classifier's FCD, KID, IS, class coverage and precision /
recall beside their real-data floors for MNIST, modes covered and KL from uniform for Stacked MNIST. Each section is
written by `python scripts/quality.py --suite 2d`, `--suite mnist`, `--suite stacked` or `--suite limited`, which
replaces only its own section and states its command, date, hardware, commit and configs.
"""


@dataclass
class Job:
    config: Path
    seed: int
    dir: Path
    overrides: tuple[str, ...] = ()  # a variant's keys (the `limited` suite's)
    name: str = ""  # the run's name in folders and pictures: the config's stem, and the variant
    rows: list[dict] = field(default_factory=list)  # every eval row, with `wall_s`: when it appeared
    aug_p: list[float] = field(default_factory=list)  # ADA's p at every log
    wall: float = 0.0
    code: int | None = None
    drs: dict | None = None  # scripts/evaluate.py --sampler drs on final/
    resumed: bool = False  # went on from (or read back) an earlier call's attempt (--resume)


def _show(path: Path) -> str:
    return os.path.relpath(path, REPO) if path.is_relative_to(REPO) else str(path)


def _threads(parallel: int) -> int:
    return max(1, (os.cpu_count() or 1) // parallel)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _is_eval(row: dict) -> bool:
    return any(k.startswith("eval/") for k in row)


def _state_file(job: Job) -> Path:
    return job.dir / STATE


def _save_state(job: Job, command: list[str], config: str, done: bool) -> None:
    """What `--resume` reads back: the training's command and config file's hash, its wall time and eval rows so
    far, whether it ended."""
    state = {"command": command, "config": config, "wall": job.wall, "rows": job.rows, "done": done, "drs": job.drs}
    write_atomic(_state_file(job), (json.dumps(state) + "\n").encode())


def _resumable(job: Job, command: list[str], config: str) -> tuple[dict | None, str]:
    """The state an earlier attempt left for this same training, or None and why not ("" where it left none)."""
    try:
        state = json.loads(_state_file(job).read_text())
    except FileNotFoundError:
        return None, ""
    except (OSError, ValueError):
        return None, f"its {STATE} does not parse"
    kinds = {"command": list, "wall": (int, float), "rows": list, "done": bool, "drs": (dict, type(None))}
    if not isinstance(state, dict) or any(not isinstance(state.get(k), t) for k, t in kinds.items()) or not all(
            isinstance(r, dict) and isinstance(r.get("wall_s"), (int, float)) for r in state["rows"]):
        return None, f"its {STATE} is not one quality.py wrote"
    if state["command"] != command:
        return None, "another command trained it"
    if state.get("config") != config:
        return None, f"{_show(job.config)}'s settings changed since"
    return state, ""


def _settings(path: Path) -> str:
    """A hash of a config file's settings: an edited comment keeps a finished training's results, a changed value
    does not."""
    text = path.read_text()
    try:
        settings = json.dumps(yaml.safe_load(text), sort_keys=True, default=str)
    except yaml.YAMLError:  # the training reports it
        settings = text
    return hashlib.sha256(settings.encode()).hexdigest()


def _read_rows(job: Job, now: float) -> None:
    """Reread the run's metrics.jsonl: its eval rows, each timed when first seen (a row the trainer drops after a
    rollback and writes again keeps its time if it is the same row), and ADA's p at every log."""
    try:
        rows = read_metrics(job.dir)
    except FileNotFoundError:
        return
    seen = {json.dumps({k: v for k, v in r.items() if k != "wall_s"}, sort_keys=True): r["wall_s"] for r in job.rows}
    job.rows = [r | {"wall_s": seen.get(json.dumps(r, sort_keys=True), now)} for r in rows if _is_eval(r)]
    job.aug_p = [r["aug/p"] for r in rows if "aug/p" in r]


def _command(job: Job, sets: list[str]) -> list[str]:
    """The training's command line, less the interpreter: what `quality.json` records and `--resume` compares."""
    return ["train.py", "--config", str(job.config), f"seed={job.seed}", f"run.dir={job.dir}", "wandb.mode=disabled",
            *job.overrides, *sets]


def train(job: Job, sets: list[str], threads: int, stop: threading.Event, resume: bool) -> Job:
    """One training; polls its metrics.jsonl to time each evaluation, and stops early when `stop` is set. With
    `resume`, a training an earlier call finished is read back, and one it left unfinished goes on from its last
    checkpoint, its wall time added to the earlier attempts'."""
    if stop.is_set():
        return job
    command, config = _command(job, sets), _settings(job.config)
    state, why = _resumable(job, command, config) if resume else (None, "")
    if state is None:
        if why:  # an earlier run this call will not continue: kept aside, not lost
            kept = job.dir.with_name(job.dir.name + ".replaced")
            shutil.rmtree(kept, ignore_errors=True)
            job.dir.rename(kept)
            print(f"quality.py: {job.dir} trains afresh ({why}); the earlier run is kept in {kept}", flush=True)
        shutil.rmtree(job.dir, ignore_errors=True)  # so that the trainer's own resume cannot pick up an older run
        job.dir.mkdir(parents=True)
    else:
        job.wall, job.rows, job.drs = state["wall"], state["rows"], state["drs"]
        job.resumed = True
        if state["done"]:
            job.code = 0
            _read_rows(job, job.wall)
            return job
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    start = time.monotonic() - job.wall
    with (job.dir / "train.log").open("a") as log:
        proc = subprocess.Popen([sys.executable, *command], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        while job.code is None:
            try:
                job.code = proc.wait(timeout=POLL_S)
            except subprocess.TimeoutExpired:
                if stop.is_set():
                    proc.terminate()  # the trainer checkpoints on SIGTERM: --resume goes on from there
            # Read after the wait, so that the rows written before the exit are all read.
            job.wall = time.monotonic() - start
            _read_rows(job, job.wall)
            _save_state(job, command, config, done=job.code == 0 and not stop.is_set())
    return job


def score_drs(job: Job, threads: int, stop: threading.Event) -> Job:
    """The final G_ema's metrics through discriminator rejection sampling, kept in `drs.json` beside the run."""
    if job.code != 0 or stop.is_set() or job.drs or read_config(job.dir).model.self_cond:  # DRS needs real labels
        return job
    out = job.dir / "drs.json"
    cmd = [sys.executable, "scripts/evaluate.py", "--run", str(job.dir), "--sampler", "drs", "--out", str(out)]
    with (job.dir / "drs.log").open("w") as log:
        job.code = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS=str(threads)), stdout=log,
                                  stderr=subprocess.STDOUT).returncode
    if job.code == 0:
        job.drs = json.loads(out.read_text())
        state = json.loads(_state_file(job).read_text())
        write_atomic(_state_file(job), (json.dumps(state | {"drs": job.drs}) + "\n").encode())
    return job


def run_all(jobs: list[Job], args: argparse.Namespace, parallel: int, drs: bool = True) -> None:
    """Trains every job (and scores it with DRS), `parallel` at a time; the first failure stops the others and is
    reported. SIGTERM (or SIGINT) stops them all at their next checkpoint-safe point, for `--resume` to go on."""
    threads, stop, failed = _threads(parallel), threading.Event(), None
    signalled = []

    def on_signal(signum: int, frame: object) -> None:
        signalled.append(signal.Signals(signum).name)
        stop.set()

    def one(job: Job) -> Job:
        job = train(job, args.set, threads, stop, args.resume)
        return score_drs(job, threads, stop) if drs else job

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with ThreadPoolExecutor(parallel) as pool:
            for done in as_completed([pool.submit(one, job) for job in jobs]):
                job = done.result()
                if job.code == 0 and not stop.is_set():  # a training stopped by SIGTERM may exit 0 too
                    again = " (read back)" if job.resumed else ""
                    print(f"{job.name or _show(job.config)} seed {job.seed}: {_duration(job.wall)}{again}", flush=True)
                elif failed is None and job.code is not None and not signalled:
                    failed = job
                    stop.set()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if signalled:
        raise UserError(f"stopped by {signalled[0]}; each training saved a checkpoint: run the same command with "
                        "--resume to go on from them")
    if failed:
        log = failed.dir / ("drs.log" if (failed.dir / "drs.log").is_file() else "train.log")
        lines = [line.rsplit("\r", 1)[-1] for line in log.read_text(errors="replace").splitlines()]
        print("\n".join(lines[-TAIL:]), file=sys.stderr)
        what = "DRS scoring of" if log.name == "drs.log" else "training"
        raise UserError(f"{what} {_show(failed.config)} seed {failed.seed} failed (exit status {failed.code}); its "
                        f"full output is in {log}")


def images_of(out: Path) -> Path:
    """The folder of a results file's pictures."""
    return out.parent / "images"


def draw(job: Job, suite: str, images: Path) -> Path:
    """The final G_ema's samples of `job` as `images/<name>.png` (scripts/sample.py, seed 0)."""
    images.mkdir(parents=True, exist_ok=True)
    out = images / f"{job.name or job.config.stem}.png"
    cmd = [sys.executable, "scripts/sample.py", "--run", str(job.dir), "--num", str(PICTURE[suite]), "--out",
           str(out), "--seed", "0"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        raise UserError(f"drawing the samples of {_show(job.dir)} failed: {done.stderr.strip().splitlines()[-1:]}")
    return out


def picture(path: Path, out: Path, what: str) -> str:
    return f"![{what}]({os.path.relpath(path, out.parent)})"


def commit(out: Path) -> str:
    """HEAD's short hash, `dirty` if anything but the results file and its pictures differs from it."""
    head, status = git_commit(short=True, repo=REPO), changed_files(REPO)
    if head == "unknown" or status is None:
        return "unknown (not a git checkout)"
    ours = os.path.relpath(out.resolve(), REPO), os.path.relpath(images_of(out.resolve()), REPO) + os.sep
    changed = [path for path in status if path != ours[0] and not path.startswith(ours[1])]
    return head + (" (dirty)" if changed else "")


def header(title: str, jobs: list[Job], configs: list[Path], parallel: int, wall: float,
           args: argparse.Namespace, drs: bool) -> str:
    cuda = torch.cuda.is_available()
    seeds = sorted({job.seed for job in jobs})
    keys = f" data.limit=N aug.kind=KIND [with ada: {' '.join(ADA_SMALL)}] model.self_cond=S model.cond_norm=S"
    variant = keys if any(job.overrides for job in jobs) else ""
    template = (f"python train.py --config CONFIG seed=S run.dir={_show(args.runs)}/<name>/seedS "
                f"wandb.mode=disabled{variant} {shlex.join(args.set)}").strip()
    lines = [f"## {title}", "",
             f"- command: `python scripts/quality.py {shlex.join(sys.argv[1:])}`",
             f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
             f"- hardware: {hardware(cuda)}",
             f"- code: commit {commit(args.out)}",
             f"- each training: `{template}`, {parallel} at a time, OMP_NUM_THREADS={_threads(parallel)}",
             *([] if not drs else ["- then, rejection sampling: `python scripts/evaluate.py --run RUN --sampler "
                                       "drs` (final G_ema; D calibrated 500 steps; gamma at the 80th percentile)"]),
             f"- seeds: {', '.join(map(str, seeds))}; wall time of the suite: {_duration(wall)}" +
             (f" in this call (`--resume`); the trainings' own, every attempt added up: "
              f"{_duration(sum(job.wall for job in jobs))} in all" if any(job.resumed for job in jobs) else ""), ""]
    for path in configs:
        text = path.read_text().strip() if path.is_file() else "# not in this checkout"
        lines += [f"`{_show(path)}`:", "", "```yaml", text, "```", ""]
    return "\n".join(lines)


def _dataset(job: Job) -> str:
    return read_config(job.dir).data.dataset


def _last(job: Job, key: str) -> dict:
    rows = [r for r in job.rows if key in r]
    if not rows:
        raise UserError(f"{metrics_file(job.dir)} holds no '{key}' evaluation; keep eval.every above 0")
    return rows[-1]


def _spread(values: list[float], fmt: str, worst: str) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    bound = min(values) if worst == "min" else max(values)
    return f"{statistics.mean(values):{fmt}} ± {std:{fmt}} ({worst} {bound:{fmt}})"


def table_2d(config: Path, jobs: list[Job]) -> str:
    dataset, rows = _dataset(jobs[0]), [_last(job, "eval/hq") for job in jobs]
    modes, hq, kl = ([r[f"eval/{k}"] for r in rows] for k in ("modes", "hq", "reverse_kl"))
    drs = all(job.drs for job in jobs)
    head = "| seed | steps | modes covered | high quality % | reverse KL | wall time |"
    lines = [f"### {dataset}: `{_show(config)}`", "",
             head + (" DRS: modes | DRS: high quality % |" if drs else ""),
             "| --- " * (6 + 2 * drs) + "|"]
    lines += [f"| {job.seed} | {r['train/step']} | {r['eval/modes']:.0f} | {r['eval/hq']:.2f} | "
              f"{r['eval/reverse_kl']:.4g} | {_duration(job.wall)} |" +
              (f" {job.drs['modes']:.0f} | {job.drs['hq']:.2f} |" if drs else "") for job, r in zip(jobs, rows)]
    walls = [job.wall for job in jobs]
    lines += [(f"| mean ± std (worst) | | {_spread(modes, '.1f', 'min')} | {_spread(hq, '.2f', 'min')} | "
               f"{_spread(kl, '.4f', 'max')} | {_duration(statistics.mean(walls))} (max {_duration(max(walls))}) |" +
               (f" {_spread([j.drs['modes'] for j in jobs], '.1f', 'min')} | "
                f"{_spread([j.drs['hq'] for j in jobs], '.2f', 'min')} |" if drs else "")), ""]
    if dataset in GOALS_2D:
        want, least = GOALS_2D[dataset]
        missed = [str(job.seed) for job, r in zip(jobs, rows) if r["eval/modes"] < want or r["eval/hq"] < least]
        short = _gaps(modes, want, least - min(hq), "{:.2f} points")
        lines += [f"Goal, every seed {want}/{want} modes and at least {least:g}% high quality: "
                  f"{_verdict(missed, short)}."]
        if drs:
            least = GOALS_DRS[dataset]
            missed = [str(j.seed) for j in jobs if j.drs["modes"] < want or j.drs["hq"] < least]
            short = _gaps([j.drs["modes"] for j in jobs], want, least - min(j.drs["hq"] for j in jobs), "{:.2f} points")
            lines += [f"With DRS (`scripts/evaluate.py --sampler drs`, final G_ema, default 80th percentile), every "
                      f"seed {want}/{want} modes and at least {least:g}%: {_verdict(missed, short)}."]
        lines.append("")
    return "\n".join(lines)


def section_2d(by_config: dict[Path, list[Job]], shown: dict[Path, str]) -> str:
    last = {_dataset(jobs[0]): [_last(j, "eval/hq") for j in jobs] for jobs in by_config.values()}
    ours = [f"{statistics.mean(r['eval/modes'] for r in last[d]):.1f} / "
            f"{statistics.mean(r['eval/hq'] for r in last[d]):.1f}" if d in last else "not run"
            for d in ("ring8", "grid25")]
    lines = [table_2d(config, jobs) + f"\n{shown[config]} (seed {jobs[0].seed}: 2,500 samples in blue, the modes "
             "in red)\n" for config, jobs in by_config.items()]
    lines += [PUBLISHED_NOTE, "", "| method | ring8 | grid25 |", "| --- | --- | --- |",
              *(f"| {name} | {ring} | {grid} |" for name, ring, grid in PUBLISHED),
              f"| this repo (mean over seeds) | {ours[0]} | {ours[1]} |", ""]
    return "\n".join(lines)


def _mnist_cells(row: dict, suffix: str) -> str:
    m = {k: row[f"eval/{k}{suffix}"] for k in ("fcd", "kid", "is", "class_min", "class_max", "precision", "recall")}
    return (f"{m['fcd']:.4g} | {m['kid']:.4g} | {m['is']:.2f} | {100 * m['class_min']:.1f} | "
            f"{100 * m['class_max']:.1f} | {m['precision']:.3f} | {m['recall']:.3f}")


def _cond_cells(row: dict, suffix: str) -> str:
    return f"{100 * row[f'eval/class_acc{suffix}']:.2f} | {row[f'eval/fcd_class_mean{suffix}']:.4g}"


def table_mnist(job: Job) -> str:
    last, gpu_goals = _last(job, "eval/fcd"), _show(job.config) in MNIST_GPU
    cond = "eval/class_acc" in last
    rows, factor = [r for r in job.rows if "eval/fcd" in r], 2 if gpu_goals or cond else 3
    extra = " class accuracy % | per-class FCD (mean) |" if cond else ""
    lines = [f"#### `{_show(job.config)}`, seed {job.seed}, every evaluation: {_duration(job.wall)}", "",
             "| step | kimg | epochs | minute | FCD | KID | IS | class min % | class max % | precision | recall |" +
             extra, "| --- " * (11 + 2 * cond) + "|"]
    lines += [f"| {r['train/step']} | {r['train/kimg']:.1f} | {r['train/kimg'] * 1000 / MNIST_IMAGES:.2f} | "
              f"{r['wall_s'] / 60:.1f} | {_mnist_cells(r, '')} |" + (f" {_cond_cells(r, '')} |" if cond else "")
              for r in rows]
    if job.drs:
        drs = {f"eval/{k}": v for k, v in job.drs.items()}
        lines.append(f"| DRS on the final G_ema | | | | {_mnist_cells(drs, '')} |" +
                     (f" {_cond_cells(drs, '')} |" if cond else ""))
    lines.append(f"| real data (floor) | | | | {_mnist_cells(last, '_real')} |" +
                 (f" {_cond_cells(last, '_real')} |" if cond else ""))
    hit = next((r for r in rows if r["eval/fcd"] <= factor * r["eval/fcd_real"]), None)
    first = "none" if hit is None else f"step {hit['train/step']}, minute {hit['wall_s'] / 60:.1f}"
    lines += ["", f"First evaluation with FCD ≤ {factor} × floor: {first}.", ""]
    return "\n".join(lines)


# What each MNIST row's summary judges, on the worst seed: (label, metric, bound, True if the metric must be at least
# the bound); a bound below 0 is that many times the metric's floor.
GOALS_MNIST = {"uncond": (("FCD ≤ 0.6", "fcd", 0.6, False), ("IS ≥ 9.0", "is", 9.0, True),
                          ("every digit ≥ 8%", "class_min", 0.08, True),
                          ("every digit ≤ 12%", "class_max", 0.12, False)),
               "cond": (("FCD ≤ 2 × floor", "fcd", -2.0, False), ("precision ≥ 0.85", "precision", 0.85, True),
                        ("recall ≥ 0.8", "recall", 0.8, True),
                        ("≥ 98% read as their label", "class_acc", 0.98, True))}
SUMMARY_MNIST = (("FCD", "fcd", ".4g", False), ("KID", "kid", ".4g", False), ("IS", "is", ".2f", True),
                 ("class min %", "class_min", ".1f", True), ("class max %", "class_max", ".1f", False),
                 ("precision", "precision", ".3f", True), ("recall", "recall", ".3f", True))
PERCENT = ("class_min", "class_max", "class_acc")


def summary_mnist(config: Path, jobs: list[Job]) -> str:
    """Each seed's last evaluation, their mean ± std (worst), the floors, and the issue's goals on the worst seed."""
    last = [_last(job, "eval/fcd") for job in jobs]
    cond = "eval/class_acc" in last[0]
    columns = SUMMARY_MNIST + ((("class accuracy %", "class_acc", ".2f", True),) if cond else ())

    def value(row: dict, key: str, suffix: str = "") -> float:
        return row[f"eval/{key}{suffix}"] * (100 if key in PERCENT else 1)

    lines = [f"### `{_show(config)}` over {len(jobs)} seeds (last evaluation)", "",
             "| seed | " + " | ".join(c[0] for c in columns) + " | wall time |", "| --- " * (len(columns) + 2) + "|"]
    lines += [f"| {job.seed} | " + " | ".join(f"{value(r, key):{fmt}}" for _, key, fmt, _ in columns) +
              f" | {_duration(job.wall)} |" for job, r in zip(jobs, last)]
    walls = [job.wall for job in jobs]
    lines += ["| mean ± std (worst) | " + " | ".join(
        _spread([value(r, key) for r in last], fmt, "min" if up else "max") for _, key, fmt, up in columns) +
        f" | {_duration(statistics.mean(walls))} (max {_duration(max(walls))}) |",
        "| real data (floor) | " + " | ".join(f"{value(last[0], key, '_real'):{fmt}}" for _, key, fmt, _ in columns) +
        " | |", ""]
    verdicts = []
    for label, key, bound, up in GOALS_MNIST["cond" if cond else "uncond"]:
        limit = -bound * last[0][f"eval/{key}_real"] if bound < 0 else bound
        short = {str(job.seed): limit - r[f"eval/{key}"] if up else r[f"eval/{key}"] - limit
                 for job, r in zip(jobs, last)}
        failing = [seed for seed, gap in short.items() if gap > 0]
        verdicts.append(f"{label} ({limit:.4g}): {_verdict(failing, f'{max(short.values()):.3g}')}")
    verdicts.append(f"training ≤ {CPU_MINUTES} minutes: {_late(jobs, CPU_MINUTES)}")
    lines += ["Goals on every seed (training-time numbers, without DRS): " + "; ".join(verdicts) + ".", ""]
    return "\n".join(lines)


def _verdict(failing: list[str], by: str = "") -> str:
    """A goal's verdict over seeds, naming the seeds that miss it and, where given, by how much the worst does."""
    if not failing:
        return "**met**"
    return f"**not met** (seeds {', '.join(failing)}{f'; the worst by {by}' if by else ''})"


def _late(jobs: list[Job], minutes: float) -> str:
    """The verdict on a wall-time goal: the seeds over it, and the longest's excess."""
    slow = [job for job in jobs if job.wall > 60 * minutes]
    return _verdict([str(job.seed) for job in slow],
                    _duration(max(job.wall for job in slow) - 60 * minutes) if slow else "")


def _gaps(modes: list[float], want: int, gap: float, other: str) -> str:
    """How far the worst seeds are from every one of `want` modes, and by `gap` on the other metric (`other`
    formats it)."""
    return ", ".join(([f"{want - min(modes):.0f} modes"] if min(modes) < want else []) +
                     ([other.format(gap)] if gap > 0 else []))


def table_stacked(config: Path, jobs: list[Job], shown: str) -> str:
    """Each seed's last evaluation (modes, KL; a self-conditioned run's clusters in use), their mean and worst,
    real digit triples', the goal, and the published rows."""
    rows = [_last(job, "eval/kl") for job in jobs]
    clusters = all("eval/clusters" in r for r in rows)
    lines = [f"### `{_show(config)}`", "", "| seed | steps | modes covered | KL | wall time |" +
             (" clusters in use |" if clusters else ""), "| --- " * (5 + clusters) + "|"]
    lines += [f"| {job.seed} | {r['train/step']} | {r['eval/modes']:.0f} | {r['eval/kl']:.4f} | "
              f"{_duration(job.wall)} |" + (f" {r['eval/clusters']:.0f} |" if clusters else "")
              for job, r in zip(jobs, rows)]
    walls = [job.wall for job in jobs]
    lines += [f"| mean ± std (worst) | | {_spread([r['eval/modes'] for r in rows], '.1f', 'min')} | "
              f"{_spread([r['eval/kl'] for r in rows], '.4f', 'max')} | {_duration(statistics.mean(walls))} (max "
              f"{_duration(max(walls))}) |" + (" |" if clusters else ""),
              f"| real digit triples | | {rows[0]['eval/modes_real']:.0f} | {rows[0]['eval/kl_real']:.4f} | |" +
              (" |" if clusters else ""), ""]
    want, most = GOAL_STACKED
    missed = [str(job.seed) for job, r in zip(jobs, rows) if r["eval/modes"] < want or r["eval/kl"] > most]
    short = _gaps([r["eval/modes"] for r in rows], want, max(r["eval/kl"] for r in rows) - most, "KL {:.4f}")
    lines += [f"Goals: every seed {want}/{want} modes and KL ≤ {most:g}: {_verdict(missed, short)};"
              f" every training ≤ {STACKED_MINUTES} minutes: {_late(jobs, STACKED_MINUTES)}.",
              "", f"{shown} (seed {jobs[0].seed}: 100 samples of the final G_ema)", "",
              "Published, modes / KL (26,000 samples, a pretrained MNIST classifier per channel):", "",
              "| method | modes | KL | source |", "| --- | --- | --- | --- |",
              *(f"| {name} | {modes} | {kl} | {source} |" for name, modes, kl, source in PUBLISHED_STACKED),
              f"| this repo (mean over seeds) | {statistics.mean(r['eval/modes'] for r in rows):.1f} | "
              f"{statistics.mean(r['eval/kl'] for r in rows):.4f} | this section |", ""]
    return "\n".join(lines)


def _variant(job: Job) -> tuple[int, str, bool]:
    """(training images, aug.kind, model.self_cond) of a `limited` job."""
    keys = dict(o.split("=", 1) for o in job.overrides)
    return int(keys["data.limit"]) or MNIST_IMAGES, keys["aug.kind"], keys["model.self_cond"] == "true"


def _ratios(by: dict[tuple, dict[int, dict]], a: tuple, b: tuple) -> dict[int, float]:
    """Seed by seed, variant a's last FCD over variant b's (the seeds both ran)."""
    return {s: by[a][s]["eval/fcd"] / by[b][s]["eval/fcd"] for s in sorted(by[a]) if s in by[b]}


def table_limited(config: Path, jobs: list[Job]) -> str:
    """Every variant's last evaluation over seeds (mean, and worst in brackets) beside the floors, and ADA's goals
    against no augmentation, seed by seed (the same seed's runs compared)."""
    lines = [f"### `{_show(config)}` on a subset (`data.limit`), by `aug.kind` and `model.self_cond`", "",
             "Each cell: the mean over seeds, and the worst seed's in brackets (one seed: its number).", "",
             "| training images | aug.kind | self_cond | seeds | FCD | KID | IS | class min % | class max % | "
             "precision | recall | ADA's p: final (max) | wall time (max) |", "| --- " * 13 + "|"]
    by: dict[tuple, dict[int, dict]] = {}
    for job in jobs:
        by.setdefault(_variant(job), {})[job.seed] = _last(job, "eval/fcd")

    def cell(values: list[float], fmt: str, up: bool) -> str:
        worst = min(values) if up else max(values)
        return f"{statistics.mean(values):{fmt}}" + (f" ({worst:{fmt}})" if len(values) > 1 else "")

    for variant, rows in by.items():
        ran = [job for job in jobs if _variant(job) == variant]
        cells = [cell([scale * r[f"eval/{key}"] for r in rows.values()], fmt, up)
                 for _, key, fmt, up in SUMMARY_MNIST for scale in [100 if key in PERCENT else 1]]
        p = [job.aug_p for job in ran if job.aug_p]
        ada = f"{statistics.mean(q[-1] for q in p):.3f} ({max(max(q) for q in p):.3f})" if p else "–"
        n, kind, cond = variant
        lines.append(f"| {n:,} | {kind} | {str(cond).lower()} | {len(rows)} | {' | '.join(cells)} | {ada} | "
                     f"{_duration(max(job.wall for job in ran))} |")
    floor = next(iter(next(iter(by.values())).values()))
    lines += [f"| real data (floor) | | | | {_mnist_cells(floor, '_real')} | | |", ""]
    verdicts = []
    small = min(n for n, _, _ in by)
    for cond in (True, False):
        tag, none, ada = f"self_cond={str(cond).lower()}", (small, "none", cond), (small, "ada", cond)
        if none in by and ada in by:
            r = _ratios(by, ada, none)
            recall = [str(s) for s in r if by[ada][s]["eval/recall"] <= by[none][s]["eval/recall"]]
            verdicts += [f"{tag}: at {small:,} images ADA's FCD ≤ {ADA_GOAL_SMALL:g} × unaugmented's (mean "
                         f"{statistics.mean(r.values()):.2f}x, worst {max(r.values()):.2f}x) "
                         f"{_verdict([str(s) for s, x in r.items() if x > ADA_GOAL_SMALL])}",
                         f"its recall above unaugmented's {_verdict(recall)}"]
    on, off = (small, "none", True), (small, "none", False)
    if on in by and off in by:
        r = _ratios(by, on, off)
        verdicts.append(f"at {small:,} images without augmentation, self-conditioning's FCD is "
                        f"{statistics.mean(r.values()):.2f}x the plain model's (worst seed {max(r.values()):.2f}x)")
    if verdicts:
        lines += ["Goals at the last evaluation, every seed: " + "; ".join(verdicts) + ".", ""]
    return "\n".join(lines)


def replace_section(text: str, suite: str, body: str) -> str:
    """`text` with `suite`'s marked section set to `body`; added before the next suite's section if missing."""
    mark = "<!-- quality:{}:{} -->".format
    block = f"{mark(suite, 'begin')}\n{body.strip()}\n{mark(suite, 'end')}"
    if mark(suite, "begin") in text and mark(suite, "end") in text:
        head, rest = text.split(mark(suite, "begin"), 1)
        return head + block + rest.split(mark(suite, "end"), 1)[1]
    later = [mark(s, "begin") for s in SUITES[SUITES.index(suite) + 1:] if mark(s, "begin") in text]
    if later:
        at = text.index(later[0])
        return text[:at] + block + "\n\n" + text[at:]
    return text.rstrip("\n") + "\n\n" + block + "\n"


def run_suite(suite: str, args: argparse.Namespace, cuda: bool, parallel: int) -> str:
    if args.configs:
        configs, unmeasured = [p.resolve() for p in args.configs], []
    elif suite == "limited":
        configs, unmeasured = [REPO / LIMITED_CONFIG], []
    elif suite == "2d":
        configs, unmeasured = [REPO / p for p in CONFIGS_2D], []
    elif suite == "stacked":
        configs, unmeasured = [REPO / p for p in CONFIGS_STACKED], []
    else:
        gpu = [REPO / p for p in MNIST_GPU]
        configs, unmeasured = [REPO / p for p in MNIST_CPU] + (gpu if cuda else []), [] if cuda else gpu
    for path in configs:
        if not path.is_file():
            raise UserError(f"config file '{_show(path)}' not found; create it or name others with --configs")
    seeds = range(args.seeds or (5 if suite == "2d" else 3))
    if suite == "limited":
        jobs = [Job(c, s, args.runs / name / f"seed{s}", (f"data.limit={n % MNIST_IMAGES}", f"aug.kind={kind}", *keys),
                    name) for c in configs for n, kind, keys in LIMITED for s in seeds
                for name in [f"{c.stem}-{n}-{kind}" + ("" if SELF_COND[0] in keys else "-plain")]]
    else:
        jobs = [Job(c, s, args.runs / c.stem / f"seed{s}", name=c.stem) for c in configs for s in seeds]
    # An MNIST training gets every core (its wall time is a goal) unless --jobs says otherwise.
    parallel = min(parallel, len(jobs)) if suite != "mnist" or args.jobs else 1
    start = time.monotonic()
    drs = not args.no_drs and suite not in ("limited", "stacked")
    run_all(jobs, args, parallel, drs)
    drs = drs and any(job.drs for job in jobs)  # self-conditioned runs are not scored through DRS
    wall = time.monotonic() - start
    if suite == "limited":
        drawn = [job for job in jobs if _variant(job)[0] == LIMITED_DRAWN and job.seed == jobs[0].seed]
        grids = " ".join(picture(draw(job, suite, images_of(args.out)), args.out, f"{job.name}: samples of the final "
                                 "G_ema") for job in drawn)
        body = "\n".join(table_limited(c, [j for j in jobs if j.config == c]) for c in configs) + (
            f"\nThe final G_ema of each {LIMITED_DRAWN:,}-image run (seed {jobs[0].seed}), left to right: "
            f"{', '.join(f'aug.kind={v[1]} self_cond={str(v[2]).lower()}' for v in map(_variant, drawn))}.\n\n"
            f"{grids}\n" if drawn else "")
        return header("Small datasets: augmentation", jobs, configs, parallel, wall, args, drs) + "\n" + body
    firsts = {c: next(j for j in jobs if j.config == c) for c in configs}
    shown = {c: picture(draw(job, suite, images_of(args.out)), args.out,
                        f"{c.stem}: samples of the final G_ema") for c, job in firsts.items()}
    if suite == "stacked":
        title, body = "Stacked MNIST", "\n".join(table_stacked(c, [j for j in jobs if j.config == c], shown[c])
                                                 for c in configs)
    elif suite == "2d":
        title, body = "2-D mixtures", section_2d({c: [j for j in jobs if j.config == c] for c in configs}, shown)
    else:
        note = (f"`minute`: wall time since the training started when the row appeared in `metrics.jsonl` (checked "
                f"every {POLL_S:g} s); `epochs`: images seen / {MNIST_IMAGES:,}.\n")
        title, body = "MNIST", "\n".join([note] + [
            summary_mnist(c, [j for j in jobs if j.config == c]) + "\n" + table_mnist(firsts[c]) + f"\n{shown[c]}\n"
            for c in configs] + [f"### `{_show(path)}`: not measured (no GPU in this session)\n"
                                 for path in unmeasured])
    return header(title, jobs, configs + unmeasured, parallel, wall, args, drs) + "\n" + body


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", required=True, choices=(*SUITES, "all"))
    parser.add_argument("--seeds", type=int, help="seeds 0..N-1 (default: 5 for 2d, 3 for the others)")
    parser.add_argument("--jobs", type=int, help="trainings at once (default: 2 on CPU, 1 with CUDA; mnist: 1)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results.md",
                        help="the markdown file (default: docs/results.md)")
    parser.add_argument("--runs", type=Path, default=REPO / "runs" / "quality",
                        help="where the run folders go (default: runs/quality)")
    parser.add_argument("--configs", type=Path, nargs="+", help="train these instead of the suite's configs")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an override added to every training (repeat for more)")
    parser.add_argument("--no-drs", action="store_true", help="skip the rejection-sampling scores")
    parser.add_argument("--resume", action="store_true", help="read back the trainings an earlier call with the "
                        "same --runs and settings finished, and go on with those it left unfinished (any other "
                        "earlier run is kept aside in RUN.replaced)")
    args = parser.parse_args()
    args.out, args.runs = args.out.resolve(), args.runs.resolve()
    try:
        if (args.seeds is not None and args.seeds < 1) or (args.jobs is not None and args.jobs < 1):
            raise UserError("--seeds and --jobs must be at least 1")
        if args.configs and args.suite == "all":
            raise UserError("--configs replaces one suite's configs; pick --suite 2d, mnist, stacked or limited")
        cuda = torch.cuda.is_available()
        parallel = args.jobs or (1 if cuda else min(2, os.cpu_count() or 1))
        for suite in SUITES if args.suite == "all" else (args.suite,):
            section = run_suite(suite, args, cuda, parallel)
            print(section)
            text = args.out.read_text() if args.out.is_file() else INTRO
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(replace_section(text, suite, section))
            print(f"wrote {_show(args.out)}")
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.code
    return 0


if __name__ == "__main__":
    sys.exit(main())
