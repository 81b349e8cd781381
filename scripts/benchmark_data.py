"""Measure the data path: loader images/s next to what the trainer consumes, and the data wait of a real run.

Usage (from the repo root):

    python scripts/benchmark_data.py --config configs/mnist_dcgan.yaml data.mnist_dir=../shared/data/mnist
    python scripts/benchmark_data.py --config configs/celeba64.yaml data.shards=data/celeba-shards --workers 0,4,8

Three numbers, each for the config's model, batch and data settings, on one process:
1. loader: images/s of the real loader (read + decode + augment + batch) with each worker count in --workers,
   after its first batch (worker start-up is reported apart);
2. trainer: images/s the training step consumes (D step + G step of the configured model, data already in memory);
3. a real run of `train.py` for --steps steps with the first worker count: `perf/data_wait_frac`, the share of
   wall time the loop spent waiting for the next batch, over the whole run and per log interval after the first.
4. with --npy-shards N: the first N shards of the data, written again as pre-decoded `npy` shards
   (`make_shards.py --format npy`), and one worker's images/s (in-process, 0 workers) on each (goal: >= 10x),
   on the npy shards streamed (their offset indexes removed) against read at their offsets, and the images/s of
   decoding alone, on samples already in memory;
5. with --cache: a second real run with the dataset held on the device (`data.device_cache=true`), its data wait.
Prints a markdown table and writes the numbers as JSON with --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from gan_dist.bench import bare_loop
from gan_dist.config import Config, load_config
from gan_dist.data import Source, decode_dataset, open_source, shard_batches
from gan_dist.errors import UserError
from gan_dist.images import decode_image
from gan_dist.rundir import read_metrics
from gan_dist.shardformat import write_shard
from gan_dist.shards import open_shard, tar_samples
from gan_dist.writer import as_npy, index_shards


def loader_rate(cfg: Config, workers: int, batches: int) -> dict:
    data = dataclasses.replace(cfg.data, num_workers=workers)
    start = time.perf_counter()
    it = shard_batches(open_source(data), data, cfg.train.batch_size, cfg.seed, rank=0, world=1)
    next(it)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    elapsed = time.perf_counter() - start
    del it
    return {"workers": workers, "img_per_sec": batches * cfg.train.batch_size / elapsed, "first_batch_s": first}


def npy_vs_png(cfg: Config, shards: int, batches: int, folder: Path) -> dict:
    """One worker's images/s on the first `shards` shards as they are, and as npy shards of the same samples."""
    source = open_source(cfg.data)
    subset = Source(source.urls[:shards], source.counts[:shards])
    plain = dataclasses.replace(cfg.data, dataset="webdataset", shards="::".join(subset.urls), num_workers=0)
    images, labels, _ = decode_dataset(subset, plain)
    folder.mkdir(parents=True, exist_ok=True)
    start = 0
    for i, count in enumerate(subset.counts):
        samples = ({"__key__": f"{k:08d}", "npy": as_npy(images[k].transpose(1, 2, 0))}
                   | ({"cls": str(int(labels[k])).encode()} if labels[k] >= 0 else {})  # -1: the sample has none
                   for k in range(start, start + count))
        write_shard(folder / f"train-{i:05d}.tar", samples)
        start += count
    index_shards(folder)
    streamed = folder.with_name(f"{folder.name}-streamed")  # the same shards without their offset indexes
    shutil.copytree(folder, streamed, ignore=shutil.ignore_patterns("*.idx"))
    npy = dataclasses.replace(plain, shards=str(folder), manifest="")
    png_rate = loader_rate(dataclasses.replace(cfg, data=plain), 0, batches)["img_per_sec"]
    npy_rate = loader_rate(dataclasses.replace(cfg, data=npy), 0, batches)["img_per_sec"]
    npy_streamed = loader_rate(dataclasses.replace(cfg, data=dataclasses.replace(npy, shards=str(streamed))), 0,
                               batches)["img_per_sec"]
    decode = {kind: decode_rate(urls, cfg.data) for kind, urls in
              (("png", subset.urls), ("npy", sorted(str(p) for p in folder.glob("*.tar"))))}
    return {"shards": shards, "samples": len(images), "png_img_per_sec": png_rate, "npy_img_per_sec": npy_rate,
            "npy_streamed_img_per_sec": npy_streamed, "index_speedup": npy_rate / npy_streamed,
            "speedup": npy_rate / png_rate, "png_decode_per_sec": decode["png"], "npy_decode_per_sec": decode["npy"],
            "decode_speedup": decode["npy"] / decode["png"]}


def decode_rate(urls: list[str], data) -> float:
    """Images/s of `decode_image` alone, over every sample of `urls` already in memory."""
    samples = []
    for url in urls:
        with open_shard(url) as stream:
            samples += list(tar_samples(stream, url))
    start = time.perf_counter()
    for sample in samples:
        decode_image(sample, data.resolution, data.channels)
    return len(samples) / (time.perf_counter() - start)


