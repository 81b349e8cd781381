"""Checkpoints for exact resume, verified before they are trusted, and the final exports.

A checkpoint is `{run.dir}/checkpoints/step_{step:08d}/`:

- accelerate's state: both models (safetensors), both optimizers, the fp16 scaler and every rank's RNG (torch
  files, only ever loaded with `weights_only=True`, which cannot run code);
- gan-dist's own state, never pickled: `ema.safetensors` (G_ema) and TrainState as `train_state.safetensors`
  (tensors) plus `train_state.json` (everything else);
- `config.yaml`, the config it was written with, so that a resume with other values names the keys that changed;
- `meta.json`, written last: the step, the world size, and every file with its size and sha256.

It is written under a temporary name, fsynced, and renamed only once every rank has finished, so a directory with
the final name is complete. Before a checkpoint is loaded it is verified: each file listed with its size and
digest, every rank's RNG state present, every torch file loadable without running code. `ckpt.resume=auto` falls
back past a damaged checkpoint to the newest intact one; an explicit `ckpt.resume=PATH` must be intact. Checkpoints
are named by step, never by accelerate's automatic counter (which restarts at 0 after a resume and prunes the
newest checkpoint).

A run started from `ckpt.resume=PATH` records PATH as its origin in every checkpoint it writes, so the same command
after a requeue continues from the run's own newer checkpoints, and pruning never deletes PATH.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import load as safe_torch_load
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from gan_dist.config import ModelConfig, config_changes, may_change
from gan_dist.ema import EMA
from gan_dist.distributed import sync_buffers
from gan_dist.errors import UserError
from gan_dist.export import checkpoint_path, export_metadata
from gan_dist.files import fsync_dir, fsync_file, publish_dir, sha256_file, versioned_dir, write_atomic, \
    write_failure
from gan_dist.models import build_generator, build_models, config_json, model_config

STEP_DIR = re.compile(r"^step_(\d{8,})$")  # {step:08d} grows past 8 digits at step 1e8
META = "meta.json"
OWN_FILES = ("ema.safetensors", "train_state.safetensors", "train_state.json")
ACCELERATE_FILES = ("model.safetensors", "model_1.safetensors", "optimizer.bin", "optimizer_1.bin")
TORCH_FILE = re.compile(r".*\.(bin|pkl|pt)$")
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)  # what a failed write raises in Python, torch, safetensors


def rng_file(rank: int) -> str:
    return f"random_states_{rank}.pkl"


class CheckpointError(Exception):
    """A checkpoint that is incomplete, damaged or unsafe; the message names the checkpoint and the file."""


@dataclass
class TrainState:
    """Loop state saved with every checkpoint."""

    step: int = 0
    nimg: int = 0  # real images seen, over all ranks
    batches: int = 0  # micro-batches this rank has taken from its data stream: the data position
    z_fixed: torch.Tensor = field(default_factory=lambda: torch.empty(0))  # noise behind every sample grid
    data_pos: torch.Tensor = field(default_factory=lambda: torch.empty(0, 3, dtype=torch.int64))  # see data.py
    log_sums: dict[str, torch.Tensor] = field(default_factory=dict)  # metric -> (world,) sums of the cut interval
    log_steps: int = 0  # micro-steps in those sums
    # G's and D's buffers on every rank, name -> (world, ...): without DDP's buffer broadcasts each rank's
    # BatchNorm statistics are its own, and D's shape its G step. Rank 0's alone are in the model files.
    rank_buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    best: float | None = None  # the best value of eval.best_metric so far (behind best/)
    scores: dict | None = None  # the last evaluation, which final/metrics.json holds
    wandb_id: str = ""
    origin: str = ""  # the ckpt.resume=PATH these checkpoints continue from; "" for a run started in its run.dir
    rollbacks: int = 0  # times the run went back to a checkpoint after non-finite losses or weights
    data_layout: str = ""  # what data_pos holds: "cache" (one global position) or "stream" (one per loader slot)
    # The parts of epochs left to the loader's slots after a resume on another world size (data.spans_tensor).
    data_spans: torch.Tensor = field(default_factory=lambda: torch.empty(0, 3, dtype=torch.int64))

    def save(self, folder: Path) -> None:
        tensors = {"z_fixed": self.z_fixed, "data_pos": self.data_pos, "data_spans": self.data_spans} | {
            f"log_sums/{k}": v for k, v in self.log_sums.items()} | {
            f"rank_buffers/{k}": v for k, v in self.rank_buffers.items()}
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                  str(folder / "train_state.safetensors"))
        scalars = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("z_fixed", "data_pos",
                                                                                       "data_spans", "log_sums",
                                                                                       "rank_buffers")}
        (folder / "train_state.json").write_text(json.dumps(scalars, indent=1) + "\n")

    def load(self, folder: Path) -> None:
        """Restore from `folder`; CheckpointError if a value has the wrong type (nothing is changed then)."""
        try:
            tensors = load_file(str(folder / "train_state.safetensors"))
            scalars = json.loads((folder / "train_state.json").read_text())
        except (OSError, ValueError, SafetensorError) as err:
            raise CheckpointError(f"{folder}: train state unreadable ({err})") from None
        if not isinstance(scalars, dict):
            scalars = {}
        types = {"step": int, "nimg": int, "batches": int, "log_steps": int, "best": (float, int, type(None)),
                 "scores": (dict, type(None)), "wandb_id": str, "origin": str}
        bad = [k for k, t in types.items() if not isinstance(scalars.get(k), t) or isinstance(scalars.get(k), bool)]
        if bad or "z_fixed" not in tensors or "data_pos" not in tensors or min(
                scalars["step"], scalars["nimg"], scalars["batches"], scalars["log_steps"]) < 0:
            raise CheckpointError(f"{folder}: train_state.json or train_state.safetensors has missing or invalid "
                                  f"entries ({', '.join(bad) or 'tensors'})")
        self.__dict__.update({k: scalars[k] for k in types})
        rollbacks, layout = scalars.get("rollbacks", 0), scalars.get("data_layout", "")  # newer than some checkpoints
        self.rollbacks = rollbacks if isinstance(rollbacks, int) and rollbacks >= 0 else 0
        self.data_layout = layout if layout in ("cache", "stream") else ""
        self.z_fixed, self.data_pos = tensors["z_fixed"], tensors["data_pos"]
        spans = tensors.get("data_spans", torch.empty(0, 3, dtype=torch.int64))  # newer than some checkpoints
        self.data_spans = spans if spans.ndim == 2 and spans.shape[1] == 3 else torch.empty(0, 3, dtype=torch.int64)
        self.log_sums = {k.removeprefix("log_sums/"): v for k, v in tensors.items() if k.startswith("log_sums/")}
        self.rank_buffers = {k.removeprefix("rank_buffers/"): v for k, v in tensors.items()
                             if k.startswith("rank_buffers/")}


def step_of(path: Path) -> int:
    return int(STEP_DIR.match(path.name).group(1))


def checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoints in `run_dir` that were completely written (have meta.json), oldest first; not yet verified."""
    root = Path(run_dir) / "checkpoints"
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


