"""The run directory (`run.dir`): its layout, the one place its files are found and read, and the writer of its
config, command and metrics rows (checkpoint.py writes the checkpoints, export.py the exports).

    config.yaml                   the run's config, every value resolved but those read from the environment
    command.json                  the command that started the run (`provenance.launch_command`), written once
    metrics.jsonl                 one JSON row per log, each with its `train/step`
    console.log                   what the console would have shown after it was lost (console.py), if it was
    samples/<key>_<step>.png      the sample grids (`samples_ema_00001000.png`)
    checkpoints/step_<step>/      the checkpoints (checkpoint.py), complete once their meta.json is written
    final/, best/                 the exports (export.py): the end of training, the best evaluation so far
    wandb/                        W&B's own files
    wandb_gaps.json               the steps W&B missed when it failed and the run went on (tracking.py)

Steps in names have at least 8 digits (`{step:08d}`), more past step 1e8. A run killed mid-write can leave a torn
last line in metrics.jsonl: readers here skip it, and `prepare_run_dir` removes it when the run resumes. This module
sits at the bottom of the import graph (config, errors and files alone), so that everything may read a run with it.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from gan_dist.config import Config, run_config, to_yaml
from gan_dist.errors import UserError
from gan_dist.files import write_atomic

CONFIG = "config.yaml"  # also the name of the config a checkpoint keeps of its own
COMMAND = "command.json"
METRICS = "metrics.jsonl"
SAMPLES = "samples"
CHECKPOINTS = "checkpoints"
EXPORTS = ("final", "best")
WANDB = "wandb"
META = "meta.json"
STEP_DIR = re.compile(r"^step_(\d{8,})$")  # {step:08d} grows past 8 digits at step 1e8
SAMPLE_FILE = re.compile(r"^samples_(.+)_(\d{8,})\.png$")


class CheckpointError(Exception):
    """A checkpoint that is incomplete, damaged or unsafe; the message names the checkpoint and the file."""


def config_file(run_dir: str | Path) -> Path:
    return Path(run_dir) / CONFIG


def command_file(run_dir: str | Path) -> Path:
    return Path(run_dir) / COMMAND


def metrics_file(run_dir: str | Path) -> Path:
    return Path(run_dir) / METRICS


def console_file(run_dir: str | Path) -> Path:
    return Path(run_dir) / "console.log"


def samples_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / SAMPLES


def wandb_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / WANDB


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def step_dir(run_dir: str | Path, step: int) -> Path:
    """Where the checkpoint of `step` lies (written or not)."""
    return checkpoints_dir(run_dir) / f"step_{step:08d}"


def sample_file(run_dir: str | Path, key: str, step: int) -> Path:
    """The picture logged under `key` (`samples/ema`) at `step`."""
    return samples_dir(run_dir) / f"{key.replace('/', '_')}_{step:08d}.png"


def sample_grids(run_dir: str | Path) -> dict[str, dict[int, Path]]:
    """The sample grids kept in `samples/`: kind (ema, G) -> step -> picture."""
    grids: dict[str, dict[int, Path]] = {}
    for png in sorted(samples_dir(run_dir).glob("samples_*.png")):
        if m := SAMPLE_FILE.match(png.name):
            grids.setdefault(m.group(1), {})[int(m.group(2))] = png
    return grids


# ---------------------------------------------------------------- config and command


def write_config(run_dir: str | Path, cfg: Config) -> None:
    """config.yaml, as `config.to_yaml` writes `cfg`: every value resolved but those read from the environment."""
    write_atomic(config_file(run_dir), to_yaml(cfg).encode())


def read_config(run_dir: str | Path) -> Config:
    """The run's config (values that read the environment stay unresolved); UserError when it has none."""
    if not config_file(run_dir).is_file():
        raise UserError(f"{run_dir} is not a run directory (no {CONFIG}); pass the run.dir of a training run")
    return run_config(config_file(run_dir))


def config_text(run_dir: str | Path) -> str | None:
    """config.yaml as it was written, or None when the run has none."""
    path = config_file(run_dir)
    return path.read_text(errors="replace") if path.is_file() else None


