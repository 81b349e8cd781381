"""Checkpoints for exact resume, verified before they are trusted: `Checkpointer` holds the run's stateful parts
once (the trained networks, optimizers, EMA and augmentation, `TrainState`, the config) and offers save, resume,
roll back and the non-finite check that guards every write. Exports (`final/`, `best/`) are export.py's, which
sits above this module; where checkpoints lie and how they are listed is rundir.py's.

A checkpoint is `{run.dir}/checkpoints/step_{step:08d}/`:

- accelerate's state: both models (safetensors), both optimizers, the fp16 scaler and every rank's RNG (torch
  files, only ever loaded with `weights_only=True`, which cannot run code);
- gan-dist's own state, never pickled: `ema.safetensors` (G_ema) and TrainState with the data's state
  (`data.DataState`: every rank's positions) as `train_state.safetensors` (tensors) plus `train_state.json`
  (everything else);
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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import load as safe_torch_load
from accelerate.utils import set_seed
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from gan_dist.config import Config, config_changes, may_change, to_dict, to_yaml
from gan_dist.data import DataState
from gan_dist.distributed import on_main, sync_buffers
from gan_dist.errors import UserError
from gan_dist.files import fsync_dir, fsync_file, sha256_file, write_atomic, write_failure
from gan_dist.rundir import META, CheckpointError, checkpoints, config_file, prepare_run_dir, read_meta, step_dir, \
    step_of
from gan_dist.trained import Trained

OWN_FILES = ("ema.safetensors", "train_state.safetensors", "train_state.json")
ACCELERATE_FILES = ("model.safetensors", "model_1.safetensors", "optimizer.bin", "optimizer_1.bin")
TORCH_FILE = re.compile(r".*\.(bin|pkl|pt)$")
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)  # what a failed write raises in Python, torch, safetensors


def rng_file(rank: int) -> str:
    return f"random_states_{rank}.pkl"


@dataclass
class TrainState:
    """Loop state saved with every checkpoint (the data's own state is the data's: `data.DataState`, saved beside
    it in the same two files)."""

    step: int = 0
    nimg: int = 0  # real images seen, over all ranks
    z_fixed: torch.Tensor = field(default_factory=lambda: torch.empty(0))  # noise behind every sample grid
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
    self_cond: dict[str, torch.Tensor] = field(default_factory=dict)  # self-conditioning's clusters (`SelfCond`)

    def save(self, folder: Path, data: DataState) -> None:
        """Write this state and `data` (every rank's positions gathered) as train_state.safetensors and .json."""
        tensors = {"z_fixed": self.z_fixed, "data_pos": data.pos, "data_spans": data.spans} | {
            f"log_sums/{k}": v for k, v in self.log_sums.items()} | {
            f"rank_buffers/{k}": v for k, v in self.rank_buffers.items()} | {
            f"self_cond/{k}": v for k, v in self.self_cond.items()}
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                  str(folder / "train_state.safetensors"))
        scalars = {"step": self.step, "nimg": self.nimg, "batches": data.batches, "log_steps": self.log_steps,
                   "best": self.best, "scores": self.scores, "wandb_id": self.wandb_id, "origin": self.origin,
                   "rollbacks": self.rollbacks, "data_layout": data.layout}
        (folder / "train_state.json").write_text(json.dumps(scalars, indent=1) + "\n")

    def load(self, folder: Path) -> DataState:
        """Restore from `folder` and return the data's state saved with it; CheckpointError if a value has the
        wrong type (nothing is changed then)."""
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
        self.__dict__.update({k: scalars[k] for k in types if k != "batches"})
        rollbacks, layout = scalars.get("rollbacks", 0), scalars.get("data_layout", "")  # newer than some checkpoints
        self.rollbacks = rollbacks if isinstance(rollbacks, int) and rollbacks >= 0 else 0
        self.z_fixed = tensors["z_fixed"]
        self.log_sums = {k.removeprefix("log_sums/"): v for k, v in tensors.items() if k.startswith("log_sums/")}
        self.rank_buffers = {k.removeprefix("rank_buffers/"): v for k, v in tensors.items()
                             if k.startswith("rank_buffers/")}
        self.self_cond = {k.removeprefix("self_cond/"): v for k, v in tensors.items() if k.startswith("self_cond/")}
        spans = tensors.get("data_spans", torch.empty(0, 3, dtype=torch.int64))  # newer than some checkpoints
        spans = spans if spans.ndim == 2 and spans.shape[1] == 3 else torch.empty(0, 3, dtype=torch.int64)
        return DataState(pos=tensors["data_pos"], spans=spans, layout=layout if layout in ("cache", "stream") else "",
                         batches=scalars["batches"])


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
                        f"none, or a path like {step_dir(run_dir, 1000)}")
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


