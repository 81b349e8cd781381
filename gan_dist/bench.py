"""What the benchmark scripts share: the bare PyTorch training loop the trainer is timed against, the device
syncs and peak-memory readings around a timed phase, and a one-line description of the machine.

`scripts/benchmark.py` and `scripts/benchmark_data.py` time the trainer against `bare_loop`: the same G, D, Adam,
batch, memory format, autocast, compile and loss functions, on one batch already in memory, and nothing else (no
accelerate, logging, EMA or data loading); `scripts/quality.py` and `scripts/benchmark.py` state `hardware()`.
"""

from __future__ import annotations

import os
import platform
import resource
import time
import warnings
from pathlib import Path

import torch
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from gan_dist.config import Config
from gan_dist.losses import d_loss, frozen, g_loss
from gan_dist.models import build_models
from gan_dist.optim import make_optimizers


def hardware(cuda: bool) -> str:
    """The CPU and its cores, the GPU (with `cuda`), and the torch and Python versions, in one line."""
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in (cpuinfo.read_text().splitlines() if cpuinfo.is_file() else [])
             if line.startswith("model name")]
    cpu = (names[0] if names else platform.processor()) or "unknown CPU"
    gpu = torch.cuda.get_device_name(0) if cuda else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores; {gpu}; torch {torch.__version__}, Python {platform.python_version()}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def bare_loop(cfg: Config, batch: int, steps: int, warmup: int, device: torch.device, ddp: bool) -> dict:
    """The D and G steps as one would write them by hand, timed over `steps` after `warmup`."""
    torch.manual_seed(cfg.seed)
    G, D = build_models(cfg.model)
    memory_format = torch.channels_last if cfg.perf.channels_last else torch.preserve_format
    G, D = G.to(device, memory_format=memory_format), D.to(device, memory_format=memory_format)
    if ddp:
        ids = [device.index] if device.type == "cuda" else None
        with warnings.catch_warnings():  # torch 2.13 renames the option; the old name's False is the trainer's
            warnings.filterwarnings("ignore", "`broadcast_buffers` is deprecated", FutureWarning)
            G, D = [DistributedDataParallel(m, device_ids=ids, broadcast_buffers=cfg.dist.broadcast_buffers)
                    for m in (G, D)]
        if cfg.dist.comm_hook != "none":  # the trainer's hook (accelerate registers torch's), for a fair comparison
            hook = {"fp16": default_hooks.fp16_compress_hook, "bf16": default_hooks.bf16_compress_hook}
            for m in (G, D):
                m.register_comm_hook(None, hook[cfg.dist.comm_hook])
    opt_G, opt_D = make_optimizers(G, D, cfg.optim)
    if cfg.perf.compile:
        G, D = torch.compile(G, mode=cfg.perf.compile_mode), torch.compile(D, mode=cfg.perf.compile_mode)
    shape = (batch, 2) if cfg.model.arch == "mlp" else (batch, cfg.model.channels, cfg.model.resolution,
                                                          cfg.model.resolution)
    real = (torch.rand(shape, device=device) * 2 - 1).contiguous(
        memory_format=torch.channels_last if cfg.perf.channels_last and len(shape) == 4 else torch.contiguous_format)
    bf16 = cfg.train.mixed_precision == "bf16"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def step() -> None:
        with torch.no_grad(), autocast:
            fake = G(torch.randn(batch, cfg.model.z_dim, device=device))
        with autocast:
            logits = D(torch.cat([real, fake])).float()
        d_loss(logits[:batch], logits[batch:], cfg.loss.kind, cfg.loss.label_noise).backward()
        opt_D.step()
        opt_D.zero_grad(set_to_none=cfg.optim.set_to_none)
        with frozen(D):
            with autocast:
                logits = D(G(torch.randn(batch, cfg.model.z_dim, device=device))).float()
            g_loss(logits, cfg.loss.kind).backward()
        opt_G.step()
        opt_G.zero_grad(set_to_none=cfg.optim.set_to_none)

    for _ in range(warmup):
        step()
    reset_peak(device)
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    seconds = time.perf_counter() - start
    return {"img_per_sec": steps * batch / seconds, "seconds": seconds, "peak_mb": peak_mb(device)}
