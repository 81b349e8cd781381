"""The sbatch scripts on a real two-node SLURM cluster on this host (`scripts/local_slurm.sh up`), CPU and gloo:

- a 2-node x 1-process job completes and writes the final weights, logging world size 2 from both node ranks;
- preemption: `scancel --signal=USR2` mid-run -> every rank checkpoints at one step, the job requeues itself,
  restarts (Restarts=1), resumes, completes, and its final weights equal the uninterrupted run's bit for bit, in
  the same W&B run;
- a one-process job (slurm/train.sbatch) preempted the same way requeues within its grace period although W&B's
  finish hangs, and ends bit-identical to an uninterrupted one-process run;
- `kill -9` of one rank ends the job within `dist.timeout_s`, and a resubmission on one node resumes from the last
  complete checkpoint (the log says the world size changed) and completes.

Skipped, with the reason, only where SLURM cannot be installed (no root or no apt). About 3 minutes on 2 cores.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file

from runs import MNIST, launch
from wandb_records import run_id

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # a real cluster, minutes per test
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")
STEPS = 150
JOB = (f"train.steps={STEPS}", "ckpt.every=25", "ckpt.keep=10", "data.num_workers=2", "eval.every=0")
# Imported by every Python of a job that has its folder on PYTHONPATH: W&B's finish then hangs, as it does when the
# network to W&B stalls during a preemption.
STALLED_WANDB = """import time
import wandb.sdk.wandb_run

wandb.sdk.wandb_run.Run.finish = lambda self, *args, **kwargs: time.sleep(3600)
"""


@pytest.fixture(scope="session")
def cluster():
    """The local two-node cluster, brought up for this session and stopped at its end (also when bringing it up
    fails halfway); a cluster that was already running (.ci/run starts one, a developer may keep one) stays up."""
    if shutil.which("sbatch") is None and (os.geteuid() != 0 or shutil.which("apt-get") is None):
        pytest.skip("SLURM is not installed and cannot be installed here (needs root and apt-get)")
    # A running controller, not `sinfo`: without one, sinfo retries for about 10 s before it fails.
    was_up = any(p.info["name"] == "slurmctld" for p in psutil.process_iter(["name"]))
    try:
        up = subprocess.run(["bash", "scripts/local_slurm.sh", "up"], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env=dict(os.environ, SLURM_LOCAL_NODES="2"))
        if up.returncode and shutil.which("sbatch") is None:
            pytest.skip(f"SLURM could not be installed here: {up.stderr.strip().splitlines()[-1:]}")
        assert up.returncode == 0, f"the local SLURM cluster did not come up:\n{up.stderr}"
        yield
    finally:
        if not was_up:
            subprocess.run(["bash", "scripts/local_slurm.sh", "down"], cwd=REPO, capture_output=True, timeout=120)


def submit(script: str, run_dir: Path, shards: Path, *overrides: str, wait: bool = False,
           env: dict | None = None) -> str:
    """Submit the debug config; the job id. With `wait`, `sbatch --wait` returns when the job has ended and fails
    unless it completed."""
    sbatch = ["sbatch", "--parsable", f"--output={run_dir.parent / (run_dir.name + '-%j.out')}"]
    sbatch += ["--wait"] if wait else []
    args = ["--config", "configs/debug.yaml", f"run.dir={run_dir}", f"data.cache_dir={shards}",
            f"data.mnist_dir={MNIST}", *JOB, *overrides]
    # The job inherits this environment: the test's Python must come first on PATH for `accelerate`.
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", OMP_NUM_THREADS="1",
               WANDB_SILENT="true") | (env or {})
    env.pop("WANDB_MODE", None)
    done = subprocess.run([*sbatch, script, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    job_id = done.stdout.strip().split(";")[0]
    assert done.returncode == 0, f"sbatch exited {done.returncode}: {done.stderr}\n{log_of(run_dir, job_id)}"
    return job_id


def job(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def log_of(run_dir: Path, job_id: str) -> str:
    path = run_dir.parent / f"{run_dir.name}-{job_id}.out"
    return path.read_text() if path.is_file() else f"(no output file {path})"


def start_now(job_id: str) -> None:
    """Let a requeued job start at once instead of at its BeginTime (about 2 minutes away). Not within the second of
    its requeue: slurmd refuses a credential issued in the same second as the one it revoked ("Job credential
    revoked", and the job fails without running)."""
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)


def finished(job_id: str, timeout: float = 240) -> dict[str, str]:
    return wait_for(lambda: (info := job(job_id)).get("JobState") in ENDED and info, timeout, f"job {job_id} to end")


def weights(run_dir: Path) -> dict:
    return {n: load_file(run_dir / "final" / f"{n}.safetensors") for n in ("generator", "generator_ema",
                                                                             "discriminator")}


def first_checkpoint(run_dir: Path) -> None:
    wait_for(lambda: list(run_dir.glob("checkpoints/step_*/meta.json")), 180, f"a checkpoint in {run_dir}")


