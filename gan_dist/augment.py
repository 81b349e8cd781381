"""Augmentations of every image D sees, real and generated alike, differentiable so that G learns through them.

- DiffAugment (Zhao et al. 2020, `aug.kind=diffaug`): the paper's `color` (brightness, saturation, contrast),
  `translation` (up to 1/8 of the side, zero fill) and `cutout` (a square of half the side set to zero), applied to
  every sample of every batch, as its code does.
- ADA (Karras et al. 2020, `aug.kind=ada`): StyleGAN2-ADA's `bgc` pipeline (pixel blitting: x-flip, 90-degree
  rotations, integer translation; general geometric: isotropic scale, rotation, anisotropic scale, fractional
  translation; colour: brightness, contrast, luma flip, hue rotation, saturation), each transform applied to each
  sample with one probability p, at the paper's strengths. The geometric ones compose into one matrix per sample,
  executed by one bilinear `grid_sample` with reflection at the border (the paper oversamples 2x through wavelet
  filters, and computes its padding on the host; neither is done here). p follows the overfitting heuristic
  r_t = E[sign(D(real))] (`losses.overfitting`): every `aug.interval` steps it moves towards `aug.target` at a speed
  that lets it cross 0..1 in `aug.speed_kimg` thousand images. The heuristic's sums arrive already reduced over every
  process (the loop reduces them), so every rank holds the same p. p and the sums are buffers: the loop checkpoints
  them per rank.

Random draws come from the global RNG of the images' device, which each process seeds apart and every checkpoint
restores: a run and its resume draw the same augmentations. Nothing here waits for the device: p stays a tensor.
Pure torch; the loop passes in what it needs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gan_dist.config import AugConfig


def _in_format_of(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`out` laid out as `x` is: a channels_last batch (perf.channels_last) stays one for D's convolutions."""
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return out.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _uniform(n: int, like: torch.Tensor, *shape: int) -> torch.Tensor:
    return torch.rand(n, *shape, device=like.device, dtype=like.dtype)


def brightness(x: torch.Tensor) -> torch.Tensor:
    return x + (_uniform(len(x), x, 1, 1, 1) - 0.5)


def saturation(x: torch.Tensor) -> torch.Tensor:
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * (_uniform(len(x), x, 1, 1, 1) * 2) + mean


def contrast(x: torch.Tensor) -> torch.Tensor:
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_uniform(len(x), x, 1, 1, 1) + 0.5) + mean


def translation(x: torch.Tensor, ratio: float = 0.125) -> torch.Tensor:
    """Shift each image by whole pixels, up to `ratio` of its side each way; what enters is zero (DiffAugment)."""
    n, _, h, w = x.shape
    sy, sx = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy = torch.randint(-sy, sy + 1, (n, 1, 1), device=x.device)
    dx = torch.randint(-sx, sx + 1, (n, 1, 1), device=x.device)
    rows = (torch.arange(h, device=x.device)[None, :, None] + dy + 1).clamp(0, h + 1)
    cols = (torch.arange(w, device=x.device)[None, None, :] + dx + 1).clamp(0, w + 1)
    padded = F.pad(x, [1, 1, 1, 1])  # the clamped indices land on this zero border
    batch = torch.arange(n, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)


