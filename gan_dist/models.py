"""Generators and discriminators of the two seed models, in PyTorch. Pure torch: no accelerate, no distributed code.

- DCGAN for 28x28 MNIST (seed 000, a Keras Sequential): Keras' BatchNorm defaults (momentum 0.99, eps 1e-3),
  LeakyReLU(0.2), 5x5 kernels, 'same' padding, glorot-uniform kernels and zero biases. D returns logits; the loss
  applies the sigmoid that the seed put in its last layer. Other sides divisible by 4 (32, 64) start G at side / 4.
- Radford et al.'s DCGAN (2015) for square images of side 2^k >= 16 (32x32, 64x64 RGB): G grows 4x4 by stride-2
  4x4 transposed convolutions with BatchNorm and ReLU, halving channels from `width * side / 8`; D mirrors it with
  LeakyReLU(0.2), no BatchNorm on its first layer, and a 4x4 valid convolution to one logit; N(0, 0.02) init.
- MLP for 2-D points (seed 001): G z -> 256 -> 2 (tanh), D 2 -> 256 -> 1, ReLU, logits out. With
  `model.fourier_features`, D reads sin and cos of random projections of the point (Tancik et al. 2020): a ReLU MLP
  on raw coordinates cannot resolve modes far narrower than their spacing (measured: a fresh D tells the grid's data
  from a G with 30% of its samples between modes no better than 54% of the time; with 128 features of scale 10,
  74%), so it can neither push G off the gaps nor, calibrated, reject G's samples there.
- `model.d_width` sets an image D's width apart from G's (`model.width`): D is the cheaper network of the pair.
- `model.spectral_norm` puts spectral normalization on every D weight, for any arch; `model.d_norm=none` drops D's
  BatchNorm (R3GAN: its losses and penalties need none, and R1 / R2 per sample want no batch coupling).
- `model.mbstd_group` gives an image D, before its last layer, one more feature map: the standard deviation of
  each feature over a group of that many samples, averaged (ProGAN, Karras et al. 2018). D then sees how varied a
  batch is, so a G that draws few kinds of images loses; groups are consecutive samples, so they do not depend on
  how a global batch is split over processes.
- `model.cond`: a class-conditional pair for any arch. G concatenates a learned label embedding to z (and counts the
  labels of the data it is trained on, so samplers can draw labels at the data's class frequencies); D adds the
  projection of its last features onto a learned class embedding (Miyato & Koyama 2018) to its logit. With
  `model.cond_norm`, G takes z alone and the label sets the scale and shift of every BatchNorm in G instead
  (class-conditional BatchNorm: de Vries et al. 2017, Miyato & Koyama 2018's G, BigGAN). `model.self_cond` builds
  the same pair over `model.self_cond_k` clusters instead of classes (`selfcond.py` labels the data).
- Every generator is a `Generator`, which keeps its ModelConfig and carries huggingface_hub's PyTorchModelHubMixin:
  `G.save_pretrained(folder)` writes `model.safetensors` (with metadata naming the architecture) and `config.json`
  (the ModelConfig), and `Generator.from_pretrained(folder or Hub repo)` rebuilds the class the config names. Its
  state_dict is that of the plain module, so exports and checkpoints of any version load into it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from huggingface_hub import PyTorchModelHubMixin, hf_hub_download
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from gan_dist.config import ModelConfig
from gan_dist.errors import UserError

WEIGHTS = "model.safetensors"  # the mixin's weights file of a save_pretrained folder or Hub repo
PROVENANCE = ("step", "kimg", "commit")  # what an exported file's metadata says of the training behind its weights


def _keras_bn(num_features: int, dims: int, affine: bool = True) -> nn.Module:
    # Keras momentum 0.99 keeps 99% of the old running value; torch's momentum is the weight of the new one.
    bn = nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d
    return bn(num_features, eps=1e-3, momentum=0.01, affine=affine)


class ClassBatchNorm(nn.Module):
    """BatchNorm whose scale and shift are the label's: `bn` (without its own affine) normalizes with the batch's
    statistics, shared by every class, then each sample is scaled by 1 + gain[c] and shifted by bias[c]. Both
    tables start at zero, so an untrained layer is the plain BatchNorm."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, classes: int) -> None:
        super().__init__()
        self.bn = bn
        self.gain, self.bias = nn.Embedding(classes, bn.num_features), nn.Embedding(classes, bn.num_features)
        nn.init.zeros_(self.gain.weight)
        nn.init.zeros_(self.bias.weight)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shape = (len(x), -1) + (1,) * (x.ndim - 2)
        return self.bn(x) * (1 + self.gain(c)).view(shape) + self.bias(c).view(shape)