def verify(path: Path) -> dict:
    """meta.json of an intact checkpoint: every file it lists has its size and sha256, nothing the resume needs is
    missing (every rank's RNG state and data position among it), and every torch file loads without running code.
    CheckpointError naming the checkpoint and the first bad file otherwise."""
    meta = read_meta(path)
    listed = meta["files"]
    needed = ACCELERATE_FILES + OWN_FILES + tuple(rng_file(r) for r in range(meta["world_size"]))
    missing = [name for name in needed if name not in listed]
    if missing:
        raise CheckpointError(f"{path}: {missing[0]} is missing (not in {META}); the checkpoint is incomplete")
    unlisted = sorted(p.name for p in path.iterdir() if p.name != META and p.name not in listed)
    if unlisted:
        raise CheckpointError(f"{path}: {unlisted[0]} is not listed in {META} (no checkpoint of this run holds it)")
    for name, want in listed.items():
        file = path / name
        if not isinstance(want, dict) or "/" in name or name.startswith("."):
            raise CheckpointError(f"{path}: {META} has an invalid entry for {name!r}")
        if not file.is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        if file.stat().st_size != want.get("size"):
            raise CheckpointError(f"{path}: {name} has {file.stat().st_size} bytes, {META} says {want.get('size')} "
                                  "(truncated or damaged)")
        if sha256_file(file) != want.get("sha256"):
            raise CheckpointError(f"{path}: {name} does not match its sha256 in {META} (damaged)")
        if TORCH_FILE.match(name):
            try:
                safe_torch_load(file, map_location="cpu", mmap=True)
            except Exception as err:  # any failure to load safely refuses the checkpoint
                first = (str(err).strip().splitlines() or [type(err).__name__])[0]
                raise CheckpointError(f"{path}: {name} cannot be loaded without running code or is damaged "
                                      f"({first[:200]}); refusing it") from None
    try:  # each rank's data position: one row per rank and loader worker
        with safe_open(str(path / "train_state.safetensors"), framework="pt") as f:
            rows = f.get_slice("data_pos").get_shape()[0] if "data_pos" in f.keys() else 0
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"{path}: train_state.safetensors is unreadable ({err})") from None
    if rows < meta["world_size"] or rows % meta["world_size"]:
        raise CheckpointError(f"{path}: train_state.safetensors lacks some rank's data position ({rows} rows for "
                              f"{meta['world_size']} ranks)")
    return meta


