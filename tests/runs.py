"""Launching real training runs from tests, and reading what they leave: `accelerate launch train.py` on CPU (gloo for
more than one process; one process runs as `python train.py`), the final weights, `metrics.jsonl`, a digest of a
run.dir, and killing a launch's whole process tree; this pytest worker's cores for one-off work inside a test. Also
what a hostile checkpoint is made of: a pickle that runs a command, with meta.json's digests made to match, as
someone handing it over would."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import torch
from safetensors.torch import load_file

from gan_dist.files import sha256_file

REPO = Path(__file__).resolve().parents[1]


def _mnist() -> Path:
    """Where the tests read MNIST, the one place that says: $GAN_DIST_MNIST_DIR, else the project's shared copy
    beside the checkout where there is one (CI), else the trainer's default folder (conftest downloads it there)."""
    if os.environ.get("GAN_DIST_MNIST_DIR"):
        return Path(os.environ["GAN_DIST_MNIST_DIR"])
    shared = REPO.parent / "shared" / "data" / "mnist"
    return shared if shared.is_dir() else REPO / "data" / "mnist"


MNIST = _mnist()
WEIGHTS = ("generator", "generator_ema", "discriminator")


@contextmanager
def worker_cores() -> Iterator[None]:
    """torch's intra-op threads on this pytest worker's share of the cores for a one-off computation (conftest
    keeps one otherwise)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(run_dir: Path, shards: Path, nproc: int, *overrides: str, background: bool = False,
           config: str = "configs/debug.yaml", check: bool = True, env: dict | None = None,
           script: tuple[str, ...] = ("train.py",), precision: str | None = None, wrap: tuple[str, ...] = ()):
    """`accelerate launch train.py` (or another `script` taking train.py's arguments after its own) of `config` in
    `run_dir` on MNIST `shards`. One process without a launcher `precision` (its --mixed_precision) is started as
    `python train.py`: accelerate's launcher would only run that, 2 s later. Returns the Popen with `background`
    (own session, stdout and stderr merged), else the output, after checking the exit status unless `check` is
    False (then the CompletedProcess). `wrap` goes before the command (tests/small_disk.sh and its arguments)."""
    if nproc == 1 and precision is None:
        cmd = [sys.executable]
    else:
        # --quiet: a failing run ends with its own error lines, not also the launcher's traceback.
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--quiet", "--num_machines", "1",
               "--mixed_precision", precision or "no", "--dynamo_backend", "no", "--main_process_port",
               str(free_port()), "--num_processes", str(nproc)] + (["--multi_gpu"] if nproc > 1 else [])
    cmd = [*wrap, *cmd, *script, "--config", config, f"run.dir={run_dir}", f"data.cache_dir={shards}",
           f"data.mnist_dir={MNIST}", *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_SILENT="true") | (env or {})
    env.pop("WANDB_MODE", None)
    if background:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if not check:
        return proc
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def newest(run_dir: Path) -> int:
    """The step of the newest complete checkpoint, -1 without one."""
    return max((int(p.name[5:]) for p in run_dir.glob("checkpoints/step_*")), default=-1)


def wait(proc: subprocess.Popen, ready, timeout: float = 60) -> None:
    """Until `ready()` (polled every 2 ms), the process ends, or `timeout` seconds pass."""
    deadline = time.time() + timeout
    while proc.poll() is None and not ready() and time.time() < deadline:
        time.sleep(0.002)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a launch and everything under it (torchrun starts each rank in a session of its own)."""
    try:
        tree = psutil.Process(proc.pid)
        victims = [tree, *tree.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in victims:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def weights(run_dir: Path, folder: str = "final") -> dict:
    return {name: load_file(run_dir / folder / f"{name}.safetensors") for name in WEIGHTS}


def assert_same_weights(a: dict, b: dict) -> None:
    for name in WEIGHTS:
        assert a[name].keys() == b[name].keys()
        for key in b[name]:
            assert a[name][key].equal(b[name][key]), f"{name}.{key} differs"


def jsonl(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if not k.startswith("perf/")} for row in rows]


def digest(root: Path) -> dict[str, str]:
    """Every file under `root` with its sha256, and every symlink (final/, best/) with its target."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(root))] = "-> " + os.readlink(p)
        elif p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


class RunsCommand:
    """Unpickled, it runs `touch target`: what a hostile checkpoint file would do."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


def reseal(checkpoint: Path, name: str) -> None:
    """Make meta.json's size and sha256 of `name` match the file as it is now."""
    meta = json.loads((checkpoint / "meta.json").read_text())
    file = checkpoint / name
    meta["files"][name] = {"size": file.stat().st_size, "sha256": sha256_file(file)}
    (checkpoint / "meta.json").write_text(json.dumps(meta))
