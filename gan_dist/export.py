"""What an export says about itself, and `load_generator`, the one way to load a generator from wherever gan-dist
put it: a run directory, an export, a step checkpoint, a save_pretrained folder or a Hub repo.

An export (`{run.dir}/final/`, `{run.dir}/best/`, written by `checkpoint.export_final`) holds `config.json` (the
ModelConfig, flat, as `Generator.save_pretrained` writes it) and safetensors files whose metadata names the
architecture and the training behind the weights: arch, resolution, channels, z_dim, classes, step, kimg and the
code's git commit. Exports of a gan-dist from before config.json still load, with the ModelConfig of the run's
config.yaml beside them.

    from gan_dist import load_generator
    G = load_generator("runs/mnist/final")  # a run dir, RUN/checkpoints/step_N, a save_pretrained folder, a repo id
    images = G(G.latents(16))  # (16, C, H, W) in [-1, 1]; G(z, c) for a conditional run; latents(16, truncation=0.7)
"""

from __future__ import annotations

import functools
import json
import subprocess
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

from gan_dist.config import Config, ModelConfig, run_config
from gan_dist.errors import UserError
from gan_dist.models import WEIGHTS, Generator, build_generator, describe, load_weights, model_config


@functools.cache
def git_commit() -> str:
    """The commit of the gan-dist code that runs, or "unknown" outside a git checkout."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        commit = ""
    return commit or "unknown"


def export_metadata(model: ModelConfig | None, step: int | None, nimg: int | None) -> dict[str, str]:
    """safetensors metadata of an exported network: the model's description and what is known of its training."""
    metadata = {"format": "pt"} if model is None else describe(model)
    if step is not None:
        metadata["step"] = str(step)
    if nimg is not None:
        metadata["kimg"] = str(nimg / 1000)
    return metadata | {"commit": git_commit()}


def load_generator(path_or_repo: str | Path, ema: bool = True, device: str | torch.device = "cpu",
                   revision: str | None = None) -> Generator:
    """G in eval mode on `device`, from any place gan-dist puts one: a run directory (its final/), an export folder
    (`RUN/final`, `RUN/best`), a step checkpoint (`RUN/checkpoints/step_N`), a folder written by `save_pretrained`,
    or a Hub repo id (`revision` a branch, tag or commit of it). `ema` picks G_ema (else G) in a run, export or
    checkpoint; a save_pretrained folder or repo holds one generator. UserError naming what was given and what was
    expected when it holds no generator."""
    from gan_dist.checkpoint import META, checkpoint_generator  # checkpoint.py imports this module

    path = Path(path_or_repo)
    if not path.exists():
        path = _download(str(path_or_repo), revision)
    if (path / META).is_file():  # before save_pretrained's file: a step checkpoint's G is also model.safetensors
        return checkpoint_generator(path, ema).to(device).eval()
    if (path / WEIGHTS).is_file():
        return Generator.from_pretrained(path, map_location=device)
    if (path / "config.yaml").is_file():
        if not (path / "final").is_dir():
            raise UserError(f"run directory {path} has no final/ export (the run has not finished); pass {path}/best "
                            f"for its best evaluation so far, or a checkpoint in {path}/checkpoints")
        path = path / "final"
    file = path / f"{'generator_ema' if ema else 'generator'}.safetensors"
    if not file.is_file():
        raise UserError(f"{path} holds no generator: pass a run directory, an export folder (RUN/final, RUN/best, with "
                        f"{file.name}), a step checkpoint (RUN/checkpoints/step_N), a save_pretrained folder (with "
                        f"{WEIGHTS}), or a Hub repo id")
    G = build_generator(_export_config(path))
    return load_weights(G, file).to(device).eval()


def checkpoint_path(run: str | Path, checkpoint: str) -> Path:
    """Where `checkpoint` of the run directory `run` lies: `final` and `best` its exports, a step number its
    checkpoint of that step."""
    if checkpoint in ("final", "best"):
        return Path(run) / checkpoint
    if not checkpoint.isdigit():
        raise UserError(f"--checkpoint {checkpoint} is not final, best or a step number")
    return Path(run) / "checkpoints" / f"step_{int(checkpoint):08d}"


def owning_run(path: str | Path) -> Path | None:
    """The run directory that `path` is, or that holds `path` as its export or step checkpoint; None otherwise."""
    from gan_dist.checkpoint import META  # checkpoint.py imports this module

    path = Path(path)
    for folder in (path, path.parent, path.parent.parent):
        if (folder / "config.yaml").is_file() and not (folder / META).is_file():
            return folder
    return None


def review_source(run: str, checkpoint: str) -> tuple[str | Path, Config | None]:
    """What the review scripts' `--run X [--checkpoint C]` loads: checkpoint C of X when X is a run directory, else
    X itself (an export or step checkpoint folder, a save_pretrained folder, a Hub repo id); and the Config of the
    run X belongs to, when it belongs to one."""
    home = owning_run(run) if Path(run).exists() else None
    if home is None or home != Path(run):
        return run, None if home is None else run_config(home / "config.yaml")
    source = checkpoint_path(run, checkpoint)
    if not source.is_dir():
        saved = ", ".join(sorted(p.name for p in (home / "checkpoints").glob("step_*"))) or "none"
        what = f"no complete checkpoint at step {checkpoint}" if checkpoint.isdigit() else \
            f"no {checkpoint}/ export ({'the run has not finished' if checkpoint == 'final' else 'eval.every=0?'})"
        raise UserError(f"run directory {run} has {what}; its checkpoints: {saved}")
    return source, run_config(home / "config.yaml")


def _export_config(folder: Path) -> ModelConfig:
    """An export's ModelConfig: its config.json, or for an export of an older gan-dist its run's config.yaml."""
    if (folder / "config.json").is_file():
        try:
            config = json.loads((folder / "config.json").read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UserError(f"{folder / 'config.json'} is unreadable ({err})") from None
        return model_config(config, str(folder / "config.json"))
    config_file = folder.resolve().parent / "config.yaml"
    if not config_file.is_file():
        raise UserError(f"{folder} has no config.json, and no config.yaml of its run beside it ({config_file}); "
                        "load the export from inside its run directory")
    return run_config(config_file).model


def _download(repo: str, revision: str | None) -> Path:
    """The Hub repo's config.json and weights, in the local cache (downloaded unless there already)."""
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=["config.json", WEIGHTS]))
    except HFValidationError:
        raise UserError(f"{repo} does not exist, and is no Hub repo id either; pass a run directory, an export folder "
                        "(RUN/final, RUN/best), a step checkpoint (RUN/checkpoints/step_N), a save_pretrained folder, "
                        "or a repo id like user/name") from None
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"{repo} is no local folder, and the Hub repo of that name cannot be downloaded ({first[:200]})"
                        "; check the name, the network and your token (`hf auth login`)") from None