@dataclass
class Resume:
    """Where a run starts: `path` None for a fresh start; `step` that checkpoint's step; `origin` what the run's
    checkpoints record as the ckpt.resume=PATH they grew from (pruning keeps it); `complete` when that checkpoint
    ends the run and final/ exists, so there is nothing to do."""

    path: Path | None
    step: int = 0
    origin: str = ""
    complete: bool = False


def _newest_intact(candidates: list[Path], say: Callable[[str], None]) -> tuple[Path, dict] | None:
    for path in reversed(candidates):
        try:
            return path, verify(path)
        except CheckpointError as err:
            say(f"warning: checkpoint {err}; falling back to the one before it")
    return None


def choose_resume(run_dir: str | Path, resume: str, say: Callable[[str], None]) -> Resume:
    """The checkpoint to resume from (verified), or a fresh start; a UserError when `ckpt.resume` cannot be
    honoured safely. Call it on the main process only, holding the run.dir's lease."""
    existing = checkpoints(run_dir)
    if resume == "none":
        if existing:
            raise UserError(f"run.dir '{run_dir}' already holds checkpoints (latest {existing[-1].name}); "
                            "resume with ckpt.resume=auto, or start fresh in a new run.dir")
        return Resume(None)
    if resume == "auto":
        if not existing:
            return Resume(None)
        found = _newest_intact(existing, say)
        if found is None:
            raise UserError(f"run.dir '{run_dir}' holds checkpoints but none is intact (see the warnings above); "
                            "nothing was changed. Resume from a copy with ckpt.resume=PATH, or use a new run.dir")
        path, meta = found
        return Resume(path, meta["step"], _origin(path))
    path = Path(resume).resolve()
    if not (path / META).is_file():
        raise UserError(f"ckpt.resume='{resume}' is not a complete checkpoint (no {META} there); use ckpt.resume=auto, "
                        f"none, or a path like {Path(run_dir) / 'checkpoints' / 'step_00001000'}")
    try:
        meta = verify(path)
    except CheckpointError as err:
        raise UserError(f"ckpt.resume: checkpoint {err}") from None
    # After a requeue the same command runs again: continue the run's own checkpoints that grew from PATH.
    own = [p for p in existing if p.resolve() != path]
    grown = [p for p in own if _origin(p) == str(path)]
    if grown:
        found = _newest_intact(grown, say)
        if found is not None:
            say(f"ckpt.resume={resume}: continuing from {found[0].name}, this run's newest checkpoint since it "
                "started from there")
            return Resume(found[0], found[1]["step"], str(path))
    # Older checkpoints beside PATH are its own past; anything else would be pruned or mixed with this run.
    foreign = [p for p in own if p not in grown and (p.resolve().parent != path.parent or step_of(p) > meta["step"])]
    if foreign:
        raise UserError(f"run.dir '{run_dir}' holds checkpoints that did not grow from ckpt.resume={resume} "
                        f"(latest {foreign[-1].name}); resume from it in a new run.dir, or move those checkpoints "
                        "away first (nothing was changed)")
    return Resume(path, meta["step"], str(path))


