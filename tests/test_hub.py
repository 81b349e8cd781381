"""Tests for exports that explain themselves and the Hugging Face Hub side: `Generator.save_pretrained` /
`from_pretrained`, `export.export_final`'s config.json and metadata, `gan_dist.load_generator`, and
scripts/push_to_hub.py. Offline (the Hub is put in offline mode), on tiny networks, in a few seconds.

Covers: save_pretrained -> from_pretrained giving the same samples for the same noise (and labels), with the class,
BatchNorm statistics and a conditional G's class counts restored, for every arch; export_final writing config.json
and the safetensors metadata; load_generator on an export (G_ema or G), a run directory and an export of an older
gan-dist (no config.json, no metadata), in eval mode with the exported weights; one UserError naming the thing for a
missing path, a folder without a generator, an unfinished run, a config.json gan-dist does not know and a repo that
cannot be downloaded; push_to_hub.py --dry-run writing a folder that from_pretrained loads, with a card holding the
scores beside their floors, the sample grid and the training command; a failed upload ending in one `error:` line.

    . .venv/bin/activate && python -m pytest tests/test_hub.py -q
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from gan_dist import load_generator
from gan_dist.config import ModelConfig, load_config, to_yaml
from gan_dist.errors import UserError
from gan_dist.export import export_final
from gan_dist.models import ConditionalGenerator, Generator, MLPGenerator, build_models, conditioned

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("push_to_hub", REPO / "scripts" / "push_to_hub.py")
push_to_hub = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(push_to_hub)

TINY = ("model.width=2", "model.z_dim=8", "log.num_samples=16")


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No test reaches the network, or a Hub cache other than its own."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


def trained(cfg: ModelConfig, seed: int = 0) -> Generator:
    """A G whose weights and buffers are unlike a fresh one's: moved weights, BatchNorm statistics of a few batches,
    and for a conditional G counted labels."""
    torch.manual_seed(seed)
    G = build_models(cfg)[0]
    with torch.no_grad():
        for p in G.parameters():
            p.add_(0.05 * torch.randn_like(p))
        c = torch.randint(cfg.classes, (8,)) if cfg.cond else None
        for _ in range(3):
            conditioned(G, torch.randn(8, cfg.z_dim), c)
        if c is not None:
            G.count(c)
    return G.eval()


@torch.no_grad()
def samples(G: torch.nn.Module, cfg: ModelConfig) -> torch.Tensor:
    z = torch.randn(6, cfg.z_dim, generator=torch.Generator().manual_seed(1))
    return conditioned(G, z, torch.arange(6) % cfg.classes if cfg.cond else None)


def assert_same(G: torch.nn.Module, H: torch.nn.Module, cfg: ModelConfig) -> None:
    assert type(G) is type(H) and not H.training
    assert G.state_dict().keys() == H.state_dict().keys()
    for k, v in G.state_dict().items():
        assert torch.equal(v, H.state_dict()[k]) and v.dtype == H.state_dict()[k].dtype, k
    assert torch.equal(samples(G, cfg), samples(H, cfg))


def make_run(root: Path, *overrides: str, scores: dict | None = None) -> tuple[Path, Generator, Generator]:
    """A finished run directory: config.yaml and a final/ export of a G and a G_ema that differ."""
    cfg = load_config([*TINY, *overrides])
    run = root / "run"
    run.mkdir()
    (run / "config.yaml").write_text(to_yaml(cfg))
    G, G_ema = trained(cfg.model, 0), trained(cfg.model, 1)
    export_final(run, {"generator": G, "generator_ema": G_ema, "discriminator": build_models(cfg.model)[1]},
                 scores=scores, model=cfg.model, step=7, nimg=448)
    return run, G, G_ema


@pytest.mark.parametrize("cfg", [
    ModelConfig(arch="dcgan", width=2, z_dim=8),
    ModelConfig(arch="dcgan", width=2, z_dim=8, cond=True, classes=10),
    ModelConfig(arch="radford", width=2, z_dim=8, channels=3, resolution=16, cond=True, classes=3),
    ModelConfig(arch="mlp", hidden=8, z_dim=2, out_act="none"),
], ids=["dcgan", "dcgan-cond", "radford-cond", "mlp"])
def test_save_pretrained_then_from_pretrained_gives_the_same_samples(cfg, tmp_path):
    G = trained(cfg)
    G.save_pretrained(tmp_path / "g")
    assert json.loads((tmp_path / "g" / "config.json").read_text())["arch"] == cfg.arch
    assert_same(G, Generator.from_pretrained(tmp_path / "g"), cfg)
    assert_same(G, type(G).from_pretrained(tmp_path / "g"), cfg)  # the concrete class too
    if cfg.cond:
        assert Generator.from_pretrained(tmp_path / "g").class_counts.sum() == 8
        with pytest.raises(UserError, match="holds a ConditionalGenerator, not a MLPGenerator"):
            MLPGenerator.from_pretrained(tmp_path / "g")


def test_export_writes_config_and_metadata_and_loads_as_it_was_exported(tmp_path):
    run, G, G_ema = make_run(tmp_path, "model.cond=true")
    cfg = G.cfg
    final = run / "final"
    assert json.loads((final / "config.json").read_text()) == dataclasses.asdict(cfg)
    with safe_open(str(final / "generator_ema.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta | {"commit": "x"} == {"format": "pt", "library": "gan-dist", "arch": "dcgan", "resolution": "28",
                                      "channels": "1", "z_dim": "8", "classes": "10", "step": "7", "kimg": "0.448",
                                      "commit": "x", "network": "generator_ema"}
    assert len(meta["commit"]) == 40 or meta["commit"] == "unknown"
    for where in (final, run, str(run)):  # an export folder, or a run directory (its final/)
        loaded = load_generator(where)
        assert isinstance(loaded, ConditionalGenerator)
        assert_same(G_ema, loaded, cfg)
        assert loaded.provenance == {"step": "7", "kimg": "0.448", "commit": meta["commit"]}
    assert_same(G, load_generator(final, ema=False), cfg)
    assert_same(G_ema, load_generator(run / "final", device=torch.device("cpu")), cfg)


def test_an_export_of_an_older_gan_dist_loads_with_its_runs_config(tmp_path):
    cfg = load_config(list(TINY))
    run = tmp_path / "old"
    (run / "final").mkdir(parents=True)
    (run / "config.yaml").write_text(to_yaml(cfg))
    G_ema = trained(cfg.model)
    save_file(dict(G_ema.state_dict()), str(run / "final" / "generator_ema.safetensors"))  # no metadata, no json
    loaded = load_generator(run / "final")
    assert_same(G_ema, loaded, cfg.model)
    assert loaded.provenance == {}


def test_what_holds_no_generator_is_one_user_error_naming_it(tmp_path):
    (tmp_path / "empty").mkdir()
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text("seed: 0\n")
    cases = {tmp_path / "nowhere" / "final": "does not exist, and is no Hub repo id",
             tmp_path / "empty": "holds no generator",
             unfinished: "has no final/ export"}
    for path, why in cases.items():
        with pytest.raises(UserError, match=why) as info:
            load_generator(path)
        assert str(path) in str(info.value)
    with pytest.raises(UserError, match="cannot be downloaded") as info:
        load_generator("someone/no-such-gan")
    assert "someone/no-such-gan" in str(info.value)

    run, _, _ = make_run(tmp_path)
    config = json.loads((run / "final" / "config.json").read_text())
    (run / "final" / "config.json").write_text(json.dumps(config | {"widht": 3}))
    with pytest.raises(UserError, match="widht unknown or of the wrong type") as info:
        load_generator(run)
    assert str(run / "final" / "config.json") in str(info.value)


SCORES = {"fcd": 12.0045, "kid": 0.151, "fcd_real": 0.1393, "kid_real": 0.00124, "step": 7, "kimg": 0.448}


@pytest.mark.parametrize("overrides", [(), ("data.dataset=ring8", "model.arch=mlp", "model.hidden=8")],
                         ids=["mnist", "ring8"])
def test_dry_run_writes_the_folder_from_pretrained_loads(overrides, tmp_path, capsys):
    run, _, G_ema = make_run(tmp_path, *overrides, scores=None if overrides else SCORES)
    meta = run / "checkpoints" / "step_00000007" / "meta.json"
    meta.parent.mkdir(parents=True)
    meta.write_text(json.dumps({"step": 7, "world_size": 2, "files": {}}))
    out = tmp_path / "upload"
    assert push_to_hub.main([str(run), "--repo", "someone/tiny-gan", "--dry-run", str(out)]) == 0
    assert "nothing uploaded" in capsys.readouterr().out
    files = {p.name for p in out.iterdir()}
    assert files == {"model.safetensors", "config.json", "README.md", "samples.png", "training_config.yaml"} | (
        set() if overrides else {"metrics.json"})
    assert_same(G_ema, Generator.from_pretrained(out), G_ema.cfg)
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.metadata()["step"] == "7" and f.metadata()["arch"] == G_ema.cfg.arch
    side = 2 + 4 * (28 + 2)  # 16 samples in a 4 x 4 grid of 28-pixel images with 2-pixel gaps
    assert Image.open(out / "samples.png").size == ((side, side) if not overrides else (384, 384))

    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: gan-dist" in card and "- gan\n" in card
    assert "![" in card and "(samples.png)" in card and 'load_generator("someone/tiny-gan")' in card
    assert "accelerate launch --num_processes 2 train.py --config training_config.yaml" in card
    assert "step 7, 0.448 kimg" in card and (out / "training_config.yaml").read_text() in card
    if overrides:
        assert "No evaluation was recorded" in card and "pipeline_tag" not in card
    else:
        assert "| fcd | 12 | 0.1393 |" in card and "| kid | 0.151 | 0.00124 |" in card
        assert "pipeline_tag: unconditional-image-generation" in card


def test_push_refuses_what_it_cannot_publish(tmp_path, capsys):
    run, _, _ = make_run(tmp_path)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    cases = [([str(run), "--repo", "a/b/c"], "--repo a/b/c"),
             ([str(run), "--repo", "a/b", "--export", "best"], "best does not exist"),
             ([str(tmp_path), "--repo", "a/b"], "is not a run directory"),
             ([str(run), "--repo", "a/b", "--dry-run", str(tmp_path / "full")], "is not an empty folder")]
    for argv, why in cases:
        assert push_to_hub.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and why in err and err.count("\n") == 1


@pytest.mark.parametrize("token", [None, "hf_not_a_token"])
def test_a_failed_upload_is_one_error_line(token, tmp_path, capsys, monkeypatch):
    run, _, _ = make_run(tmp_path)
    monkeypatch.setattr(push_to_hub, "get_token", lambda: token)
    assert push_to_hub.main([str(run), "--repo", "someone/tiny-gan"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    assert ("hf auth login" if token is None else "could not upload to the Hub repo someone/tiny-gan") in err


def test_a_card_of_a_real_run_has_its_command_and_no_path_of_the_machine(tmp_path, shards, capsys):
    """A 2-process run started with absolute paths (run.dir, the MNIST files, the shard cache): its command.json
    records train.py's and the launcher's arguments, and nothing push_to_hub writes holds a path of this machine."""
    from runs import MNIST, launch

    run = tmp_path / "run"
    launch(run, shards, 2, "train.steps=4", "ckpt.every=4", "log.sample_every=4", "eval.every=0",
           "wandb.mode=disabled")
    command = json.loads((run / "command.json").read_text())
    assert command["cwd"] == str(REPO) and command["train"][0].endswith("train.py")
    assert "accelerate.commands.launch" in command["launcher"] and f"run.dir={run}" in command["launcher"]
    out = tmp_path / "upload"
    assert push_to_hub.main([str(run), "--repo", "someone/tiny-gan", "--dry-run", str(out)]) == 0
    card = (out / "README.md").read_text()
    assert "python -m accelerate.commands.launch --quiet --num_machines 1" in card
    assert "--num_processes 2 --multi_gpu train.py --config configs/debug.yaml run.dir=/path/to/run" in card
    private = {str(tmp_path), str(REPO), str(MNIST.resolve()), str(shards), str(Path.home())} - {"/"}
    for file in out.iterdir():
        if file.suffix in (".md", ".yaml", ".json"):
            text = file.read_text()
            assert not [p for p in private if p in text], file.name
            assert all(path.startswith("/path/to/") for path in push_to_hub.ABSOLUTE.findall(text)), file.name
    assert "dir: /path/to/run" in (out / "training_config.yaml").read_text()


def test_portable_paths_keep_urls_and_make_the_run_folder_relative():
    cwd = "/home/me/gan-dist"
    text = ("dir: /home/me/gan-dist/runs/a\nshards: pipe:curl -s https://host/x/{0..3}.tar::file:/data/y.tar\n"
            "mnist_dir: /mnt/data/mnist\nnote: a/b and http://h/p\n")
    assert push_to_hub.portable(text, cwd) == (
        "dir: runs/a\nshards: pipe:curl -s https://host/x/{0..3}.tar::file:/path/to/y.tar\n"
        "mnist_dir: /path/to/mnist\nnote: a/b and http://h/p\n")
