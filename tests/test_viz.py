"""Tests for gan_dist.viz: the image grid of samples and the 2-D scatter plot, both uint8 RGB arrays.

Covers: grid size (ceil(sqrt(N)) columns, `pad` pixels around and between tiles); pixel values mapped from [-1, 1]
to [0, 255] (clamped, never wrapping) at the right grid location; grayscale repeated over RGB; the scatter plot
drawing red rings at the mode centres and blue dots at the points, with y pointing up; a run's fixed-noise grid,
the same noise for every grid of a seed and a column per class of a conditional G, drawn in eval mode.

Run from the repo root:

    . .venv/bin/activate && python -m pytest tests/test_viz.py -q
"""

from __future__ import annotations

import math

import numpy as np
import torch

from gan_dist.viz import fixed_noise, fixed_noise_grid, image_grid, scatter_plot


def tile_origin(i: int, cols: int, h: int, w: int, pad: int = 2) -> tuple[int, int]:
    r, q = divmod(i, cols)
    return pad + r * (h + pad), pad + q * (w + pad)


def test_grid_of_16_images_is_a_padded_4x4_square():
    grid = image_grid(torch.zeros(16, 1, 8, 8))
    side = 4 * (8 + 2) + 2
    assert grid.shape == (side, side, 3) and grid.dtype == np.uint8


def test_grid_places_pixels_and_maps_minus_one_to_0_and_plus_one_to_255():
    images = torch.zeros(16, 1, 8, 8)  # mid grey
    images[5, 0, 3, 4] = 1.0  # tile 5 is row 1, column 1
    images[10, 0, 7, 0] = -1.0  # tile 10 is row 2, column 2
    grid = image_grid(images)
    y, x = tile_origin(5, 4, 8, 8)
    assert (y, x) == (12, 12)
    assert grid[y + 3, x + 4].tolist() == [255, 255, 255]
    y, x = tile_origin(10, 4, 8, 8)
    assert grid[y + 7, x + 0].tolist() == [0, 0, 0]
    # exactly one white pixel in the whole grid; the -1 pixel is the only black one inside the tiles
    assert (grid == 255).all(axis=2).sum() == 1
    tiles = np.zeros(grid.shape[:2], bool)
    for i in range(16):
        ty, tx = tile_origin(i, 4, 8, 8)
        tiles[ty:ty + 8, tx:tx + 8] = True
    assert tiles.sum() == 16 * 64
    inside = grid[tiles]
    assert ((inside == 0).all(axis=1)).sum() == 1
    assert np.isin(inside, [0, 127, 128, 255]).all()  # the rest is 0.0 -> 127.5, rounded either way
    # padding between tiles is uniform and not image content
    assert len(np.unique(grid[~tiles])) == 1


def test_grid_values_are_linear_in_between():
    values = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0])
    images = values.view(5, 1, 1, 1).expand(5, 1, 3, 3).clone()
    grid = image_grid(images, pad=1)  # 3 columns, 2 rows of 3x3 tiles
    assert grid.shape == (2 * 4 + 1, 3 * 4 + 1, 3)
    got = [int(grid[tile_origin(i, 3, 3, 3, pad=1)][0]) for i in range(5)]
    expected = [(v + 1) * 127.5 for v in values.tolist()]
    assert all(abs(g - e) <= 1 for g, e in zip(got, expected)), (got, expected)


def test_out_of_range_values_clamp_instead_of_wrapping():
    images = torch.tensor([-3.0, 1.5, 2.0, -1.2]).view(4, 1, 1, 1)
    grid = image_grid(images, pad=0)
    assert grid[:, :, 0].tolist() == [[0, 255], [255, 0]]


def test_grayscale_is_repeated_over_rgb_and_colour_kept():
    gray = image_grid(torch.rand(4, 1, 5, 5) * 2 - 1)
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    rgb = torch.full((1, 3, 2, 2), -1.0)
    rgb[:, 0] = 1.0  # pure red
    grid = image_grid(rgb, pad=0)
    assert grid.shape == (2, 2, 3) and (grid.reshape(-1, 3) == [255, 0, 0]).all()


# ----------------------------------------------------------------------------------------------------------------
# scatter_plot

SIZE = 384


