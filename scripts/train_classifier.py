"""Train the MNIST classifier that the image metrics (FCD, KID, precision/recall) use as their feature network.

Usage (from the repo root, no install needed):

    python scripts/train_classifier.py --mnist-dir ../shared/data/mnist
    python scripts/train_classifier.py --mnist-dir DIR --out data/classifier/mnist_cnn.safetensors --epochs 2 --seed 0

--mnist-dir is a folder with the four MNIST files (each gzipped or raw). The result is written to --out only if its
test accuracy reaches 99% (--force writes it anyway). Training runs once; an evaluation otherwise trains it on
first use. Metrics are only comparable between runs that used the same classifier file.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from gan_dist.classifier import DEFAULT_PATH, EPOCHS, MIN_ACCURACY, save_classifier, train_classifier
from gan_dist.errors import UserError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train the MNIST feature network for gan-dist's evaluation metrics.")
    parser.add_argument("--mnist-dir", type=Path, default=Path("data/mnist"),
                        help="folder with the four MNIST files (default: data/mnist)")
    parser.add_argument("--out", type=Path, default=Path(DEFAULT_PATH),
                        help=f"output safetensors file (default: {DEFAULT_PATH})")
    parser.add_argument("--epochs", type=int, default=EPOCHS, help=f"training epochs (default: {EPOCHS})")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--force", action="store_true",
                        help=f"write the model even if its test accuracy is below {MIN_ACCURACY:.2f}")
    args = parser.parse_args(argv)

    try:
        if args.epochs < 1:
            raise UserError(f"--epochs must be at least 1, got {args.epochs}")
        if args.out.is_dir():
            raise UserError(f"--out {args.out} is a folder; give the path of a .safetensors file")
        start = time.perf_counter()
        model, accuracy = train_classifier(args.mnist_dir, epochs=args.epochs, seed=args.seed,
                                           progress=sys.stderr.isatty())
        elapsed = time.perf_counter() - start
        print(f"test accuracy {accuracy:.4f} after {args.epochs} epochs ({elapsed:.0f} s)")
        if accuracy < MIN_ACCURACY and not args.force:
            print(f"error: test accuracy {accuracy:.4f} is below {MIN_ACCURACY:.2f}, so {args.out} was not written; "
                  f"train longer with --epochs, or pass --force to write it anyway", file=sys.stderr)
            return 1
        save_classifier(model, accuracy, args.out)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2  # 1 is taken by "trained, but not accurate enough"
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