def _g_norm(cfg: ModelConfig, bn) -> nn.Module:
    """G's BatchNorm `bn(affine)`, class-conditional with `model.cond_norm`."""
    return ClassBatchNorm(bn(False), cfg.classes) if cfg.cond_norm else bn(True)


def _through(layers: nn.Sequential, x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
    """`layers(x)`, handing the labels to the class-conditional BatchNorms among them."""
    for layer in layers:
        x = layer(x, c) if isinstance(layer, ClassBatchNorm) else layer(x)
    return x


def _glorot_init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def describe(cfg: ModelConfig) -> dict[str, str]:
    """safetensors metadata naming the network a weights file belongs to, readable without gan-dist (the Hub's
    file viewer and `safe_open(...).metadata()` show it)."""
    return {"format": "pt", "library": "gan-dist", "arch": cfg.arch, "resolution": str(cfg.resolution),
            "channels": str(cfg.channels), "z_dim": str(cfg.z_dim), "classes": str(label_count(cfg))}


def label_count(cfg: ModelConfig) -> int:
    """The classes whose labels G and D take: `model.classes` for a conditional run, `model.self_cond_k` clusters
    for a self-conditioned one, 0 for an unconditional one."""
    return cfg.self_cond_k if cfg.self_cond else cfg.classes if cfg.cond else 0


def config_json(cfg: ModelConfig) -> str:
    """config.json of an export or a save_pretrained folder: the ModelConfig, flat."""
    return json.dumps(dataclasses.asdict(cfg), indent=1, sort_keys=True) + "\n"


def model_config(config: object, where: str) -> ModelConfig:
    """The ModelConfig of a config.json; UserError naming `where` if it is not one. Keys it lacks keep their
    defaults (the values of a gan-dist from before they existed); keys it does not know are refused."""
    defaults = dataclasses.asdict(ModelConfig())
    entries = config.items() if isinstance(config, dict) else [("(not a JSON object)", None)]
    bad = [k for k, v in entries if k not in defaults or not isinstance(
        v, (int, float) if isinstance(defaults[k], float) else type(defaults[k]))]
    if bad or config.get("arch") not in ARCHS:
        raise UserError(f"{where} is not a gan-dist model config ({', '.join(bad) or 'no key'} unknown or of the "
                        f"wrong type; arch must be one of {', '.join(ARCHS)}); export the run again with this "
                        "gan-dist, or load it with the version that wrote it")
    return ModelConfig(**config)


def latents(n: int, z_dim: int, truncation: float | None = None,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """n standard normal latents (n, z_dim). With `truncation` psi, each entry is drawn from the normal restricted
    to [-psi, psi] (BigGAN's truncation trick: the tails are drawn again, not clipped; exactly so here, by the
    inverse CDF), which trades variety for fidelity as psi shrinks."""
    if truncation is None:
        return torch.randn(n, z_dim, generator=generator)
    if not 0 < truncation < math.inf:
        raise UserError(f"truncation {truncation} must be a positive number of standard deviations (e.g. 0.7)")
    low = torch.special.ndtr(torch.tensor(-truncation, dtype=torch.float64))
    u = low + (1 - 2 * low) * torch.rand(n, z_dim, generator=generator, dtype=torch.float64)
    return torch.special.ndtri(u).float()


class Generator(nn.Module, PyTorchModelHubMixin, library_name="gan-dist", tags=["gan", "gan-dist"]):
    """Base of every generator: it keeps the ModelConfig it was built from (`cfg`), and `provenance`, the step,
    kimg and commit of the weights loaded into it (from a file's metadata), which `save_pretrained` writes again."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.provenance: dict[str, str] = {}

    def latents(self, n: int, truncation: float | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """n latents for this G, on the CPU: `latents` with its z_dim (`truncation` psi, or None for none)."""
        return latents(n, self.cfg.z_dim, truncation, generator)

    def _save_pretrained(self, save_directory: Path) -> None:
        # config.json written here, so the mixin leaves it as it is: the flat ModelConfig, as in final/ and best/.
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()},
                  str(save_directory / WEIGHTS), metadata=describe(self.cfg) | self.provenance)
        (save_directory / "config.json").write_text(config_json(self.cfg))

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None, cache_dir: str | Path | None,
                         force_download: bool, local_files_only: bool, token: str | bool | None,
                         config: dict | None = None, map_location: str | torch.device = "cpu",
                         **_deprecated: object) -> Generator:
        """The mixin's `from_pretrained`: the class and shapes from config.json (which the mixin passes as
        `config`), the weights loaded strictly, in eval mode on `map_location`. huggingface_hub before 1.0 also
        passes `proxies` and `resume_download`, which its own download ignores or takes from the environment."""
        if os.path.isdir(model_id):
            file = Path(model_id) / WEIGHTS
            if config is None or not file.is_file():
                raise UserError(f"{model_id} holds no config.json and {WEIGHTS} of save_pretrained; an export folder "
                                "(RUN/final, RUN/best) or a run directory loads with gan_dist.load_generator")
        else:
            file = hf_hub_download(model_id, WEIGHTS, revision=revision, cache_dir=cache_dir,
                                   force_download=force_download, token=token, local_files_only=local_files_only)
        G = build_generator(model_config(config, f"{model_id}/config.json"))
        if not isinstance(G, cls):
            raise UserError(f"{model_id} holds a {type(G).__name__}, not a {cls.__name__}; load it with "
                            "gan_dist.models.Generator.from_pretrained")
        return load_weights(G, file).to(map_location).eval()


def load_weights(G: Generator, file: str | Path) -> Generator:
    """Load the safetensors `file` into G, every tensor and no other, and keep its metadata's step, kimg and commit
    as `G.provenance`; a UserError naming the file when it is unreadable or does not fit G."""
    try:
        with safe_open(str(file), framework="pt") as f:
            weights, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except (OSError, SafetensorError) as err:
        raise UserError(f"{file} is not a readable safetensors file ({err})") from None
    try:
        G.load_state_dict(weights)
    except RuntimeError as err:
        raise UserError(f"{file} does not fit the model its config describes "
                        f"({str(err).strip().splitlines()[-1].strip()[:300]})") from None
    G.provenance = {k: metadata[k] for k in PROVENANCE if k in metadata}
    return G


class DCGANGenerator(Generator):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        c, s = 4 * cfg.width, cfg.resolution // 4
        self.c, self.s = c, s
        self.fc = nn.Sequential(nn.Linear(cfg.z_dim, s * s * c, bias=False),
                                _g_norm(cfg, lambda affine: _keras_bn(s * s * c, 1, affine)), nn.LeakyReLU(0.2))
        self.conv = nn.Sequential(
            nn.ConvTranspose2d(c, c // 2, 5, stride=1, padding=2, bias=False),  # 7x7 for MNIST
            _g_norm(cfg, lambda affine: _keras_bn(c // 2, 2, affine)), nn.LeakyReLU(0.2),
            nn.ConvTranspose2d(c // 2, c // 4, 5, stride=2, padding=2, output_padding=1, bias=False),  # 14x14
            _g_norm(cfg, lambda affine: _keras_bn(c // 4, 2, affine)), nn.LeakyReLU(0.2),
            nn.ConvTranspose2d(c // 4, cfg.channels, 5, stride=2, padding=2, output_padding=1, bias=False),  # 28x28
            nn.Tanh(),
        )
        _glorot_init(self)

    def forward(self, z: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        h = _through(self.fc, z, c).view(-1, self.c, self.s, self.s)
        return _through(self.conv, h, c)  # (B, C, side, side) in [-1, 1]


class Discriminator(nn.Module):
    """D = `net`, whose last `head` layers map features to one logit. With classes, a projection discriminator:
    the logit gains <embed(c), features> (features flattened)."""

    head = 1

    def __init__(self) -> None:
        super().__init__()
        self.inputs: nn.Module = nn.Identity()

    def project(self, features: int, cfg: ModelConfig) -> None:
        classes = label_count(cfg)
        self.embed = nn.Embedding(classes, features) if classes else None
        if self.embed is not None:
            nn.init.normal_(self.embed.weight, 0.0, features ** -0.5)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, F): what D's last layers map to its logit, flattened (the projection's, and self-conditioning's)."""
        return self.net[:-self.head](self.inputs(x)).flatten(1)

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        x = self.inputs(x)
        if c is None:
            return self.net(x).flatten(1).squeeze(1)  # (B,) logits
        h = self.net[:-self.head](x)
        return self.net[-self.head:](h).flatten(1).squeeze(1) + (self.embed(c) * h.flatten(1)).sum(1)


def _d_norm(cfg: ModelConfig, bn: nn.Module) -> list[nn.Module]:
    return [bn] if cfg.d_norm == "batch" else []


class MinibatchStd(nn.Module):
    """Appends one channel: the standard deviation of every feature over each group of `group` consecutive samples,
    averaged over features and pixels, given to each sample of the group. A batch not divisible by `group` uses its
    largest divisor below it (a lone sample sees 0)."""

    def __init__(self, group: int) -> None:
        super().__init__()
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        g = next(d for d in range(min(self.group, B), 0, -1) if B % d == 0)
        std = (x.view(B // g, g, C, H, W).var(1, unbiased=False) + 1e-8).sqrt().mean((1, 2, 3))  # (B / g,)
        return torch.cat([x, std.repeat_interleave(g).view(B, 1, 1, 1).expand(B, 1, H, W).to(x.dtype)], 1)


def _mbstd(cfg: ModelConfig) -> list[nn.Module]:
    return [MinibatchStd(cfg.mbstd_group)] if cfg.mbstd_group else []


class DCGANDiscriminator(Discriminator):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        w, s = cfg.d_width or cfg.width, cfg.resolution // 4
        features = (2 * w + bool(cfg.mbstd_group)) * s * s
        self.net = nn.Sequential(
            nn.Conv2d(cfg.channels, w, 5, stride=2, padding=2), nn.LeakyReLU(0.2), *_d_norm(cfg, _keras_bn(w, 2)),
            nn.Conv2d(w, 2 * w, 5, stride=2, padding=2), nn.LeakyReLU(0.2), *_d_norm(cfg, _keras_bn(2 * w, 2)),
            *_mbstd(cfg), nn.Flatten(), nn.Dropout(cfg.dropout), nn.Linear(features, 1),  # 14x14, 7x7, logit
        )
        _glorot_init(self)
        self.project(features, cfg)


def _radford_init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d) and m.affine:  # a class-conditional one starts at 1 and 0 instead
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class RadfordGenerator(Generator):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        c = cfg.width * cfg.resolution // 8  # 512 at 64x64, 256 at 32x32 (width 64)
        layers: list[nn.Module] = [nn.Unflatten(1, (cfg.z_dim, 1, 1)),
                                   nn.ConvTranspose2d(cfg.z_dim, c, 4, 1, 0, bias=False),
                                   _g_norm(cfg, lambda affine, n=c: nn.BatchNorm2d(n, affine=affine)), nn.ReLU()]
        while c > cfg.width:  # 4x4 -> side / 2
            layers += [nn.ConvTranspose2d(c, c // 2, 4, 2, 1, bias=False),
                       _g_norm(cfg, lambda affine, n=c // 2: nn.BatchNorm2d(n, affine=affine)), nn.ReLU()]
            c //= 2
        layers += [nn.ConvTranspose2d(c, cfg.channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        _radford_init(self)

    def forward(self, z: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        return _through(self.net, z, c)  # (B, C, side, side) in [-1, 1]


class RadfordDiscriminator(Discriminator):
    head = 2

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        c = cfg.d_width or cfg.width
        layers: list[nn.Module] = [nn.Conv2d(cfg.channels, c, 4, 2, 1, bias=False), nn.LeakyReLU(0.2)]
        for _ in range(cfg.resolution.bit_length() - 4):  # side / 2 -> 4x4
            layers += [nn.Conv2d(c, 2 * c, 4, 2, 1, bias=False), *_d_norm(cfg, nn.BatchNorm2d(2 * c)),
                       nn.LeakyReLU(0.2)]
            c *= 2
        c_out = c + bool(cfg.mbstd_group)
        layers += [*_mbstd(cfg), nn.Conv2d(c_out, 1, 4, 1, 0, bias=False), nn.Flatten()]
        self.net = nn.Sequential(*layers)
        _radford_init(self)
        self.project(16 * c_out, cfg)


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


class MLPGenerator(Generator):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        out_act = nn.Tanh() if cfg.out_act == "tanh" else None
        self.net = _mlp([cfg.z_dim] + [cfg.hidden] * cfg.depth + [2], out_act)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)  # (B, 2)


class FourierFeatures(nn.Module):
    """x -> [sin(x B), cos(x B)], B ~ N(0, scale^2) of shape (2, n), fixed at construction (a buffer)."""

    def __init__(self, n: int, scale: float) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.randn(2, n) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x @ self.freqs.to(x.dtype)
        return torch.cat([h.sin(), h.cos()], 1)


class MLPDiscriminator(Discriminator):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        n = cfg.fourier_features
        if n:
            self.inputs = FourierFeatures(n, cfg.fourier_scale)
        self.net = _mlp([2 * n if n else 2] + [cfg.hidden] * cfg.depth + [1], None)
        self.project(cfg.hidden, cfg)


class ConditionalGenerator(Generator):
    """G(z, c) = net(z concatenated with a learned embedding of c), `net` the unconditional G of `cfg.arch` with a
    longer z; with `cfg.cond_norm`, net(z, c) with class-conditional BatchNorms. `class_counts` holds the labels of
    the real batches it was trained with (`count`)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        z_dim, classes = cfg.z_dim if cfg.cond_norm else 2 * cfg.z_dim, label_count(cfg)
        self.net = ARCHS[cfg.arch][0](dataclasses.replace(cfg, z_dim=z_dim, cond=False, self_cond=False,
                                                          classes=classes))
        self.embed = None if cfg.cond_norm else nn.Embedding(classes, cfg.z_dim)
        self.register_buffer("class_counts", torch.zeros(classes, dtype=torch.float64))

    def forward(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if self.embed is None:
            return self.net(z, c)
        return self.net(torch.cat([z, self.embed(c).to(z.dtype)], 1))

    @torch.no_grad()
    def count(self, c: torch.Tensor) -> None:
        self.class_counts += torch.bincount(c, minlength=len(self.class_counts)).to(self.class_counts.dtype)

    @torch.no_grad()
    def recount(self, counts: torch.Tensor) -> None:
        """Start the counts again from `counts` (self-conditioning's cluster sizes, after a re-clustering)."""
        self.class_counts.copy_(counts)

    def class_freqs(self) -> torch.Tensor:
        """The data's class frequencies as seen in training; uniform before any label was seen."""
        counts = self.class_counts.float()
        return counts / counts.sum() if counts.sum() > 0 else torch.full_like(counts, 1 / len(counts))


def spectral_normalize(D: nn.Module) -> nn.Module:
    """Divide every weight of D by its largest singular value (one power iteration per training forward)."""
    for m in list(D.modules()):
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.utils.parametrizations.spectral_norm(m)
    return D


ARCHS = {"dcgan": (DCGANGenerator, DCGANDiscriminator), "radford": (RadfordGenerator, RadfordDiscriminator),
         "mlp": (MLPGenerator, MLPDiscriminator)}


def build_generator(cfg: ModelConfig) -> Generator:
    return ConditionalGenerator(cfg) if label_count(cfg) else ARCHS[cfg.arch][0](cfg)


def build_models(cfg: ModelConfig) -> tuple[Generator, nn.Module]:
    G = build_generator(cfg)  # before D: the order the seed's random initialisations are drawn in
    D = ARCHS[cfg.arch][1](cfg)
    return G, spectral_normalize(D) if cfg.spectral_norm else D


def conditioned(net: nn.Module, x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
    """`net(x)`, or `net(x, c)` with labels (a conditional G or D): the one call for both kinds of run."""
    return net(x) if c is None else net(x, c)


@contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Run `modules` in eval mode (BatchNorm on running statistics, no dropout), then restore their modes."""
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)
