"""Faults a cluster or a user hands the trainer, each in real runs of `accelerate launch train.py` on CPU (the table
"What survives what" in the README points here):

- a second launch on a live run.dir is refused within seconds, naming the first, which ends bit-identical to a
  solo run;
- rerunning a finished run is a no-op that says so (the run.dir byte-identical); a higher train.steps continues it;
- a truncated file in the newest checkpoint and a torn last line in metrics.jsonl: the rerun names both, resumes
  from the checkpoint before, and ends bit-identical to an uninterrupted run, with the same logged curve;
- a checkpoint holding a pickle that would create a file: refused with one error line naming the file; the file is
  never created;
- a shard with bad labels, images in another format than their extension (EPS, JPEG in a .png) and an image over
  the pixel bound: the run finishes, naming each shard and key and counting them in data/skipped;
- a stalled http server: the run stops within seconds, naming the URL;
- a run directory from someone else: scripts/evaluate.py neither loads its TorchScript nor runs its pipe: commands;
- chaos: the whole process tree killed at random moments (and right in the middle of checkpoint saves) 20 times over
  1 process (shards through the loader) and 2 (device-resident data), rerunning after each; every rerun resumes and
  the final weights are bit-identical.

Run: python -m pytest tests/test_faults.py -q -s   (-s prints the chaos trials' kill moments; about 4 minutes)
"""

from __future__ import annotations

import http.server
import io
import json
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from runs import REPO, RunsCommand, assert_same_weights, digest, jsonl, kill_tree, launch, newest, reseal, wait, \
    weights, without_timing

RUN = ("train.steps=300", "ckpt.every=50", "ckpt.keep=10", "eval.every=100", "wandb.mode=disabled")


