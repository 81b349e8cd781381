"""The console as an observer of the run: stdout and stderr that cannot be written (a closed pipe, `| head`, a `tee`
that died, a full disk under a log file) never end training.

`observe_console()` (train.py, first thing) puts a `Console` in front of each stream, makes both line-buffered (a
log shows each line as it is printed, and a failure meets the line that was being written) and ignores SIGPIPE (a
closed pipe is an error of the write, never a stop signal). A stream's first failed write or flush points its file
descriptor at /dev/null, so that nothing written to it later (by Python at exit, by C++ code, by a library holding
the stream) fails again; from then on, what it would have shown goes to the run directory's `console.log` (the
main process and its loader workers, once `keep_in` names it; until then it is held in memory; other ranks' is
dropped), which begins with a line saying when and why the console was lost and goes on with the text the stream
did not take. Writing `console.log` is best effort: a full run.dir is the tracker's and the checkpoints' to report,
as one error line. Nothing here touches torch.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import TextIO

HELD_MAX = 1 << 20  # characters held for console.log before the run directory is known


class _Log:
    """The run directory's console.log, shared by both streams; text is held in memory until its folder is known."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self.held: list[str] = []
        self.size = 0
        self.failed = False

    def write(self, text: str) -> None:
        if self.failed:
            return
        if self.path is None:
            if self.size + len(text) <= HELD_MAX:
                self.held.append(text)
                self.size += len(text)
            return
        try:
            with self.path.open("a", encoding="utf-8", errors="replace") as f:
                f.write("".join(self.held) + text)
            self.held = []
        except OSError:
            self.failed = True

    def keep_in(self, path: Path | None) -> None:
        self.path, self.failed = path, path is None
        if self.held and path is not None:
            self.write("")


LOG = _Log()


class Console:
    """`stream` until a write or flush of it fails; after that, `LOG`. Everything else is the stream's own."""

    def __init__(self, stream: TextIO, name: str) -> None:
        self.stream, self.name = stream, name
        self.lost: str | None = None
        self.unflushed = ""  # written since the stream last flushed: lost with its buffer if a flush fails

    def write(self, text: str) -> int:
        if self.lost is None:
            try:
                written = self.stream.write(text)
            except OSError as err:
                self._lose(err)
                LOG.write(self.unflushed + text)
                return len(text)
            # A line-buffered stream flushes at a line's end (or a carriage return: a progress bar's redraw).
            self.unflushed = "" if "\n" in text or "\r" in text else (self.unflushed + text)[-HELD_MAX:]
            return written
        LOG.write(text)
        return len(text)

    def flush(self) -> None:
        if self.lost is None:
            try:
                self.stream.flush()
                self.unflushed = ""
            except OSError as err:
                self._lose(err)
                LOG.write(self.unflushed)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def isatty(self) -> bool:
        return self.lost is None and self.stream.isatty()

    def _lose(self, err: OSError) -> None:
        self.lost = f"{type(err).__name__}: {err.strerror or err}"
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, self.stream.fileno())
            finally:
                os.close(devnull)
            self.stream.flush()  # what the buffer still holds drains into /dev/null
        except (OSError, ValueError):
            pass
        LOG.write(f"[gan-dist] {time.strftime('%Y-%m-%d %H:%M:%S')}: {self.name} could not be written "
                  f"({self.lost}); training goes on, and what it would have shown follows here\n")

    def __getattr__(self, name: str):
        if name == "stream":  # not set yet (a copy being made): no recursion through the line below
            raise AttributeError(name)
        return getattr(self.stream, name)


def observe_console() -> None:
    """Put a line-buffered `Console` in front of stdout and stderr (once), and make SIGPIPE no stop signal."""
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # CPython's own default, made sure of: a parent may have changed it
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is None or isinstance(stream, Console):
            continue
        try:
            stream.reconfigure(line_buffering=True)
        except (AttributeError, OSError, ValueError):
            pass  # not a TextIOWrapper (a test's capture): its own buffering stays
        setattr(sys, name, Console(stream, name))


def keep_in(path: Path | None) -> None:
    """The main process, once it holds the run directory: what a lost console would have shown goes to `path` (the
    run's console.log) from now on; None when the directory is another run's."""
    LOG.keep_in(path)
