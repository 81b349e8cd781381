"""Durable file operations for run directories: fsynced atomic writes, digests, and folders swapped in one step.

A kill, a node crash or a full disk at any moment leaves either the old or the new content under a name, never a
mix: files are written under a temporary name, fsynced, renamed, and their directory fsynced. `final/` and `best/`
are symlinks to versioned folders (`.final.<token>`), so replacing one is a single `rename` of a new symlink over
the old one: a reader (or a run killed in between) always finds a complete folder. `write_failure` says in words why
a write failed, also where a library hides the OS's reason. Pure Python, no torch.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import shutil
from pathlib import Path


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make the names in `path` (new files, renames) durable; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some network filesystems refuse fsync on a directory; their renames are synchronous anyway
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data`: a reader sees the old bytes or the new ones, never a part."""
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def versioned_dir(link: Path) -> Path:
    """A new, empty folder beside `link` to fill and then publish with `publish_dir`."""
    folder = link.with_name(f".{link.name}.{secrets.token_hex(4)}")
    folder.mkdir(parents=True)
    return folder


def publish_dir(folder: Path, link: Path) -> None:
    """Point `link` at the filled `folder` (fsynced first) in one rename, then delete the versions it replaced."""
    for p in folder.iterdir():
        fsync_file(p)
    fsync_dir(folder)
    tmp_link = link.with_name(f".{link.name}.link-{secrets.token_hex(4)}")
    os.symlink(folder.name, tmp_link)
    if link.is_dir() and not link.is_symlink():
        # A plain folder from an older gan-dist: moved aside first (renaming over a folder is not possible).
        os.replace(link, link.with_name(f".{link.name}.{secrets.token_hex(4)}"))
    os.replace(tmp_link, link)
    fsync_dir(link.parent)
    for old in link.parent.glob(f".{link.name}.*"):
        if old.name != folder.name:
            if old.is_symlink() or old.is_file():
                old.unlink(missing_ok=True)
            else:
                shutil.rmtree(old, ignore_errors=True)


def write_failure(err: BaseException, path: Path) -> str:
    """Why a write under `path` failed: the OS's reason (No space left on device, Read-only file system, Disk quota
    exceeded, ...). torch's writer reports a full disk as 'unexpected pos' or 'file write failed', so without an
    OSError the filesystem is asked: full, or read-only; else the library's own first line."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        fs = os.statvfs(folder)
        if fs.f_flag & os.ST_RDONLY:
            return os.strerror(errno.EROFS)
        if fs.f_bavail * fs.f_frsize < 1 << 20:
            return os.strerror(errno.ENOSPC)
    except OSError:
        pass
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
