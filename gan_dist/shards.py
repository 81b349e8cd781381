"""Webdataset shards on disk or behind a URL: expanding `data.shards`, opening and reading tars, and manifests.

A shard is a tar in the usual webdataset layout: members `KEY.EXT` grouped into samples by KEY (`__key__` plus one
entry per extension, e.g. `png`, `cls`). Shards come from local paths, brace patterns (`train-{00000..00127}.tar`),
`pipe:` commands (`pipe:aws s3 cp s3://bucket/train-00000.tar -`) and http(s) URLs, joined with `::` or given as a
list. A shard folder's `manifest.json` (format `gan-dist-shards/1`) lists every shard's name and sample count; the
trainer needs it to split exact epochs, and `scripts/make_shards.py --index` writes one for foreign shards.

Reading here yields raw bytes only: nothing is decoded, and no member is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
import zlib
from pathlib import Path
from typing import IO, Iterator

import braceexpand

from gan_dist.errors import UserError

MANIFEST_FORMAT = "gan-dist-shards/1"
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")


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


def open_shard(url: str) -> IO[bytes]:
    """A binary stream of the shard at `url`; ShardError naming the URL when it cannot be opened."""
    try:
        if is_remote(url):
            import webdataset  # noqa: PLC0415 - importing it pulls in torch; tools that only index do not need it

            return webdataset.gopen(url, "rb")
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


def tar_samples(stream: IO[bytes], url: str) -> Iterator[dict]:
    """Samples of one tar stream as dicts of raw bytes (`__key__`, `__url__`, one entry per extension).

    A truncated or corrupt tar raises ShardError after yielding every sample before the fault; the sample being
    read at the fault is dropped."""
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
                data = tar.extractfile(member).read()
                if len(data) != member.size:
                    raise tarfile.ReadError(f"member {member.name} is truncated")
                if sample is None or sample["__key__"] != key:
                    if sample is not None:
                        yield sample
                    sample = {"__key__": key, "__url__": url}
                sample[ext] = data
            _check_end(tar, raw)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        raise ShardError(url, f"is truncated or corrupt ({err or type(err).__name__})",
                         sample["__key__"] if sample else None) from None
    if sample is not None:
        yield sample


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest_file(path_or_url: str) -> dict:
    """A manifest from a local file or any URL `open_shard` takes; UserError if it is missing or malformed."""
    try:
        if is_remote(path_or_url):
            with open_shard(path_or_url) as f:
                raw = f.read()
        else:
            raw = Path(path_or_url).read_bytes()
        manifest = json.loads(raw)
    except (OSError, ShardError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read shard manifest {path_or_url} ({err}); write one with "
                        f"scripts/make_shards.py --index SHARD_FOLDER") from None
    try:
        ok = manifest["format"] == MANIFEST_FORMAT and all(
            isinstance(s["name"], str) and int(s["num_samples"]) >= 0
            for split in manifest["splits"].values() for s in split["shards"])
    except (KeyError, TypeError, ValueError, AttributeError):
        ok = False
    if not ok:
        raise UserError(f"shard manifest {path_or_url} is not a {MANIFEST_FORMAT} manifest; rewrite it with "
                        f"scripts/make_shards.py --index SHARD_FOLDER")
    return manifest


def shard_name(url: str) -> str:
    """The file name a URL points at (the last `*.tar` word of a `pipe:` command)."""
    if url.startswith("pipe:"):
        words = [w for w in url.split() if w.endswith(".tar") or ".tar" in w]
        url = words[-1] if words else url
    return url.rstrip("/").rsplit("/", 1)[-1].split("?")[0]


def sample_counts(urls: list[str], manifest: dict, source: str) -> list[int]:
    """Each URL's sample count from `manifest`, matched by file name; UserError naming the first unknown shard."""
    counts = {s["name"]: int(s["num_samples"]) for split in manifest["splits"].values() for s in split["shards"]}
    out = []
    for url in urls:
        name = shard_name(url)
        if name not in counts:
            raise UserError(f"shard {url} is not listed in the manifest {source}; re-index the shards with "
                            f"scripts/make_shards.py --index SHARD_FOLDER")
        out.append(counts[name])
    return out