def to_pixel(xy, lim: float) -> tuple[int, int]:
    """(row, column) of a data point on axes spanning [-lim, lim], y up."""
    x, y = xy
    col = (x / lim * 0.5 + 0.5) * (SIZE - 1)
    row = (0.5 - y / lim * 0.5) * (SIZE - 1)
    return int(round(row)), int(round(col))


def window(img: np.ndarray, rc: tuple[int, int], r: int) -> np.ndarray:
    row, col = rc
    return img[max(row - r, 0): row + r + 1, max(col - r, 0): col + r + 1].reshape(-1, 3).astype(int)


def reddish(px: np.ndarray) -> np.ndarray:
    return (px[:, 0] > 150) & (px[:, 1] < 100) & (px[:, 2] < 100)


def blueish(px: np.ndarray) -> np.ndarray:
    return (px[:, 2] > 150) & (px[:, 0] < 100) & (px[:, 2] > px[:, 1] + 50)


def test_scatter_marks_centres_red_and_points_blue():
    angles = 2 * math.pi * np.arange(8) / 8
    centers = 2.0 * np.stack([np.cos(angles), np.sin(angles)], 1)
    lim = 2.0 + 1.0  # the axes hold the centres with a margin of 1
    points = torch.tensor([[0.5, 1.2], [-1.0, -0.3], [2.6, -2.6]])
    img = scatter_plot(points, centers, size=SIZE)
    assert img.shape == (SIZE, SIZE, 3) and img.dtype == np.uint8

    for c in centers:
        assert reddish(window(img, to_pixel(c, lim), 6)).any(), f"no red ring at centre {c}"
    for p in points.tolist():
        assert blueish(window(img, to_pixel(p, lim), 2)).any(), f"no blue dot at point {p}"
    # far from every point and centre the background is white
    empty = window(img, to_pixel((-2.5, 2.5), lim), 4)
    assert not reddish(empty).any() and not blueish(empty).any()
    assert (empty >= 200).all()


def test_scatter_y_axis_points_up_and_x_axis_right():
    centers = np.zeros((1, 2))
    top_right = scatter_plot(torch.tensor([[1.0, 1.0]]), centers, size=SIZE)
    blue = np.argwhere(blueish(top_right.reshape(-1, 3).astype(int)).reshape(SIZE, SIZE))
    assert len(blue) > 0
    rows, cols = blue[:, 0], blue[:, 1]
    assert rows.max() < SIZE // 2, "positive y is drawn in the upper half"
    assert cols.min() > SIZE // 2, "positive x is drawn in the right half"


def test_scatter_axes_hold_far_modes():
    centers = np.array([[-4.0, -4.0], [4.0, 4.0]])  # grid25's corners
    img = scatter_plot(torch.tensor([[4.0, 4.0]]), centers, size=SIZE)
    lim = 4.0 + 1.0
    assert reddish(window(img, to_pixel((4.0, 4.0), lim), 6)).any()
    assert reddish(window(img, to_pixel((-4.0, -4.0), lim), 6)).any()
    assert blueish(window(img, to_pixel((4.0, 4.0), lim), 2)).any()


# ----------------------------------------------------------------------------------------------------------------
# fixed_noise_grid


class LabelPainter(torch.nn.Module):
    """A conditional G whose 1x1 image is its label's grey (class k of 10 at k / 10), and black in train mode."""

    def forward(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        value = c.float() / 10 if not self.training else torch.full((len(z),), -1.0)
        return value.view(-1, 1, 1, 1)


def test_the_fixed_noise_is_the_seeds_own():
    assert torch.equal(fixed_noise(6, 3, seed=1), fixed_noise(6, 3, seed=1))
    assert not torch.equal(fixed_noise(6, 3, seed=1), fixed_noise(6, 3, seed=2))


def test_a_conditional_grid_has_a_column_per_class_drawn_in_eval_mode():
    G = LabelPainter().train()
    grid = fixed_noise_grid(G, fixed_noise(12, 4, seed=0), classes=5, centers=np.zeros((1, 2)))
    assert G.training, "G's mode is restored"
    assert grid.shape == (3 * 3 + 2, 5 * 3 + 2, 3), "12 samples of 5 classes: 5 columns, 3 rows"
    for i in range(12):
        y, x = tile_origin(i, 5, 1, 1, pad=2)
        assert abs(int(grid[y, x, 0]) - (i % 5 / 10 + 1) * 127.5) <= 1, f"sample {i} is of class {i % 5}"