def _origin(path: Path) -> str:
    """The ckpt.resume=PATH a checkpoint's run grew from, or ""."""
    try:
        origin = json.loads((path / META).read_text()).get("origin")
    except (OSError, ValueError, AttributeError):
        return ""
    return origin if isinstance(origin, str) else ""


def _agree(accelerator: Accelerator, ok: bool) -> bool:
    """True on every rank when `ok` was True on every rank (one all-reduce)."""
    return accelerator.reduce(torch.tensor(float(not ok), device=accelerator.device), "sum").item() == 0


def save_checkpoint(accelerator: Accelerator, run_dir: str | Path, state: TrainState, ema: torch.nn.Module,
                    keep: int, config: str = "") -> Path:
    """Write a checkpoint for `state.step` (all ranks call this) and keep only the newest `keep`, never
    `state.origin`. A write that fails on any rank (a full disk) leaves the older checkpoints as they were and
    raises UserError on every rank."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{state.step:08d}"
    tmp = root / f".tmp-{final.name}"
    error = None
    try:
        if accelerator.is_main_process:
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob(".tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
    except OSError as err:
        error = err
    if not _agree(accelerator, error is None):
        raise _write_error(accelerator, root, tmp, error)
    try:
        accelerator.save_state(str(tmp))
        fsync_file(tmp / rng_file(accelerator.process_index))  # each rank flushes what it wrote
        if accelerator.is_main_process:
            if accelerator.scaler is not None:
                # Every rank writes the same scaler file at once; main's identical copy replaces what they left.
                torch.save(accelerator.scaler.state_dict(), tmp / "scaler.pt.new")
                os.replace(tmp / "scaler.pt.new", tmp / "scaler.pt")
            save_file({k: v.detach().cpu().contiguous() for k, v in ema.state_dict().items()},
                      str(tmp / "ema.safetensors"))
            state.save(tmp)
            if config:
                (tmp / "config.yaml").write_text(config)
    except WRITE_ERRORS as err:  # torch and safetensors raise their own types for a full disk
        error = err
    if not _agree(accelerator, error is None):
        raise _write_error(accelerator, root, tmp, error)
    if accelerator.is_main_process:
        try:
            _seal(tmp, final, state, accelerator.num_processes)
        except OSError as err:
            error = err
    if not _agree(accelerator, error is None):
        raise _write_error(accelerator, root, tmp, error)
    if accelerator.is_main_process:
        _prune(root, keep, state.origin)
    return final


def _prune(root: Path, keep: int, origin: str) -> None:
    for old in checkpoints(root.parent)[:-keep]:
        if origin and old.resolve() == Path(origin):
            continue
        # Renamed before deletion, so a kill mid-delete cannot leave a half-deleted 'step_' directory.
        doomed = root / f".tmp-del-{old.name}"
        try:
            os.replace(old, doomed)
            shutil.rmtree(doomed)
        except OSError as err:
            print(f"[gan-dist] warning: could not delete the old checkpoint {old} ({err})", flush=True)


def _seal(tmp: Path, final: Path, state: TrainState, world: int) -> None:
    """List every file with its size and digest in meta.json, make it all durable, and rename it into place."""
    deadline = time.time() + 30
    while not all((tmp / rng_file(r)).is_file() for r in range(world)):
        if time.time() > deadline:  # another node's file not visible yet: a filesystem not shared by all nodes
            raise OSError(f"{tmp} lacks the RNG state of some rank after 30 s; run.dir must be on a filesystem "
                          "that every node sees")
        time.sleep(0.1)
    files = {}
    for p in sorted(tmp.iterdir()):
        fsync_file(p)
        files[p.name] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    meta = {"step": state.step, "nimg": state.nimg, "world_size": world, "wandb_id": state.wandb_id,
            "origin": state.origin, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "files": files}
    write_atomic(tmp / META, json.dumps(meta, indent=1).encode())
    if final.exists():  # a damaged checkpoint of this step that the run fell back past
        doomed = final.with_name(f".tmp-del-{final.name}")
        os.replace(final, doomed)
        shutil.rmtree(doomed)
    os.replace(tmp, final)
    fsync_dir(final.parent)


def _write_error(accelerator: Accelerator, root: Path, tmp: Path, err: BaseException | None) -> UserError:
    """The error every rank raises after a failed checkpoint write (on a rank that saw no error itself, quietly: the
    one that did prints it); main deletes the part written, which a full disk needs back."""
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    why = f" ({write_failure(err, root)})" if err is not None else ""
    return UserError(f"cannot write a checkpoint in {root}{why}; the checkpoints before it are intact. Free space "
                     "or fix the folder, then rerun the same command to resume", quiet=err is None)


def nonfinite(accelerator: Accelerator, parts: dict[str, list[torch.Tensor]]) -> list[str]:
    """The names of `parts` (weights, optimizer states) holding a NaN or an inf on any rank: one check per tensor on
    the device and one reduce (all ranks call this, before anything is written from them)."""
    device = accelerator.device

    def bad(tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([torch.isfinite(t).all().to(device) for t in tensors]).logical_not().any() if tensors \
            else torch.tensor(False, device=device)

    flags = accelerator.reduce(torch.stack([bad(tensors) for tensors in parts.values()]).float(), "sum").tolist()
    return [name for name, flag in zip(parts, flags) if flag > 0]


def training_tensors(modules: dict[str, torch.nn.Module], optimizers: dict[str, torch.optim.Optimizer]) -> \
        dict[str, list[torch.Tensor]]:
    """What a checkpoint holds of each network (weights and buffers) and optimizer (its moments), by name."""
    return {name: [*m.parameters(), *m.buffers()] for name, m in modules.items()} | {
        name: [t for state in opt.state.values() for t in state.values() if torch.is_tensor(t)]
        for name, opt in optimizers.items()}


@torch.no_grad()
def restore_buffers(saved: dict[str, torch.Tensor], modules: dict[str, torch.nn.Module], rank: int,
                    world: int) -> None:
    """This rank's own buffers from a checkpoint of the same world size, else rank 0's (which G's and D's model
    files hold too)."""
    for name, module in modules.items():
        for key, b in module.named_buffers():
            rows = saved.get(f"{name}.{key}")
            if rows is not None and len(rows) and rows.shape[1:] == b.shape:
                b.copy_(rows[rank] if len(rows) == world else rows[0])


def save_training(accelerator: Accelerator, run_dir: str | Path, state: TrainState, ema: EMA, keep: int,
                  data_pos: torch.Tensor, log: tuple[dict[str, torch.Tensor], int],
                  nets: dict[str, torch.nn.Module], config: str) -> Path:
    """Checkpoint a training run (all ranks call this): gather into `state` what each rank alone holds (its data
    position `data_pos`, its sums of the log interval so far `log`, the buffers of `nets`), then save it with the
    run's `config` (YAML)."""
    sync_buffers(ema.G_ema)
    state.data_pos = accelerator.gather(data_pos.to(accelerator.device)).cpu()
    state.log_sums, state.log_steps = log
    state.rank_buffers = {f"{name}.{key}": accelerator.gather(b[None]).cpu()
                          for name, module in nets.items() for key, b in module.named_buffers()}
    return save_checkpoint(accelerator, run_dir, state, ema, keep, config)


