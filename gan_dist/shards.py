"""Webdataset shards on disk or behind a URL: expanding `data.shards`, opening shards and reading their samples.

A shard is a tar in the usual webdataset layout (see `shardformat.py`, which also owns the manifests): members
`KEY.EXT` grouped into samples by KEY. Shards come from local paths, brace patterns (`train-{00000..00127}.tar`),
`pipe:` commands (`pipe:aws s3 cp s3://bucket/train-00000.tar -`) and http(s) URLs, joined with `::` or given as a
list; `location` makes a shard's URL comparable with a manifest's.

Reading here yields raw bytes only: nothing is decoded, and no member is ever unpickled. Remote shards (http(s),
`pipe:`) are read with a stall watchdog (`data.timeout_s`, `data.min_rate_kbs`), so none can hang a rank.

`ShardReader` reads a run's shards for the loader: a local shard with an offset index at its members' offsets
(`read_indexed`), any other streamed (`tar_samples`), each checked against its manifest's count. It keeps the fault
accounting: a truncated or unreadable shard, or one unlike its manifest, is warned about naming it and the samples
it loses are counted (`data.on_error=raise` stops the run instead, `FatalDataError`). `Laid` reads the samples at
given places of shards laid end to end (an epoch's order, see `order.py`), streaming a shard without an index once
and forward across the places asked for.
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import IO, Callable, Generator, Iterator, NamedTuple

import braceexpand
import numpy as np

from gan_dist.errors import UserError


class ShardError(Exception):
    """A shard that cannot be opened or read to its end; `key` names the sample being read at the fault."""

    def __init__(self, url: str, reason: str, key: str | None = None) -> None:
        at = f" at sample '{key}'" if key else ""
        super().__init__(f"shard {url}: {reason}{at}")
        self.url, self.reason, self.key = url, reason, key


def is_remote(url: str) -> bool:
    return url.startswith(("pipe:", "http://", "https://"))


def expand_urls(spec: str | list[str]) -> list[str]:
    """`data.shards` as a list of URLs: `::`-joined or listed entries, brace patterns expanded, folders listed."""
    parts = spec.split("::") if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for part in (p.strip() for p in parts):
        if not part:
            continue
        if not is_remote(part) and Path(part).is_dir():
            tars = sorted(str(p) for p in Path(part).glob("*.tar"))
            if not tars:
                raise UserError(f"data.shards folder {part} holds no .tar shards; write some with "
                                f"scripts/make_shards.py --src IMAGES --out {part}")
            urls += tars
        else:
            urls += list(braceexpand.braceexpand(part))
    return urls


def check_local(urls: list[str]) -> None:
    """Fail fast, naming the URL, when a local shard is missing (remote ones fail when opened)."""
    missing = [u for u in urls if not is_remote(u) and not Path(u.removeprefix("file:")).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"shard {missing[0]} does not exist{more}; check data.shards (brace patterns such as "
                        f"train-{{00000..00009}}.tar must match the files)")


class StreamError(OSError):
    """A remote stream that stalled, was too slow, or whose command failed; the message says which."""


class _Watched:
    """A remote byte stream (an http response or a command's stdout) that raises StreamError when no byte arrives
    for `timeout_s`, or fewer than `min_rate` bytes/s arrive over any `timeout_s` spent waiting on it, so a stalled
    server or command never hangs a rank. Only time spent inside `read` counts: a reader that pauses (a loader
    worker whose queue is full) is not the source being slow."""

    def __init__(self, read1, fileno: int | None, timeout_s: float, min_rate: float, close, finish=None) -> None:
        self._read1, self._fileno, self.timeout_s, self.min_rate = read1, fileno, timeout_s, min_rate
        self._close, self._finish = close, finish
        self._waited, self._got = 0.0, 0

    def read(self, size: int = -1) -> bytes:
        size = 1 << 16 if size < 0 else size
        start = time.monotonic()
        if self._fileno is not None:  # a pipe: wait for data without blocking past the timeout
            ready, _, _ = select.select([self._fileno], [], [], self.timeout_s)
            if not ready:
                raise StreamError(f"stalled: no data for {self.timeout_s:g} s (data.timeout_s)")
        try:
            data = self._read1(size)
        except TimeoutError:
            raise StreamError(f"stalled: no data for {self.timeout_s:g} s (data.timeout_s)") from None
        self._waited += time.monotonic() - start
        self._got += len(data)
        if self._waited >= self.timeout_s:
            rate = self._got / self._waited
            if rate < self.min_rate:
                raise StreamError(f"too slow: {rate / 1000:.2f} kB/s over {self._waited:.0f} s, under "
                                  f"data.min_rate_kbs={self.min_rate / 1000:g}")
            self._waited, self._got = 0.0, 0
        if not data and self._finish is not None:
            self._finish()
        return data

    def close(self) -> None:
        self._close()

    def __enter__(self) -> _Watched:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _open_http(url: str, timeout_s: float, min_rate: float) -> _Watched:
    for attempt in range(3):  # a refused or reset connection is retried; a server that answers is not
        try:
            response = urllib.request.urlopen(url, timeout=timeout_s)
            break
        except urllib.error.HTTPError:
            raise
        except (urllib.error.URLError, ConnectionError, TimeoutError) as err:
            if attempt == 2:
                raise OSError(f"no connection after 3 tries: {getattr(err, 'reason', err)}") from None
            time.sleep(1 + attempt)
    return _Watched(response.read1, None, timeout_s, min_rate, response.close)


def _open_pipe(command: str, timeout_s: float, min_rate: float) -> _Watched:
    # A session of its own, so that closing kills the whole command (a shell and what it started), not the shell.
    proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    fd = proc.stdout.fileno()

    def finish() -> None:  # at the end of the data: the command must have succeeded
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise StreamError(f"the command closed its output but did not exit within {timeout_s:g} s") from None
        if code:
            raise StreamError(f"the command exited with status {code}")

    def close() -> None:  # also before the end: a command we stop reading is killed, not waited for
        proc.stdout.close()
        if proc.poll() is None:  # never signal a group id that a reaped command may have freed
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()

    return _Watched(lambda n: os.read(fd, n), fd, timeout_s, min_rate, close, finish)


def open_shard(url: str, timeout_s: float = 60.0, min_rate_kbs: float = 1.0) -> IO[bytes]:
    """A binary stream of the shard at `url`; ShardError naming the URL when it cannot be opened. Remote streams
    fail with StreamError when they stall (see `_Watched`)."""
    try:
        if url.startswith("pipe:"):
            return _open_pipe(url.removeprefix("pipe:"), timeout_s, min_rate_kbs * 1000)
        if is_remote(url):
            return _open_http(url, timeout_s, min_rate_kbs * 1000)
        return open(url.removeprefix("file:"), "rb")
    except (OSError, ValueError) as err:
        raise ShardError(url, f"cannot be opened ({err})") from None


def split_key(name: str) -> tuple[str | None, str]:
    """`dir/abc.seg.png` -> (`dir/abc`, `seg.png`): webdataset's rule, the key ends at the basename's first dot."""
    match = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    return (match.group(1), match.group(2).lower()) if match else (None, "")


class _Counting:
    """A read-only stream that counts the bytes read through it."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream, self.count = stream, 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.count += len(data)
        return data


def _check_end(tar: tarfile.TarFile, raw: _Counting) -> None:
    # tarfile ends a stream quietly at a missing header, so a tar cut at a member boundary would pass for a short
    # one. An intact uncompressed tar has end-of-archive zero blocks after its last member; a cut one does not.
    if tar.fileobj.comptype != "tar":
        return  # compressed streams report truncation themselves
    while raw.read(1 << 16):
        pass
    if raw.count < tar.offset + tarfile.BLOCKSIZE:
        raise tarfile.ReadError("it ends without the end-of-archive blocks")


def tar_samples(stream: IO[bytes], url: str, max_member_bytes: int | None = None) -> Iterator[dict]:
    """Samples of one tar stream as dicts of raw bytes (`__key__`, `__url__`, one entry per extension).

    A member over `max_member_bytes` (a decompression bomb in a compressed tar) is not read: its sample carries
    `__error__` instead. A truncated or corrupt tar raises ShardError after yielding every sample before the fault;
    the sample being read at the fault is dropped."""
    sample: dict | None = None
    raw = _Counting(stream)
    try:
        with tarfile.open(fileobj=raw, mode="r|*") as tar:
            for member in tar:
                if not member.isreg():
                    continue
                key, ext = split_key(member.name)
                if key is None or os.path.basename(key).startswith("__"):
                    continue
                if sample is None or sample["__key__"] != key:
                    if sample is not None:
                        yield sample
                    sample = {"__key__": key, "__url__": url}
                if max_member_bytes is not None and member.size > max_member_bytes:
                    sample["__error__"] = f"member {member.name} has {member.size} bytes, over the cap of " \
                                          f"{max_member_bytes}"
                    continue
                data = tar.extractfile(member).read()
                if len(data) != member.size:
                    raise tarfile.ReadError(f"member {member.name} is truncated")
                sample[ext] = data
            _check_end(tar, raw)
    except StreamError as err:
        raise ShardError(url, str(err), sample["__key__"] if sample else None) from None
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        raise ShardError(url, f"is truncated or corrupt ({err or type(err).__name__})",
                         sample["__key__"] if sample else None) from None
    if sample is not None:
        yield sample


def index_samples(members: list[list]) -> list[tuple[str, list[tuple[str, int, int]]]]:
    """An index's members grouped into samples as `tar_samples` groups a stream: consecutive members of one key, each
    as (extension, data offset, size); members that are no sample's (`__*` names, no extension) left out."""
    samples: list[tuple[str, list[tuple[str, int, int]]]] = []
    for name, at, n in members:
        key, ext = split_key(name)
        if key is None or os.path.basename(key).startswith("__"):
            continue
        if not samples or samples[-1][0] != key:
            samples.append((key, []))
        samples[-1][1].append((ext, at, n))
    return samples


def read_indexed(path: str, url: str, samples: list[tuple[str, list[tuple[str, int, int]]]],
                 max_member_bytes: int | None = None) -> Iterator[dict]:
    """The `samples` of the local shard at `path` (from `index_samples`), each member read at its offset (`pread`:
    a shard cut short meanwhile gives a short read, never a fault): the same dicts as `tar_samples` yields, with no
    tar header parsed. ShardError, naming the sample, when the shard ends before a member does."""
    fd = os.open(path, os.O_RDONLY)
    try:
        for key, parts in samples:
            sample = {"__key__": key, "__url__": url}
            for ext, at, n in parts:
                if max_member_bytes is not None and n > max_member_bytes:
                    sample["__error__"] = f"member {key}.{ext} has {n} bytes, over the cap of {max_member_bytes}"
                    continue
                sample[ext] = os.pread(fd, n, at)
                if len(sample[ext]) != n:
                    raise ShardError(url, "is truncated (it ends before a member its index lists)", key)
            yield sample
    finally:
        os.close(fd)


class FatalDataError(Exception):
    """A data fault that stops the run: a shard that cannot be opened, or any fault with data.on_error=raise."""


class Read(NamedTuple):
    """How a shard's read ended: samples yielded, the fault that ended it early (or the manifest count it does not
    match), and samples it holds beyond that count."""

    got: int
    fault: str | None
    extra: int


def collect(reading: Generator[dict, None, Read]) -> tuple[list[dict], Read]:
    samples = []
    while True:
        try:
            samples.append(next(reading))
        except StopIteration as stop:
            return samples, stop.value


class _Forward:
    """A shard without an offset index, streamed once and forward across the windows of one chunk that need it
    (it cannot be read at an offset): `take` hands out the samples at rising indices as the windows ask."""

    def __init__(self, reading: Generator[dict, None, Read]) -> None:
        self.reading, self.at, self.read = reading, 0, None  # `at`: the index of the next sample the stream yields

    def take(self, keep: list[int], to_end: bool) -> tuple[list[dict], Read]:
        """The samples at the sorted indices `keep` (none before `at`), the first of them up to a fault; with
        `to_end`, the stream is read through, so that samples beyond the manifest's count are found."""
        wanted, out = set(keep), []
        while self.read is None and (self.at <= keep[-1] or to_end):
            try:
                sample = next(self.reading)
            except StopIteration as stop:
                self.read = stop.value
                break
            if self.at in wanted:
                out.append(sample)
            self.at += 1
        return out, self.read or Read(len(out), None, 0)


def _say(msg: str) -> None:
    print(f"[gan-dist] {msg}", file=sys.stderr, flush=True)


def _mismatch(url: str, seen: int, expected: int | None, end: int | None) -> tuple[str | None, int]:
    """For a shard read through `end` that holds `seen` samples where its manifest lists `expected`: what is wrong,
    when the read wanted samples it lacks or read on past the manifest's count; and how many samples it holds beyond
    that count."""
    if expected is None or end is None or not (seen < min(expected, end) or seen > expected == end):
        return None, 0
    return f"shard {url} holds {seen} samples, its manifest lists {expected}", max(seen - expected, 0)


class ShardReader:
    """A run's shards (`urls`, with each one's manifest sample count in `counts`, or None) read as raw samples for
    rank `rank`, and what faults cost: each is warned about, naming the shard (with `on_error`="raise" it stops the
    run instead: FatalDataError), and the samples it loses are counted in `skipped`. No member over `cap` bytes is
    read; `timeout_s` and `min_rate_kbs` watch remote shards (`open_shard`). `index` reads a local shard's offset
    index from its path (`shardformat.read_index`, handed in because shardformat imports this module)."""

    def __init__(self, urls: list[str], counts: list[int] | None, *, rank: int, on_error: str, cap: int,
                 timeout_s: float, min_rate_kbs: float, index: Callable[[str], list[list] | None]) -> None:
        self.urls, self.counts, self.rank, self.on_error, self.cap = urls, counts, rank, on_error, cap
        self.timeout_s, self.min_rate_kbs, self.index = timeout_s, min_rate_kbs, index
        self.skipped = 0
        self.indexes: dict[str, list | None] = {}  # url -> its samples' offsets (None: no index, streamed)
        self.stale: dict[str, str] = {}  # url -> why its offset index was not used (data.on_error=warn), not yet said

    def warn(self, what: str, lost: int) -> None:
        if self.on_error == "raise":
            raise FatalDataError(what)
        _say(f"warning: rank {self.rank}: {what}; skipped {lost} sample(s) (data.on_error=raise stops instead)")

    def skip(self, what: str, lost: int) -> None:
        self.warn(what, lost)
        self.skipped += lost

    def indexed(self, url: str) -> list | None:
        """A local shard's samples from its offset index (checked against the shard once per run), or None. An
        index that is malformed or no longer matches its shard stops the run with data.on_error=raise; with warn,
        the shard is streamed without it, as a shard without an index is, and `read` says so once."""
        if is_remote(url):
            return None
        if url not in self.indexes:
            try:
                members = self.index(url.removeprefix("file:"))
            except ShardError as err:
                if self.on_error == "raise":
                    raise FatalDataError(str(err)) from None
                self.stale[url], members = err.reason, None
            self.indexes[url] = None if members is None else index_samples(members)
        return self.indexes[url]

    def _unindexed(self, url: str, fault: str | None) -> str | None:
        """`fault` of a shard read without its stale index, with why (said once: the warning of its first fault,
        or a warning of its own when its read ends without one)."""
        reason = self.stale.pop(url, None)
        if reason is None:
            return fault
        note = f"streamed without its offset index ({reason})"
        if fault is None:
            _say(f"warning: rank {self.rank}: shard {url}: {note}")
            return None
        return f"{fault}; {note}"

    def read(self, url: str, first: int, end: int | None, expected: int | None,
             keep: list[int] | None = None) -> Generator[dict, None, Read]:
        """Raw samples [first, end) of one shard in order (to its end when `end` is None). A fault ends the read
        early, so what it yields is always the first of the samples asked for. A local shard with an offset index
        is read at its members' offsets, without parsing a tar header, and only at the sorted indices `keep` when
        given; others are streamed whole (`Laid` takes what it needs from them through `_Forward`). A range that
        ends where the manifest says the shard ends reads on to its real end, so a shard holding more samples than
        its manifest lists is found."""
        indexed = self.indexed(url)
        if indexed is not None:
            seen = len(indexed)
            stop = min(seen, end if end is not None else seen)
            picked = range(first, stop) if keep is None else [j for j in keep if j < stop]
            got = 0
            try:
                for sample in read_indexed(url.removeprefix("file:"), url, [indexed[j] for j in picked], self.cap):
                    yield sample
                    got += 1
            except (ShardError, OSError) as err:
                return Read(got, str(err), 0)
            return Read(got, *_mismatch(url, seen, expected, end))
        try:
            stream = open_shard(url, self.timeout_s, self.min_rate_kbs)
        except ShardError as err:
            raise FatalDataError(f"{err}; check data.shards") from None
        seen = got = 0
        try:
            for seen, sample in enumerate(tar_samples(stream, url, self.cap), start=1):
                if first < seen and (end is None or seen <= end):
                    yield sample
                    got += 1
                if end is not None and seen >= end and end != expected:
                    break
        except ShardError as err:
            if err.key is None and is_remote(url) and first == 0:
                raise FatalDataError(f"shard {url}: nothing could be read ({err.reason}); check data.shards "
                                     f"(and data.timeout_s for a slow source)") from None
            return Read(got, self._unindexed(url, str(err)), 0)
        finally:
            try:
                stream.close()
            except OSError:
                pass  # a pipe: command closed early by us exits on SIGPIPE
        fault, extra = _mismatch(url, seen, expected, end)
        return Read(got, self._unindexed(url, fault), extra)

    def shard(self, url: str, expected: int | None, loud: Callable[[], bool] = lambda: True) -> Iterator[dict]:
        """Every sample of one shard in order; the samples a fault loses are skipped and counted when `loud()`."""
        read = yield from self.read(url, 0, expected, expected)
        lost = (max(expected - read.got, 0) if expected is not None else 0) + read.extra
        if read.fault and loud():
            self.skip(read.fault, max(lost, 1))


class Laid:
    """The shards of `reader` laid end to end in `order` (an epoch's, each with its manifest count), read at places
    in that laying. Shards without an offset index go on from one open stream across the calls to `gather`; `close`
    closes those still open."""

    def __init__(self, reader: ShardReader, order: list[int]) -> None:
        self.reader, self.order = reader, order
        self.ends = np.cumsum([reader.counts[i] for i in order])
        self.streams: dict[int, _Forward] = {}  # by place in `order`

    def gather(self, wanted: list[int]) -> tuple[dict[int, dict], dict[int, int]]:
        """The samples at places `wanted`, by place; and the samples lost at each place (a fault, or a shard's
        samples beyond its manifest, counted at its last listed place), warned about here and counted by the
        caller as its stream passes them. The open streams of shards that the places have passed are closed."""
        reader, counts, streams = self.reader, self.reader.counts, self.streams
        by_shard: dict[int, list[int]] = {}
        for place, laid in zip(wanted, np.searchsorted(self.ends, wanted, side="right").tolist()):
            by_shard.setdefault(laid, []).append(place)
        for passed in [laid for laid in streams if laid < min(by_shard)]:
            streams.pop(passed).reading.close()
        got, lost = {}, {}
        for laid, places in sorted(by_shard.items()):
            i = self.order[laid]
            base = int(self.ends[laid]) - counts[i]
            keep = sorted(p - base for p in places)
            url = reader.urls[i]
            if reader.indexed(url) is not None:
                samples, read = collect(reader.read(url, keep[0], keep[-1] + 1, counts[i], keep))
            else:
                if laid not in streams or streams[laid].at > keep[0]:
                    streams[laid] = _Forward(reader.read(url, 0, counts[i], counts[i]))
                samples, read = streams[laid].take(keep, keep[-1] == counts[i] - 1)
            got.update((base + j, sample) for j, sample in zip(keep, samples))
            missing = [base + j for j in keep[len(samples):]]
            lost.update((place, 1) for place in missing)
            extra = read.extra if keep[-1] == counts[i] - 1 else 0
            if extra:
                lost[base + keep[-1]] = lost.get(base + keep[-1], 0) + extra
            if missing or extra:
                reader.warn(read.fault, len(missing) + extra)
        return got, lost

    def close(self) -> None:
        for stream in self.streams.values():
            stream.reading.close()


def location(url: str) -> str:
    """Where a shard or manifest lives, comparable between the two: a local file's absolute path, an http(s) URL,
    or the last path or URL in a `pipe:` command."""
    if url.startswith("pipe:"):
        words = [w.strip("'\"") for w in url.removeprefix("pipe:").split() if "/" in w]
        url = words[-1] if words else url
        if "://" in url:
            return url
    if url.startswith(("http://", "https://", "pipe:")):
        return url
    return str(Path(url.removeprefix("file:")).resolve())