def cutout(x: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:
    """Zero a square of `ratio` of the side at a random centre of each image (it may reach past the border)."""
    n, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    cy = torch.randint(0, h + (1 - ch % 2), (n, 1, 1), device=x.device)
    cx = torch.randint(0, w + (1 - cw % 2), (n, 1, 1), device=x.device)
    rows = torch.arange(h, device=x.device)[None, :, None] - (cy - ch // 2)
    cols = torch.arange(w, device=x.device)[None, None, :] - (cx - cw // 2)
    inside = (rows >= 0) & (rows < ch) & (cols >= 0) & (cols < cw)
    return x * (~inside).unsqueeze(1).to(x.dtype)


DIFFAUG_FNS = {"color": (brightness, saturation, contrast), "translation": (translation,), "cutout": (cutout,)}


class DiffAugment:
    """DiffAugment's policy (names from config.DIFFAUG_POLICIES, comma-joined) as a callable on a batch in [-1, 1]."""

    def __init__(self, policy: str) -> None:
        self.fns = [fn for name in policy.split(",") for fn in DIFFAUG_FNS[name.strip()]]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for fn in self.fns:
            out = fn(out)
        return _in_format_of(out, x)


# StyleGAN2-ADA's strengths of its bgc pipeline (augment.py): the spread of each transform's parameter.
XINT_MAX, SCALE_STD, ROTATE_MAX, ANISO_STD, XFRAC_STD = 0.125, 0.2, 1.0, 0.2, 0.125
BRIGHTNESS_STD, CONTRAST_STD, HUE_MAX, SATURATION_STD = 0.2, 0.5, 1.0, 1.0


def _eye(n: int, size: int, like: torch.Tensor) -> torch.Tensor:
    return torch.eye(size, device=like.device, dtype=like.dtype).expand(n, size, size).clone()


def _scale2d(sx: torch.Tensor, sy: torch.Tensor) -> torch.Tensor:
    m = _eye(len(sx), 3, sx)
    m[:, 0, 0], m[:, 1, 1] = sx, sy
    return m


def _translate2d(tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    m = _eye(len(tx), 3, tx)
    m[:, 0, 2], m[:, 1, 2] = tx, ty
    return m


def _rotate2d(theta: torch.Tensor) -> torch.Tensor:
    m = _eye(len(theta), 3, theta)
    m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1] = theta.cos(), -theta.sin(), theta.sin(), theta.cos()
    return m


def _translate3d(t: torch.Tensor) -> torch.Tensor:
    m = _eye(len(t), 4, t)
    m[:, 0, 3], m[:, 1, 3], m[:, 2, 3] = t, t, t
    return m


def _scale3d(s: torch.Tensor) -> torch.Tensor:
    m = _eye(len(s), 4, s)
    m[:, 0, 0], m[:, 1, 1], m[:, 2, 2] = s, s, s
    return m


def _rotate3d(axis: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Rotation by `theta` about the unit 3-vector `axis`, as 4x4 matrices (Rodrigues)."""
    x, y, z = axis
    s, c = theta.sin(), theta.cos()
    cc = 1 - c
    m = _eye(len(theta), 4, theta)
    m[:, 0, 0], m[:, 0, 1], m[:, 0, 2] = x * x * cc + c, x * y * cc - z * s, x * z * cc + y * s
    m[:, 1, 0], m[:, 1, 1], m[:, 1, 2] = y * x * cc + z * s, y * y * cc + c, y * z * cc - x * s
    m[:, 2, 0], m[:, 2, 1], m[:, 2, 2] = z * x * cc - y * s, z * y * cc + x * s, z * z * cc + c
    return m


class ADA(nn.Module):
    """The ADA pipeline and its adaptive p (see the module's docstring). `forward` augments a batch in [-1, 1];
    `observe` adds a D step's mean sign of D(real); `adjust` moves p from the every-process sums of an interval."""

    def __init__(self, cfg: AugConfig) -> None:
        super().__init__()
        self.target, self.speed_kimg = cfg.target, cfg.speed_kimg
        self.register_buffer("p", torch.tensor(float(cfg.p)))
        self.register_buffer("rt", torch.tensor(0.0))  # the heuristic at the last adjustment
        self.register_buffer("sums", torch.zeros(2))  # this process's [sum of mean signs, D steps] since then

    def observe(self, sign_mean: torch.Tensor) -> None:
        self.sums += torch.stack([sign_mean.detach().float(), torch.ones((), device=self.sums.device)])

    def adjust(self, sums: torch.Tensor, nimg: int) -> None:
        """Move p by sign(r_t - target) x `nimg` / (speed_kimg x 1000), where `sums` are every process's sums of
        the interval in which D saw `nimg` real images; clear this process's sums."""
        self.rt.copy_(sums[0] / sums[1].clamp(min=1))
        step = torch.sign(self.rt - self.target) * nimg / (self.speed_kimg * 1000)
        self.p.copy_((self.p + step).clamp(0, 1))
        self.sums.zero_()

    def _geometry(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sample's inverse geometric transform (output pixel -> input pixel, in pixels about the image
        centre) and whether any transform was chosen for it."""
        n, _, h, w = x.shape
        p, zeros, ones = self.p, torch.zeros(n, device=x.device), torch.ones(n, device=x.device)
        chosen = torch.zeros(n, dtype=torch.bool, device=x.device)
        G_inv = _eye(n, 3, zeros)

        def pick(value: torch.Tensor, identity: torch.Tensor, prob: torch.Tensor) -> torch.Tensor:
            nonlocal chosen
            mask = _uniform(n, zeros) < prob
            chosen = chosen | mask
            return torch.where(mask if value.ndim == 1 else mask[:, None], value, identity)

        flip = pick(torch.floor(_uniform(n, zeros) * 2), zeros, p)
        G_inv = G_inv @ _scale2d(1 - 2 * flip, ones)
        quarter = pick(torch.floor(_uniform(n, zeros) * 4), zeros, p)
        G_inv = G_inv @ _rotate2d(-math.pi / 2 * quarter)
        shift = pick((_uniform(n, zeros, 2) * 2 - 1) * XINT_MAX, zeros[:, None].expand(n, 2), p)
        G_inv = G_inv @ _translate2d(torch.round(shift[:, 0] * w), torch.round(shift[:, 1] * h))
        s = pick(torch.exp2(torch.randn(n, device=x.device) * SCALE_STD), ones, p)
        G_inv = G_inv @ _scale2d(1 / s, 1 / s)
        p_rot = 1 - torch.sqrt((1 - p).clamp(0, 1))  # two rotations, so that one happens with probability p
        theta = pick((_uniform(n, zeros) * 2 - 1) * math.pi * ROTATE_MAX, zeros, p_rot)
        G_inv = G_inv @ _rotate2d(-theta)
        s = pick(torch.exp2(torch.randn(n, device=x.device) * ANISO_STD), ones, p)
        G_inv = G_inv @ _scale2d(1 / s, s)
        theta = pick((_uniform(n, zeros) * 2 - 1) * math.pi * ROTATE_MAX, zeros, p_rot)
        G_inv = G_inv @ _rotate2d(-theta)
        shift = pick(torch.randn(n, 2, device=x.device) * XFRAC_STD, zeros[:, None].expand(n, 2), p)
        G_inv = G_inv @ _translate2d(shift[:, 0] * w, shift[:, 1] * h)
        return G_inv, chosen

    def _colour(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sample's 4x4 colour matrix (on [r, g, b, 1]) and whether any transform was chosen for it."""
        n, c = len(x), x.shape[1]
        p, zeros, ones = self.p, torch.zeros(n, device=x.device), torch.ones(n, device=x.device)
        chosen = torch.zeros(n, dtype=torch.bool, device=x.device)

        def pick(value: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
            nonlocal chosen
            mask = _uniform(n, zeros) < p
            chosen = chosen | mask
            return torch.where(mask, value, identity)

        C = _eye(n, 4, zeros)
        b = pick(torch.randn(n, device=x.device) * BRIGHTNESS_STD, zeros)
        C = _translate3d(b) @ C
        k = pick(torch.exp2(torch.randn(n, device=x.device) * CONTRAST_STD), ones)
        C = _scale3d(k) @ C
        v = torch.tensor([1, 1, 1, 0], device=x.device, dtype=zeros.dtype) / math.sqrt(3)  # the luma axis
        flip = pick(torch.floor(_uniform(n, zeros) * 2), zeros)
        C = (torch.eye(4, device=x.device) - 2 * torch.outer(v, v) * flip[:, None, None]) @ C  # Householder
        if c > 1:  # hue and saturation leave a grey image grey
            theta = pick((_uniform(n, zeros) * 2 - 1) * math.pi * HUE_MAX, zeros)
            C = _rotate3d(v[:3], theta) @ C
            s = pick(torch.exp2(torch.randn(n, device=x.device) * SATURATION_STD), ones)
            vv = torch.outer(v, v)
            C = (vv + (torch.eye(4, device=x.device) - vv) * s[:, None, None]) @ C
        return C, chosen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _in_format_of(self.recolour(self.warp(x)), x)

    def warp(self, x: torch.Tensor) -> torch.Tensor:
        """The blitting and geometric groups: each output pixel is interpolated between input pixels."""
        n, c, h, w = x.shape
        G_inv, moved = self._geometry(x)
        # Pixels about the centre -> grid_sample's [-1, 1] coordinates (pixel edges at +-1: align_corners=False).
        to_unit = _scale2d(torch.full((n,), 2 / w, device=x.device), torch.full((n,), 2 / h, device=x.device))
        from_unit = _scale2d(torch.full((n,), w / 2, device=x.device), torch.full((n,), h / 2, device=x.device))
        grid = F.affine_grid((to_unit @ G_inv @ from_unit)[:, :2], [n, c, h, w], align_corners=False)
        # In float32 even for a half-precision batch: a bf16 grid would be off by a tenth of a pixel.
        warped = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="reflection",
                               align_corners=False).to(x.dtype)
        # A sample no transform chose stays bit-exact (grid_sample's identity is off by rounding).
        return torch.where(moved[:, None, None, None], warped, x)

    def recolour(self, x: torch.Tensor) -> torch.Tensor:
        """The colour group: one affine map of each sample's colour vectors."""
        n, c, h, w = x.shape
        C, coloured = self._colour(x)
        flat = x.float().reshape(n, c, h * w)
        if c == 3:
            flat = C[:, :3, :3] @ flat + C[:, :3, 3:]
        else:  # grey: the mean of the colour rows, applied to the one channel (StyleGAN2-ADA)
            mean = C[:, :3, :].mean(dim=1, keepdim=True)
            flat = flat * mean[:, :, :3].sum(dim=2, keepdim=True) + mean[:, :, 3:]
        return torch.where(coloured[:, None, None, None], flat.reshape(n, c, h, w).to(x.dtype), x)


def build_augment(cfg: AugConfig) -> DiffAugment | ADA | None:
    """The augmentation `aug.kind` asks for, or None (D sees images as they are)."""
    if cfg.kind == "diffaug":
        return DiffAugment(cfg.policy)
    if cfg.kind == "ada":
        return ADA(cfg)
    return None
