"""Tests for gan_dist.checkpoint: choosing the checkpoint to resume from, the save/load round trip through a real
single-process accelerate Accelerator (CPU), pruning, and the final safetensors export.

Covers: find_resume (`auto` picks the newest complete `step_XXXXXXXX` with a meta.json and ignores `.tmp-*`
directories and step directories without meta.json; `auto` with nothing -> None; `none` with existing checkpoints
-> UserError naming the run dir; a path without meta.json -> UserError naming it); save_checkpoint keeping the
newest `keep` and leaving no `.tmp-*` behind; load_checkpoint restoring both models (with BatchNorm buffers), both
Adam states, the EMA, TrainState and the Python / numpy / torch RNGs exactly; export_final writing the three
safetensors files equal to the modules' state_dicts.

accelerate's AcceleratorState is a process-wide singleton, so this module builds one Accelerator (module-scoped
fixture) and resets the state when it is done.

Run from the repo root:

    . .venv/bin/activate && python -m pytest tests/test_checkpoint.py -q
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gan_dist.checkpoint import TrainState, checkpoints, export_final, find_resume, load_checkpoint, save_checkpoint
from gan_dist.config import EMAConfig, LossConfig, ModelConfig
from gan_dist.ema import EMA
from gan_dist.errors import UserError
from gan_dist.losses import d_step, g_step
from gan_dist.models import build_models

# ----------------------------------------------------------------------------------------------------------------
# find_resume


def make_ckpt(run_dir: Path, name: str, meta: bool = True) -> Path:
    path = run_dir / "checkpoints" / name
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"x")
    if meta:
        (path / "meta.json").write_text(json.dumps({"step": int(name.rsplit("_", 1)[-1])}))
    return path


def test_auto_picks_the_latest_complete_checkpoint(tmp_path):
    make_ckpt(tmp_path, "step_00000009")
    latest = make_ckpt(tmp_path, "step_00000010")  # 10 after 9: numeric, not just any order
    make_ckpt(tmp_path, "step_00000020", meta=False)  # crashed before meta.json was written
    make_ckpt(tmp_path, ".tmp-step_00000030")  # a write in progress, even with a meta.json
    make_ckpt(tmp_path, ".tmp-del-step_00000001")
    (tmp_path / "checkpoints" / "step_00000040").write_text("not a directory")
    (tmp_path / "checkpoints" / "notes_00000050").mkdir()
    assert find_resume(tmp_path, "auto") == latest
    assert checkpoints(tmp_path) == [tmp_path / "checkpoints" / "step_00000009", latest]


def test_auto_with_nothing_starts_fresh(tmp_path):
    assert find_resume(tmp_path / "does-not-exist", "auto") is None
    assert find_resume(tmp_path, "auto") is None
    make_ckpt(tmp_path, "step_00000005", meta=False)
    make_ckpt(tmp_path, ".tmp-step_00000006")
    assert find_resume(tmp_path, "auto") is None


def test_none_refuses_a_run_dir_with_checkpoints(tmp_path):
    assert find_resume(tmp_path, "none") is None
    make_ckpt(tmp_path, "step_00000007")
    with pytest.raises(UserError) as info:
        find_resume(tmp_path, "none")
    assert str(tmp_path) in str(info.value)
    assert "step_00000007" in str(info.value)


def test_explicit_path_needs_meta_json(tmp_path):
    incomplete = make_ckpt(tmp_path, "step_00000003", meta=False)
    with pytest.raises(UserError) as info:
        find_resume(tmp_path, str(incomplete))
    assert str(incomplete) in str(info.value)
    missing = tmp_path / "nowhere"
    with pytest.raises(UserError) as info:
        find_resume(tmp_path, str(missing))
    assert str(missing) in str(info.value)
    complete = make_ckpt(tmp_path, "step_00000004")
    assert find_resume(tmp_path, str(complete)) == complete


# ----------------------------------------------------------------------------------------------------------------
# save / load with a real Accelerator


@pytest.fixture(scope="module")
def accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    acc = Accelerator(cpu=True)
    yield acc
    AcceleratorState._reset_state(True)
    PartialState._reset_state()


@pytest.fixture(scope="module")
def run(accelerator, tmp_path_factory):
    """Tiny DCGAN (BatchNorm buffers included), Adam for both, TrainState and EMA registered, as loop.py does."""
    torch.manual_seed(0)
    mcfg = ModelConfig(arch="dcgan", width=2, z_dim=8)
    G, D = build_models(mcfg)
    ema = EMA(G, EMAConfig(halflife_kimg=0.01, rampup=0.0))
    opt_G = torch.optim.Adam(G.parameters(), lr=1e-3, betas=(0.5, 0.999), eps=1e-7)
    opt_D = torch.optim.Adam(D.parameters(), lr=1e-3, betas=(0.5, 0.999), eps=1e-7)
    G, D, opt_G, opt_D = accelerator.prepare(G, D, opt_G, opt_D)
    state = TrainState(z_fixed=torch.randn(4, 8), wandb_id="abc123")
    accelerator.register_for_checkpointing(ema, state)
    r = SimpleNamespace(acc=accelerator, G=G, D=D, opt_G=opt_G, opt_D=opt_D, ema=ema, state=state, mcfg=mcfg,
                        dir=tmp_path_factory.mktemp("run"))

    def train_step():
        real = torch.rand(4, 1, 28, 28) * 2 - 1
        d_step(r.G, r.D, r.opt_D, real, torch.randn(4, 8), LossConfig(), r.acc.backward)
        g_step(r.G, r.D, r.opt_G, torch.randn(4, 8), "ns", r.acc.backward)
        r.ema.update(r.acc.unwrap_model(r.G), r.state.nimg, 4)
        r.state.step += 1
        r.state.nimg += 4
        r.state.batches += 1

    r.train_step = train_step
    return r


def snapshot(r) -> dict:
    clone = lambda sd: {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in sd.items()}  # noqa: E731

    def opt(o):
        sd = o.state_dict()
        return {i: clone(s) for i, s in sd["state"].items()}

    return {
        "G": clone(r.G.state_dict()), "D": clone(r.D.state_dict()), "ema": clone(r.ema.state_dict()),
        "opt_G": opt(r.opt_G), "opt_D": opt(r.opt_D),
        "state": (r.state.step, r.state.nimg, r.state.batches, r.state.z_fixed.clone(), r.state.wandb_id),
    }


def assert_same(a: dict, b: dict) -> None:
    for part in ("G", "D", "ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k}"
    for part in ("opt_G", "opt_D"):
        assert a[part].keys() == b[part].keys() and a[part]
        for i in a[part]:
            for k, v in a[part][i].items():
                assert torch.equal(torch.as_tensor(v), torch.as_tensor(b[part][i][k])), f"{part}[{i}].{k}"
    sa, sb = a["state"], b["state"]
    assert sa[:3] == sb[:3] and torch.equal(sa[3], sb[3]) and sa[4] == sb[4]


def perturb(r) -> None:
    with torch.no_grad():
        for p in list(r.G.parameters()) + list(r.D.parameters()) + list(r.ema.parameters()):
            p.add_(1.0)
        for b in r.G.buffers():
            if b.is_floating_point():
                b.mul_(3.0)
    r.train_step()  # moves Adam's moments and step counts too
    r.state.step, r.state.nimg, r.state.batches, r.state.wandb_id = 999, 999, 999, "other"
    r.state.z_fixed = torch.zeros(4, 8)
    torch.manual_seed(12345)
    np.random.seed(12345)
    random.seed(12345)


def draws() -> tuple:
    return torch.randn(5), np.random.rand(3), random.random()


def test_save_keeps_the_newest_and_load_restores_everything(run):
    root = run.dir / "checkpoints"
    snaps = {}
    for step in (1, 2, 3):
        run.train_step()
        assert run.state.step == step
        if step == 3:  # leftovers of a crash mid-write are cleared by the next save
            (root / ".tmp-step_00000003").mkdir(parents=True)
            (root / ".tmp-step_00000003" / "junk").write_text("partial")
            (root / ".tmp-del-step_00000000").mkdir()
        path = save_checkpoint(run.acc, run.dir, run.state, keep=2)
        assert path == root / f"step_{step:08d}"
        snaps[step] = snapshot(run)
        if step == 3:
            after_save = draws()

    assert sorted(p.name for p in root.iterdir()) == ["step_00000002", "step_00000003"]
    meta = json.loads((root / "step_00000003" / "meta.json").read_text())
    assert meta["step"] == 3 and meta["nimg"] == 12 and meta["world_size"] == 1 and meta["wandb_id"] == "abc123"
    assert find_resume(run.dir, "auto") == root / "step_00000003"

    # Weights, optimizer moments, EMA, TrainState and RNGs all change...
    perturb(run)
    with pytest.raises(AssertionError):
        assert_same(snapshot(run), snaps[3])
    # ...and come back exactly.
    meta = load_checkpoint(run.acc, root / "step_00000003")
    assert meta["step"] == 3
    assert_same(snapshot(run), snaps[3])
    t, n, p = draws()
    assert torch.equal(t, after_save[0]) and np.array_equal(n, after_save[1]) and p == after_save[2]

    # An older checkpoint restores its own step, not the newest.
    load_checkpoint(run.acc, root / "step_00000002")
    assert run.state.step == 2
    assert_same(snapshot(run), snaps[2])

    # Continuing from a restored checkpoint is deterministic: the same next step twice.
    load_checkpoint(run.acc, root / "step_00000003")
    run.train_step()
    first = snapshot(run)
    load_checkpoint(run.acc, root / "step_00000003")
    run.train_step()
    assert_same(snapshot(run), first)


def test_saving_the_same_step_again_replaces_it(run):
    root = run.dir / "checkpoints"
    run.state.step = 50
    save_checkpoint(run.acc, run.dir, run.state, keep=3)
    with torch.no_grad():
        next(run.G.parameters()).add_(1.0)
    expected = snapshot(run)
    save_checkpoint(run.acc, run.dir, run.state, keep=3)
    assert not list(root.glob(".tmp-*"))
    assert [p.name for p in checkpoints(run.dir)][-1] == "step_00000050"
    perturb(run)
    load_checkpoint(run.acc, root / "step_00000050")
    assert_same(snapshot(run), expected)


def test_export_final_writes_the_three_state_dicts(run, tmp_path):
    G_raw, D_raw = run.acc.unwrap_model(run.G), run.acc.unwrap_model(run.D)
    modules = {"generator": G_raw, "generator_ema": run.ema.G_ema, "discriminator": D_raw}
    final = export_final(tmp_path, modules)
    assert final == tmp_path / "final"
    assert sorted(p.name for p in final.iterdir()) == ["discriminator.safetensors", "generator.safetensors",
                                                       "generator_ema.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"], "no temporary directory left behind"
    for name, module in modules.items():
        tensors = load_file(str(final / f"{name}.safetensors"))
        sd = module.state_dict()
        assert tensors.keys() == sd.keys()
        for k in sd:
            assert torch.equal(tensors[k], sd[k]), f"{name}.{k}"
    # the files load straight into fresh modules of the configured architecture
    G2, _ = build_models(run.mcfg)
    G2.load_state_dict(load_file(str(final / "generator_ema.safetensors")))
    z = torch.randn(2, 8)
    with torch.no_grad():
        assert torch.equal(G2.eval()(z), run.ema.G_ema(z))

    # exporting again replaces the old files
    with torch.no_grad():
        next(G_raw.parameters()).add_(1.0)
    export_final(tmp_path, modules)
    first = next(iter(G_raw.state_dict()))
    assert torch.equal(load_file(str(final / "generator.safetensors"))[first], G_raw.state_dict()[first])


def test_checkpoints_past_eight_digit_steps_are_found(run):
    saved = run.state.step
    try:
        for step in (99_999_999, 100_000_000):
            run.state.step = step
            save_checkpoint(run.acc, run.dir, run.state, keep=10)
        assert find_resume(run.dir, "auto").name == "step_100000000"
    finally:
        run.state.step = saved
