"""The typed config tree and its loader: dataclass defaults, then a YAML file, then overrides (`key=value`,
`--key=value` or `--key value`, in any order around `--config`).

Every component receives only its own section (`cfg.model`, `cfg.data`, ...). `load_config` turns OmegaConf's
errors into one-line `UserError`s that name the key and, for typos, the closest valid name.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import typing
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import ClassVar, Literal

import yaml
from omegaconf import II, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from gan_dist.errors import UserError


@dataclass
class RunConfig:
    dir: str = "runs/default"  # checkpoints, final weights, samples, metrics.jsonl and wandb/ go here
    lease_timeout_s: int = 60  # a run.dir whose holder sent no heartbeat for this long (a dead node) is taken over


@dataclass
class ModelConfig:
    arch: Literal["dcgan", "radford", "mlp"] = "dcgan"  # seed 000's; Radford et al.'s DCGAN; seed 001's (2-D points)
    z_dim: int = 100
    width: int = 64  # D's first conv has `width` channels; dcgan G's first feature map 4 * width
    d_width: int = 0  # image D's width alone (its first conv's channels); 0 = model.width
    channels: int = 1  # image channels; in the config tree it follows data.channels
    resolution: int = 28  # image side; in the config tree it follows data.resolution
    dropout: float = 0.2  # dcgan D dropout before the last layer, as in seed 000
    hidden: int = 256  # mlp hidden units
    depth: int = 1  # mlp hidden layers
    fourier_features: int = 0  # mlp D sees sin / cos of this many random projections of its input (0 = the input)
    fourier_scale: float = 1.0  # ... drawn from N(0, fourier_scale^2): the finest detail D resolves ~ 1 / scale
    out_act: Literal["tanh", "none"] = "tanh"  # mlp G output: seed 001's tanh; none for mixtures outside [-1, 1]
    spectral_norm: bool = False  # spectral normalization (Miyato et al. 2018) of every D weight
    d_norm: Literal["batch", "none"] = "batch"  # D's normalization: the seeds' BatchNorm, or none (R3GAN's)
    mbstd_group: int = 0  # image D: minibatch standard deviation over groups of this many samples (ProGAN); 0 = off
    cond: bool = False  # class-conditional G (label embedding) and projection D (Miyato & Koyama 2018)
    cond_norm: bool = False  # with cond: G's BatchNorms take their scale and shift from the label, z alone as input
    classes: int = 0  # number of classes; in the config tree it follows data.classes
    # Self-conditioning (Liu et al. 2020): no labels used; G and D are conditioned, as with model.cond, on the
    # k-means cluster of D's own features that each real image falls in (G's labels follow the clusters' sizes)
    self_cond: bool = False
    self_cond_k: int = 100  # clusters (the paper: 100 on Stacked MNIST, 50 on 2-D mixtures)
    self_cond_every: int = 5000  # steps between re-clusterings (warm-started, cluster ids kept by matching)
    self_cond_images: int = 25000  # real images clustered (a fixed sample; at most the dataset's size is used)


@dataclass
class OptimConfig:
    lr_G: float = 2e-4
    lr_D: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    eps: float = 1e-7  # Keras' Adam default, which both seeds used
    schedule: Literal["constant", "linear", "cosine"] = "constant"  # rates after warmup (decays end at lr_end)
    lr_end: float = 0.0  # linear / cosine decay ends at this fraction of lr_G and lr_D
    schedule_kimg: float = 0.0  # > 0: schedules (rates, loss.gamma_end) run over this many kimg seen (R3GAN); 0: steps
    warmup_steps: int = 0  # learning rates rise linearly from 0 over these first steps
    impl: Literal["auto", "foreach", "fused", "single"] = "auto"  # Adam kernels; auto: torch picks (foreach on GPU)
    set_to_none: bool = True  # zero_grad frees gradients (the next backward writes them) instead of filling zeros


@dataclass
class LossConfig:
    # ns: non-saturating (the seeds'); ls: least squares; rpgan: R3GAN's relativistic pairing
    kind: Literal["ns", "minimax", "hinge", "ls", "wgan_gp", "rpgan"] = "ns"
    label_noise: float = 0.05  # seed 000's noise on D's 0/1 targets (ns, minimax, ls); 0 turns it off
    n_critic: int = 1  # D steps per G step, each on its own real batch (5 in WGAN-GP's paper)
    gp_weight: float = 10.0  # wgan_gp: weight of the gradient penalty on real/fake interpolates
    r1_gamma: float = 0.0  # R1 penalty gamma / 2 * |grad_x D(real)|^2 (Mescheder et al. 2018); 0 turns it off
    r2_gamma: float = 0.0  # R2 penalty gamma / 2 * |grad_x D(fake)|^2 (R3GAN pairs it with R1); 0 turns it off
    r1_every: int = 16  # lazy R1 and R2: every r1_every D steps, scaled by r1_every (StyleGAN2); 1 = every step
    gamma_end: float = 1.0  # R1 / R2 gammas decay by cosine to this fraction of theirs over the schedule (R3GAN)
    topk_gamma: float = 1.0  # top-k G updates (Sinha et al. 2020): k shrinks by this factor per epoch; 1 = off
    topk_min: float = 0.5  # ... down to this fraction of the batch
    ms_weight: float = 0.0  # mode-seeking term (Mao et al. 2019): G pays for pairs of z that give similar images


DIFFAUG_POLICIES = ("color", "translation", "cutout")  # aug.policy's names
IMAGE_DATASETS = ("mnist", "stacked_mnist", "webdataset")  # data.dataset's images; the others are 2-D points


@dataclass
class AugConfig:
    # Augment every image D sees, real and fake, in D and G steps alike: none; DiffAugment (Zhao et al. 2020) on
    # every sample; ADA (Karras et al. 2020): StyleGAN2-ADA's bgc transforms, each with a probability p tuned to D
    kind: Literal["none", "diffaug", "ada"] = "none"
    policy: str = "color,translation,cutout"  # diffaug: its transforms, comma-joined
    p: float = 0.0  # ada: the probability p at the start
    target: float = 0.6  # ada: p rises while r_t = E[sign(D(real))] is above this, and falls while below
    interval: int = 4  # ada: steps between adjustments of p
    speed_kimg: float = 500.0  # ada: p moves from 0 to 1 in this many thousand real images at the most


@dataclass
class EMAConfig:
    halflife_kimg: float = 10.0  # StyleGAN's ema_kimg: half-life of G_ema's weights, in thousands of images
    rampup: float = 0.05  # half-life is at most rampup * images seen early on (StyleGAN's ema_rampup); 0 = off


@dataclass
class TrainConfig:
    steps: int = 46800  # iterations; each is one D step and one G step
    batch_size: int = 128  # global batch over all processes (and accumulation micro-steps)
    grad_accum: int = 1  # micro-batches per step on each process
    # auto: the launcher's (accelerate launch --mixed_precision, accelerate config), else no; any other value
    # overrides the launcher. bf16: autocast (GPU or CPU); fp16: GPU, with loss scaling.
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    # A non-finite loss or weight (NaN, inf): stop with one error line, or go back to the newest checkpoint (every
    # checkpoint is finite) and go on with other noise, at most max_rollbacks times in the run
    on_nonfinite: Literal["stop", "rollback"] = "stop"
    max_rollbacks: int = 3


@dataclass
class DataConfig:
    # webdataset: data.shards; stacked_mnist: three MNIST digits as R, G, B (1,000 modes; data.channels=3);
    # gaussian: seed 001's N(0, I); ring8 / grid25: 2-D mixtures
    dataset: Literal["mnist", "stacked_mnist", "webdataset", "gaussian", "ring8", "grid25"] = "mnist"
    shards: str = ""  # webdataset URLs: paths, folders, brace patterns, pipe: commands, http(s); '::' or a list joins
    manifest: str = ""  # the shards' manifest.json ('::' joins several); default: those beside local shards
    mode: Literal["epoch", "resampled"] = "epoch"  # exact epochs, or endless random shard draws
    resolution: int = 28  # images are resized (shorter side) and centre-cropped to this square size
    channels: Literal[1, 3] = 1  # grayscale or RGB
    hflip: bool = False  # random horizontal flips
    classes: int = 0  # labels 0..classes-1 (`cls` of shards); 0 = the dataset's own (MNIST 10, stacked 1000, ring8 8)
    on_error: Literal["warn", "raise"] = "warn"  # a bad sample or shard: skip and count it, or stop
    timeout_s: float = 60.0  # remote shards (http(s), pipe:) fail when they connect or send nothing for this long
    min_rate_kbs: float = 1.0  # ... or deliver less than this many kB/s over any timeout_s window
    mnist_dir: str = "data/mnist"  # the four MNIST IDX files (downloaded here when missing and online)
    cache_dir: str = "data/mnist-shards"  # prepared webdataset shards + manifest.json
    download: bool = True
    num_workers: int = 2  # loader processes per rank (none with the device cache)
    limit: int = 0  # train on the first N samples of one fixed random order of the dataset (any world size); 0 = all
    device_cache: Literal["auto", True, False] = "auto"  # decode the whole dataset once into a tensor on the device
    shuffle_buffer: int = 2000  # samples per shuffle window (each drawn in its own order; a worker holds one)
    std: float = 0.05  # per-mode standard deviation for ring8 / grid25
    radius: float = 2.0  # ring8 radius
    spacing: float = 2.0  # grid25 distance between neighbouring modes


@dataclass
class EvalConfig:
    every: int = 2000  # steps between evaluations (and one at the end); 0 turns evaluation off
    num_samples: int = 10000  # generated samples per evaluation (2-D data: 2500 is the published protocol)
    best_metric: str = "auto"  # the metric that picks best/: fcd (MNIST), hq (2-D), fid (RGB), or any eval/ name
    model: Literal["ema", "G"] = "ema"  # G_ema or G
    classifier: str = "data/classifier/mnist_cnn.safetensors"  # MNIST feature network; trained on first use
    inception: str = ""  # StyleGAN's TorchScript inception-2015-12-05.pt for FID on RGB data; empty = skip FID
    batch: int = 500  # samples per forward pass


@dataclass
class DistConfig:
    timeout_s: int = 600  # process-group timeout: a collective waiting on a dead rank fails after this long
    stop_check_every: int = 10  # steps between all-rank stop-signal checks (all-reduce, host sync); and checkpoints
    requeue: bool = True  # under SLURM, SIGUSR1/SIGUSR2 save a checkpoint and requeue the job (scontrol requeue)
    bucket_cap_mb: int = 25  # DDP: gradients are all-reduced in buckets of this size, overlapping the backward
    gradient_as_bucket_view: bool = False  # DDP: gradients are views into the all-reduce buckets (one copy less)
    static_graph: bool = False  # DDP: every step uses the same parameters in the same order, so DDP can skip checks
    broadcast_buffers: bool = False  # DDP: send rank 0's BatchNorm buffers to every rank before each forward
    # DDP communication hook: gradients all-reduced as fp16 or bf16 (half the bytes), the sum cast back to fp32
    comm_hook: Literal["none", "fp16", "bf16"] = "none"


@dataclass
class CkptConfig:
    every: int = 1000  # steps between checkpoints (one is always written at the end)
    keep: int = 3  # newest checkpoints kept
    resume: str = "auto"  # auto (latest complete checkpoint in run.dir) | none | a checkpoint path


@dataclass
class WandbConfig:
    mode: Literal["online", "offline", "disabled"] = "online"  # online falls back to offline without a key or network
    project: str = "gan-dist"
    entity: str | None = None
    name: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    finish_timeout_s: float = 60.0  # longest wait for uploads at the end (a preempted job must requeue in time)


@dataclass
class LogConfig:
    every: int = 50  # steps between scalar logs (the only host syncs of training metrics)
    sample_every: int = 500  # steps between sample grids from G_ema
    num_samples: int = 64  # fixed-noise samples in each grid


@dataclass
class PerfConfig:
    channels_last: bool = False  # NHWC memory format for G, D and real batches (tensor cores prefer it)
    # torch.compile G and D (through accelerate); not with R1, R2 or WGAN-GP (double backward). auto: the launcher's
    # choice (accelerate launch --dynamo_backend, accelerate config), else off; true / false override it.
    compile: Literal["auto", True, False] = "auto"
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"  # reduce-overhead: CUDA graphs
    prefetch: bool = True  # the next batch is copied to the device (pinned memory, a side CUDA stream) during a step
    ema_every: int = 1  # update G_ema every k steps, with the decay of k steps
    step_sync: bool = False  # read each step's losses to the host for the progress bar (a device sync per step)


@dataclass
class Config:
    seed: int = 0
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=lambda: ModelConfig(channels=II("data.channels"),
                                                                   resolution=II("data.resolution"),
                                                                   classes=II("data.classes")))
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    ckpt: CkptConfig = field(default_factory=CkptConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    log: LogConfig = field(default_factory=LogConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)
    # Not a config key: the keys whose values read the environment (`${oc.env:NAME}`: tokens, private URLs), with
    # their text before resolution. Files and W&B get that text alone (`to_yaml`, `to_dict`); the run uses the value.
    unresolved: ClassVar[dict[str, str | list]] = {}


def key_type(key: str):
    """The declared type of config key `key` ('loss.kind'), or None for no such key."""
    node: type = Config
    for part in key.split("."):
        if not is_dataclass(node):
            return None
        node = typing.get_type_hints(node).get(part)
    return node


def choices(key: str) -> tuple | None:
    """The allowed values of config key `key` ('loss.kind'): its `Literal` type is the one list; None for a free key."""
    node = key_type(key)
    return typing.get_args(node) if typing.get_origin(node) is Literal else None


def _show(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


# Allowed ranges of every number not fixed by a Literal type (or following data.*), both ends inclusive; ABOVE_LOW
# keys must be strictly above their low end, BELOW_HIGH keys strictly below their high end. Upper bounds catch typos (a
# missing decimal point, an extra 0).
RANGES: dict[str, tuple[float, float]] = {
    "seed": (0, 2**31 - 1),
    "run.lease_timeout_s": (5, 86400),
    "model.z_dim": (1, 65536), "model.width": (1, 65536), "model.d_width": (0, 65536), "model.hidden": (1, 2**20),
    "model.depth": (1, 1000), "model.dropout": (0, 1), "model.mbstd_group": (0, 4096),
    "model.fourier_features": (0, 65536), "model.fourier_scale": (0, 1e6), "model.self_cond_k": (2, 2000),
    "model.self_cond_every": (1, 10**12), "model.self_cond_images": (2, 10**8),
    "optim.lr_G": (0, 1), "optim.lr_D": (0, 1), "optim.eps": (0, 1), "optim.beta1": (0, 1), "optim.beta2": (0, 1),
    "optim.warmup_steps": (0, 10**12), "optim.lr_end": (0, 1), "optim.schedule_kimg": (0, 1e9),
    "loss.label_noise": (0, 0.5), "loss.n_critic": (1, 100), "loss.gp_weight": (0, 1e6), "loss.r1_gamma": (0, 1e6),
    "loss.r2_gamma": (0, 1e6), "loss.r1_every": (1, 10**6), "loss.gamma_end": (0, 1), "loss.topk_gamma": (0, 1),
    "loss.topk_min": (0, 1), "loss.ms_weight": (0, 1e6), "data.classes": (0, 10**6),
    "aug.p": (0, 1), "aug.target": (0, 1), "aug.interval": (1, 10**6), "aug.speed_kimg": (0, 1e9),
    "ema.halflife_kimg": (0, 1e9), "ema.rampup": (0, 1e3),
    "train.steps": (1, 10**12), "train.batch_size": (1, 2**20), "train.grad_accum": (1, 2**16),
    "train.max_rollbacks": (0, 10**6),
    "data.resolution": (4, 4096), "data.num_workers": (0, 256), "data.shuffle_buffer": (1, 10**7),
    "data.limit": (0, 10**12), "data.timeout_s": (0, 86400), "data.min_rate_kbs": (0, 1e9), "data.std": (0, 1e3),
    "data.radius": (0, 1e3), "data.spacing": (0, 1e3),
    "eval.every": (0, 10**12), "eval.num_samples": (2, 10**7), "eval.batch": (1, 2**20),
    "dist.timeout_s": (10, 7 * 86400), "dist.stop_check_every": (1, 10**6), "dist.bucket_cap_mb": (1, 65536),
    "ckpt.every": (1, 10**12), "ckpt.keep": (1, 10**6),
    "wandb.finish_timeout_s": (0, 86400),
    "log.every": (1, 10**12), "log.sample_every": (1, 10**12), "log.num_samples": (1, 4096),
    "perf.ema_every": (1, 10**6),
}
ABOVE_LOW = {"optim.lr_G", "optim.lr_D", "optim.eps", "data.timeout_s", "data.std", "data.radius", "data.spacing",
             "loss.topk_gamma", "loss.topk_min", "aug.speed_kimg"}
# data.classes=0 stands for the dataset's own number of classes.
DATASET_CLASSES = {"mnist": 10, "stacked_mnist": 1000, "gaussian": 1, "ring8": 8, "grid25": 25}
BELOW_HIGH = {"optim.beta1", "optim.beta2", "loss.label_noise", "model.dropout"}


# Keys that may change when a run resumes (listed in the README): how long it trains, its learning rates, how often it
# logs, evaluates and checkpoints, where its files and data live, and how fast it runs. A change of any other key is
# named in a warning, and one that changes a network's shape stops the resume.
MAY_CHANGE = ("train.steps", "train.on_nonfinite", "train.max_rollbacks", "optim.lr_G", "optim.lr_D",
              "optim.schedule", "optim.lr_end", "optim.schedule_kimg", "optim.warmup_steps", "run", "ckpt", "log",
              "eval", "wandb", "dist", "perf", "data.mnist_dir", "data.cache_dir", "data.download", "data.shards",
              "data.manifest", "data.num_workers", "data.device_cache", "data.timeout_s", "data.min_rate_kbs",
              "data.on_error")


def may_change(key: str) -> bool:
    """Whether config key `key` may change on resume (MAY_CHANGE names keys and whole sections)."""
    return any(key == k or key.startswith(k + ".") for k in MAY_CHANGE)


def config_changes(old: dict, new: dict) -> dict[str, str]:
    """key -> 'old -> new' for each config key whose value differs between two configs as `to_dict` gives them
    (a key one of them lacks, from another version of gan-dist, is left out)."""
    before, after = _flat(old), _flat(new)
    return {k: f"{_show(before[k])} -> {_show(v)}" for k, v in after.items() if k in before and before[k] != v}


@dataclass(frozen=True)
class Launch:
    """The settings that both `accelerate launch` (its flags, or `accelerate config`) and this config can carry: the
    value that applies and where it came from. The launcher hands its choices to the script as environment variables;
    'auto' here takes them, any other value overrides them. (Its --gradient_accumulation_steps reaches DeepSpeed
    only, and its --cpu is what this trainer does without CUDA anyway: train.grad_accum is the one accumulation.)"""
    precision: str
    precision_from: str
    compile: bool
    compile_backend: str  # accelerate's DynamoBackend name: INDUCTOR, ...
    compile_mode: str
    compile_from: str


def resolve_launch(train: TrainConfig, perf: PerfConfig, env: typing.Mapping[str, str] = os.environ) -> Launch:
    launched = env.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if train.mixed_precision != "auto":
        precision, precision_from = train.mixed_precision, "train.mixed_precision"
    elif launched in ("no", "bf16", "fp16"):
        precision = launched
        precision_from = "accelerate launch --mixed_precision or accelerate config" \
            if "ACCELERATE_MIXED_PRECISION" in env else "default"
    else:
        raise UserError(f"the launcher asks for mixed precision '{launched}', which gan-dist does not train with; "
                        "launch with --mixed_precision no, bf16 or fp16, or set train.mixed_precision", code=2)
    backend = env.get("ACCELERATE_DYNAMO_BACKEND", "NO").upper()
    if perf.compile == "auto" and backend != "NO":
        return Launch(precision, precision_from, True, backend, env.get("ACCELERATE_DYNAMO_MODE", "default"),
                      "accelerate launch --dynamo_backend or accelerate config")
    return Launch(precision, precision_from, perf.compile is True, "INDUCTOR", perf.compile_mode,
                  "perf.compile" if perf.compile != "auto" else "default")


def _all_keys(node, prefix: str = "") -> list[str]:
    keys = []
    for k, v in node.items():
        keys.append(prefix + k)
        if OmegaConf.is_dict(v):
            keys += _all_keys(v, prefix + k + ".")
    return keys


def _explain(err: OmegaConfBaseException, schema) -> UserError:
    key = err.full_key or getattr(err, "key", "") or ""
    if isinstance(err, ConfigKeyError) or "not in" in str(err):
        close = difflib.get_close_matches(str(key), _all_keys(schema), n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return UserError(f"unknown config key '{key}'{hint} (keys are listed in the README)", code=2)
    allowed = choices(str(key)) if isinstance(err, ValidationError) else None
    if allowed:
        return UserError(f"config key '{key}' is '{getattr(err, 'value', None)}'; choose one of "
                         f"{', '.join(map(_show, allowed))}", code=2)
    if isinstance(err, ValidationError):
        msg = str(err).splitlines()[0]
        return UserError(f"config key '{key}': {msg}", code=2)
    unset = re.search(r"Environment variable '([^']*)' not found", str(err))
    if unset:
        return UserError(f"config key '{key}' reads the environment variable {unset[1]}, which is not set; set it, or "
                         f"give a default: ${{oc.env:{unset[1]},default}}", code=2)
    return UserError(f"config: {str(err).splitlines()[0]}", code=2)


def _check(cfg) -> None:
    for key in _all_keys(cfg):
        value = OmegaConf.select(cfg, key)
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"config key '{key}' must be a finite number, got {value}", code=2)
    for key, (low, high) in RANGES.items():
        value = OmegaConf.select(cfg, key)
        if value < low or (key in ABOVE_LOW and value == low):
            raise UserError(f"config key '{key}' must be {'greater than' if key in ABOVE_LOW else 'at least'} "
                            f"{low}, got {value}", code=2)
        if value > high or (key in BELOW_HIGH and value == high):
            raise UserError(f"config key '{key}' must be {'less than' if key in BELOW_HIGH else 'at most'} {high}, "
                            f"got {value}", code=2)
    if cfg.loss.label_noise and cfg.loss.kind in ("hinge", "wgan_gp", "rpgan"):
        raise UserError(f"loss.label_noise={cfg.loss.label_noise} applies to the ns, minimax and ls losses only; "
                        f"add loss.label_noise=0 for loss.kind={cfg.loss.kind}", code=2)
    launch = resolve_launch(cfg.train, cfg.perf)
    if launch.compile and (cfg.loss.r1_gamma > 0 or cfg.loss.r2_gamma > 0 or cfg.loss.kind == "wgan_gp"):
        what = "perf.compile=true" if launch.compile_from == "perf.compile" else f"compiling ({launch.compile_from})"
        raise UserError(f"{what} cannot train with a gradient penalty (loss.r1_gamma or loss.r2_gamma > 0, or "
                        "loss.kind=wgan_gp): torch.compile has no double backward; turn one of them off "
                        "(perf.compile=false overrides the launcher)", code=2)
    if cfg.model.classes != cfg.data.classes:
        raise UserError(f"model.classes={cfg.model.classes} differs from data.classes={cfg.data.classes}; set "
                        "data.classes alone (model.classes follows it)", code=2)
    if cfg.model.cond_norm and (not (cfg.model.cond or cfg.model.self_cond) or cfg.model.arch == "mlp"):
        raise UserError("model.cond_norm=true makes the BatchNorms of a class-conditional G take the label: it needs "
                        f"model.cond=true (or model.self_cond=true) and a G with BatchNorm (model.arch=dcgan or "
                        f"radford), got model.cond={str(cfg.model.cond).lower()}, model.arch={cfg.model.arch}", code=2)
    if cfg.model.self_cond and cfg.model.cond:
        raise UserError("model.self_cond=true conditions G and D on clusters of D's features instead of the data's "
                        "labels; it cannot be combined with model.cond=true: turn one of them off", code=2)
    if cfg.model.self_cond and cfg.model.self_cond_k > cfg.model.self_cond_images:
        raise UserError(f"model.self_cond_k={cfg.model.self_cond_k} clusters need at least as many clustered images, "
                        f"but model.self_cond_images={cfg.model.self_cond_images}; raise it or lower the k", code=2)
    if cfg.model.d_width and cfg.model.arch == "mlp":
        raise UserError(f"model.d_width={cfg.model.d_width} sets an image D's width; the mlp D has model.hidden "
                        "units: set that, or model.d_width=0", code=2)
    if cfg.model.mbstd_group == 1 or (cfg.model.mbstd_group and cfg.model.arch == "mlp"):
        raise UserError(f"model.mbstd_group={cfg.model.mbstd_group}: the minibatch standard deviation needs groups of "
                        "at least 2 samples and an image D (model.arch=dcgan or radford); 0 turns it off", code=2)
    if cfg.model.cond and cfg.data.classes < 2:
        raise UserError(f"model.cond=true needs at least 2 classes, but data.classes is {cfg.data.classes} for "
                        f"data.dataset={cfg.data.dataset}; set data.classes to the number of `cls` labels", code=2)
    _check_images(cfg)
    _check_aug(cfg)


def _check_aug(cfg) -> None:
    names = [p.strip() for p in cfg.aug.policy.split(",")]
    unknown = [p for p in names if p not in DIFFAUG_POLICIES]
    if cfg.aug.kind == "diffaug" and unknown:
        raise UserError(f"aug.policy='{cfg.aug.policy}' names {', '.join(repr(p) for p in unknown)}; choose from "
                        f"{', '.join(DIFFAUG_POLICIES)}, comma-joined (e.g. aug.policy=color,translation,cutout)",
                        code=2)
    if cfg.aug.kind != "none" and cfg.data.dataset not in IMAGE_DATASETS:
        raise UserError(f"aug.kind={cfg.aug.kind} augments images, but data.dataset={cfg.data.dataset} holds 2-D "
                        "points; use aug.kind=none", code=2)


def _check_images(cfg) -> None:
    data, model = cfg.data, cfg.model
    if data.dataset == "webdataset" and data.shards in ("", None):
        raise UserError("data.dataset=webdataset needs data.shards: a shard folder, a brace pattern such as "
                        "data.shards=/data/train-{00000..00127}.tar, or URLs", code=2)
    if data.dataset != "webdataset" and data.shards:
        raise UserError(f"data.shards is set but data.dataset is '{data.dataset}'; set data.dataset=webdataset to "
                        "train on the shards", code=2)
    if data.device_cache is True and (data.dataset not in IMAGE_DATASETS or data.mode != "epoch"):
        raise UserError(f"data.device_cache=true holds an image dataset read in epochs, but data.dataset is "
                        f"'{data.dataset}' and data.mode '{data.mode}'; use data.device_cache=auto", code=2)
    if data.limit and (data.dataset not in IMAGE_DATASETS or data.mode != "epoch"):
        raise UserError(f"data.limit={data.limit} trains on a fixed subset of an image dataset read in epochs, but "
                        f"data.dataset is '{data.dataset}' and data.mode '{data.mode}'; use data.limit=0", code=2)
    if data.dataset not in IMAGE_DATASETS:
        return
    if data.dataset == "stacked_mnist" and (data.channels, data.resolution) != (3, 28):
        raise UserError(f"data.dataset=stacked_mnist holds 28x28 images of 3 channels (a digit in each), got "
                        f"data.channels={data.channels} and data.resolution={data.resolution}; set data.channels=3 "
                        "and data.resolution=28", code=2)
    if data.dataset == "stacked_mnist" and data.mode != "epoch":
        raise UserError("data.dataset=stacked_mnist is drawn in epochs of its fixed triples; use data.mode=epoch",
                        code=2)
    for key in ("channels", "resolution"):
        if model[key] != data[key]:
            raise UserError(f"model.{key}={model[key]} differs from data.{key}={data[key]}; set data.{key} "
                            f"alone (model.{key} follows it)", code=2)
    side = data.resolution
    if model.arch == "mlp":
        raise UserError(f"model.arch=mlp draws 2-D points, but data.dataset={data.dataset} holds images; use "
                        "model.arch=dcgan or radford", code=2)
    if model.arch == "dcgan" and side % 4:
        raise UserError(f"model.arch=dcgan needs data.resolution divisible by 4 (28, 32, 64), got {side}", code=2)
    if model.arch == "radford" and (side < 16 or side & (side - 1)):
        raise UserError(f"model.arch=radford needs data.resolution a power of two >= 16 (32, 64, 128), got {side}",
                        code=2)


def _shards_as_string(node) -> None:
    """Let `data.shards` be written as a list too; it is stored '::'-joined (webdataset's own list syntax)."""
    data = node.get("data") if OmegaConf.is_dict(node) else None
    shards = OmegaConf.to_container(data, resolve=False).get("shards") if OmegaConf.is_dict(data) else None
    if isinstance(shards, list):  # joined as written: an item that reads the environment is resolved later
        data.shards = "::".join(str(u) for u in shards)


def _no_as_word(node) -> None:
    """YAML reads a bare `no` as false; the one key with 'no' among its choices gets the word back."""
    for key in ("train.mixed_precision",):
        if OmegaConf.select(node, key, throw_on_missing=False) is False:
            OmegaConf.update(node, key, "no")


def _merge(cfg, part, what: str):
    _shards_as_string(part)
    _no_as_word(part)
    try:
        return OmegaConf.merge(cfg, part)
    except TypeError:  # OmegaConf's own error for a mapping given where a list belongs, or the other way round
        raise UserError(f"{what}: a value has the wrong shape for its key (a mapping where a list or a single "
                        "value belongs, or the other way round)", code=2) from None


ENV_READ = "${oc.env:"
REFERENCE = re.compile(r"\$\{([A-Za-z_][\w.]*)\}")


def _flat(node, prefix: str = "") -> dict:
    out = {}
    for k, v in node.items():
        out |= _flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v}
    return out