def run_wait(argv: list[str], workers: int, steps: int, log_every: int) -> dict:
    from gan_dist.loop import train  # noqa: PLC0415 - creates an Accelerator; only needed here

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(argv + [f"run.dir={tmp}", f"train.steps={steps}", f"data.num_workers={workers}",
                                  f"log.every={log_every}", f"ckpt.every={steps}", f"log.sample_every={steps}",
                                  "wandb.mode=disabled", "eval.every=0"])
        start = time.perf_counter()
        train(cfg)
        wall = time.perf_counter() - start
        rows = read_metrics(tmp)
    waits = [r["perf/data_wait_frac"] for r in rows]
    rates = [r["perf/img_per_sec"] for r in rows]
    steady = waits[1:] or waits
    return {"workers": workers, "steps": steps, "wall_s": wall, "wait_frac_run": sum(waits) / len(waits),
            "wait_frac_first_interval": waits[0],
            "wait_frac_steady": sum(steady) / len(steady), "wait_frac_max_steady": max(steady),
            "train_img_per_sec_steady": sum(rates[1:] or rates) / len(rates[1:] or rates)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="training config YAML (default: the defaults, i.e. the seed DCGAN)")
    parser.add_argument("--workers", default="0,2", help="loader worker counts to measure (default 0,2)")
    parser.add_argument("--batches", type=int, default=100, help="loader batches timed per worker count")
    parser.add_argument("--train-steps", type=int, default=10, help="in-memory training steps timed")
    parser.add_argument("--steps", type=int, default=60, help="steps of the real run (0 skips it)")
    parser.add_argument("--log-every", type=int, default=10, help="log interval of the real run")
    parser.add_argument("--run-workers", type=int, default=2, help="loader workers of the real run (default 2)")
    parser.add_argument("--npy-shards", type=int, default=0, help="shards to rewrite as npy and compare (0: skip)")
    parser.add_argument("--cache", action="store_true", help="a second real run with data.device_cache=true")
    parser.add_argument("--out", type=Path, help="write the numbers as JSON here")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args()
    argv = (["--config", args.config] if args.config else []) + args.overrides
    try:
        cfg = load_config(argv)
        if cfg.data.dataset not in ("mnist", "webdataset"):
            raise UserError("benchmark_data.py measures image data; give a config with data.dataset mnist or "
                            "webdataset")
        loaders = [loader_rate(cfg, int(w), args.batches) for w in args.workers.split(",")]
        # What the loop asks of the loader: the bare D + G steps on a batch already in memory.
        consumed = bare_loop(cfg, cfg.train.batch_size, args.train_steps, 1, torch.device("cpu"),
                             ddp=False)["img_per_sec"]
        with tempfile.TemporaryDirectory() as tmp:
            npy = npy_vs_png(cfg, args.npy_shards, args.batches, Path(tmp)) if args.npy_shards else None
        loader_argv = argv + ["data.device_cache=false"]
        run = run_wait(loader_argv, args.run_workers, args.steps, args.log_every) if args.steps else None
        cached = run_wait(argv + ["data.device_cache=true"], 0, args.steps, args.log_every) \
            if args.steps and args.cache else None
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.code
    result = {"date": time.strftime("%Y-%m-%d"), "host": f"{platform.machine()}, {torch.get_num_threads()} torch "
              f"threads", "command": " ".join(["python", "scripts/benchmark_data.py"] + sys.argv[1:]),
              "batch": cfg.train.batch_size, "model": f"{cfg.model.arch} width {cfg.model.width}",
              "trainer_img_per_sec": consumed, "loaders": loaders, "run": run, "npy": npy, "cached_run": cached}
    print("\n| measure | value |\n| --- | --- |")
    print(f"| trainer consumes (in-memory D+G steps, batch {cfg.train.batch_size}) | {consumed:,.0f} img/s |")
    for r in loaders:
        print(f"| loader, {r['workers']} workers | {r['img_per_sec']:,.0f} img/s "
              f"({r['img_per_sec'] / consumed:.1f}x the trainer; first batch {r['first_batch_s']:.2f} s) |")
    if npy:
        print(f"| one worker, {npy['samples']} samples of {npy['shards']} shards: as written vs npy | "
              f"{npy['png_img_per_sec']:,.0f} vs {npy['npy_img_per_sec']:,.0f} img/s: **{npy['speedup']:.1f}x** "
              f"(goal >= 10x: {'met' if npy['speedup'] >= 10 else 'not met'}) |")
        print(f"| one worker, npy shards: streamed (tar headers parsed) vs read at their offset indexes | "
              f"{npy['npy_streamed_img_per_sec']:,.0f} vs {npy['npy_img_per_sec']:,.0f} img/s: "
              f"**{npy['index_speedup']:.1f}x** |")
        print(f"| decoding alone (`decode_image` on samples in memory): as written vs npy | "
              f"{npy['png_decode_per_sec']:,.0f} vs {npy['npy_decode_per_sec']:,.0f} img/s: "
              f"**{npy['decode_speedup']:.1f}x** |")
    for what, r in (("loader", run), ("device cache", cached)):
        if r:
            print(f"| real run, {what}, {r['workers']} workers, {r['steps']} steps: data wait | "
                  f"{100 * r['wait_frac_run']:.2f}% of step time over the run; "
                  f"{100 * r['wait_frac_steady']:.2f}% after the first interval (max "
                  f"{100 * r['wait_frac_max_steady']:.2f}%), {100 * r['wait_frac_first_interval']:.1f}% in the "
                  f"first; {r['train_img_per_sec_steady']:,.0f} img/s |")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
