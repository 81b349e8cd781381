"""The shard format gan-dist writes and reads: tar shards in the webdataset layout and their `manifest.json`.

A shard is a tar of members `KEY.EXT`, grouped into samples by KEY: `__key__` plus one member per extension (an
image as one of `IMAGE_EXTS` or as `npy`, a class index as `cls`, ...). `write_shard` is the one place shards
are written: fixed tar headers, so the same samples always give the same bytes and checksums, and a shard's size
is known before it is written (`member_bytes`, `tar_bytes`).

A shard folder's `manifest.json` (format `gan-dist-shards/1`, `MANIFEST_FORMAT`) names the dataset and its image
size and classes, and lists every split's shards with each one's name (relative to the manifest), sample count and
sha256; the trainer needs the counts to split exact epochs. Here manifests are built (`build_manifest`,
`shard_entry`), written atomically (`write_manifest`), read and validated: `read_manifest` checks a shard folder
that is a cache of ours (None when it has no manifest), `read_manifest_file` reads one from a local file or any URL
`shards.open_shard` takes, and `manifest_counts` gives shard URLs their sample counts from manifests.

Beside each plain tar shard it writes, `write_shard` leaves an offset index, `NAME.tar.idx` (format
`gan-dist-index/1`, `INDEX_FORMAT`): the shard's size and every member's name, data offset and size, so a reader
takes members straight from the file instead of parsing tar headers (`shards.read_indexed`). `read_index` checks an
index against its shard before it is used: the shard's size, and the header of its first member.

webdataset is imported only inside `write_shard`, because importing it pulls in torch, which tools that only read
or check data don't need.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterable
from pathlib import Path

from gan_dist.errors import UserError
from gan_dist.files import sha256_file, write_atomic
from gan_dist.shards import ShardError, is_remote, location, open_shard

MANIFEST_FORMAT = "gan-dist-shards/1"
INDEX_FORMAT = "gan-dist-index/1"
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")


def write_shard(path: str | Path, samples: Iterable[dict]) -> tuple[int, str]:
    """Write `samples` (dicts of `__key__` and one bytes member per extension) as the tar shard `path`; returns the
    number of samples written and the shard's sha256."""
    import webdataset  # noqa: PLC0415 - see the module docstring

    count = 0
    with open(path, "wb") as f:
        # Fixed mtime (and the fixed default owner/mode) so the same input gives the same tar bytes.
        with webdataset.TarWriter(f, encoder=False, compress=False, mtime=0) as writer:
            # Plain ustar headers: a third faster than pax and the names need nothing more.
            # (TarWriter's own `format` argument is not passed on to tarfile in webdataset 1.0.)
            writer.tarstream.format = tarfile.USTAR_FORMAT
            for sample in samples:
                writer.write(sample)
                count += 1
    write_index(Path(path))
    return count, sha256_file(Path(path))


def index_file(shard: str | Path) -> Path:
    """Where the offset index of a local shard lives: beside it, `NAME.tar.idx`."""
    shard = Path(shard)
    return shard.with_name(shard.name + ".idx")


def write_index(shard: Path) -> None:
    """Write the offset index of the plain (uncompressed) tar `shard`: one pass over its headers. A compressed shard
    has no offsets to read at, and gets none."""
    try:
        with tarfile.open(shard, "r:") as tar:
            members = [[m.name, m.offset_data, m.size] for m in tar if m.isreg()]
    except tarfile.ReadError:
        return
    index = {"format": INDEX_FORMAT, "size": shard.stat().st_size, "members": members}
    write_atomic(index_file(shard), json.dumps(index, separators=(",", ":")).encode())


