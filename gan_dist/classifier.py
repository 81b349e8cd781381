"""The MNIST classifier whose penultimate layer is the feature space of the image metrics (FCD, KID,
precision/recall) and whose class probabilities feed the inception-score-style metrics.

- `MnistNet`: a small CNN for 28x28x1 images in [-1, 1] (the generator's tanh range), ~99.35% test accuracy.
- `train_classifier`: trains it from the four MNIST IDX files, deterministically for a given seed and torch build.
- `save_classifier` / `load_classifier`: one safetensors file with the accuracy, an architecture tag and a sha256
  of the weights in its metadata, so a stale or damaged cache is refused instead of silently skewing every metric.
- `ensure_classifier`: what an evaluation calls; loads the cached file, or trains and writes it on first use.

Pure torch and safetensors: no accelerate and no torch.distributed, so tools and tests can use it anywhere.
Metrics are only comparable between runs that used the same classifier file; keep it, don't retrain it casually.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import nn
from torch.nn import functional as F

from gan_dist.errors import UserError
from gan_dist.mnist import load_mnist

DEFAULT_PATH = "data/classifier/mnist_cnn.safetensors"
# Bump the version whenever MnistNet's layers change: old files then fail the tag check instead of load_state_dict.
ARCH = "MnistNet/1"
FEATURE_DIM = 128
# The bar scripts/train_classifier.py holds a fresh model to; a weaker net would make the metrics less sensitive.
MIN_ACCURACY = 0.99
# Measured on 2 CPU cores: 1 epoch 99.14% (too close to the bar), 2 epochs 99.34-99.41% over three seeds in
# ~50 s, 3 epochs 99.56% in ~100 s. 2 keeps a safe margin at half the cost.
EPOCHS = 2
BATCH_SIZE = 128
MAX_LR = 4e-3
SHIFT = 2  # augmentation: random translations of up to +-2 pixels

_TRAIN_COMMAND = "python scripts/train_classifier.py --mnist-dir DIR --out {path}"


def prepare_images(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 MNIST images (N, 28, 28) -> float32 (N, 1, 28, 28) in [-1, 1], the input MnistNet expects."""
    x = torch.as_tensor(images)
    return x.float().div(127.5).sub(1.0).unsqueeze(1)


