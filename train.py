"""Train a GAN: `accelerate launch train.py [--config configs/X.yaml] [key=value ...]` (or plain `python train.py`).

See README.md for the config keys and the run-directory layout.
"""

import sys

from gan_dist.config import load_config
from gan_dist.errors import UserError


def main() -> int:
    try:
        cfg = load_config(sys.argv[1:])
        from gan_dist.loop import train  # imported late so that config errors come back without loading torch

        train(cfg)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.code
    return 0


if __name__ == "__main__":
    sys.exit(main())
