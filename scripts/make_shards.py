"""Turn an image folder into webdataset tar shards plus manifest.json, or index shards written by another tool.

Usage (from the repo root):

    python scripts/make_shards.py --src photos --out data/photos-shards
    python scripts/make_shards.py --src photos --out data/photos-shards --max-size 100 --workers 16
    python scripts/make_shards.py --index data/laion-shards
    python scripts/make_shards.py --src photos --out data/photos-npy --format npy --resolution 64 --channels 3

--src holds .png/.jpg/.jpeg/.webp images, either directly (no classes) or in class sub-folders
(`photos/<class>/...`; classes are the sorted sub-folder names). The files are shuffled with --seed before they
are cut into shards, so every shard mixes the classes; the same input and seed always give byte-identical shards.
Each sample is the image file as it is, `cls` (class index, when there are classes) and `json` ({"path": source
path relative to --src}). Unreadable images are skipped with a warning. --out must be new or empty.

--format npy stores each image already decoded, resized and centre-cropped as training reads it at --resolution and
--channels: a uint8 (H, W, C) array (`npy` member), read back with numpy.load(allow_pickle=False). A loader worker
then copies bytes instead of decoding (scripts/benchmark_data.py measures both). Train on them with the same
data.resolution and data.channels.

--index writes manifest.json for the *.tar shards in a folder (usual webdataset layout: `__key__` plus
jpg/jpeg/png/webp and optional cls/json members), replacing any manifest already there.

Every plain tar shard either way gets an offset index beside it, `NAME.tar.idx`: each member's name, data offset and
size, so the loader reads members at their offsets instead of parsing tar headers. --index rebuilds them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gan_dist.errors import UserError
from gan_dist.writer import DEFAULT_MAX_COUNT, index_shards, make_shards


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write or index webdataset image shards for gan-dist.")
    parser.add_argument("--src", type=Path, help="image folder (images directly, or in class sub-folders)")
    parser.add_argument("--out", type=Path, help="new or empty output folder for the shards and manifest.json")
    parser.add_argument("--index", type=Path, metavar="DIR", help="write DIR/manifest.json and an offset index "
                        "beside each shard in DIR")
    parser.add_argument("--max-count", type=int, help=f"samples per shard (default {DEFAULT_MAX_COUNT} when "
                                                      f"--max-size is not given either)")
    parser.add_argument("--max-size", type=float, metavar="MB", help="MB (10^6 bytes) per shard, counting tar bytes")
    parser.add_argument("--workers", type=int, help="worker processes (default: min(8, CPU cores))")
    # None rather than the defaults, so that --index can tell they were given.
    parser.add_argument("--seed", type=int, help="shuffle seed (default 0)")
    parser.add_argument("--split", help="split name, shards are SPLIT-NNNNN.tar (default train)")
    parser.add_argument("--format", choices=("original", "npy"), default="original",
                        help="original: the image files as they are; npy: decoded uint8 arrays at --resolution")
    parser.add_argument("--resolution", type=int, help="npy: side of the square images (data.resolution)")
    parser.add_argument("--channels", type=int, choices=(1, 3), help="npy: 1 (grayscale) or 3 (RGB)")
    args = parser.parse_args(argv)
    npy = None
    if args.format == "npy":
        if args.resolution is None or args.channels is None or not 4 <= args.resolution <= 4096:
            parser.error("--format npy needs --resolution (4..4096) and --channels (1 or 3)")
        npy = (args.resolution, args.channels)
    elif args.resolution is not None or args.channels is not None:
        parser.error("--resolution and --channels go with --format npy")

    if args.index is not None:
        given = {"--src": args.src, "--out": args.out, "--max-count": args.max_count, "--max-size": args.max_size,
                 "--seed": args.seed, "--split": args.split}
        extra = [flag for flag, value in given.items() if value is not None]
        if extra or npy:
            parser.error(f"--index takes only --workers, not {', '.join(extra) or '--format'}")
    elif args.src is None or args.out is None:
        parser.error("give --src IMAGES --out DIR to write shards, or --index DIR to index existing ones")

    progress = sys.stderr.isatty()
    try:
        if args.index is not None:
            index_shards(args.index, args.workers, progress)
        else:
            make_shards(args.src, args.out, args.max_count, args.max_size, args.workers,
                        0 if args.seed is None else args.seed, "train" if args.split is None else args.split, progress,
                        npy)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
