"""Draw samples from a trained run: a grid, a folder of PNGs, an .npz array, or a latent interpolation strip.

    python scripts/sample.py --run RUN [--checkpoint final|best|STEP] --num N --out PATH [--seed S] [--interpolate]
                             [--class K] [--truncation PSI]
                             [--sampler plain|drs [--drs-percentile P] [--calib-steps N]]

RUN is a run directory (with --checkpoint), or anything `gan_dist.load_generator` takes: an export or step
checkpoint folder, a save_pretrained folder, a Hub repo id.

- `--out grid.png`: one grid of N samples (a scatter plot with the mode centres for 2-D data);
- `--out DIR` (no suffix): N PNG files, `DIR/000000.png` ...;
- `--out samples.npz`: array `samples`, images as uint8 N x H x W x C, 2-D points as float32 N x 2; for a
  conditional run also `labels` (int64 N), the class each sample was drawn for;
- `--interpolate --out strip.png`: N rows of 10 images along spherical paths between random latents.
Samples come from G_ema unless `--no-ema`. The same --seed gives the same samples. `--truncation PSI` draws z from
the normal truncated at PSI standard deviations (the truncation trick: fewer odd samples, less variety). A
conditional run's labels are drawn at the training data's class frequencies (a grid: column k is class k), or all
`--class K`.
`--sampler drs` keeps samples by discriminator rejection sampling (Azadi et al. 2019; `gan_dist/drs.py`): the run's
D is calibrated on its real data against G first, so this reads the training data.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from gan_dist.drs import add_sampler_args, make_sampler
from gan_dist.errors import UserError
from gan_dist.export import load_generator, review_source
from gan_dist.models import label_count
from gan_dist.points import mixture_centers
from gan_dist.viz import as_uint8, fixed_labels, image_grid, scatter_plot

STRIP = 10  # images per interpolation row


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation, the path that keeps Gaussian latents at their typical norm."""
    omega = torch.arccos((a / a.norm() * b / b.norm()).sum().clamp(-1, 1))
    return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)


@torch.no_grad()
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a training run's run.dir, or anything gan_dist.load_generator "
                        "takes: an export or step checkpoint folder, a save_pretrained folder, a Hub repo id")
    parser.add_argument("--checkpoint", default="final", help="of a run.dir: final, best, or a step with a checkpoint")
    parser.add_argument("--num", type=int, required=True, help="samples (rows with --interpolate)")
    parser.add_argument("--out", type=Path, required=True, help=".png grid, .npz array, or a folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--interpolate", action="store_true", help="latent interpolation strip (.png)")
    parser.add_argument("--no-ema", action="store_true", help="sample the raw G instead of G_ema")
    parser.add_argument("--class", dest="label", type=int, help="a conditional run: draw class K only (a "
                        "self-conditioned run: cluster K; by default its clusters are drawn as their sizes)")
    parser.add_argument("--truncation", type=float, metavar="PSI", help="draw z from the normal truncated at PSI "
                        "standard deviations (redrawn, not clipped): lower is more faithful and less varied")
    add_sampler_args(parser)
    args = parser.parse_args()
    try:
        if args.num < 1:
            raise UserError("--num must be at least 1")
        source, cfg = review_source(args.run, args.checkpoint)
        G = load_generator(source, ema=not args.no_ema)
        classes = label_count(G.cfg)
        if args.label is not None and not 0 <= args.label < classes:
            raise UserError(f"--class {args.label}: {args.run} is not class-conditional (model.cond=false)"
                            if not classes else f"--class {args.label} is not a class of {args.run} (0 to "
                            f"{classes - 1})")
        rng = torch.Generator().manual_seed(args.seed)
        if args.interpolate:
            if args.out.suffix != ".png":
                raise UserError("--interpolate writes a .png strip; give --out NAME.png")
            ends = G.latents(2 * args.num, args.truncation, rng).view(args.num, 2, -1)
            t = torch.linspace(0, 1, STRIP)[:, None]
            z = torch.cat([slerp(a, b, t) for a, b in ends])
        else:
            z = G.latents(args.num, args.truncation, rng)
        grid = args.out.suffix == ".png" and not args.interpolate
        c = labels(G, len(z), classes, args.label, grid and not G.cfg.self_cond, rng)
        if args.interpolate and c is not None:  # one class along each strip
            c = c[::STRIP].repeat_interleave(STRIP) if args.label is None else c
        if cfg is None and args.sampler == "drs":
            raise UserError(f"--sampler drs calibrates the run's D on its data: pass a run directory, not {args.run}")
        sampler = make_sampler(args, G, cfg, torch.device('cpu')) if args.sampler == "drs" else G
        out = sampler(z) if c is None else sampler(z, c)
        points = out.ndim == 2
        args.out.parent.mkdir(parents=True, exist_ok=True)
        if args.out.suffix == ".npz":
            arrays = {"samples": out.numpy().astype(np.float32) if points else as_uint8(out)}
            np.savez(args.out, **arrays, **({} if c is None else {"labels": c.numpy()}))
        elif args.out.suffix == ".png":
            if points:
                if cfg is None:
                    raise UserError(f"a plot of 2-D points needs the run's mode centres, which {args.run} lacks: "
                                    "pass a run directory, or --out NAME.npz")
                picture = scatter_plot(out, mixture_centers(cfg.data))
            else:
                cols = STRIP if args.interpolate else min(classes, len(out)) if grid and classes and \
                    args.label is None and not G.cfg.self_cond else None
                picture = image_grid(out, cols=cols)
            Image.fromarray(picture).save(args.out)
        elif args.out.suffix == "":
            if points:
                raise UserError("2-D samples are points, not images: give --out NAME.npz or NAME.png (a plot)")
            args.out.mkdir(exist_ok=True)
            for i, image in enumerate(as_uint8(out)):
                Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(args.out / f"{i:06d}.png")
        else:
            raise UserError(f"--out {args.out}: use a .png grid, an .npz array, or a folder (no suffix)")
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.code if err.code != 1 else 2
    print(f"wrote {args.out} ({len(out)} {'points' if points else 'images'} from {args.run}, {args.checkpoint}, "
          f"{'G' if args.no_ema else 'G_ema'}, seed {args.seed}"
          f"{'' if args.label is None else f', class {args.label}'}{', DRS' if args.sampler == 'drs' else ''}"
          f"{'' if args.truncation is None else f', truncation {args.truncation:g}'})")
    return 0


def labels(G: torch.nn.Module, n: int, classes: int, label: int | None, grid: bool,
           rng: torch.Generator) -> torch.Tensor | None:
    """A conditional run's labels: all `label`, class-ordered columns for a grid, else the data's frequencies (a
    self-conditioned run's clusters: drawn as their sizes, grid or not, so samples are unconditional)."""
    if not classes:
        return None
    if label is not None:
        return torch.full((n,), label, dtype=torch.int64)
    if grid:
        return fixed_labels(n, classes)
    return torch.multinomial(G.class_freqs(), n, replacement=True, generator=rng)


if __name__ == "__main__":
    sys.exit(main())