def read_command(run_dir: str | Path) -> dict | None:
    """command.json, the command that started the run: {"cwd": str, "launcher": [str] or None, "train": [str]}; None
    for a run of a gan-dist from before it, or a file that does not read as one."""
    try:
        command = json.loads(command_file(run_dir).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(command, dict) and isinstance(command.get("train"), list) and all(
        isinstance(a, str) for a in command["train"] + (command.get("launcher") or []))
    return command if ok and isinstance(command.get("cwd", ""), str) else None


# ---------------------------------------------------------------- metrics rows


def append_metrics(run_dir: str | Path, row: dict) -> None:
    """One row at the end of metrics.jsonl."""
    with metrics_file(run_dir).open("a") as f:
        f.write(json.dumps(row) + "\n")


def _rows(text: str) -> list[dict]:
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a last line torn by a kill mid-write, or a blank line
        if isinstance(row, dict):
            rows.append(row)
    return rows


def read_metrics(run_dir: str | Path) -> list[dict]:
    """Every row of metrics.jsonl, oldest first, without a line that does not read (a torn last line)."""
    return _rows(metrics_file(run_dir).read_text(errors="replace"))


def metrics_since(run_dir: str | Path, offset: int) -> tuple[list[dict], int]:
    """The complete rows of a running training's metrics.jsonl after byte `offset`, and the offset after them (none
    while it has no metrics.jsonl yet)."""
    try:
        with metrics_file(run_dir).open("rb") as f:
            f.seek(offset)
            chunk = f.read()
    except FileNotFoundError:
        return [], offset
    done = chunk[:chunk.rfind(b"\n") + 1]  # a line still being written is read on the next call
    return _rows(done.decode(errors="replace")), offset + len(done)


def _row_step(line: str) -> int | None:
    try:
        step = json.loads(line)["train/step"]
    except (ValueError, TypeError, KeyError):
        return None
    return step if isinstance(step, int) else None


def _trim_jsonl(path: Path, last_step: int) -> None:
    """Drop lines logged after `last_step` by a run that died before its next checkpoint, and a line torn by a
    kill mid-write (it can only be the last one)."""
    if not path.exists():
        return
    text = path.read_bytes().decode("utf-8", errors="replace")
    lines = [line for line in text.splitlines() if line.strip()]
    steps = [_row_step(line) for line in lines]
    kept = [line for line, step in zip(lines, steps) if step is not None and step <= last_step]
    torn = steps.count(None)
    if torn:
        print(f"[gan-dist] {METRICS}: dropped {torn} unreadable line(s) (a kill mid-write)", file=sys.stderr,
              flush=True)
    if len(kept) != len(lines) or (text and not text.endswith("\n")):
        write_atomic(path, "".join(line + "\n" for line in kept).encode())


def prepare_run_dir(run_dir: str | Path, step: int, command: dict | None = None) -> None:
    """Main process, at the start and after a rollback to `step`: `samples/` exists, and metrics.jsonl reads as the
    run up to `step` (W&B keeps the rows it has, and gets the steps after `step` again). At the start, `command`
    (`launch_command`'s) goes to command.json unless the run has one: the command that started it."""
    _trim_jsonl(metrics_file(run_dir), step)
    samples_dir(run_dir).mkdir(exist_ok=True)
    if command is not None and not command_file(run_dir).exists():
        write_atomic(command_file(run_dir), (json.dumps(command, indent=1) + "\n").encode())


# ---------------------------------------------------------------- W&B's gaps


def wandb_gaps_file(run_dir: str | Path) -> Path:
    """Beside W&B's folder, not in it: W&B's files may be what filled their disk."""
    return Path(run_dir) / "wandb_gaps.json"


def read_wandb_gaps(run_dir: str | Path) -> tuple[int | None, list[list[int]]]:
    """The step from which W&B has been off (None while it records the run), and the earlier gaps, [first, last]
    step each, that it has since been told of. A missing or unreadable file reads as no gap."""
    try:
        data = json.loads(wandb_gaps_file(run_dir).read_bytes())
        off, gaps = data["off_since"], data["gaps"]
        if (off is None or type(off) is int) and all(len(g) == 2 and all(type(s) is int for s in g) for g in gaps):
            return off, [list(g) for g in gaps]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None, []


def write_wandb_gaps(run_dir: str | Path, off_since: int | None, gaps: list[list[int]]) -> None:
    write_atomic(wandb_gaps_file(run_dir), json.dumps({"off_since": off_since, "gaps": gaps}).encode())


# ---------------------------------------------------------------- checkpoints and exports


def step_of(path: Path) -> int:
    return int(STEP_DIR.match(path.name).group(1))


def checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoints in `run_dir` that were completely written (have meta.json), oldest first; not yet verified."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / META).is_file()]
    return sorted(found, key=step_of)


def read_meta(path: Path) -> dict:
    """meta.json of a checkpoint, checked for the fields everything else relies on; CheckpointError otherwise."""
    try:
        meta = json.loads((path / META).read_text())
        ok = isinstance(meta, dict) and all(isinstance(meta.get(k), int) and not isinstance(meta.get(k), bool)
                                            for k in ("step", "world_size")) and 1 <= meta["world_size"] <= 1 << 16
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: {META} is unreadable ({err})") from None
    if not ok or meta["step"] < 0:
        raise CheckpointError(f"{path}: {META} lacks a valid step and world_size")
    if not isinstance(meta.get("files"), dict):
        raise CheckpointError(f"{path}: {META} lists no files (written by a gan-dist before checkpoints were "
                              "verified); resume it with that version, or start a new run.dir")
    return meta


def checkpoint_path(run: str | Path, checkpoint: str) -> Path:
    """Where `checkpoint` of the run directory `run` lies: `final` and `best` its exports, a step number its
    checkpoint of that step."""
    if checkpoint in EXPORTS:
        return Path(run) / checkpoint
    if not checkpoint.isdigit():
        raise UserError(f"--checkpoint {checkpoint} is not final, best or a step number")
    return step_dir(run, int(checkpoint))


def owning_run(path: str | Path) -> Path | None:
    """The run directory that `path` is, or that holds `path` as its export or step checkpoint; None otherwise."""
    path = Path(path)
    for folder in (path, path.parent, path.parent.parent):
        if config_file(folder).is_file() and not (folder / META).is_file():
            return folder
    return None