@pytest.fixture(scope="module")
def reference(cluster, shards, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("slurm") / "reference"
    job_id = submit("slurm/train_multinode.sbatch", run_dir, shards, wait=True)
    assert job(job_id)["JobState"] == "COMPLETED"
    return run_dir


def test_two_node_job_completes_with_world_size_two(reference):
    (log_file,) = reference.parent.glob("reference-*.out")
    log = log_file.read_text()
    assert "2 node(s) (n[1-2]) x 1 process(es) (CPU)" in log
    assert "node 0 of 2 (n1): accelerate launch, machine rank 0" in log
    assert "node 1 of 2 (n2): accelerate launch, machine rank 1" in log
    # accelerate prints on each node's main process: both node ranks report the world of 2.
    assert log.count("training: world size 2 on cpu (MULTI_CPU)") == 2
    assert f"done: step {STEPS}" in log and (reference / "final" / "generator_ema.safetensors").is_file()


def test_preempted_job_requeues_resumes_and_matches_an_uninterrupted_run(reference, shards, tmp_path):
    run_dir = tmp_path / "preempted"
    job_id = submit("slurm/train_multinode.sbatch", run_dir, shards)
    first_checkpoint(run_dir)
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    wait_for(lambda: job(job_id).get("Restarts") == "1" and job(job_id).get("JobState") == "PENDING", 120,
             "the requeue")
    start_now(job_id)
    info = finished(job_id)
    log = log_of(run_dir, job_id)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log
    stopped = [line for line in log.splitlines() if line.startswith("stopped at step")]
    assert stopped and all("by SIGUSR2; checkpoint saved" in line for line in stopped), log
    step = int(stopped[0].split()[3])
    assert 25 <= step < STEPS and (run_dir / "checkpoints" / f"step_{step:08d}").is_dir()
    assert f"requeued SLURM job {job_id}" in log and "restart 1" in log
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{step:08d}'}" in log
    resumed, expected = weights(run_dir), weights(reference)
    for name, tensors in expected.items():
        for key, value in tensors.items():
            assert resumed[name][key].equal(value), f"{name}.{key} differs from the uninterrupted run"
    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2 and {f.stem.removeprefix("run-") for f in files} == {run_id(files[1])}


def test_one_process_job_requeues_within_its_grace_period_past_a_stalled_wandb_finish(cluster, shards, tmp_path):
    """slurm/train.sbatch on a node without GPUs runs one process, which gets SLURM's USR2 whatever accelerate's
    launcher does with it (1.16's simple launcher dies of it): USR2 checkpoints it, W&B's hung finish is left after
    wandb.finish_timeout_s, the job requeues, resumes and ends bit-identical to an uninterrupted one-process run."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(STALLED_WANDB)
    reference = tmp_path / "reference"
    launch(reference, shards, 1, *JOB)
    run_dir = tmp_path / "preempted"
    job_id = submit("slurm/train.sbatch", run_dir, shards, "wandb.finish_timeout_s=3", env={"PYTHONPATH": str(hook)})
    first_checkpoint(run_dir)
    signalled = time.time()
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    wait_for(lambda: job(job_id).get("Restarts") == "1" and job(job_id).get("JobState") == "PENDING", 120,
             "the requeue")
    requeued_after = time.time() - signalled
    start_now(job_id)
    info = finished(job_id)
    log = log_of(run_dir, job_id)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log
    assert "1 node(s) (n1) x 1 process(es) (CPU)" in log and "stopped at step" in log and "by SIGUSR2" in log
    assert log.count("W&B did not finish within wandb.finish_timeout_s=3 s") == 2, log
    assert f"requeued SLURM job {job_id}" in log and requeued_after < 60, (requeued_after, log)
    for name, tensors in weights(reference).items():
        for key, value in tensors.items():
            assert weights(run_dir)[name][key].equal(value), f"{name}.{key} differs from the uninterrupted run"


def test_killed_rank_ends_the_job_and_a_one_node_resubmission_completes(cluster, shards, tmp_path):
    run_dir = tmp_path / "killed"
    timeout_s = 15  # the survivor waits this long in its collective; startup's waits are a few seconds
    job_id = submit("slurm/train_multinode.sbatch", run_dir, shards, f"dist.timeout_s={timeout_s}")
    first_checkpoint(run_dir)
    victims = [p for p in psutil.process_iter(["cmdline"])
               if p.info["cmdline"] and p.info["cmdline"][1:3] == ["-u", "train.py"]
               and f"run.dir={run_dir}" in p.info["cmdline"] and p.environ().get("RANK") == "1"
               and p.parent().cmdline()[1:3] != ["-u", "train.py"]]  # the rank, not its loader workers
    assert len(victims) == 1
    victims[0].send_signal(signal.SIGKILL)
    killed_at = time.time()
    info = finished(job_id, timeout=timeout_s + 60)
    assert info["JobState"] == "FAILED" and time.time() - killed_at < timeout_s + 30, log_of(run_dir, job_id)
    assert not (run_dir / "final").exists()

    job_id = submit("slurm/train.sbatch", run_dir, shards, f"dist.timeout_s={timeout_s}")
    info = finished(job_id)
    log = log_of(run_dir, job_id)
    assert info["JobState"] == "COMPLETED", log
    assert "resumed from" in log and "world size changed from 2 to 1" in log
    assert f"done: step {STEPS}" in log and (run_dir / "final" / "generator.safetensors").is_file()


@pytest.fixture(autouse=True, scope="module")
def _runs_find_the_classifier(classifier):
    """The debug config evaluates with the MNIST classifier; it is trained once per session, not by each run."""