def _conv(cin: int, cout: int) -> list[nn.Module]:
    # No conv bias: the BatchNorm right after it has its own shift.
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class MnistNet(nn.Module):
    """conv16-conv16-pool-conv32-conv32-pool -> FC 128 (features) -> FC 10 (logits).

    Half the channels of the classic conv32-conv32-pool-conv64-conv64 MNIST net: a quarter of the compute, so it
    trains to ~99.35% in under a minute on 2 CPU cores. In eval mode every output of a sample depends only on that
    sample (BatchNorm uses its running statistics, dropout is off), so features do not depend on batching.
    """

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *_conv(1, 16), *_conv(16, 16), nn.MaxPool2d(2),  # 14x14
            *_conv(16, 32), *_conv(32, 32), nn.MaxPool2d(2),  # 7x7
            nn.Flatten(),
            nn.Dropout(0.25),  # like all dropout here, active only in training: eval features are a function of x
            nn.Linear(32 * 7 * 7, FEATURE_DIM, bias=False), nn.BatchNorm1d(FEATURE_DIM), nn.ReLU(inplace=True),
        )
        # Regularises the head without touching `features`: forward is exactly head(dropout(features(x))).
        self.dropout = nn.Dropout(0.25)
        self.head = nn.Linear(FEATURE_DIM, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (N, 128), after the last ReLU, for images (N, 1, 28, 28) in [-1, 1]."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (N, 10) for images (N, 1, 28, 28) in [-1, 1]."""
        return self.head(self.dropout(self.body(x)))


def _shift(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by its own random offset in [-SHIFT, SHIFT]^2, filling with background (-1)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (SHIFT, SHIFT, SHIFT, SHIFT), value=-1.0)
    dy = torch.randint(0, 2 * SHIFT + 1, (n, 1), generator=generator)
    dx = torch.randint(0, 2 * SHIFT + 1, (n, 1), generator=generator)
    rows = (dy + torch.arange(h))[:, :, None]  # (n, h, 1)
    cols = (dx + torch.arange(w))[:, None, :]  # (n, 1, w)
    # One gather for the whole batch instead of a crop per image.
    return padded[torch.arange(n)[:, None, None], 0, rows, cols].unsqueeze(1)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy of `model` on prepared images `x` (N, 1, 28, 28); leaves the model in eval mode."""
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += int((model(x[i:i + batch_size]).argmax(1) == labels[i:i + batch_size]).sum())
    return correct / len(x)


def train_classifier(
    mnist_dir: str | Path,
    epochs: int = EPOCHS,
    seed: int = 0,
    progress: bool = False,
    *,
    limit: int | None = None,
    test_limit: int | None = None,
) -> tuple[MnistNet, float]:
    """Train MnistNet on MNIST from `mnist_dir`; returns (model in eval mode, test accuracy).

    `limit` / `test_limit` use only the first N training / test images (for quick tests). The same seed, data and
    torch build give the same weights. Uses torch's current thread count and leaves the global RNG state as it was.
    """
    if epochs < 1:
        raise UserError(f"classifier epochs must be at least 1, got {epochs}")
    data = load_mnist(mnist_dir)
    train_images, train_labels = data["train"]
    test_images, test_labels = data["test"]
    if limit is not None:
        train_images, train_labels = train_images[:limit], train_labels[:limit]
    if test_limit is not None:
        test_images, test_labels = test_images[:test_limit], test_labels[:test_limit]
    x, y = prepare_images(train_images), torch.from_numpy(train_labels).long()
    n = len(x)
    # Batches of BATCH_SIZE to 2 * BATCH_SIZE - 1 covering every image: no tiny last batch to upset BatchNorm.
    steps_per_epoch = max(1, n // BATCH_SIZE)

    # Seeding inside fork_rng keeps the run reproducible without resetting the caller's global RNG (a GAN run
    # that trains this on first use must not have its own noise stream changed by it).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # weight init and dropout
        generator = torch.Generator().manual_seed(seed)  # shuffling and augmentation
        model = MnistNet()
        # channels_last runs the convolutions about 30% faster on CPU; undone before returning so that the
        # saved tensors are plain contiguous ones.
        model = model.to(memory_format=torch.channels_last)
        optimizer = torch.optim.Adam(model.parameters(), lr=MAX_LR)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=MAX_LR, total_steps=epochs * steps_per_epoch, pct_start=0.2
        )
        bar = None
        if progress:
            from tqdm import tqdm  # noqa: PLC0415 - only needed for interactive use

            bar = tqdm(total=epochs * steps_per_epoch, unit="step", desc="training MNIST classifier",
                       dynamic_ncols=True)
        try:
            model.train()
            for epoch in range(epochs):
                order = torch.randperm(n, generator=generator)
                for batch in torch.tensor_split(order, steps_per_epoch):
                    inputs = _shift(x[batch], generator).contiguous(memory_format=torch.channels_last)
                    loss = F.cross_entropy(model(inputs), y[batch])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    schedule.step()
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}", refresh=False)
        finally:
            if bar is not None:
                bar.close()
        model = model.to(memory_format=torch.contiguous_format)
        accuracy = evaluate(model, prepare_images(test_images), torch.from_numpy(test_labels).long())
    return model, accuracy


def _weights_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of the raw bytes of every tensor, concatenated in sorted key order."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_classifier(model: MnistNet, accuracy: float, path: str | Path) -> Path:
    """Write `model` with its test accuracy, arch tag and weights checksum to `path` (safetensors), atomically."""
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {"accuracy": f"{accuracy:.4f}", "arch": ARCH, "sha256_of_weights": _weights_sha256(tensors)}
    # Per process, so two ranks training at once never write into each other's temp file.
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Serialised in memory and written with open(): safetensors' save_file creates files with mode 0600, which
        # would lock other users out of a shared cache; open() honours the umask.
        tmp.write_bytes(save(tensors, metadata=metadata))
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(
            f"cannot write the classifier to {path} ({e.strerror or e}); check the folder is writable and has space"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_classifier(path: str | Path) -> tuple[MnistNet, float]:
    """The classifier stored at `path` (eval mode, on CPU) and its recorded test accuracy; UserError if unusable."""
    path = Path(path)
    command = _TRAIN_COMMAND.format(path=path)
    if not path.is_file():
        raise UserError(
            f"evaluation classifier {path} does not exist; train it with `{command}` "
            f"(DIR: the folder with the four MNIST files)"
        )
    fix = f"delete it and retrain with `{command}`"
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (OSError, SafetensorError) as e:
        raise UserError(f"evaluation classifier {path} is not a readable safetensors file ({e}); {fix}") from None

    if metadata.get("arch") != ARCH:
        raise UserError(
            f"evaluation classifier {path} has architecture tag {metadata.get('arch')!r}, this code needs {ARCH!r}; "
            f"{fix}"
        )
    if metadata.get("sha256_of_weights") != _weights_sha256(tensors):
        raise UserError(f"evaluation classifier {path} is corrupt (its weights do not match their checksum); {fix}")
    try:
        accuracy = float(metadata["accuracy"])
    except (KeyError, ValueError):
        raise UserError(f"evaluation classifier {path} has no valid accuracy in its metadata; {fix}") from None
    if not 0.0 <= accuracy <= 1.0 or math.isnan(accuracy):
        raise UserError(f"evaluation classifier {path} records an impossible accuracy {accuracy}; {fix}")

    # Built without drawing from the global RNG: a training run that loads the classifier (and a resumed one that
    # loads it again after restoring its RNG) must draw the same noise as one that never does.
    with torch.random.fork_rng(devices=[]):
        model = MnistNet()
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1].strip()
        raise UserError(f"evaluation classifier {path} does not fit {ARCH} ({first}); {fix}") from None
    return model.eval(), accuracy


def ensure_classifier(
    path: str | Path, mnist_dir: str | Path, train_if_missing: bool = True
) -> tuple[MnistNet, float]:
    """Load the classifier at `path`, or (when it is missing and `train_if_missing`) train it and save it there.

    A file that exists but is damaged or stale is an error, never silently replaced: metrics computed with a
    different classifier are not comparable. With several processes, call it on one first (others then load).
    """
    path = Path(path)
    if path.exists() or not train_if_missing:
        return load_classifier(path)
    print(
        f"[gan-dist] training the evaluation classifier on {mnist_dir} (~1 minute on 2 CPU cores, once); "
        f"it is cached at {path}",
        file=sys.stderr,
        flush=True,
    )
    model, accuracy = train_classifier(mnist_dir, progress=sys.stderr.isatty())
    save_classifier(model, accuracy, path)
    return model, accuracy
