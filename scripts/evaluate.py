"""Every metric for one checkpoint of a run, printed as a table beside the real-data floors and written as JSON.

    python scripts/evaluate.py --run RUN [--checkpoint final|best|STEP] [--num N] [--out FILE.json] [--no-ema]
                               [--truncation PSI] [--inception PATH] [--shards SPEC]
                               [--sampler plain|drs [--drs-percentile P]]
    accelerate launch --multi_gpu --num_processes 2 scripts/evaluate.py --run RUN    # same result, split

A run directory may come from someone else, so nothing in it that could run code is used unless given here: the
Inception network for FID (TorchScript is code) only with `--inception`, and `pipe:` shard commands only with
`--shards` (the run's `eval.inception` and `pipe:` shards in its config.yaml are not used).

Each process generates its share of the N samples (the same noise per sample index whatever the process count);
the shares are gathered in index order, so 1 and 2 processes give the same metrics up to float rounding. The JSON
holds flat keys (`fcd`, `kid`, `is`, `class_kl`, `precision`, `recall`, ... or `modes`, `hq`, `reverse_kl` for 2-D
data) and each floor as `<name>_real`. MNIST metrics use the classifier of the run's `eval.classifier`; a
conditional run is also scored per class (`class_acc`, `fcd_class<k>`). `--sampler drs` scores the samples that
discriminator rejection sampling keeps (`gan_dist/drs.py`; `"sampler": "drs"` in the JSON): a row of its own, never
the training-time numbers; so do `--truncation PSI`'s (`"truncation"` in the JSON; null without).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from gan_dist.drs import add_sampler_args, make_sampler
from gan_dist.errors import UserError
from gan_dist.evaluation import Evaluator
from gan_dist.export import load_generator, review_source
from gan_dist.distributed import local_main_first
from gan_dist.models import label_count
from gan_dist.shards import expand_urls


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="the run.dir of a training run (or its export or checkpoint)")
    parser.add_argument("--checkpoint", default="final", help="final, best, or a step with a checkpoint")
    parser.add_argument("--num", type=int, help="generated samples (default: the run's eval.num_samples)")
    parser.add_argument("--out", type=Path, help="write the metrics here as JSON")
    parser.add_argument("--no-ema", action="store_true", help="evaluate the raw G instead of G_ema")
    parser.add_argument("--inception", default="", help="StyleGAN's TorchScript inception-2015-12-05.pt, for FID "
                        "on RGB data (loading TorchScript runs its code: only give a file you trust)")
    parser.add_argument("--shards", help="the real images for FID (data.shards syntax), instead of the run's; "
                        "needed to run the run's pipe: commands")
    parser.add_argument("--truncation", type=float, metavar="PSI", help="draw z from the normal truncated at PSI "
                        "standard deviations (redrawn, not clipped), to measure fidelity against variety")
    add_sampler_args(parser)
    args = parser.parse_args()
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    try:
        source, cfg = review_source(args.run, args.checkpoint)
        if cfg is None:
            raise UserError(f"{args.run} is no run directory, nor an export or checkpoint in one; evaluate.py scores "
                            "against a run's data and classifier: pass the run.dir of a training run")
        G = load_generator(source, ema=not args.no_ema)
        eval_cfg = dataclasses.replace(cfg.eval, every=1, num_samples=args.num or cfg.eval.num_samples,
                                       inception=args.inception)
        data_cfg = dataclasses.replace(cfg.data, shards=args.shards) if args.shards else cfg.data
        if eval_cfg.num_samples < 2:
            raise UserError("--num must be at least 2")
        if not args.shards and eval_cfg.inception and any(u.startswith("pipe:") for u in expand_urls(data_cfg.shards)):
            raise UserError(f"the run's data.shards has pipe: commands, which this script runs only when you give "
                            f"them: pass --shards '{data_cfg.shards}' if you trust them")
        # Each node's main process trains the classifier if it is missing; the others then load it.
        classes = label_count(cfg.model)
        evaluator = local_main_first(accelerator, lambda: Evaluator(eval_cfg, data_cfg, cfg.model.z_dim, cfg.seed,
                                                                    classes, args.truncation, cfg.model.self_cond))
        if not evaluator.active:
            raise UserError(f"nothing to evaluate for data.dataset={cfg.data.dataset} without --inception")
        G = G.to(accelerator.device)
        if args.sampler == "drs":  # every rank calibrates the same copy of D from the same seed
            G = make_sampler(args, G, dataclasses.replace(cfg, data=data_cfg), accelerator.device,
                             say=accelerator.print)
    except UserError as err:
        if not err.quiet:
            print(f"error: {err}", file=sys.stderr)
        return 2
    scores = evaluator(G, accelerator.process_index, accelerator.num_processes,
                       accelerator.gather, accelerator.device)
    if accelerator.is_main_process:
        print(f"{args.run}, checkpoint {args.checkpoint}, {'G' if args.no_ema else 'G_ema'}, "
              f"{eval_cfg.num_samples} samples on {accelerator.num_processes} process(es), sampler {args.sampler}"
              f"{'' if args.truncation is None else f', truncation {args.truncation:g}'}")
        print(f"{'metric':<12}{'value':>12}{'real data':>12}")
        for name, value in scores.items():
            if not name.endswith("_real"):
                floor = scores.get(f"{name}_real")
                print(f"{name:<12}{value:>12.5g}{'' if floor is None else format(floor, '>12.5g')}")
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(scores | {"checkpoint": args.checkpoint, "sampler": args.sampler,
                                                     "num_samples": eval_cfg.num_samples,
                                                     "truncation": args.truncation}, indent=1) + "\n")
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