def _from_env(cfg) -> dict[str, str | list]:
    """The keys whose values read the environment (`${oc.env:...}` alone, inside a longer text, or through another
    such key), with their text before resolution."""
    texts = {k: v for k, v in _flat(OmegaConf.to_container(cfg, resolve=False)).items()
             if isinstance(v, str | list) and "${" in str(v)}
    found: dict[str, str | list] = {}
    while True:
        more = {k: v for k, v in texts.items() if k not in found and (
            ENV_READ in str(v) or any(ref in found for ref in REFERENCE.findall(str(v))))}
        if not more:
            return found
        found |= more


def _keep_env_text(cfg, keys: dict[str, str | list]) -> None:
    """Leave text keys that read the environment unresolved (a variable the training job had may be unset here)."""
    def escaped(text):
        return [escaped(t) for t in text] if isinstance(text, list) else str(text).replace("${", "\\${")

    for key, text in keys.items():
        if key_type(key) in (str, str | None, list[str]):  # a number is resolved, as in training
            OmegaConf.update(cfg, key, escaped(text), merge=False)


USAGE = """usage: train.py [--config PATH] [key=value | --key=value | --key value ...]

Train a GAN. Overrides name config keys (see README.md), e.g. train.steps=500 or --optim.lr_G=1e-3, in any order
around --config; they apply over the YAML file, which applies over the defaults."""