def saved_config(path: Path) -> dict | None:
    """The config a checkpoint was written with: its own config.yaml, or for a checkpoint of an older gan-dist its
    run's; None when neither is readable."""
    for file in (path / "config.yaml", path.parent.parent / "config.yaml"):
        try:
            config = yaml.safe_load(file.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue
        if isinstance(config, dict):
            return config
    return None


def resume_training(accelerator: Accelerator, path: Path, state: TrainState, ema: torch.nn.Module,
                    nets: dict[str, torch.nn.Module], config: dict) -> None:
    """Load the checkpoint main chose and verified into every rank, each rank's own buffers of `nets` included,
    and say so, naming the keys of this run's `config` (`to_dict`'s) that differ from the checkpoint's. A
    checkpoint that does not fit is a UserError naming those keys."""
    old = saved_config(path)
    changes = config_changes(old, config) if old is not None else {}
    fixed = {k: v for k, v in changes.items() if not may_change(k)}
    try:
        meta = load_checkpoint(accelerator, path, state, ema)
    except CheckpointError as err:
        keys = ", ".join(f"{k}: {v}" for k, v in (fixed or changes).items())
        raise UserError(f"checkpoint {err}" + (f"; changed since it was written: {keys}" if keys else "") +
                        ". Resume with the values it was written with (its config.yaml), or start a new run.dir") \
            from None
    world = accelerator.num_processes
    restore_buffers(state.rank_buffers, nets, accelerator.process_index, world)
    accelerator.print(f"resumed from {path} (step {state.step}, {state.nimg} images, saved with world size "
                      f"{meta['world_size']})")
    if changes:
        accelerator.print(f"changed since the checkpoint: {', '.join(f'{k}: {v}' for k, v in changes.items())}")
    if fixed:
        verb = "is" if len(fixed) == 1 else "are"
        accelerator.print(f"warning: {', '.join(fixed)} changed since the checkpoint, and {verb} not among the keys "
                          "that may change on resume (README: Resume): the run goes on, but no longer as the run that "
                          "wrote the checkpoint would have")
    if meta["world_size"] != world:
        accelerator.print(f"world size changed from {meta['world_size']} to {world}: training continues from the "
                          "checkpoint, but not bit-exactly (per-rank noise and data order differ)")


def load_checkpoint(accelerator: Accelerator, path: Path, state: TrainState, ema: torch.nn.Module) -> dict:
    """Restore a checkpoint `verify` accepted (all ranks call this); returns its meta.json. accelerate loads its
    part with `weights_only=True` and safetensors; TrainState and G_ema come from safetensors and JSON."""
    meta = read_meta(path)
    try:
        accelerator.load_state(str(path))
        ema.load_state_dict(load_file(str(path / "ema.safetensors")))
    except (RuntimeError, ValueError, KeyError, SafetensorError) as err:
        raise CheckpointError(f"{path} does not fit this run's networks or optimizers "
                              f"({str(err).strip().splitlines()[-1].strip()[:300]})") from None
    state.load(path)
    return meta


def export_final(run_dir: str | Path, modules: dict[str, torch.nn.Module], name: str = "final",
                 scores: dict | None = None, *, model: ModelConfig | None = None, step: int | None = None,
                 nimg: int | None = None) -> Path:
    """Write `{run.dir}/{name}/<module>.safetensors` (plain state_dicts), with `model` its `config.json`, and with
    `scores` `metrics.json`; main process only. Each file's metadata names the network, the code's commit and what
    is given of the model (arch, resolution, channels, z_dim, classes) and of the step and images seen (step,
    kimg), so that `gan_dist.load_generator` needs nothing beside the folder. `final/` is the end of training,
    `best/` the best evaluation so far. The old export stays in place until the new one is complete and replaces
    it in one step."""
    link = Path(run_dir) / name
    broken = [m for m, module in modules.items()
              if not all(torch.isfinite(t).all() for t in module.state_dict().values())]
    if broken:  # the loop checks first; this is the last guard of what users load
        raise UserError(f"refusing to write {link}: {', '.join(broken)} hold non-finite values (NaN or inf)")
    folder = None
    try:
        folder = versioned_dir(link)
        metadata = export_metadata(model, step, nimg)
        for module_name, module in modules.items():
            save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()},
                      str(folder / f"{module_name}.safetensors"), metadata=metadata | {"network": module_name})
        if model is not None:
            (folder / "config.json").write_text(config_json(model))
        if scores is not None:
            (folder / "metrics.json").write_text(json.dumps(scores, indent=1) + "\n")
        publish_dir(folder, link)
    except WRITE_ERRORS as err:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        kept = f"; {link} as it was is kept" if link.exists() else ""
        raise UserError(f"cannot write {link} ({write_failure(err, link.parent)}){kept}. Free space or fix the "
                        "folder, then rerun the same command") from None
    return link