def save_checkpoint(accelerator: Accelerator, run_dir: str | Path, state: TrainState, data: DataState, *,
                    ema: torch.nn.Module, keep: int, config: str = "") -> Path:
    """Write a checkpoint for `state.step` with the data's state `data` (every rank's positions gathered; all ranks
    call this) and keep only the newest `keep`, never
    `state.origin`. A write that fails on any rank (a full disk) leaves the older checkpoints as they were and
    raises UserError on every rank."""
    final = step_dir(run_dir, state.step)
    root = final.parent
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
            state.save(tmp, data)
            if config:
                config_file(tmp).write_text(config)
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


def saved_config(path: Path) -> dict | None:
    """The config a checkpoint was written with: its own config.yaml, or for a checkpoint of an older gan-dist its
    run's; None when neither is readable."""
    for file in (config_file(path), config_file(path.parent.parent)):
        try:
            config = yaml.safe_load(file.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue
        if isinstance(config, dict):
            return config
    return None


def load_checkpoint(accelerator: Accelerator, path: Path, state: TrainState, ema: torch.nn.Module) -> \
        tuple[dict, DataState]:
    """Restore a checkpoint `verify` accepted (all ranks call this); returns its meta.json and the data's state.
    accelerate loads its part with `weights_only=True` and safetensors; TrainState and G_ema come from safetensors
    and JSON."""
    meta = read_meta(path)
    try:
        accelerator.load_state(str(path))
        ema.load_state_dict(load_file(str(path / "ema.safetensors")))
    except (RuntimeError, ValueError, KeyError, SafetensorError) as err:
        raise CheckpointError(f"{path} does not fit this run's networks or optimizers "
                              f"({str(err).strip().splitlines()[-1].strip()[:300]})") from None
    return meta, state.load(path)


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


class Checkpointer:
    """The run's stateful parts, held once: the trained networks, optimizers, EMA and augmentation (`trained`), the
    loop's `state`, and the run's config (`cfg`, the whole tree: a checkpoint keeps it, and a resume compares with
    it). The data and the log interval's sums are handed to `save`, which the loop asks them for; `resume` and
    `roll_back` give the data's saved state back. All ranks call every method."""

    def __init__(self, accelerator: Accelerator, cfg: Config, trained: Trained, state: TrainState) -> None:
        self.accelerator, self.cfg, self.trained, self.state = accelerator, cfg, trained, state
        self.run_dir = Path(cfg.run.dir)

    def save(self, data: DataState, log: tuple[dict[str, torch.Tensor], int]) -> Path:
        """Checkpoint the run at `state.step`: gather into the state what each rank alone holds (its data position
        in `data`, its sums of the log interval so far `log`, its networks' buffers), then write it (keeping
        ckpt.keep checkpoints)."""
        acc, state = self.accelerator, self.state
        sync_buffers(self.trained.G_ema)
        data = replace(data, pos=acc.gather(data.pos.to(acc.device)).cpu())
        state.log_sums, state.log_steps = log
        state.rank_buffers = {f"{name}.{key}": acc.gather(b[None]).cpu()
                              for name, module in self.trained.per_rank().items() for key, b in module.named_buffers()}
        state.self_cond = self.trained.self_cond.state() if self.trained.self_cond is not None else {}
        return save_checkpoint(acc, self.run_dir, state, data, ema=self.trained.ema, keep=self.cfg.ckpt.keep,
                               config=to_yaml(self.cfg))

    def resume(self, resume: Resume) -> DataState:
        """Load the checkpoint main chose and verified (`resume`) into every rank, each rank's own buffers
        included, and say so, naming the keys of this run's config that differ from the checkpoint's; the data's
        state saved with it (a fresh one for a fresh start). A checkpoint that does not fit is a UserError naming
        those keys."""
        if resume.path is None:
            return DataState.fresh()
        data = self._load(resume.path)
        self.state.origin = resume.origin
        return data

    def _load(self, path: Path) -> DataState:
        acc, say = self.accelerator, self.accelerator.print
        old = saved_config(path)
        changes = config_changes(old, to_dict(self.cfg)) if old is not None else {}
        fixed = {k: v for k, v in changes.items() if not may_change(k)}
        try:
            meta, data = load_checkpoint(acc, path, self.state, self.trained.ema)
        except CheckpointError as err:
            keys = ", ".join(f"{k}: {v}" for k, v in (fixed or changes).items())
            raise UserError(f"checkpoint {err}" + (f"; changed since it was written: {keys}" if keys else "") +
                            ". Resume with the values it was written with (its config.yaml), or start a new "
                            "run.dir") from None
        world = acc.num_processes
        restore_buffers(self.state.rank_buffers, self.trained.per_rank(), acc.process_index, world)
        if self.trained.self_cond is not None:
            self.trained.self_cond.load(self.state.self_cond)
        say(f"resumed from {path} (step {self.state.step}, {self.state.nimg} images, saved with world size "
            f"{meta['world_size']})")
        if changes:
            say(f"changed since the checkpoint: {', '.join(f'{k}: {v}' for k, v in changes.items())}")
        if fixed:
            verb = "is" if len(fixed) == 1 else "are"
            say(f"warning: {', '.join(fixed)} changed since the checkpoint, and {verb} not among the keys that may "
                "change on resume (README: Resume): the run goes on, but no longer as the run that wrote the "
                "checkpoint would have")
        if meta["world_size"] != world:
            say(f"world size changed from {meta['world_size']} to {world}: training continues from the checkpoint, "
                "but not bit-exactly (per-rank noise and data order differ)")
        return data

    def nonfinite(self) -> list[str]:
        """The names of the trained tensors (weights, optimizer states) holding a NaN or an inf on any rank: one
        check per tensor on the device and one reduce, before anything is written from them."""
        device = self.accelerator.device

        def bad(tensors: list[torch.Tensor]) -> torch.Tensor:
            return torch.stack([torch.isfinite(t).all().to(device) for t in tensors]).logical_not().any() \
                if tensors else torch.tensor(False, device=device)

        parts = self.trained.tensors()
        flags = self.accelerator.reduce(torch.stack([bad(t) for t in parts.values()]).float(), "sum").tolist()
        return [name for name, flag in zip(parts, flags) if flag > 0]

    def roll_back(self, bad: list[str], give_up: Callable[[], None]) -> DataState:
        """After the metrics or tensors `bad` turned non-finite: with train.on_nonfinite=rollback and rollbacks
        left, load the newest checkpoint into every rank and draw other noise from there, so that the run does not
        walk the same path again; returns the data's state there. Otherwise `give_up()` (the tracker's finish) and
        stop with one error line."""
        acc, cfg, state = self.accelerator, self.cfg, self.state
        what = f"training diverged at step {state.step}: {', '.join(bad)} non-finite (NaN or inf)"
        path = on_main(acc, lambda: choose_resume(cfg.run.dir, "auto", acc.print).path or (
            Path(state.origin) if state.origin else None))
        rollback = cfg.train.on_nonfinite == "rollback"
        if path is None or not rollback or state.rollbacks >= cfg.train.max_rollbacks:
            give_up()
            if path is None:
                raise UserError(f"{what}, before the run's first checkpoint: there is nothing to go back to, and "
                                "nothing was written from it. Rerun with lower learning rates (optim.lr_G, "
                                "optim.lr_D)", quiet=not acc.is_main_process)
            tried = f" again after {state.rollbacks} rollback(s) (train.max_rollbacks={cfg.train.max_rollbacks})" \
                if rollback else ""
            raise UserError(f"{what}{tried}; nothing was written from it, and the newest checkpoint {path} is "
                            "finite. Lower the learning rates (optim.lr_G and optim.lr_D may change on resume) and "
                            "rerun the same command to resume from it"
                            f"{'' if rollback else ', or set train.on_nonfinite=rollback'}",
                            quiet=not acc.is_main_process)
        rollbacks = state.rollbacks + 1
        data = self._load(path)
        state.rollbacks = rollbacks
        set_seed(int(np.random.SeedSequence([cfg.seed, rollbacks]).generate_state(1)[0] % 2**31), device_specific=True)
        on_main(acc, lambda: prepare_run_dir(self.run_dir, state.step))
        acc.print(f"{what}; rolled back to step {state.step} (rollback {rollbacks} of train.max_rollbacks="
                  f"{cfg.train.max_rollbacks}), drawing other noise from there")
        return data
