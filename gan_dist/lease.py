"""One writer per run.dir: a lease the main process holds for a run's whole life, safe on shared filesystems.

The lease is a file `{run.dir}/lease/{generation:08d}.json` naming its holder (host, pid, SLURM job and restart,
a heartbeat time and counter). Taking it means creating the next generation's file with `os.link`, which fails if
that name exists, also over NFS (no `fcntl` locks, which NFS does not reliably honour). So of two runs racing
for a run.dir, exactly one wins, and the other is refused at once, naming the holder.

A lease is free when it is missing, and can be taken over when its holder is gone: the same host with that pid no
longer alive, the same SLURM job after a requeue, or no heartbeat for `timeout_s` (a dead node). A holder
renews its heartbeat from a thread every `timeout_s / 4`; it finds out that it lost the lease (after a stall longer
than the timeout) when a newer generation appears, and then must stop without writing. Pure Python, no torch.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from gan_dist.errors import UserError
from gan_dist.files import fsync_dir, write_atomic
from gan_dist.signals import slurm_job_id


@dataclass
class Holder:
    host: str
    pid: int
    job: str  # SLURM job id ("" outside SLURM)
    restart: int  # SLURM_RESTART_COUNT: a requeued job runs again under the same id with a higher count
    token: str
    heartbeat: float  # the holder's clock
    beats: int = 0
    started: str = ""

    def describe(self, now: float) -> str:
        job = f", SLURM job {self.job}" if self.job else ""
        return f"host {self.host}, pid {self.pid}{job}, last heartbeat {now - self.heartbeat:.0f} s ago"


def me() -> Holder:
    return Holder(host=socket.gethostname(), pid=os.getpid(), job=slurm_job_id() or "",
                  restart=int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0), token=secrets.token_hex(8),
                  heartbeat=time.time(), started=time.strftime("%Y-%m-%dT%H:%M:%S"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    try:  # a killed process that nobody has reaped yet is a zombie: gone, though its pid still answers
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class RunLease:
    def __init__(self, run_dir: str | Path, timeout_s: float, say: Callable[[str], None] = print) -> None:
        self.dir = Path(run_dir) / "lease"
        self.timeout_s, self.say = timeout_s, say
        self.holder = me()
        self.path: Path | None = None
        self.made_run_dir = False
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _generations(self) -> list[Path]:
        return sorted(p for p in self.dir.glob("*.json") if p.stem.isdigit())

    def _read(self, path: Path) -> Holder | None:
        """The holder in `path`, or None when it is unreadable (a torn or foreign file counts as a dead holder)."""
        try:
            return Holder(**json.loads(path.read_text()))
        except FileNotFoundError:
            raise
        except (OSError, ValueError, TypeError):
            return None

    def _gone(self, holder: Holder | None, path: Path) -> str:
        """Why `holder` no longer holds its lease, or "" while it may still be running."""
        mine = self.holder
        if holder is None:
            age = time.time() - path.stat().st_mtime
            return f"its file {path.name} is unreadable and {age:.0f} s old" if age > self.timeout_s else ""
        if holder.job and holder.job == mine.job and holder.restart != mine.restart:
            return f"SLURM job {holder.job} was requeued (restart {holder.restart} -> {mine.restart})"
        if holder.host == mine.host and not _alive(holder.pid):
            return f"its process {holder.pid} on {holder.host} has ended"
        if time.time() - holder.heartbeat > self.timeout_s:
            # Clocks of two nodes may disagree: a holder that is alive still beats within one interval.
            time.sleep(self.timeout_s / 4 + 1)
            again = self._read(path)
            if again is None or again.beats == holder.beats:
                return f"no heartbeat for {time.time() - holder.heartbeat:.0f} s (run.lease_timeout_s=" \
                       f"{self.timeout_s:g})"
        return ""

    def acquire(self) -> None:
        """Hold the lease or raise UserError naming the run that holds it. Call before reading the run.dir."""
        self.made_run_dir = not self.dir.parent.exists()
        for _ in range(20):  # each round loses only to another run that took a generation meanwhile
            self.dir.mkdir(parents=True, exist_ok=True)
            generations = self._generations()
            number = 1
            if generations:
                top = generations[-1]
                try:
                    holder = self._read(top)
                    why = self._gone(holder, top)
                except FileNotFoundError:
                    continue  # released or taken over while we looked
                if not why:
                    raise UserError(
                        f"run.dir '{self.dir.parent}' is in use by another run ({holder.describe(time.time())}); "
                        "wait for it to end, or use another run.dir. A run that was killed frees it at once on "
                        f"its own host, else after run.lease_timeout_s={self.timeout_s:g} s")
                self.say(f"taking over the lease on run.dir '{self.dir.parent}': {why}")
                number = int(top.stem) + 1
            if self._create(self.dir / f"{number:08d}.json"):
                for old in self._generations():
                    if old != self.path:
                        old.unlink(missing_ok=True)
                self._thread = threading.Thread(target=self._beat, name="gan-dist-lease", daemon=True)
                self._thread.start()
                return
        raise UserError(f"could not take the lease on run.dir '{self.dir.parent}': other runs keep taking it")

    def _create(self, path: Path) -> bool:
        tmp = self.dir / f".{self.holder.token}.tmp"
        try:
            write_atomic(tmp, json.dumps(asdict(self.holder)).encode())
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(self.dir)
        self.path = path
        return True

    def holds(self) -> bool:
        """Whether this run still holds the lease: its file is there, names it, and no newer generation exists."""
        try:
            holder = self._read(self.path)
            return holder is not None and holder.token == self.holder.token and self._generations()[-1] == self.path
        except (OSError, IndexError):
            return False

    def _beat(self) -> None:
        while not self._stop.wait(self.timeout_s / 4):
            if not self.holds():
                self.lost = True
                self.say(f"lost the lease on run.dir '{self.dir.parent}' to another run; the run stops at its "
                         "next check")
                return
            self.holder.heartbeat, self.holder.beats = time.time(), self.holder.beats + 1
            try:
                write_atomic(self.path, json.dumps(asdict(self.holder)).encode())
            except OSError as err:
                self.say(f"warning: could not renew the lease in {self.path} ({err})")

    def release(self) -> None:
        """Give the lease up (the run ends or fails). The lease folder goes when nothing else is in it, and so does
        a run.dir that the lease created and nothing else filled (a run refused by bad input leaves no trace)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.path is not None and self.holds():
            try:
                self.path.unlink(missing_ok=True)
                for folder in (self.dir, self.dir.parent) if self.made_run_dir else (self.dir,):
                    folder.rmdir()
            except OSError:  # a folder not empty, or a disk gone read-only: a run on this host takes the lease over
                pass
        self.path = None