# Each exported network's file in a step checkpoint: G_ema's own file, then accelerate's models in prepare order.
STEP_FILES = {"generator_ema": "ema.safetensors", "generator": "model.safetensors",
              "discriminator": "model_1.safetensors"}


def network_weights(run_dir: str | Path, checkpoint: str = "final", name: str = "generator_ema") -> dict:
    """The state_dict of `name` (generator_ema, generator, discriminator) from `final`, `best`, or the checkpoint
    of a step number; UserError otherwise."""
    run_dir, path = Path(run_dir), checkpoint_path(run_dir, checkpoint)
    if checkpoint in ("final", "best"):
        if not (path / f"{name}.safetensors").is_file():
            raise UserError(f"{path / f'{name}.safetensors'} does not exist; is {run_dir} a finished run (final/), or "
                            f"one with eval.every set (best/)? Or pass a step that has a checkpoint: "
                            f"{', '.join(p.name for p in checkpoints(run_dir)) or 'none saved'}")
        return _weights(path / f"{name}.safetensors")
    if not (path / META).is_file():
        raise UserError(f"{run_dir} has no complete checkpoint at step {checkpoint}; it has "
                        f"{', '.join(p.name for p in checkpoints(run_dir)) or 'none'}")
    return _weights(path / STEP_FILES[name])