def read_index(shard: str | Path) -> list[list] | None:
    """The members [name, data offset, size] of the local `shard` as its index lists them, or None when it has no
    index. ShardError when the index is malformed or does not match the shard: its size differs, or the header
    before the first member's data names another member (the shard was rewritten after it was indexed)."""
    shard, path = Path(shard), index_file(shard)
    if not path.is_file():
        return None
    rebuild = f"delete {path.name} (the shard is then streamed), or rebuild it with scripts/make_shards.py --index " \
              f"{shard.parent}"
    try:
        index = json.loads(path.read_bytes())
        size, members = index["size"], index["members"]
        ok = index["format"] == INDEX_FORMAT and isinstance(size, int) and all(
            isinstance(name, str) and type(at) is int and type(n) is int and tarfile.BLOCKSIZE <= at and 0 <= n and
            at + n <= size for name, at, n in members)
    except (OSError, ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise ShardError(str(shard), f"its index {path.name} is unreadable or malformed; {rebuild}")
    if shard.stat().st_size != size:
        raise ShardError(str(shard), f"has {shard.stat().st_size} bytes but its index {path.name} says {size}: the "
                                     f"shard changed after it was indexed; {rebuild}")
    if members:
        name, at, n = members[0]
        with open(shard, "rb") as f:
            f.seek(at - tarfile.BLOCKSIZE)
            block = f.read(tarfile.BLOCKSIZE)
        try:
            header = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
            # A name too long for the header block is in a pax header before it; the size still is here.
            same = header.size == n and (header.name == name or len(name.encode()) > 100)
        except tarfile.TarError:
            same = False
        if not same:
            raise ShardError(str(shard), f"its first member is not {name} of {n} bytes, as its index {path.name} "
                                         f"says: the shard changed after it was indexed; {rebuild}")
    return members


def member_bytes(size: int) -> int:
    """The bytes a member of `size` bytes takes in a `write_shard` tar: a ustar header block, data padded to blocks."""
    return tarfile.BLOCKSIZE + -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def tar_bytes(members: int) -> int:
    """The file size of a tar whose members take `members` bytes: two end blocks, padded to a whole record."""
    return -(-(members + 2 * tarfile.BLOCKSIZE) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def shard_entry(name: str, num_samples: int, sha256: str) -> dict:
    """A manifest's entry for one shard."""
    return {"name": name, "num_samples": num_samples, "sha256": sha256}


def build_manifest(dataset: str, image: dict, splits: dict[str, list[dict]], num_classes: int,
                   classes: list[str] | None = None) -> dict:
    """The manifest of `splits` ({split: [shard_entry, ...]}); `image` is {height, width, channels, ...}."""
    manifest = {"format": MANIFEST_FORMAT, "dataset": dataset, "image": image}
    if classes is not None:
        manifest["classes"] = classes
    manifest["num_classes"] = num_classes
    manifest["splits"] = {name: {"num_samples": sum(s["num_samples"] for s in shards), "shards": shards}
                          for name, shards in splits.items()}
    return manifest


def write_manifest(folder: Path, manifest: dict) -> None:
    """Write `folder/manifest.json` atomically: a reader finds the old manifest or the new one, never a part."""
    write_atomic(folder / "manifest.json", (json.dumps(manifest, indent=2) + "\n").encode())


def read_manifest(out: str | Path) -> dict | None:
    """The manifest of the shard folder `out`, or None if it has none; UserError if it is broken."""
    out = Path(out)
    path = out / "manifest.json"
    if not path.is_file():
        return None
    fix = f"delete {out} so it is rebuilt"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"shard folder {out} has an unreadable manifest.json ({e}); {fix}") from None
    try:
        if manifest["format"] != MANIFEST_FORMAT:
            raise UserError(
                f"shard folder {out} has manifest format {manifest['format']!r}, expected {MANIFEST_FORMAT!r}; {fix}"
            )
        names = [shard["name"] for split in manifest["splits"].values() for shard in split["shards"]]
    except (KeyError, TypeError, AttributeError):
        raise UserError(f"shard folder {out} has a malformed manifest.json; {fix}") from None

    missing = []
    for name in names:
        # A name with a path in it would point outside the folder.
        if not isinstance(name, str) or Path(name).name != name:
            raise UserError(f"shard folder {out} has a malformed manifest.json (shard name {name!r}); {fix}")
        shard = out / name
        if not shard.is_file() or shard.stat().st_size == 0:
            missing.append(name)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise UserError(
            f"shard folder {out} is incomplete: {', '.join(missing[:3])}{more} missing or empty; {fix}"
        )
    return manifest


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


def manifest_counts(urls: list[str], manifests: list[str]) -> list[int]:
    """Each URL's sample count from the `manifests`, whose shard names are taken relative to where each manifest
    lives; UserError naming the first shard that none of them lists."""
    known: dict[str, int] = {}
    for path in manifests:
        manifest = read_manifest_file(path)
        base = location(path)
        for split in manifest["splits"].values():
            for shard in split["shards"]:
                entry = base.rsplit("/", 1)[0] + "/" + shard["name"]
                known[entry if "://" in entry else str(Path(entry).resolve())] = int(shard["num_samples"])
    counts = [known.get(location(url)) for url in urls]
    if None in counts:
        url = urls[counts.index(None)]
        raise UserError(f"shard {url} is not listed in the manifest {' or '.join(manifests)} (manifests list shards "
                        "by their path beside the manifest); re-index the shards with scripts/make_shards.py "
                        "--index SHARD_FOLDER")
    return counts
