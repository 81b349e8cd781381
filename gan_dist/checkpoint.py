"""Checkpoints for exact resume, and the final export.

A checkpoint is `{run.dir}/checkpoints/step_{step:08d}/`: accelerate's state (both models, both optimizers, the
scaler, every rank's RNG) plus the registered EMA and TrainState, and a readable `meta.json`. It is written under a
temporary name and renamed only when every rank has finished, so a checkpoint with the final name is complete, and a
crash mid-write leaves nothing that `ckpt.resume=auto` would pick. Checkpoints are named by step, never by
accelerate's automatic counter (which restarts at 0 after a resume and prunes the newest checkpoint).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from gan_dist.errors import UserError

STEP_DIR = re.compile(r"^step_(\d{8,})$")  # {step:08d} grows past 8 digits at step 1e8


@dataclass
class TrainState:
    """Loop state saved with every checkpoint (registered with the Accelerator)."""

    step: int = 0
    nimg: int = 0  # real images seen, over all ranks
    batches: int = 0  # micro-batches this rank has taken from its data stream: the data position
    z_fixed: torch.Tensor = field(default_factory=lambda: torch.empty(0))  # noise behind every sample grid
    data_pos: torch.Tensor = field(default_factory=lambda: torch.empty(0, 3, dtype=torch.int64))  # see data.py
    log_sums: dict[str, torch.Tensor] = field(default_factory=dict)  # metric -> (world,) sums of the cut interval
    log_steps: int = 0  # micro-steps in those sums
    best: float | None = None  # the best value of eval.best_metric so far (behind best/)
    wandb_id: str = ""

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(state)


def checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints in `run_dir`, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def find_resume(run_dir: str | Path, resume: str) -> Path | None:
    """The checkpoint to resume from, or None for a fresh start; a UserError when `ckpt.resume` cannot be honoured."""
    existing = checkpoints(run_dir)
    if resume == "auto":
        return existing[-1] if existing else None
    if resume == "none":
        if existing:
            raise UserError(f"run.dir '{run_dir}' already holds checkpoints (latest {existing[-1].name}); "
                            "resume with ckpt.resume=auto, or start fresh in a new run.dir")
        return None
    path = Path(resume)
    if not (path / "meta.json").is_file():
        raise UserError(f"ckpt.resume='{resume}' is not a complete checkpoint (no meta.json there); use "
                        f"ckpt.resume=auto, none, or a path like {Path(run_dir) / 'checkpoints' / 'step_00001000'}")
    return path


def save_checkpoint(accelerator: Accelerator, run_dir: str | Path, state: TrainState, keep: int) -> Path:
    """Write a checkpoint for `state.step` (all ranks call this) and keep only the newest `keep`."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{state.step:08d}"
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        meta = {"step": state.step, "nimg": state.nimg, "world_size": accelerator.num_processes,
                "wandb_id": state.wandb_id, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoints(run_dir)[:-keep]:
            # Renamed before deletion, so a kill mid-delete cannot leave a half-deleted 'step_' directory.
            doomed = root / f".tmp-del-{old.name}"
            os.replace(old, doomed)
            shutil.rmtree(doomed)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: Path) -> dict:
    """Restore everything `save_checkpoint` wrote (all ranks call this); returns meta.json."""
    accelerator.load_state(str(path))
    return json.loads((path / "meta.json").read_text())


def export_final(run_dir: str | Path, modules: dict[str, torch.nn.Module], name: str = "final",
                 scores: dict | None = None) -> Path:
    """Write `{run.dir}/{name}/<module>.safetensors` (plain state_dicts) and, with `scores`, `metrics.json`,
    atomically; main process only. `final/` is the end of training, `best/` the best evaluation so far."""
    final = Path(run_dir) / name
    tmp = final.with_name(f".tmp-{name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for module_name, module in modules.items():
        save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()},
                  str(tmp / f"{module_name}.safetensors"))
    if scores is not None:
        (tmp / "metrics.json").write_text(json.dumps(scores, indent=1) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def generator_weights(run_dir: str | Path, checkpoint: str = "final", ema: bool = True) -> dict[str, torch.Tensor]:
    """G_ema's (or G's) state_dict from `final`, `best`, or the checkpoint of a step number; UserError otherwise."""
    run_dir = Path(run_dir)
    if checkpoint in ("final", "best"):
        path = run_dir / checkpoint / f"{'generator_ema' if ema else 'generator'}.safetensors"
        if not path.is_file():
            raise UserError(f"{path} does not exist; is {run_dir} a finished run (final/), or one with eval.every "
                            f"set (best/)? Or pass a step that has a checkpoint: "
                            f"{', '.join(p.name for p in checkpoints(run_dir)) or 'none saved'}")
        return load_file(str(path))
    if not checkpoint.isdigit():
        raise UserError(f"--checkpoint {checkpoint} is not final, best or a step number")
    step_dir = run_dir / "checkpoints" / f"step_{int(checkpoint):08d}"
    if not (step_dir / "meta.json").is_file():
        raise UserError(f"{run_dir} has no complete checkpoint at step {checkpoint}; it has "
                        f"{', '.join(p.name for p in checkpoints(run_dir)) or 'none'}")
    if not ema:
        return load_file(str(step_dir / "model.safetensors"))  # accelerate saves G, the first prepared model, here
    state = torch.load(step_dir / "custom_checkpoint_0.pkl", map_location="cpu", weights_only=True)
    prefix = "averaged.module."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load_run_generator(run_dir: str | Path, checkpoint: str = "final", ema: bool = True):
    """(G in eval mode with the run's weights, the run's Config) for the review scripts."""
    from gan_dist.config import load_config  # noqa: PLC0415 - keeps this module's import light for the loop
    from gan_dist.models import build_models  # noqa: PLC0415

    config = Path(run_dir) / "config.yaml"
    if not config.is_file():
        raise UserError(f"{run_dir} is not a run directory (no config.yaml); pass --run the run.dir of a training run")
    cfg = load_config(["--config", str(config)])
    G = build_models(cfg.model)[0]
    G.load_state_dict(generator_weights(run_dir, checkpoint, ema))
    return G.eval(), cfg