def _weights(path: Path) -> dict[str, torch.Tensor]:
    """A network's state_dict from its file in an export or a step checkpoint (G_ema's under its EMA wrapper)."""
    try:
        weights = load_file(str(path))
    except (OSError, SafetensorError) as err:
        raise UserError(f"{path} is not a readable safetensors file ({err})") from None
    prefix = "averaged.module."
    return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)} if path.name == "ema.safetensors" \
        else weights


def checkpoint_generator(path: Path, ema: bool = True) -> torch.nn.Module:
    """G_ema (or G) of a step checkpoint, built as the config it was written with says (its own config.yaml, or
    its run's), for `gan_dist.load_generator`."""
    config = saved_config(path)
    if config is None or not isinstance(config.get("model"), dict):
        raise UserError(f"checkpoint {path} has no readable config.yaml, and neither has its run; load it from "
                        "inside its run directory")
    G = build_generator(model_config(config["model"], str(path / "config.yaml")))
    _load(G, _weights(path / STEP_FILES["generator_ema" if ema else "generator"]), path.parent.parent, path.name)
    return G


def load_run_discriminator(run_dir: str | Path, cfg, checkpoint: str = "final") -> torch.nn.Module:
    """The run's D in eval mode (for rejection sampling); `cfg` the run's Config."""
    D = build_models(cfg.model)[1]
    _load(D, network_weights(run_dir, checkpoint, "discriminator"), run_dir, checkpoint)
    return D.eval()


def _load(net: torch.nn.Module, weights: dict, run_dir: str | Path, checkpoint: str) -> None:
    try:
        net.load_state_dict(weights)
    except RuntimeError as err:
        raise UserError(f"the weights of {run_dir} ({checkpoint}) do not fit its config.yaml "
                        f"({str(err).strip().splitlines()[-1].strip()})") from None
