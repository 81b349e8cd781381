"""Stacked MNIST, the field's mode-collapse benchmark (VEEGAN, PacGAN, GDPP, R3GAN): three MNIST digits stacked as
the R, G, B channels of one 28x28 image, so 1,000 modes (the digit triples). A model is scored by the modes its
samples cover and the KL divergence of its mode histogram from uniform, each channel read by an MNIST classifier.

The dataset (`data.dataset=stacked_mnist`) is a fixed table of TRIPLES triples of MNIST training images, drawn
once from a fixed seed (numpy's legacy RandomState, whose stream never changes), so every run, seed and world size
trains on the same images; the loader draws them in epochs like any dataset held on the device. Only the digits
(60,000 x 28 x 28 bytes) and the table are held; a batch is one gather. Its label is the mode, 100 r + 10 g + b.
"""

from __future__ import annotations

import numpy as np
import torch

TRIPLES = 1_000_000  # images in the dataset: each mode about 1,000 times, each digit image about 50 times
TABLE_SEED = 0  # the one table every run uses
MODES = 1000


def triples(count: int) -> np.ndarray:
    """(TRIPLES, 3) int64: the training-set index of each image's R, G and B digit."""
    return np.random.RandomState(TABLE_SEED).randint(0, count, size=(TRIPLES, 3)).astype(np.int64)


class StackedImages:
    """The dataset's images as `CachedBatches` indexes them: `self[index]` is (len(index), 3, 28, 28) uint8, built
    from the held digits by one gather."""

    def __init__(self, digits: torch.Tensor, table: torch.Tensor) -> None:
        self.digits, self.table = digits, table  # (60000, 28, 28) uint8; (N, 3) int64, on the same device

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        return self.digits[self.table[index]]

    @property
    def device(self) -> torch.device:
        return self.digits.device

    @property
    def nbytes(self) -> int:
        return self.digits.nbytes + self.table.nbytes

    def to(self, device: torch.device) -> StackedImages:
        return StackedImages(self.digits.to(device), self.table.to(device))


def stacked(digits: np.ndarray, labels: np.ndarray, keep: np.ndarray | None) -> tuple[StackedImages, np.ndarray]:
    """The dataset over MNIST's training `digits` and `labels` (or the `keep` rows of its table, `data.limit`):
    its images and their modes."""
    table = triples(len(digits))
    table = table if keep is None else table[keep]
    return StackedImages(torch.from_numpy(digits), torch.from_numpy(table)), modes_of(labels.astype(np.int64)[table])


def modes_of(digits: np.ndarray | torch.Tensor):
    """The mode of each (r, g, b) digit triple, rows of `digits`: 100 r + 10 g + b."""
    return digits[:, 0] * 100 + digits[:, 1] * 10 + digits[:, 2]


def channel_digits(classify, images: torch.Tensor) -> torch.Tensor:
    """(B, 3) int64: the digit `classify` (an MNIST classifier's logits of (n, 1, 28, 28) images) reads in each
    channel of (B, 3, 28, 28) images."""
    return classify(images.reshape(-1, 1, *images.shape[2:])).argmax(1).view(len(images), 3)


def mode_metrics(modes: torch.Tensor) -> dict[str, float]:
    """Modes covered (of 1,000: a mode some sample reads as) and KL(histogram || uniform) of a sample's `modes`."""
    p = torch.bincount(modes.long(), minlength=MODES).double() / len(modes)
    held = p[p > 0]
    return {"modes": int(len(held)), "kl": float((held * (held * MODES).log()).sum())}