_KEY = re.compile(r"[A-Za-z_][\w]*(\.[A-Za-z_]\w*)*")


def parse_args(argv: list[str]) -> tuple[str | None, list[str]]:
    """train.py's arguments as (the --config path, the overrides as key=value): `key=value`, W&B's `--key=value`,
    or `--key value` (the value being the next argument, unless that is a flag or an override itself), in any order
    around `--config PATH` (or `--config=PATH`). UserError (exit status 2) for anything else."""
    config, overrides, args = None, [], list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("-h", "--help"):
            print(USAGE)
            raise SystemExit(0)
        name, eq, value = arg.removeprefix("--").partition("=")
        if arg.startswith("--") and not _KEY.fullmatch(name):
            raise UserError(f"{arg.partition('=')[0]} is neither --config nor a config key (e.g. --train.steps=500)",
                            code=2)
        if not arg.startswith("--"):
            if not eq:
                raise UserError(f"override '{arg}' is not key=value (e.g. train.steps=500)", code=2)
            overrides.append(arg)
            continue
        if not eq:
            if not args or args[0].startswith("--") or _KEY.fullmatch(args[0].partition("=")[0]) and "=" in args[0]:
                raise UserError(f"{arg} has no value; write {arg}=VALUE", code=2)
            value = args.pop(0)
        if name == "config":
            if config is not None:
                raise UserError(f"--config is given twice ({config} and {value}); pass one YAML file", code=2)
            config = value
        else:
            overrides.append(f"{name}={value}")
    return config, overrides


