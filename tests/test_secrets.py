"""Secrets read from the environment (`${oc.env:NAME}`): the run uses their values, but every file it writes, W&B
and the model card of `push_to_hub.py --dry-run` get only the `${oc.env:...}` text, which resolves again on a rerun.
"""

from __future__ import annotations

import importlib.util
import secrets

import pytest

from gan_dist.config import load_config, run_config, to_dict, to_yaml
from gan_dist.errors import UserError

from runs import REPO, launch
from wandb_records import config

_spec = importlib.util.spec_from_file_location("push_to_hub", REPO / "scripts" / "push_to_hub.py")
push_to_hub = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(push_to_hub)

SECRET = f"tok-{secrets.token_hex(8)}"


def test_values_read_from_the_environment_are_written_as_their_text(tmp_path, monkeypatch):
    monkeypatch.setenv("GAN_DIST_TOKEN", SECRET)
    cfg = load_config(["wandb.name=run-${oc.env:GAN_DIST_TOKEN}", "data.manifest=${wandb.name}/manifest.json",
                       "wandb.tags=[a, '${oc.env:GAN_DIST_TOKEN}']", "train.steps=${oc.env:GAN_DIST_STEPS,77}"])
    assert (cfg.wandb.name, cfg.wandb.tags, cfg.train.steps) == (f"run-{SECRET}", ["a", SECRET], 77)
    assert cfg.data.manifest == f"run-{SECRET}/manifest.json", "a key that reads a secret through another key"
    text = to_yaml(cfg)
    assert SECRET not in text and SECRET not in str(to_dict(cfg))
    assert "name: run-${oc.env:GAN_DIST_TOKEN}" in text and "manifest: ${wandb.name}/manifest.json" in text

    # The written file reruns as it was, and reads (for review scripts) where the variable is not set.
    (tmp_path / "config.yaml").write_text(text)
    again = load_config(["--config", str(tmp_path / "config.yaml")])
    assert (again.wandb.name, again.data.manifest, again.train.steps) == (cfg.wandb.name, cfg.data.manifest, 77)
    monkeypatch.delenv("GAN_DIST_TOKEN")
    review = run_config(tmp_path / "config.yaml")
    assert review.wandb.name == "run-${oc.env:GAN_DIST_TOKEN}" and to_yaml(review) == text
    with pytest.raises(UserError, match=r"config key '\S+' reads the environment variable GAN_DIST_TOKEN, which is "
                                        r"not set; set it, or give a default"):
        load_config(["--config", str(tmp_path / "config.yaml")])


def test_a_secret_in_the_environment_reaches_no_file_and_no_wandb_run(tmp_path, shards, classifier, monkeypatch,
                                                                      capsys):
    """A token handed to the `pipe:` command that fetches the shards (as a private bucket or Hub dataset needs)."""
    count = len(list(shards.glob("train-*.tar")))
    command = f"pipe:GAN_DIST_TOKEN=${{oc.env:GAN_DIST_TOKEN}} cat {shards}/train-{{00000..{count - 1:05d}}}.tar"
    run = tmp_path / "run"
    output = launch(run, shards, 1, "data.dataset=webdataset", "data.mode=resampled", f"data.shards={command}",
                    env={"GAN_DIST_TOKEN": SECRET})
    monkeypatch.delenv("GAN_DIST_TOKEN", raising=False)
    card = tmp_path / "card"
    assert push_to_hub.main([str(run), "--repo", "someone/tiny-gan", "--dry-run", str(card)]) == 0

    written = [p for root in (run, card) for p in root.rglob("*") if p.is_file()]
    kinds = {p.suffix for p in written}
    assert {".yaml", ".json", ".jsonl", ".safetensors", ".png", ".wandb", ".md"} <= kinds, kinds
    assert [p for p in written if SECRET.encode() in p.read_bytes()] == []
    assert SECRET not in output + capsys.readouterr().out
    # What the files hold instead: the text, in config.yaml, W&B's config and the model card.
    assert f"shards: {command}" in (run / "config.yaml").read_text()
    (wandb_file,) = run.glob("wandb/offline-run-*/run-*.wandb")
    assert config(wandb_file)["data"]["shards"] == command
    # The card's copy has the shards' path, one of this machine, as /path/to/NAME.
    assert command.replace(f"{shards}/", "/path/to/") in (card / "README.md").read_text()
