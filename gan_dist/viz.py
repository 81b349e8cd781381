"""Pictures of samples for W&B, the run directory and the model card: image grids and 2-D scatter plots, as uint8
HxWxC arrays; and a run's fixed-noise grid, the one picture its training logs and its model card shows.

Drawn with numpy and PIL (no matplotlib, no torchvision).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw

from gan_dist.models import conditioned, eval_mode


def as_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8."""
    x = ((images.detach().float().cpu() + 1) * 127.5).clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def image_grid(images: torch.Tensor, pad: int = 2, cols: int | None = None) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> one (rows*H, cols*W, 3) uint8 grid (square unless `cols` is given)."""
    x = as_uint8(images)
    if x.shape[3] == 1:
        x = np.repeat(x, 3, axis=3)
    n, h, w, c = x.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), np.uint8)
    for i, im in enumerate(x):
        r, q = divmod(i, cols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = im
    return grid


def scatter_plot(points: torch.Tensor, centers: np.ndarray, size: int = 384) -> np.ndarray:
    """Generated 2-D points (blue) over the target's mode centres (red), on axes that hold both."""
    pts = points.detach().float().cpu().numpy()
    lim = max(float(np.abs(centers).max()) + 1.0, 1.5)
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)

    def px(xy: np.ndarray) -> np.ndarray:
        return (np.asarray(xy) / lim * 0.5 + 0.5) * (size - 1) * np.array([1, -1]) + np.array([0, size - 1])

    draw.line([tuple(px([-lim, 0])), tuple(px([lim, 0]))], fill=(210, 210, 210))
    draw.line([tuple(px([0, -lim])), tuple(px([0, lim]))], fill=(210, 210, 210))
    for x, y in px(pts[np.all(np.abs(pts) <= lim, axis=1)]):
        draw.rectangle((x - 1, y - 1, x + 1, y + 1), fill=(30, 90, 200))
    for x, y in px(centers):
        draw.ellipse((x - 4, y - 4, x + 4, y + 4), outline=(220, 30, 30), width=2)
    return np.asarray(image)


def fixed_noise(n: int, z_dim: int, seed: int) -> torch.Tensor:
    """The noise behind every sample grid of a run with `seed`: the same `n` latents at every step and on the card."""
    return torch.randn(n, z_dim, generator=torch.Generator().manual_seed(seed))


def fixed_labels(n: int, classes: int, device: torch.device | str | None = None) -> torch.Tensor | None:
    """The labels of `n` fixed-noise samples of a G with `classes` (None when unconditional): sample i is of class
    i % classes, so column k of a grid with a column per class is class k."""
    return torch.arange(n, device=device) % classes if classes else None


@torch.no_grad()
def fixed_noise_grid(G: torch.nn.Module, z: torch.Tensor, classes: int, centers: np.ndarray) -> np.ndarray:
    """G's samples (in eval mode) on the fixed noise `z` as a run's grids show them: a column per class when G has
    `classes`, a scatter plot over the mixture's mode `centers` for 2-D points."""
    with eval_mode(G):
        out = conditioned(G, z, fixed_labels(len(z), classes, z.device))
    if out.ndim == 2:
        return scatter_plot(out, centers)
    return image_grid(out, cols=min(classes, len(out)) if classes else None)
