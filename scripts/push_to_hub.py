"""Publish a run's final/ or best/ generator on the Hugging Face Hub, with a model card.

    python scripts/push_to_hub.py RUN --repo NAME [--export final|best] [--private] [--dry-run OUT]

The folder it uploads holds G_ema in save_pretrained's layout (`model.safetensors`, `config.json`), which
`gan_dist.load_generator(NAME)` and `gan_dist.models.Generator.from_pretrained(NAME)` load; `README.md`, the model
card (what was trained on what, the export's scores beside their real-data floors, a sample grid, and the command
and config that train the run again: the run's command.json, as it was started); `samples.png`, G_ema's samples on
the run's fixed noise (its training grids' noise); `training_config.yaml`, the run's config.yaml; and the export's
`metrics.json` when it was evaluated. No absolute path of the machine the run was on leaves it: in the card and the
config, a path inside the folder the run started in is made relative to it, and any other reads /path/to/NAME.
`--dry-run OUT` writes that folder to OUT and uploads nothing. An upload needs a token with write access (`hf auth
login`, or HF_TOKEN) and creates the repo when it does not exist; a failure is one `error:` line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from huggingface_hub import HfApi, ModelCardData, get_token
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from PIL import Image

from gan_dist.config import Config
from gan_dist.errors import UserError
from gan_dist.export import load_generator
from gan_dist.models import Generator, label_count
from gan_dist.points import mixture_centers
from gan_dist.rundir import CheckpointError, checkpoints, config_text, read_command, read_config, read_meta
from gan_dist.viz import fixed_noise, fixed_noise_grid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="the run.dir of a training run")
    parser.add_argument("--repo", required=True, help="the Hub repo id, e.g. user/mnist-dcgan")
    parser.add_argument("--export", choices=("final", "best"), default="final",
                        help="final (the end of training) or best (the best evaluation)")
    parser.add_argument("--private", action="store_true", help="create the repo private (an existing repo keeps "
                        "its visibility)")
    parser.add_argument("--dry-run", type=Path, metavar="OUT", help="write the upload folder to OUT, upload nothing")
    args = parser.parse_args(argv)
    try:
        try:
            validate_repo_id(args.repo)
        except HFValidationError as err:
            raise UserError(f"--repo {args.repo}: {str(err).splitlines()[0]}") from None
        if args.dry_run is not None:
            out = args.dry_run
            if out.exists() and (not out.is_dir() or any(out.iterdir())):
                raise UserError(f"--dry-run {out} exists and is not an empty folder; give a new folder")
            build(args.run, args.export, args.repo, out)
            print(f"wrote {out}: {', '.join(sorted(p.name for p in out.iterdir()))} (nothing uploaded)")
            return 0
        with tempfile.TemporaryDirectory() as tmp:
            build(args.run, args.export, args.repo, Path(tmp))
            token = get_token()
            if token is None:
                raise UserError("no Hugging Face token: log in with `hf auth login` or set HF_TOKEN (a token that "
                                f"may write to {args.repo}), or write the folder with --dry-run OUT")
            url = upload(Path(tmp), args.repo, args.private, token, f"{args.run.resolve().name} {args.export}/")
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"uploaded {args.run / args.export} to {url}")
    return 0


def build(run: Path, export: str, repo: str, out: Path) -> None:
    """Write the upload folder of `run`'s `export` (final or best) to `out`."""
    cfg = read_config(run)
    if not (run / export).is_dir():
        why = "the run has not finished" if export == "final" else "no evaluation has been exported (eval.every=0?)"
        other = "best" if export == "final" else "final"
        raise UserError(f"{run / export} does not exist: {why}; pass --export {other} or another run")
    G = load_generator(run / export)
    G.save_pretrained(out)  # model.safetensors and config.json; its generic README.md is replaced below
    Image.fromarray(sample_picture(G, cfg)).save(out / "samples.png")
    command = read_command(run)
    cwd = command.get("cwd") if command else None
    text = portable(config_text(run), cwd)
    (out / "training_config.yaml").write_text(text)
    scores, metrics = None, run / export / "metrics.json"
    if metrics.is_file():
        try:
            scores = json.loads(metrics.read_text())
        except (OSError, ValueError) as err:
            raise UserError(f"{metrics} is unreadable ({err}); move it away to publish without scores") from None
        shutil.copyfile(metrics, out / "metrics.json")
    (out / "README.md").write_text(model_card(repo, export, cfg, G, scores, world_size(run), text,
                                              train_command(command)))


# An absolute path: a slash at the start of a line or after a space, '=', ':' (file:/...), a quote or a bracket, and
# not a URL's '//'.
ABSOLUTE = re.compile(r"(?:^|(?<=[\s=:'\"\[(,]))/(?!/)[^\s'\",\])]+", re.MULTILINE)


def portable(text: str, cwd: str | None) -> str:
    """`text` with no absolute path of the machine the run was on: a path inside `cwd` (the folder the run started
    in) relative to it, any other as /path/to/<its last part>."""
    def swap(match: re.Match) -> str:
        path = match.group(0)
        if cwd and (path == cwd or path.startswith(cwd.rstrip("/") + "/")):
            return os.path.relpath(path, cwd)
        return f"/path/to/{Path(path).name}"

    return ABSOLUTE.sub(swap, text)


def train_command(command: dict | None) -> str | None:
    """The command line that started the run, its absolute paths made portable; programs by their own name."""
    if command is None:
        return None
    argv = command.get("launcher") or ["python", *command["train"]]
    argv = [Path(argv[0]).name, *(portable(a, command.get("cwd")) for a in argv[1:])]
    return shlex.join(argv)


