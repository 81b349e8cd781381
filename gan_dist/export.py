"""Exports and loading, above checkpointing (this module reads checkpoints; checkpoint.py never imports it):
`export_final` writes a run's `final/` and `best/`, and `load_generator` is the one way to load a generator from
wherever gan-dist put it: a run directory, an export, a step checkpoint, a save_pretrained folder or a Hub repo.

An export (`{run.dir}/final/`, `{run.dir}/best/`, written by `export_final`) holds `config.json` (the
ModelConfig, flat, as `Generator.save_pretrained` writes it) and safetensors files whose metadata names the
architecture and the training behind the weights: arch, resolution, channels, z_dim, classes, step, kimg and the
code's git commit. Exports of a gan-dist from before config.json still load, with the ModelConfig of the run's
config.yaml beside them.

    from gan_dist import load_generator
    G = load_generator("runs/mnist/final")  # a run dir, RUN/checkpoints/step_N, a save_pretrained folder, a repo id
    images = G(G.latents(16))  # (16, C, H, W) in [-1, 1]; G(z, c) for a conditional run; latents(16, truncation=0.7)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gan_dist.checkpoint import WRITE_ERRORS, saved_config
from gan_dist.config import Config, ModelConfig, run_config
from gan_dist.errors import UserError
from gan_dist.files import publish_dir, versioned_dir, write_failure
from gan_dist.models import WEIGHTS, Generator, build_generator, build_models, config_json, describe, load_weights, \
    model_config
from gan_dist.provenance import git_commit
from gan_dist.rundir import META, checkpoint_path, checkpoints, config_file, owning_run


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
    path = Path(path_or_repo)
    if not path.exists():
        path = _download(str(path_or_repo), revision)
    if (path / META).is_file():  # before save_pretrained's file: a step checkpoint's G is also model.safetensors
        return checkpoint_generator(path, ema).to(device).eval()
    if (path / WEIGHTS).is_file():
        return Generator.from_pretrained(path, map_location=device)
    if config_file(path).is_file():
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


def review_source(run: str, checkpoint: str) -> tuple[str | Path, Config | None]:
    """What the review scripts' `--run X [--checkpoint C]` loads: checkpoint C of X when X is a run directory, else
    X itself (an export or step checkpoint folder, a save_pretrained folder, a Hub repo id); and the Config of the
    run X belongs to, when it belongs to one."""
    home = owning_run(run) if Path(run).exists() else None
    if home is None or home != Path(run):
        return run, None if home is None else run_config(config_file(home))
    source = checkpoint_path(run, checkpoint)
    if not source.is_dir():
        saved = ", ".join(p.name for p in checkpoints(home)) or "none"
        what = f"no complete checkpoint at step {checkpoint}" if checkpoint.isdigit() else \
            f"no {checkpoint}/ export ({'the run has not finished' if checkpoint == 'final' else 'eval.every=0?'})"
        raise UserError(f"run directory {run} has {what}; its checkpoints: {saved}")
    return source, run_config(config_file(home))


def _export_config(folder: Path) -> ModelConfig:
    """An export's ModelConfig: its config.json, or for an export of an older gan-dist its run's config.yaml."""
    if (folder / "config.json").is_file():
        try:
            config = json.loads((folder / "config.json").read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UserError(f"{folder / 'config.json'} is unreadable ({err})") from None
        return model_config(config, str(folder / "config.json"))
    run_file = config_file(folder.resolve().parent)
    if not run_file.is_file():
        raise UserError(f"{folder} has no config.json, and no config.yaml of its run beside it ({run_file}); "
                        "load the export from inside its run directory")
    return run_config(run_file).model


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
    G = build_generator(model_config(config["model"], str(config_file(path))))
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