def errors(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def pair(tmp_path_factory, shards):
    """`first`: a run with a second launch on its run.dir while it trained; `solo`: the same run alone."""
    root = tmp_path_factory.mktemp("pair")
    first = launch(root / "first", shards, 1, *RUN, background=True)
    deadline = time.time() + 60
    while not list((root / "first" / "lease").glob("*.json")) and time.time() < deadline:
        time.sleep(0.01)
    start = time.time()
    second = launch(root / "first", shards, 1, *RUN, check=False)
    refused_after = time.time() - start
    out = first.communicate(timeout=300)[0]
    assert first.returncode == 0, out
    launch(root / "solo", shards, 1, *RUN)
    return root / "first", root / "solo", second, refused_after


def test_a_second_run_on_a_live_run_dir_is_refused_at_once_and_the_first_is_untouched(pair):
    first, solo, second, refused_after = pair
    assert second.returncode != 0 and refused_after < 20
    (line,) = errors(second.stderr)
    assert f"run.dir '{first}' is in use by another run (host " in line and "pid " in line, line
    assert "Traceback" not in second.stderr and "resumed from" not in second.stdout + second.stderr
    assert_same_weights(weights(first), weights(solo))
    assert without_timing(jsonl(first)) == without_timing(jsonl(solo))
    assert not (first / "lease").exists(), "the lease is given back at the end"


def test_rerun_of_a_finished_run_is_a_no_op_and_more_steps_continue_it(pair, shards, tmp_path):
    first, _, _, _ = pair
    before = digest(first)
    out = launch(first, shards, 1, *RUN)
    assert f"run '{first}' is complete (step 300 of 300)" in out and "training:" not in out
    assert digest(first) == before
    grown = tmp_path / "grown"
    shutil.copytree(first, grown, symlinks=True)
    out = launch(grown, shards, 1, *RUN, "train.steps=320")
    assert f"resumed from {grown / 'checkpoints' / 'step_00000300'}" in out and "step 300 -> 320" in out
    assert [r["train/step"] for r in jsonl(grown) if "train/loss_d" in r][-2:] == [310, 320]
    before, after = weights(first)["generator"], weights(grown)["generator"]
    assert all(not after[k].equal(before[k]) for k in before if k.endswith("weight")), "G trained on"


def test_damaged_newest_checkpoint_and_torn_log_line_resume_from_the_one_before(pair, shards, tmp_path):
    first, solo, _, _ = pair
    run_dir = tmp_path / "run"
    shutil.copytree(first, run_dir, symlinks=True)
    # As if the run died at step 230: after a checkpoint at 200 that a full disk cut short, mid-way through a line.
    for name in ("final", "best"):
        (run_dir / name).unlink()
    for step in (250, 300):
        shutil.rmtree(run_dir / "checkpoints" / f"step_{step:08d}")
    damaged = run_dir / "checkpoints" / "step_00000200" / "model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:1000])
    log = run_dir / "metrics.jsonl"
    log.write_text("".join(line + "\n" for line in log.read_text().splitlines()
                           if json.loads(line)["train/step"] <= 230) + '{"train/step": 240, "train/lo')
    out = launch(run_dir, shards, 1, *RUN)
    assert f"checkpoint {run_dir / 'checkpoints' / 'step_00000200'}: model.safetensors has 1000 bytes" in out
    assert f"resumed from {run_dir / 'checkpoints' / 'step_00000150'}" in out
    assert "metrics.jsonl: dropped 1 unreadable line(s)" in out
    assert_same_weights(weights(run_dir), weights(solo))
    assert without_timing(jsonl(run_dir)) == without_timing(jsonl(solo))


def test_a_checkpoint_that_would_run_code_is_refused_and_never_runs(pair, shards, tmp_path):
    first, _, _, _ = pair
    handed = tmp_path / "handed_over"
    shutil.copytree(first / "checkpoints" / "step_00000150", handed)
    target = tmp_path / "pwned"
    torch.save({"state": RunsCommand(target), "param_groups": []}, handed / "optimizer.bin")
    reseal(handed, "optimizer.bin")
    proc = launch(tmp_path / "run", shards, 1, *RUN, f"ckpt.resume={handed}", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    (line,) = errors(proc.stderr)
    assert f"{handed}: optimizer.bin cannot be loaded without running code" in line, line
    assert not target.exists() and not (tmp_path / "run").exists()


def png(image: Image.Image, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def test_hostile_samples_are_skipped_named_and_counted(tmp_path, shards):
    rng = np.random.default_rng(0)
    digit = lambda: Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8))  # noqa: E731
    bad = {"big_label": {"png": png(digit()), "cls": b"99999999999999999999999"},
           "negative_label": {"png": png(digit()), "cls": b"-1"},
           "jpeg_as_png": {"png": png(digit().convert("RGB"), "JPEG"), "cls": b"1"},
           "eps_as_png": {"png": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 28 28\nshowpage\n", "cls": b"2"},
           "bomb": {"png": png(Image.new("L", (5000, 4000))), "cls": b"3"}}
    folder = tmp_path / "shards"
    folder.mkdir()
    listed, names = [], list(bad)
    for s in range(2):
        path = folder / f"train-{s:05d}.tar"
        with wds.TarWriter(str(path)) as writer:
            for name in names[s::2]:
                writer.write({"__key__": name} | bad[name])
            for i in range(16):
                writer.write({"__key__": f"good_{s}_{i:02d}", "png": png(digit()), "cls": str(i % 10).encode()})
        listed.append({"name": path.name, "num_samples": 16 + len(names[s::2]), "sha256": ""})
    (folder / "manifest.json").write_text(json.dumps({"format": "gan-dist-shards/1", "dataset": "hostile", "splits": {
        "train": {"num_samples": sum(x["num_samples"] for x in listed), "shards": listed}}}))
    # Unshuffled (a buffer of 1), each shard's bad samples come before its good ones, so the 4 batches of the 32
    # good samples (one epoch) have read every bad one.
    out = launch(tmp_path / "run", shards, 1, "data.dataset=webdataset", f"data.shards={folder}", "train.steps=4",
                 "train.batch_size=8", "data.shuffle_buffer=1", "log.every=4", "eval.every=0", "wandb.mode=disabled")
    warnings = [line for line in out.splitlines() if "warning: rank 0: sample" in line]
    for name in names:
        (line,) = [w for w in warnings if f"sample '{name}'" in w][:1]
        assert "train-0000" in line and "skipped 1 sample(s)" in line, line
    assert "is not a class index" in " ".join(w for w in warnings if "label" in w)
    assert "5000x4000 pixels is over the bound" in " ".join(warnings)
    assert jsonl(tmp_path / "run")[-1]["data/skipped"] == len(names)
    assert (tmp_path / "run" / "final" / "generator.safetensors").is_file()


def test_a_data_fault_on_one_rank_of_two_stops_both_with_its_line(tmp_path, shards):
    """One bad sample, met by one rank's loader with data.on_error=raise: that rank stands in blank batches until the
    next stop vote, and both ranks stop there (before, the other rank ended in a traceback from its next collective)."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "shards"
    folder.mkdir()
    listed = []
    for s in range(8):
        path = folder / f"train-{s:05d}.tar"
        with wds.TarWriter(str(path)) as writer:
            for i in range(20):
                image = b"not a png" if (s, i) == (5, 7) else png(
                    Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)))
                writer.write({"__key__": f"s{s}_{i:02d}", "png": image, "cls": b"1"})
        listed.append({"name": path.name, "num_samples": 20, "sha256": ""})
    (folder / "manifest.json").write_text(json.dumps({"format": "gan-dist-shards/1", "dataset": "one-bad", "splits": {
        "train": {"num_samples": 160, "shards": listed}}}))
    start = time.time()
    proc = launch(tmp_path / "run", shards, 2, "data.dataset=webdataset", f"data.shards={folder}", "train.steps=40",
                  "train.batch_size=16", "data.device_cache=false", "data.num_workers=2", "data.on_error=raise",
                  "dist.stop_check_every=2", "ckpt.every=4", "eval.every=0", "wandb.mode=disabled", check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in output and time.time() - start < 120, output
    (line,) = errors(output)
    assert re.fullmatch(r"error: sample 's5_07' of shard \S+/train-00005.tar: .*", line), line
    assert not (tmp_path / "run" / "final").exists()
    steps = [int(p.name[5:]) for p in (tmp_path / "run" / "checkpoints").glob("step_*")]
    assert steps and max(steps) < 20, "stopped within the epoch that holds the bad sample"


class Stalled(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "100000")
        self.end_headers()
        self.wfile.flush()
        time.sleep(60)

    def log_message(self, *args):
        pass


def test_a_stalled_http_shard_stops_the_run_naming_it(tmp_path, shards):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Stalled)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    start = time.time()
    try:
        proc = launch(tmp_path / "run", shards, 1, "data.dataset=webdataset", f"data.shards={base}/train-{{0..3}}.tar",
                      "data.mode=resampled", "data.num_workers=2", "data.timeout_s=2", "eval.every=0",
                      "wandb.mode=disabled", check=False)
    finally:
        server.shutdown()
    assert proc.returncode != 0 and time.time() - start < 60 and "Traceback" not in proc.stderr
    (line,) = errors(proc.stderr)
    assert f"shard {base}/train-" in line and "stalled: no data for 2 s" in line, line


def test_evaluate_runs_nothing_from_a_run_directory_it_was_handed(pair, tmp_path):
    first, _, _, _ = pair
    handed = tmp_path / "handed"
    shutil.copytree(first, handed, symlinks=True)
    target = tmp_path / "pwned"
    (handed / "config.yaml").write_text((first / "config.yaml").read_text().replace(
        "dataset: mnist", "dataset: webdataset").replace(
        "shards: ''", f"shards: 'pipe:touch {target}; cat x.tar'").replace(
        "inception: ''", f"inception: {tmp_path / 'inception.pt'}"))
    (tmp_path / "inception.pt").write_bytes(b"not looked at")
    evaluate = [sys.executable, "scripts/evaluate.py", "--run", str(handed), "--num", "16"]
    proc = subprocess.run(evaluate, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "without --inception" in proc.stderr, proc.stderr
    proc = subprocess.run([*evaluate, "--inception", str(tmp_path / "inception.pt")], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "pass --shards" in proc.stderr, proc.stderr
    assert not target.exists()


CHAOS = ("train.steps=40", "ckpt.every=1", "ckpt.keep=2", "eval.every=0", "log.every=4", "log.sample_every=12",
         "wandb.mode=disabled")


def fresh(run_dir: Path, pattern: str, since: float) -> list[Path]:
    """Files or folders matching `pattern` made at or after `since`."""
    out = []
    for p in run_dir.glob(pattern):
        try:
            if p.stat().st_mtime >= since:
                out.append(p)
        except FileNotFoundError:
            pass  # renamed or pruned as we looked
    return out


@pytest.mark.slow
@pytest.mark.parametrize("nproc, trials", [(1, 6), (2, 3)])
def test_chaos_kills_at_random_moments_and_every_rerun_resumes_bit_identical(tmp_path, shards, nproc, trials):
    """Each trial kills the whole process tree at one of three kinds of moment, then the next trial reruns the same
    command: during start-up (a random time before an uninterrupted run's first checkpoint, and before this launch
    saves any: lease, resume, data), while a checkpoint is being written, or a random time after 1-3 new checkpoints
    (between and inside steps). A trial gains a few steps at most, so none finishes the run; the last launch does."""
    # One process reads the shards through the loader, two draw from the device-resident dataset.
    args = (*CHAOS, f"data.device_cache={'false' if nproc == 1 else 'true'}")
    start = time.time()
    reference = launch(tmp_path / "reference", shards, nproc, *args, background=True)
    wait(reference, lambda: list((tmp_path / "reference").glob("checkpoints/step_*")))
    startup = time.time() - start
    assert reference.wait(timeout=300) == 0, reference.communicate()[0]
    step_time = (time.time() - start - startup) / 40
    run_dir, rng, moments = tmp_path / "run", random.Random(nproc), []
    for trial in range(trials):
        proc = launch(run_dir, shards, nproc, *args, background=True)
        begun, before, kind = time.time(), newest(run_dir), ("start-up", "mid-save", "mid-training")[trial % 3]
        if kind == "start-up":  # a random moment, but before the first step this launch saves
            wait(proc, lambda delay=rng.uniform(0, startup): time.time() - begun > delay or newest(run_dir) > before)
        elif kind == "mid-save":
            wait(proc, lambda: fresh(run_dir, "checkpoints/.tmp-step_*", begun))
        else:
            wait(proc, lambda n=rng.randint(1, 3): newest(run_dir) >= max(before, 0) + n)
            time.sleep(rng.uniform(0, step_time))
        saving = bool(fresh(run_dir, "checkpoints/.tmp-step_*", begun))
        kill_tree(proc)
        output = proc.communicate(timeout=60)[0]
        assert proc.returncode and "Traceback" not in output and "error:" not in output, output
        resumed = [line.split()[2].rsplit("_", 1)[-1] for line in output.splitlines() if "resumed from" in line]
        moments.append(f"{kind} {time.time() - begun:.2f} s{' (a save under way)' if saving else ''}: resumed "
                       f"{resumed[0] if resumed else 'nothing'}, newest after {newest(run_dir)}")
    assert not (run_dir / "final").exists(), "a trial finished the run"
    out = launch(run_dir, shards, nproc, *args)
    assert "resumed from" in out and "done: step 40" in out
    assert_same_weights(weights(run_dir), weights(tmp_path / "reference"))
    assert without_timing(jsonl(run_dir)) == without_timing(jsonl(tmp_path / "reference"))
    print(f"\nchaos, {nproc} process(es), {trials} kills:\n  " + "\n  ".join(moments))


@pytest.fixture(autouse=True, scope="module")
def _runs_find_the_classifier(classifier):
    """The evaluations here use the MNIST classifier; it is trained once per session, not by each run."""
