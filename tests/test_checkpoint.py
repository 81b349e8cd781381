"""Tests for gan_dist.checkpoint: the save/load round trip through a real single-process accelerate Accelerator
(CPU), verification before anything is loaded, choosing the checkpoint to resume from, pruning, and the exports.

Covers: `checkpoints` listing complete `step_XXXXXXXX` directories (with meta.json) in step order; save_checkpoint
keeping the newest `keep`, leaving no `.tmp-*` behind, and listing every file with its size and sha256; load
restoring both models (with BatchNorm buffers), both Adam states, the EMA, TrainState and the Python / numpy / torch
RNGs exactly; `verify` refusing a truncated, altered or missing file, a missing rank's RNG state, an old-format
meta.json, and a pickle that would run code (the code never runs); `choose_resume` falling back past a damaged newest
checkpoint, refusing when none is intact, refusing a damaged explicit path, continuing the run's own checkpoints
that grew from an explicit path and refusing checkpoints that did not; pruning keeping that path; export_final
writing the three safetensors files, replacing an export in one step (a symlink swap) and leaving no old version.

accelerate's AcceleratorState is a process-wide singleton, so this module builds one Accelerator (module-scoped
fixture) and resets the state when it is done.

Run from the repo root:

    . .venv/bin/activate && python -m pytest tests/test_checkpoint.py -q
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from gan_dist.checkpoint import TrainState, choose_resume, load_checkpoint, save_checkpoint, verify
from gan_dist.config import EMAConfig, LossConfig, ModelConfig
from gan_dist.data import DataState
from gan_dist.ema import EMA
from gan_dist.errors import UserError
from gan_dist.export import export_final
from gan_dist.models import build_models
from gan_dist.objective import GANObjective
from gan_dist.rundir import CheckpointError, checkpoints

from runs import RunsCommand, reseal


def make_ckpt(run_dir: Path, name: str, meta: bool = True) -> Path:
    path = run_dir / "checkpoints" / name
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"x")
    if meta:
        (path / "meta.json").write_text(json.dumps({"step": int(name.rsplit("_", 1)[-1])}))
    return path


def test_checkpoints_lists_complete_step_directories_in_step_order(tmp_path):
    make_ckpt(tmp_path, "step_00000009")
    latest = make_ckpt(tmp_path, "step_00000010")  # 10 after 9: numeric, not just any order
    make_ckpt(tmp_path, "step_00000020", meta=False)  # crashed before meta.json was written
    make_ckpt(tmp_path, ".tmp-step_00000030")  # a write in progress, even with a meta.json
    make_ckpt(tmp_path, ".tmp-del-step_00000001")
    (tmp_path / "checkpoints" / "step_00000040").write_text("not a directory")
    (tmp_path / "checkpoints" / "notes_00000050").mkdir()
    assert checkpoints(tmp_path) == [tmp_path / "checkpoints" / "step_00000009", latest]
    assert checkpoints(tmp_path / "does-not-exist") == []


def test_choices_that_need_no_checkpoint(tmp_path):
    assert choose_resume(tmp_path / "does-not-exist", "auto", print).path is None
    assert choose_resume(tmp_path, "auto", print).path is None
    assert choose_resume(tmp_path, "none", print).path is None
    make_ckpt(tmp_path, "step_00000005", meta=False)
    make_ckpt(tmp_path, ".tmp-step_00000006")
    assert choose_resume(tmp_path, "auto", print).path is None
    make_ckpt(tmp_path, "step_00000007")
    with pytest.raises(UserError) as info:
        choose_resume(tmp_path, "none", print)
    assert str(tmp_path) in str(info.value) and "step_00000007" in str(info.value)
    for missing in (tmp_path / "nowhere", tmp_path / "checkpoints" / "step_00000005"):
        with pytest.raises(UserError, match=f"ckpt.resume='{missing}' is not a complete checkpoint"):
            choose_resume(tmp_path, str(missing), print)


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
    """Tiny DCGAN (BatchNorm buffers included), Adam for both, TrainState and EMA, as loop.py has them."""
    torch.manual_seed(0)
    mcfg = ModelConfig(arch="dcgan", width=2, z_dim=8)
    G, D = build_models(mcfg)
    ema = EMA(G, EMAConfig(halflife_kimg=0.01, rampup=0.0))
    opt_G = torch.optim.Adam(G.parameters(), lr=1e-3, betas=(0.5, 0.999), eps=1e-7)
    opt_D = torch.optim.Adam(D.parameters(), lr=1e-3, betas=(0.5, 0.999), eps=1e-7)
    G, D, opt_G, opt_D = accelerator.prepare(G, D, opt_G, opt_D)
    state = TrainState(z_fixed=torch.randn(4, 8), wandb_id="abc123", log_sums={"loss_d": torch.tensor([0.5])},
                       scores={"fcd": 3.5, "step": 2})
    data = DataState(torch.tensor([[1, 2, 3]]), torch.tensor([[0, 5, 9]]), "stream", 0)
    r = SimpleNamespace(acc=accelerator, G=G, D=D, opt_G=opt_G, opt_D=opt_D, ema=ema, state=state, data=data,
                        mcfg=mcfg, dir=tmp_path_factory.mktemp("run"))
    objective = GANObjective(LossConfig(), G, D, backward=accelerator.backward)

    def train_step():
        real = torch.rand(4, 1, 28, 28) * 2 - 1
        objective.d_phase(real, None, torch.randn(4, 8))
        r.opt_D.step()
        r.opt_D.zero_grad()
        objective.g_phase(real, None, torch.randn(4, 8))
        r.opt_G.step()
        r.opt_G.zero_grad()
        r.ema.update(r.acc.unwrap_model(r.G), r.state.nimg, 4)
        r.state.step += 1
        r.state.nimg += 4
        r.data.batches += 1

    def load(path):
        meta, r.data = load_checkpoint(r.acc, path, r.state, r.ema)
        return meta

    r.train_step = train_step
    r.save = lambda keep=2, run_dir=None: save_checkpoint(r.acc, run_dir or r.dir, r.state, r.data, ema=r.ema,
                                                          keep=keep)
    r.load = load
    return r


def snapshot(r) -> dict:
    clone = lambda sd: {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in sd.items()}  # noqa: E731

    def opt(o):
        sd = o.state_dict()
        return {i: clone(s) for i, s in sd["state"].items()}

    return {
        "G": clone(r.G.state_dict()), "D": clone(r.D.state_dict()), "ema": clone(r.ema.state_dict()),
        "opt_G": opt(r.opt_G), "opt_D": opt(r.opt_D),
        "state": (r.state.step, r.state.nimg, r.data.batches, r.state.wandb_id, r.state.scores, r.data.layout,
                  r.state.z_fixed.clone(), r.data.pos.clone(), r.data.spans.clone(),
                  {k: v.clone() for k, v in r.state.log_sums.items()}),
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
    assert sa[:6] == sb[:6] and all(torch.equal(x, y) for x, y in zip(sa[6:9], sb[6:9]))
    assert sa[9].keys() == sb[9].keys() and all(torch.equal(sa[9][k], sb[9][k]) for k in sa[9])


def perturb(r) -> None:
    with torch.no_grad():
        for p in list(r.G.parameters()) + list(r.D.parameters()) + list(r.ema.parameters()):
            p.add_(1.0)
        for b in r.G.buffers():
            if b.is_floating_point():
                b.mul_(3.0)
    r.train_step()  # moves Adam's moments and step counts too
    r.state.step, r.state.nimg, r.state.wandb_id, r.state.scores = 999, 999, "other", None
    r.state.z_fixed, r.state.log_sums = torch.zeros(4, 8), {}
    r.data = DataState(torch.zeros(1, 3, dtype=torch.int64), torch.empty(0, 3, dtype=torch.int64), "cache", 999)
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
        path = run.save(keep=2)
        assert path == root / f"step_{step:08d}"
        snaps[step] = snapshot(run)
        if step == 3:
            after_save = draws()

    assert sorted(p.name for p in root.iterdir()) == ["step_00000002", "step_00000003"]
    meta = json.loads((root / "step_00000003" / "meta.json").read_text())
    assert meta["step"] == 3 and meta["nimg"] == 12 and meta["world_size"] == 1 and meta["wandb_id"] == "abc123"
    # Every file is listed with its size and digest; gan-dist's own state is safetensors and JSON, no pickle.
    files = sorted(p.name for p in (root / "step_00000003").iterdir() if p.name != "meta.json")
    assert sorted(meta["files"]) == files
    assert {"ema.safetensors", "train_state.safetensors", "train_state.json", "random_states_0.pkl"} <= set(files)
    assert not [f for f in files if f.startswith("custom_checkpoint")]
    assert all(len(v["sha256"]) == 64 and v["size"] > 0 for v in meta["files"].values())
    assert choose_resume(run.dir, "auto", print).path == root / "step_00000003"

    # Weights, optimizer moments, EMA, TrainState and RNGs all change...
    perturb(run)
    with pytest.raises(AssertionError):
        assert_same(snapshot(run), snaps[3])
    # ...and come back exactly.
    meta = run.load(root / "step_00000003")
    assert meta["step"] == 3
    assert_same(snapshot(run), snaps[3])
    t, n, p = draws()
    assert torch.equal(t, after_save[0]) and np.array_equal(n, after_save[1]) and p == after_save[2]

    # An older checkpoint restores its own step, not the newest.
    run.load(root / "step_00000002")
    assert run.state.step == 2
    assert_same(snapshot(run), snaps[2])

    # Continuing from a restored checkpoint is deterministic: the same next step twice.
    run.load(root / "step_00000003")
    run.train_step()
    first = snapshot(run)
    run.load(root / "step_00000003")
    run.train_step()
    assert_same(snapshot(run), first)


def test_saving_the_same_step_again_replaces_it(run):
    root = run.dir / "checkpoints"
    run.state.step = 50
    run.save(keep=3)
    with torch.no_grad():
        next(run.G.parameters()).add_(1.0)
    expected = snapshot(run)
    run.save(keep=3)
    assert not list(root.glob(".tmp-*"))
    assert [p.name for p in checkpoints(run.dir)][-1] == "step_00000050"
    perturb(run)
    run.load(root / "step_00000050")
    assert_same(snapshot(run), expected)


def test_export_final_writes_the_three_state_dicts(run, tmp_path):
    G_raw, D_raw = run.acc.unwrap_model(run.G), run.acc.unwrap_model(run.D)
    modules = {"generator": G_raw, "generator_ema": run.ema.G_ema, "discriminator": D_raw}
    final = export_final(tmp_path, modules, scores={"fcd": 1.5})
    assert final == tmp_path / "final"
    assert sorted(p.name for p in final.iterdir()) == ["discriminator.safetensors", "generator.safetensors",
                                                       "generator_ema.safetensors", "metrics.json"]
    # final/ is a symlink to the one version folder beside it; nothing temporary is left.
    (version,) = [p for p in tmp_path.iterdir() if p.name != "final"]
    assert final.is_symlink() and os.readlink(final) == version.name and version.name.startswith(".final.")
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

    # Exporting again replaces the whole folder in one rename: the new weights, no metrics.json without scores, and
    # the old version gone.
    with torch.no_grad():
        next(G_raw.parameters()).add_(1.0)
    export_final(tmp_path, modules)
    first = next(iter(G_raw.state_dict()))
    assert torch.equal(load_file(str(final / "generator.safetensors"))[first], G_raw.state_dict()[first])
    assert not (final / "metrics.json").exists() and not version.exists()
    assert len(list(tmp_path.iterdir())) == 2


def test_export_replaces_a_plain_folder_of_an_older_version(run, tmp_path):
    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "generator.safetensors").write_bytes(b"old")
    export_final(tmp_path, {"generator": run.acc.unwrap_model(run.G)}, "best")
    assert (tmp_path / "best").is_symlink() and len(load_file(str(tmp_path / "best" / "generator.safetensors")))
    assert len(list(tmp_path.iterdir())) == 2


# ----------------------------------------------------------------------------------------------------------------
# Verification, fallback and explicit paths


@pytest.fixture()
def saved(run, tmp_path):
    """Checkpoints at steps 1, 2 and 3 of the tiny run in a fresh run.dir, with their snapshots."""
    snaps = {}
    run.state.origin = ""
    for step in (1, 2, 3):
        run.train_step()
        run.state.step = step
        run.save(keep=5, run_dir=tmp_path)
        snaps[step] = snapshot(run)
    return SimpleNamespace(dir=tmp_path, root=tmp_path / "checkpoints", snaps=snaps)


def step_dir(saved, step: int) -> Path:
    return saved.root / f"step_{step:08d}"


def test_verify_accepts_an_intact_checkpoint_and_names_each_kind_of_damage(saved):
    path = step_dir(saved, 3)
    assert verify(path)["step"] == 3
    damages = [
        ("optimizer.bin", lambda f: f.write_bytes(f.read_bytes()[:-100]), "optimizer.bin has .* bytes, meta.json says"),
        ("model.safetensors", lambda f: f.write_bytes(bytes([f.read_bytes()[0] ^ 1]) + f.read_bytes()[1:]),
         "model.safetensors does not match its sha256"),
        ("random_states_0.pkl", lambda f: f.unlink(), "random_states_0.pkl is missing"),
        ("meta.json", lambda f: f.write_text(json.dumps({k: v for k, v in json.loads(f.read_text()).items()
                                                         if k != "files"})), "lists no files"),
        ("meta.json", lambda f: f.write_text("{"), "meta.json is unreadable"),
    ]
    for name, damage, message in damages:
        copy = saved.dir / "copy"
        shutil.copytree(path, copy)
        damage(copy / name)
        with pytest.raises(CheckpointError, match=message) as info:
            verify(copy)
        assert str(copy) in str(info.value)
        shutil.rmtree(copy)


def test_a_checkpoint_missing_a_ranks_rng_state_is_refused(saved):
    path = step_dir(saved, 3)
    meta = json.loads((path / "meta.json").read_text())
    meta["world_size"] = 2  # as if rank 1's file had never been written
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="random_states_1.pkl is missing .*incomplete"):
        verify(path)


def test_a_checkpoint_missing_a_data_position_is_refused(saved):
    path = step_dir(saved, 3)
    tensors = load_file(str(path / "train_state.safetensors"))
    save_file(tensors | {"data_pos": torch.empty(0, 3, dtype=torch.int64)}, str(path / "train_state.safetensors"))
    reseal(path, "train_state.safetensors")
    with pytest.raises(CheckpointError, match="lacks some rank's data position \\(0 rows for 1 ranks\\)"):
        verify(path)


@pytest.mark.parametrize("name", ["optimizer.bin", "random_states_0.pkl"])
def test_a_pickle_that_would_run_code_is_refused_and_never_runs(saved, tmp_path_factory, name):
    """A checkpoint handed over by someone else, with the digests in meta.json made to match: still refused."""
    target = tmp_path_factory.mktemp("victim") / "pwned"
    path = step_dir(saved, 3)
    torch.save({"state": RunsCommand(target)}, path / name)  # torch's zip format
    reseal(path, name)
    with pytest.raises(CheckpointError, match=f"{name} cannot be loaded without running code"):
        verify(path)
    with pytest.raises(UserError, match=f"{name} cannot be loaded without running code"):
        choose_resume(saved.dir, str(path), print)
    assert not target.exists()
    (path / name).write_bytes(pickle.dumps(RunsCommand(target)))  # a bare pickle, which torch.load also reads
    reseal(path, name)
    with pytest.raises(CheckpointError, match="cannot be loaded without running code"):
        verify(path)
    assert not target.exists()


def test_auto_falls_back_past_a_damaged_newest_checkpoint(run, saved, capsys):
    newest = step_dir(saved, 3) / "optimizer_1.bin"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    resume = choose_resume(saved.dir, "auto", print)
    assert resume.path == step_dir(saved, 2) and resume.step == 2
    out = capsys.readouterr().out
    assert f"checkpoint {step_dir(saved, 3)}: optimizer_1.bin has" in out and "falling back" in out
    perturb(run)
    run.load(resume.path)
    assert_same(snapshot(run), saved.snaps[2])
    # An explicit path to the damaged one stops, naming the file.
    with pytest.raises(UserError, match=r"ckpt.resume: checkpoint .*step_00000003: optimizer_1.bin has"):
        choose_resume(saved.dir, str(step_dir(saved, 3)), print)
    # Nothing intact: refused, with nothing changed.
    for step in (1, 2):
        (step_dir(saved, step) / "train_state.json").write_text("{}")
    with pytest.raises(UserError, match="holds checkpoints but none is intact"):
        choose_resume(saved.dir, "auto", print)
    assert len(checkpoints(saved.dir)) == 3


def test_explicit_path_continues_its_own_checkpoints_and_is_never_pruned(run, saved, tmp_path_factory, capsys):
    start = step_dir(saved, 2)
    other = tmp_path_factory.mktemp("other")
    resume = choose_resume(other, str(start), print)
    assert (resume.path, resume.step, resume.origin) == (start.resolve(), 2, str(start.resolve()))
    run.load(resume.path)
    run.state.origin = resume.origin
    for step in (3, 4, 5, 6):
        run.state.step = step
        run.save(keep=2, run_dir=other)
    # The same command after a requeue: the run's newest own checkpoint, not PATH again.
    again = choose_resume(other, str(start), print)
    assert again.path == other / "checkpoints" / "step_00000006" and again.origin == str(start.resolve())
    assert "continuing from step_00000006" in capsys.readouterr().out
    assert json.loads((again.path / "meta.json").read_text())["origin"] == str(start.resolve())
    # Pruning in PATH's own run.dir never deletes PATH.
    run.state.origin = str(start.resolve())
    for step in (7, 8, 9):
        run.state.step = step
        run.save(keep=1, run_dir=saved.dir)
    assert [p.name for p in checkpoints(saved.dir)] == ["step_00000002", "step_00000009"]
    # Checkpoints that did not grow from PATH are refused, not mixed into the run.
    with pytest.raises(UserError, match="holds checkpoints that did not grow from ckpt.resume=.*latest step_00000006"):
        choose_resume(other, str(step_dir(saved, 9)), print)



def test_checkpoints_past_eight_digit_steps_are_found(run):
    saved = run.state.step
    try:
        for step in (99_999_999, 100_000_000):
            run.state.step = step
            run.save(keep=10)
        assert choose_resume(run.dir, "auto", print).path.name == "step_100000000"
    finally:
        run.state.step = saved


def test_a_failed_write_leaves_the_older_checkpoints_and_says_so(run, saved, monkeypatch):
    """A full disk mid-save: one UserError naming the folder, and the checkpoints before it as they were."""
    before = {p.name: verify(p)["files"] for p in checkpoints(saved.dir)}

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(run.acc, "save_state", full)
    run.state.step = 4
    with pytest.raises(UserError, match=f"cannot write a checkpoint in {saved.root} \\(No space left on device\\); "
                                        "the checkpoints before it are intact"):
        run.save(keep=5, run_dir=saved.dir)
    assert {p.name: verify(p)["files"] for p in checkpoints(saved.dir)} == before
    assert choose_resume(saved.dir, "auto", print).path == step_dir(saved, 3)
