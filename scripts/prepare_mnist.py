"""Convert MNIST to the webdataset tar shards that gan-dist trains from.

Usage (from the repo root, no install needed):

    python scripts/prepare_mnist.py --src ../shared/data/mnist --out data/mnist-shards
    python scripts/prepare_mnist.py --out data/mnist-shards              # downloads into data/mnist-raw first
    python scripts/prepare_mnist.py --src DIR --out DIR --shard-size 500

--src is a folder with the four MNIST files (train-images-idx3-ubyte, train-labels-idx1-ubyte,
t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, each gzipped or raw). Without --src the files are
downloaded into a folder `mnist-raw` next to --out (files already there are reused).
--out must not exist yet, or be empty; it receives train-NNNNN.tar, test-NNNNN.tar and manifest.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gan_dist.errors import UserError
from gan_dist.mnist import download_mnist
from gan_dist.mnist_shards import SHARD_SIZE, write_shards


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Convert MNIST to webdataset tar shards for gan-dist.")
    parser.add_argument("--src", type=Path, help="folder with the four MNIST files (default: download them)")
    parser.add_argument("--out", type=Path, required=True, help="output folder for the shards and manifest.json")
    parser.add_argument("--shard-size", type=int, default=SHARD_SIZE,
                        help=f"samples per shard (default: {SHARD_SIZE})")
    args = parser.parse_args(argv)

    try:
        src = args.src if args.src is not None else download_mnist(args.out.parent / "mnist-raw")
        manifest = write_shards(src, args.out, args.shard_size, progress=sys.stderr.isatty())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code

    splits = ", ".join(
        f"{name} {split['num_samples']} samples in {len(split['shards'])} shards"
        for name, split in manifest["splits"].items()
    )
    print(f"wrote MNIST {splits} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