def upload(folder: Path, repo: str, private: bool, token: str, what: str) -> str:
    """Create `repo` if missing and upload `folder` to it as one commit; its URL."""
    api = HfApi(token=token)
    try:
        repo_id = api.create_repo(repo, private=private, exist_ok=True).repo_id
        return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=f"gan-dist: {what}").commit_url
    except Exception as err:  # the network, the Hub or the token, each with errors of its own: one line for all
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise UserError(f"could not upload to the Hub repo {repo} ({type(err).__name__}: {first}); check the "
                        "network and that your token may write there, or write the folder with --dry-run OUT") from None


def sample_picture(G: Generator, cfg: Config) -> np.ndarray:
    """G's samples on the run's fixed noise, as its training grids drew them."""
    z = fixed_noise(cfg.log.num_samples, G.cfg.z_dim, cfg.seed)
    return fixed_noise_grid(G, z, label_count(G.cfg), mixture_centers(cfg.data))


def world_size(run: Path) -> int | None:
    """The number of processes the run trained on, from its newest readable checkpoint."""
    for path in reversed(checkpoints(run)):
        try:
            return read_meta(path)["world_size"]
        except CheckpointError:
            continue
    return None


def model_card(repo: str, export: str, cfg: Config, G: Generator, scores: dict | None, world: int | None,
               config_text: str, command: str | None = None) -> str:
    m = G.cfg
    images = m.arch != "mlp"
    front = ModelCardData(
        library_name="gan-dist", pipeline_tag="unconditional-image-generation" if images and not m.cond else None,
        tags=["gan", "gan-dist", "pytorch", "model_hub_mixin", "pytorch_model_hub_mixin", m.arch, cfg.data.dataset]
        + (["class-conditional"] if m.cond else []))
    # The weights' own metadata first; an export of an older gan-dist has only its scores' step and kimg.
    info = {k: str(v) for k, v in (scores or {}).items() if k in ("step", "kimg")} | G.provenance
    kind = (f"{m.channels}x{m.resolution}x{m.resolution} images" if images else "2-D points") + (
        f" of {m.classes} classes" if m.cond else "")
    if not images:
        call = "points = G(z)  # (16, 2)"
    elif m.cond:
        call = "x = G(z, torch.arange(16) % G.cfg.classes)  # (16, C, H, W) in [-1, 1], sample i of class i % classes"
    else:
        call = "x = G(z)  # (16, C, H, W) in [-1, 1]"
    launch = "accelerate launch" + (f" --num_processes {world}" if world else "")
    lines = [
        "---", front.to_yaml(), "---", "",
        f"# {repo}", "",
        f"A {'class-conditional ' if m.cond else ''}`{m.arch}` GAN generator trained with gan-dist on "
        f"`{cfg.data.dataset}` ({kind}, z_dim {m.z_dim}). These are the weights of G_ema, the exponential moving "
        f"average of the generator, from the run's `{export}/` export: step {info.get('step', 'unknown')}, "
        f"{info.get('kimg', 'unknown')} kimg (thousands of real images shown to D), gan-dist commit "
        f"`{info.get('commit', 'unknown')}`.", "",
        f"![G_ema's samples on the run's fixed noise{', a column per class' if m.cond else ''}](samples.png)", "",
        "## Use", "",
        "```python", "import torch", "from gan_dist import load_generator", "",
        f'G = load_generator("{repo}")  # eval mode, on the CPU (device="cuda" for a GPU)',
        "z = torch.randn(16, G.cfg.z_dim)", call, "```", "",
        f'`gan_dist.models.Generator.from_pretrained("{repo}")` loads the same network (huggingface_hub\'s '
        "PyTorchModelHubMixin).", "",
        "## Evaluation", "", *evaluation(scores), "",
        "## Training", "",
        *(["The command that started the run (paths inside the folder it ran in are relative to it, others shown as "
           "/path/to/NAME):", "", "```bash", command, "```", "", "Or, with every value the run resolved "
           "(`training_config.yaml` here, the run's config.yaml):"] if command else [
            "The run predates gan-dist's record of its command; its config.yaml, `training_config.yaml` here, holds "
            "every value it resolved, so this trains the same model again (with the data at the paths it names):"]),
        "", "```bash", f"{launch} train.py --config training_config.yaml run.dir=runs/{repo.split('/')[-1]}", "```", "",
        "<details><summary>training_config.yaml</summary>", "", "```yaml", config_text.rstrip(), "```", "",
        "</details>", ""]
    return "\n".join(lines)


def evaluation(scores: dict | None) -> list[str]:
    """The export's scores as a table, each beside its real-data floor."""
    if not scores:
        return ["No evaluation was recorded for this export (eval.every=0, or nothing to evaluate for its data)."]
    rows = [f"| {k} | {fmt(v)} | {fmt(scores.get(f'{k}_real'))} |" for k, v in scores.items()
            if not k.endswith("_real") and k not in ("step", "kimg")]
    return ([f"Scores at step {scores.get('step', '?')} ({scores.get('kimg', '?')} kimg), each beside its floor: "
             "the same metric for held-out real data scored like a generator, the value of a generator that matched "
             "the data.", "", "| metric | score | real data (floor) |", "| --- | --- | --- |"] + rows)


def fmt(v) -> str:
    return "—" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


if __name__ == "__main__":
    sys.exit(main())
