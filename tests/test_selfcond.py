"""Self-conditioning (`model.self_cond`, `gan_dist/selfcond.py`): k-means on D's features finds the clusters, a
re-clustering keeps each cluster's id (whatever ids the last clustering gave), two processes label and step exactly
as one (tests/selfcond_ddp.py under the real `accelerate launch`), a run killed (-9) and resumed across a re-clustering
ends bit-identical to an uninterrupted one, and its samplers draw clusters as their sizes.

Run: python -m pytest tests/test_selfcond.py -q   (about 1 minute; the resume test is slow)
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gan_dist.config import ModelConfig, load_config
from gan_dist.errors import UserError
from gan_dist.models import build_models
from gan_dist.selfcond import SelfCond, assignment, kmeans, match
from runs import REPO, assert_same_weights, kill_tree, launch, newest, wait, weights
from test_losses_ddp import two_processes
from test_train import wandb_files
from wandb_records import history

MLP = ModelConfig(arch="mlp", z_dim=4, hidden=16, depth=2, out_act="none", self_cond=True, self_cond_k=5,
                  self_cond_images=200)


def blobs(n: int, k: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    truth = torch.arange(n) % k
    return torch.randn(k, 8, generator=g)[truth] * 10 + torch.randn(n, 8, generator=g), truth


def same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_kmeans_finds_well_separated_clusters():
    x, truth = blobs(500)
    centres, assign = kmeans(x, 5, seed=0)
    assert same_partition(assign, truth)
    assert torch.bincount(assign).tolist() == [100] * 5


def test_the_assignment_solver_finds_the_cheapest_assignment():
    rng = np.random.default_rng(0)
    for trial in range(200):
        k = int(rng.integers(1, 7))
        cost = rng.integers(0, 5, (k, k)).astype(float) if trial % 2 else rng.random((k, k))  # ties, and none
        cols = assignment(cost)
        assert sorted(cols) == list(range(k))
        best = min(sum(cost[i, p[i]] for i in range(k)) for p in itertools.permutations(range(k)))
        assert cost[np.arange(k), cols].sum() == pytest.approx(best)


def test_matching_gives_each_new_cluster_the_old_id_that_keeps_most_images():
    old = torch.arange(300) % 6
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    new = perm[old]
    new[:10] = (new[:10] + 1) % 6  # a few images move
    ids = match(new, old, 6)
    assert torch.equal(ids[perm], torch.arange(6))
    assert (ids[new] == old).sum() == 290


def self_cond_on_blobs(seed: int = 0) -> tuple[SelfCond, torch.nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    _, D = build_models(MLP)
    g = torch.Generator().manual_seed(5)
    sample = (torch.randn(5, 2, generator=g) * 3)[torch.arange(200) % 5] + 0.2 * torch.randn(200, 2, generator=g)
    return SelfCond(MLP, D, seed=1), D, sample


def recluster(self_cond: SelfCond, D: torch.nn.Module, sample: torch.Tensor, step: int) -> torch.Tensor:
    return self_cond.recluster(D, sample, step, gather=lambda x: x, broadcast=lambda x: x, world=1, per_draw=50,
                               n=len(sample))


def test_a_reclustering_keeps_the_ids_the_last_one_gave_even_permuted():
    self_cond, D, sample = self_cond_on_blobs()
    recluster(self_cond, D, sample, 0)
    first = self_cond.assign.clone()
    # Relabel the state: cluster i is now called perm[i]. A new clustering must keep those names.
    perm = torch.tensor([2, 4, 0, 1, 3])
    self_cond.assign = perm[self_cond.assign]
    self_cond.centres.copy_(torch.empty_like(self_cond.centres).index_copy_(0, perm, self_cond.centres))
    with torch.no_grad():
        for p in D.parameters():  # D moved a little since
            p.add_(0.01 * torch.randn_like(p))
    sizes = recluster(self_cond, D, sample, 10)
    assert same_partition(self_cond.assign, first)
    assert torch.equal(self_cond.assign, perm[first])
    assert torch.equal(sizes, torch.bincount(perm[first], minlength=5))
    assert torch.equal(self_cond.label(sample), self_cond.assign)


def test_the_clusters_are_a_checkpoint_state_and_a_foreign_one_is_refused():
    self_cond, D, sample = self_cond_on_blobs()
    assert self_cond.due(7)  # never clustered: the next step clusters
    recluster(self_cond, D, sample, 0)
    assert not self_cond.due(7) and self_cond.due(MLP.self_cond_every)
    fresh, _, _ = self_cond_on_blobs(seed=1)
    fresh.load(self_cond.state())
    assert torch.equal(fresh.label(sample), self_cond.label(sample)) and fresh.last == 0
    other = SelfCond(ModelConfig(**{**MLP.__dict__, "self_cond_k": 7}), D, seed=1)
    with pytest.raises(UserError, match="self-conditioning state does not fit"):
        other.load(self_cond.state())


def test_two_processes_label_and_step_as_one(tmp_path):
    out = two_processes("tests/selfcond_ddp.py", tmp_path)
    ranks = [torch.load(out / f"rank{r}.pt") for r in range(2)]
    ref = torch.load(out / "reference.pt")
    assert len(set(ref["labels"].tolist())) > 1
    for rank in ranks:
        for key in ("centres", "assign", "labels"):
            assert torch.equal(rank[key], ref[key]), key
        assert all(torch.equal(a, b) for a, b in zip(rank["sizes"], ref["sizes"]))
        for name, grad in ref["grads"].items():
            torch.testing.assert_close(rank["grads"][name], grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("overrides, message", [
    (["model.self_cond=true", "model.cond=true"], "cannot be combined with model.cond=true"),
    (["model.self_cond=true", "model.self_cond_k=50", "model.self_cond_images=20"], "need at least as many"),
    (["data.dataset=stacked_mnist"], "set data.channels=3"),
])
def test_bad_self_conditioning_and_stacked_settings_are_one_line(overrides, message):
    with pytest.raises(UserError, match=message):
        load_config(["--config", "configs/debug.yaml", *overrides])


SELF_COND = ("model.self_cond=true", "model.cond_norm=true", "model.self_cond_k=6", "model.self_cond_every=20",
             "model.self_cond_images=600", "train.steps=40", "ckpt.every=10", "ckpt.keep=10", "eval.every=20")


@pytest.mark.slow
def test_a_resume_across_a_reclustering_is_bit_exact(tmp_path, shards):
    """Clusterings at steps 0 and 20 of 40: a run killed (-9) right after its step-10 checkpoint resumes with the
    first clustering and crosses the second, and ends with the uninterrupted run's weights, clusters and metrics. W&B
    (offline) gets the cluster sizes G draws from at each evaluation."""
    reference = tmp_path / "reference"
    launch(reference, shards, 1, *SELF_COND)
    killed = tmp_path / "killed"
    quiet = (*SELF_COND, "wandb.mode=disabled")
    proc = launch(killed, shards, 1, *quiet, "train.steps=100000", background=True)
    wait(proc, lambda: newest(killed) >= 10, timeout=120)
    kill_tree(proc)
    proc.wait()
    assert 10 <= newest(killed) < 100000
    assert "resumed from" in launch(killed, shards, 1, *quiet)
    assert_same_weights(weights(killed), weights(reference))
    clusters = [load_file(r / "checkpoints/step_00000040/train_state.safetensors") for r in (killed, reference)]
    assert any(key.startswith("self_cond/") for key in clusters[1])
    for key in (k for k in clusters[1] if k.startswith("self_cond/")):
        assert torch.equal(clusters[0][key], clusters[1][key]), key
    final = [json.loads((r / "final/metrics.json").read_text()) for r in (killed, reference)]
    assert final[0] == final[1]
    assert 2 <= final[1]["clusters"] <= 6
    # sample.py draws clusters as their sizes: only clusters G counted, none of a grid's class columns.
    counts = load_file(reference / "final/generator_ema.safetensors")["class_counts"]
    (wandb_file,) = wandb_files(reference)
    bars = [r for r in history(wandb_file) if "eval/cluster_sizes/values" in r]
    assert len(bars) == 2 and bars[-1]["eval/cluster_sizes/values"] == counts.tolist()
    assert bars[-1]["eval/cluster_sizes/bins"] == list(range(7))
    npz = tmp_path / "samples.npz"
    subprocess.run([sys.executable, "scripts/sample.py", "--run", str(reference), "--num", "400", "--out", str(npz)],
                   cwd=REPO, check=True, capture_output=True)
    drawn = np.bincount(np.load(npz)["labels"], minlength=6)
    assert set(np.flatnonzero(drawn)) <= set(np.flatnonzero(counts.numpy()))
    assert abs(drawn / 400 - (counts / counts.sum()).numpy()).max() < 0.1
