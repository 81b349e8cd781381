"""Train a GAN: `accelerate launch train.py [--config configs/X.yaml] [key=value ...]` (or plain `python train.py`);
overrides may also be `--key=value` or `--key value` (as `wandb agent` passes them), before or after --config.

See README.md for the config keys and the run-directory layout.
"""

import os
import sys

from gan_dist.config import load_config
from gan_dist.console import observe_console
from gan_dist.errors import UserError


def main() -> int:
    observe_console()  # the console only observes: a closed pipe or a full disk under it never ends training
    try:
        cfg = load_config(sys.argv[1:])
        from gan_dist.loop import train  # imported late so that config errors come back without loading torch

        if train(cfg):
            # W&B's finish hung (see wandb.finish_timeout_s); its exit hooks would hang the same way.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
    except UserError as err:
        if not err.quiet:
            print(f"error: {err}", file=sys.stderr)
        return err.code
    return 0


if __name__ == "__main__":
    sys.exit(main())
