"""Pictures of samples for W&B and the run directory: image grids and 2-D scatter plots, as uint8 HxWxC arrays.

Pure numpy and PIL (no matplotlib, no torchvision).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw


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