def load_config(argv: list[str], resolve_env: bool = True) -> Config:
    """Parse train.py's arguments (`parse_args`) into a validated Config. With `resolve_env` False, text values that
    read the environment stay as their `${oc.env:...}` text (for reading a finished run's config.yaml)."""
    config_path, overrides = parse_args(argv)
    schema = OmegaConf.structured(Config)
    try:
        cfg = schema.copy()
        if config_path:
            path = Path(config_path)
            if not path.is_file():
                raise UserError(f"config file '{path}' {'is not a file' if path.exists() else 'not found'}; pass "
                                "--config configs/<name>.yaml", code=2)
            try:
                # Checked with PyYAML's safe loader first: it names the fault, and builds no Python objects.
                raw = yaml.safe_load(path.read_bytes().decode("utf-8"))
            except UnicodeDecodeError:
                raise UserError(f"config file '{path}' is not UTF-8 text; pass a YAML file", code=2) from None
            except (yaml.YAMLError, RecursionError) as err:
                what = str(err).splitlines()[0] if str(err) else type(err).__name__
                raise UserError(f"config file '{path}' is not valid YAML: {what}", code=2) from None
            except OSError as err:
                raise UserError(f"config file '{path}' cannot be read ({err.strerror or err})", code=2) from None
            if not isinstance(raw, dict | None):
                raise UserError(f"config file '{path}' must hold a mapping of keys (e.g. 'train: {{steps: 500}}')",
                                code=2)
            cfg = _merge(cfg, OmegaConf.load(path), f"config file '{path}'")
        for item in overrides:
            try:
                override = OmegaConf.from_dotlist([item])
            except yaml.YAMLError as err:
                raise UserError(f"override '{item}': the value is not valid YAML ({str(err).splitlines()[0]}); "
                                "quote it, e.g. key='value'", code=2) from None
            cfg = _merge(cfg, override, f"override '{item}'")
        if cfg.data.classes == 0:
            cfg.data.classes = DATASET_CLASSES.get(cfg.data.dataset, 0)
        from_env = _from_env(cfg)
        if not resolve_env:
            _keep_env_text(cfg, from_env)
        _check(cfg)
        config = OmegaConf.to_object(cfg)
        config.unresolved = from_env
        return config
    except OmegaConfBaseException as err:
        raise _explain(err, schema) from None


def run_config(path: str | Path) -> Config:
    """A run's own config.yaml, for the review and export scripts: values that read the environment stay unresolved."""
    return load_config(["--config", str(path)], resolve_env=False)


def to_dict(cfg: Config) -> dict:
    """The config as plain data for files and W&B: every value resolved but those that read the environment."""
    out = asdict(cfg)
    for key, text in cfg.unresolved.items():
        *parents, name = key.split(".")
        node = out
        for part in parents:
            node = node[part]
        node[name] = text
    return out


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg)))
