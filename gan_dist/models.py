"""Generators and discriminators of the two seed models, in PyTorch. Pure torch: no accelerate, no distributed code.

- DCGAN for 28x28 MNIST (seed 000, a Keras Sequential): Keras' BatchNorm defaults (momentum 0.99, eps 1e-3),
  LeakyReLU(0.2), 5x5 kernels, 'same' padding, glorot-uniform kernels and zero biases. D returns logits; the loss
  applies the sigmoid that the seed put in its last layer.
- MLP for 2-D points (seed 001): G z -> 256 -> 2 (tanh), D 2 -> 256 -> 1, ReLU, logits out.
"""

from __future__ import annotations

import torch
from torch import nn

from gan_dist.config import ModelConfig


def _keras_bn(num_features: int, dims: int) -> nn.Module:
    # Keras momentum 0.99 keeps 99% of the old running value; torch's momentum is the weight of the new one.
    bn = nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d
    return bn(num_features, eps=1e-3, momentum=0.01)


def _glorot_init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class DCGANGenerator(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        c = 4 * cfg.width
        self.c = c
        self.fc = nn.Sequential(nn.Linear(cfg.z_dim, 7 * 7 * c, bias=False), _keras_bn(7 * 7 * c, 1), nn.LeakyReLU(0.2))
        self.conv = nn.Sequential(
            nn.ConvTranspose2d(c, c // 2, 5, stride=1, padding=2, bias=False),  # 7x7
            _keras_bn(c // 2, 2), nn.LeakyReLU(0.2),
            nn.ConvTranspose2d(c // 2, c // 4, 5, stride=2, padding=2, output_padding=1, bias=False),  # 14x14
            _keras_bn(c // 4, 2), nn.LeakyReLU(0.2),
            nn.ConvTranspose2d(c // 4, cfg.channels, 5, stride=2, padding=2, output_padding=1, bias=False),  # 28x28
            nn.Tanh(),
        )
        _glorot_init(self)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.conv(self.fc(z).view(-1, self.c, 7, 7))  # (B, C, 28, 28) in [-1, 1]


class DCGANDiscriminator(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        w = cfg.width
        self.net = nn.Sequential(
            nn.Conv2d(cfg.channels, w, 5, stride=2, padding=2), nn.LeakyReLU(0.2), _keras_bn(w, 2),  # 14x14
            nn.Conv2d(w, 2 * w, 5, stride=2, padding=2), nn.LeakyReLU(0.2), _keras_bn(2 * w, 2),  # 7x7
            nn.Flatten(), nn.Dropout(cfg.dropout), nn.Linear(2 * w * 7 * 7, 1),
        )
        _glorot_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(1)  # (B,) logits


def _mlp(sizes: list[int], out_act: nn.Module | None) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    if out_act is not None:
        layers.append(out_act)
    net = nn.Sequential(*layers)
    _glorot_init(net)
    return net


class MLPGenerator(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        out_act = nn.Tanh() if cfg.out_act == "tanh" else None
        self.net = _mlp([cfg.z_dim] + [cfg.hidden] * cfg.depth + [2], out_act)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)  # (B, 2)


class MLPDiscriminator(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.net = _mlp([2] + [cfg.hidden] * cfg.depth + [1], None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(1)  # (B,) logits


def build_models(cfg: ModelConfig) -> tuple[nn.Module, nn.Module]:
    if cfg.arch == "dcgan":
        return DCGANGenerator(cfg), DCGANDiscriminator(cfg)
    return MLPGenerator(cfg), MLPDiscriminator(cfg)
