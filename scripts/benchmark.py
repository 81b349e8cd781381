"""Throughput: the trainer's images/s beside a bare PyTorch loop's, and its weak scaling over processes.

    python scripts/benchmark.py [--config FILE] [--batch 128] [--steps 10] [--warmup STEPS] [--processes 1,2]
                                [--threads 1] [--syncs 20] [--switches all|NAME,...] [--out FILE.json] [key=value ...]

For each process count P in --processes, one launch (`accelerate launch`, CPU gloo without CUDA, NCCL with it) trains
--batch images per process and step, a global batch of P x batch: first a bare PyTorch loop (`gan_dist.bench.bare_loop`)
with the same G, D, Adam (optim.impl), batch, memory format, autocast, compile and loss functions, on one batch already
in memory: no accelerate, logging, EMA or data loading; with P > 1, G and D in torch's DDP with its default options and
the config's `dist.comm_hook`. Then the trainer (`gan_dist.loop.train`: data loading, EMA, metrics, checkpoint and
stop-signal logic, DDP as configured), then (P = 1) the bare loop again: the two bare timings bracket the trainer's. The
headline is the trainer / bare time ratio. The weak-scaling efficiency is the P-process images/s over P times the
1-process one, for the trainer and for the bare loop (what DDP itself scales on this machine).
The bare loop is timed over --steps steps after --warmup (default --steps); the trainer over its second log interval
of --steps steps (the first, which pays worker start-up, first-call allocations and compilation, is not counted).
Also reported: peak memory (CUDA: the most allocated in the phase; CPU: the process's peak RSS when the phase ends),
the trainer's data wait (`perf/data_wait_frac`), the graphs torch.compile built (recompiles included), and the host
syncs between log steps over --syncs steps of the trainer at the largest process count (scripts/count_syncs.py).
A goal table gives each goal of the fast path with its verdict (GPU rows: not measured without a GPU).
--switches adds one trainer run per speed switch (SWITCHES), each against the baseline at its process count.
Prints markdown tables; --out writes everything as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from accelerate import PartialState

from gan_dist.bench import bare_loop, hardware, peak_mb, reset_peak
from gan_dist.config import load_config
from gan_dist.errors import UserError
from gan_dist.rundir import read_metrics

REPO = Path(__file__).resolve().parents[1]
# Each speed switch as overrides of the baseline, and the process count it is measured at (0: the largest given).
SWITCHES = {
    "step_sync": (["perf.step_sync=true"], 1),
    "channels_last": (["perf.channels_last=true"], 1),
    "bf16": (["train.mixed_precision=bf16"], 1),
    "compile": (["perf.compile=true"], 1),
    "adam_fused": (["optim.impl=fused"], 1),
    "adam_foreach": (["optim.impl=foreach"], 1),
    "adam_single": (["optim.impl=single"], 1),
    "no_device_cache": (["data.device_cache=false"], 1),
    "broadcast_buffers": (["dist.broadcast_buffers=true"], 2),
    "zero_grad_to_zeros": (["optim.set_to_none=false"], 1),
    "no_prefetch": (["perf.prefetch=false"], 1),
    "ema_every_4": (["perf.ema_every=4"], 1),
    "ddp_bucket_view_static": (["dist.gradient_as_bucket_view=true", "dist.static_graph=true"], 0),
    "ddp_bucket_1mb": (["dist.bucket_cap_mb=1"], 0),
    "comm_hook_fp16": (["dist.comm_hook=fp16"], 0),
    "aug_diffaug": (["aug.kind=diffaug"], 1),  # not speed switches: what augmenting everything D sees costs
    "aug_ada": (["aug.kind=ada", "aug.p=0.5"], 1),
}


def device_of_rank() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def trainer(argv: list[str], processes: int, batch: int, steps: int, run_dir: str, device: torch.device) -> dict:
    """`train()` for 2 x `steps` steps, logged every `steps`: the second interval is the measurement."""
    from gan_dist.loop import train  # noqa: PLC0415 - the Accelerator is created inside

    cfg = load_config(argv + [f"run.dir={run_dir}", f"train.batch_size={processes * batch}", "train.grad_accum=1",
                              f"train.steps={2 * steps}", f"log.every={steps}", f"log.sample_every={2 * steps}",
                              f"ckpt.every={2 * steps}", "ckpt.resume=none", "eval.every=0", "wandb.mode=disabled"])
    reset_peak(device)
    train(cfg)
    rows = read_metrics(run_dir)
    (row,) = [r for r in rows if r.get("train/step") == 2 * steps and "perf/img_per_sec" in r]
    compiled = torch._dynamo.utils.counters  # graphs torch.compile built, recompiles included
    return {"img_per_sec": row["perf/img_per_sec"], "seconds": steps * processes * batch / row["perf/img_per_sec"],
            "data_wait_frac": row["perf/data_wait_frac"], "peak_mb": peak_mb(device),
            "loss_d": row["train/loss_d"], "loss_g": row["train/loss_g"],
            "graphs_compiled": compiled["stats"]["unique_graphs"], "frames_compiled": compiled["frames"]["total"]}


def worker(args: argparse.Namespace, argv: list[str]) -> int:
    """One process of a launch: the trainer, between two runs of the bare loop (with --bare)."""
    torch.set_num_threads(args.threads)
    device = device_of_rank()
    cfg = load_config(argv)
    # Starts the process group for the bare loop's DDP, on the CPU as the trainer's Accelerator does without CUDA.
    ddp = PartialState(cpu=not torch.cuda.is_available()).num_processes > 1
    result = {}
    if args.bare:
        result["bare_before"] = bare_loop(cfg, args.batch, args.steps, args.warmup, device, ddp)
    result["trainer"] = trainer(argv, args.processes_now, args.batch, args.steps, args.run_dir, device)
    if args.bare and not ddp:  # the trainer's end_training() has ended the process group DDP would need
        result["bare_after"] = bare_loop(cfg, args.batch, args.steps, args.warmup, device, ddp)
    if int(os.environ.get("RANK", 0)) == 0:
        Path(args.worker).write_text(json.dumps(result))
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: argparse.Namespace, argv: list[str], processes: int, bare: bool, tmp: Path, name: str) -> dict:
    """Run one launch of `processes` workers; their rank 0's result."""
    out, run_dir = tmp / f"{name}.json", tmp / name
    cmd = [sys.executable]
    if processes > 1:
        cmd += ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1", "--num_processes",
                str(processes), "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
                str(free_port())]
    cmd += [str(REPO / "scripts" / "benchmark.py"), "--worker", str(out), "--run-dir", str(run_dir),
            "--processes-now", str(processes), "--batch", str(args.batch), "--steps", str(args.steps),
            "--warmup", str(args.warmup), "--threads", str(args.threads), *(["--bare"] if bare else []), *argv]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), WANDB_SILENT="true")
    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "1"
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        lines = (proc.stdout + proc.stderr).strip().splitlines()
        tail = "\n".join(([x for x in lines if x.startswith("[rank0]:")] or lines)[-15:])  # not torchrun's summary
        raise UserError(f"the {name} launch exited {proc.returncode}:\n{tail}")
    result = json.loads(out.read_text())
    result["launch_s"] = time.perf_counter() - start
    print(f"[benchmark] {name}: {result['trainer']['img_per_sec']:,.0f} img/s ({result['launch_s']:.0f} s)",
          file=sys.stderr, flush=True)
    return result


def count_syncs(argv: list[str], processes: int, steps: int, batch: int, tmp: Path) -> int:
    """Host syncs between log steps (scripts/count_syncs.py) over `steps` steps of the trainer, all ranks."""
    out = tmp / "syncs.json"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--num_processes",
           str(processes), "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(free_port()), *(["--multi_gpu"] if processes > 1 else []), str(REPO / "scripts" / "count_syncs.py"),
           "--out", str(out), *argv, f"run.dir={tmp / 'syncs'}", f"train.batch_size={processes * batch}",
           "train.grad_accum=1", f"train.steps={steps}", f"log.every={steps}", f"log.sample_every={steps}",
           f"ckpt.every={steps}", "dist.stop_check_every=2", "ckpt.resume=none", "eval.every=0", "wandb.mode=disabled"]
    env = dict(os.environ, WANDB_SILENT="true") | ({} if torch.cuda.is_available() else {"ACCELERATE_USE_CPU": "1"})
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise UserError(f"the host-sync count exited {proc.returncode}:\n" +
                        "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-10:]))
    return sum(json.loads((tmp / f"syncs.rank{r}.json").read_text())["syncs"] for r in range(processes))


def goals(result: dict) -> list[tuple[str, str, str]]:
    """(goal, measured, verdict) for every goal of the fast-path issue this run can speak to."""
    runs, batch, gpu = result["runs"], result["batch_per_process"], torch.cuda.is_available()
    verdict = {True: "**met**", False: "**not met**"}
    rows = []
    for p, r in runs.items():
        rows.append((f"trainer / bare loop time <= 1.03, {p} process(es), global batch {int(p) * batch}",
                     f"{r['ratio']:.3f}", verdict[r["ratio"] <= 1.03]))
        wait = r["trainer"]["data_wait_frac"]
        rows.append((f"data wait < 1%, {p} process(es)", f"{100 * wait:.2f}%", verdict[wait < 0.01]))
    if "2" in runs:
        eff = runs["2"]["trainer"]["efficiency"]
        rows.append(("weak scaling >= 0.90, 2 processes", f"{eff:.3f}", verdict[eff >= 0.90]))
    if result.get("syncs") is not None:
        rows.append((f"host syncs between log steps = 0 ({result['sync_steps']} steps, all ranks)",
                     str(result["syncs"]), verdict[result["syncs"] == 0]))
    for goal_batch, goal in ((1024, 100_000), (128, 30_000)):
        name = f"one GPU, seed DCGAN, global batch {goal_batch}: >= {goal:,} img/s"
        if gpu and "1" in runs and batch == goal_batch:
            rate = runs["1"]["trainer"]["img_per_sec"]
            rows.append((name, f"{rate:,.0f} img/s", verdict[rate >= goal]))
        elif not gpu:
            rows.append((name, "-", "not measured: no GPU"))
    return rows


def markdown(result: dict) -> str:
    batch, lines = result["batch_per_process"], []
    lines.append(f"Device: {result['device']}; {result['threads']} thread(s) per process; {batch} images per "
                 f"process per step; {result['date']}.")
    lines.append(f"Command: `{result['command']}`")
    lines += ["", "| run | processes | global batch | images/s | vs bare loop | weak scaling | peak memory (MB) | "
              "data wait |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for p, r in result["runs"].items():
        b, t = r["bare"], r["trainer"]
        lines.append(f"| bare loop | {p} | {int(p) * batch} | {b['img_per_sec']:,.1f} | | "
                     f"{b.get('efficiency', 1):.3f} | {b['peak_mb']:,.0f} | |")
        lines.append(f"| trainer | {p} | {int(p) * batch} | {t['img_per_sec']:,.1f} | {r['ratio']:.3f} time ratio | "
                     f"{t.get('efficiency', 1):.3f} | {t['peak_mb']:,.0f} | {100 * t['data_wait_frac']:.2f}% |")
    compiled = [r["trainer"]["graphs_compiled"] for r in result["runs"].values()]
    if any(compiled):
        lines += ["", "Graphs torch.compile built in each trainer run (recompiles included): " +
                  ", ".join(f"{p} process(es): {r['trainer']['graphs_compiled']} graphs from "
                            f"{r['trainer']['frames_compiled']} frames" for p, r in result["runs"].items())]
    lines += ["", "| goal | measured | verdict |", "| --- | --- | --- |"]
    lines += [f"| {goal} | {measured} | {verdict} |" for goal, measured, verdict in goals(result)]
    if result["switches"]:
        lines += ["", "| switch | overrides | processes | images/s | vs baseline |", "| --- | --- | --- | --- | --- |"]
        for name, s in result["switches"].items():
            lines.append(f"| {name} | `{' '.join(s['overrides'])}` | {s['processes']} | "
                         f"{s['trainer']['img_per_sec']:,.1f} | {s['speedup']:.3f}x |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="training config YAML (default: the defaults, i.e. the seed DCGAN)")
    parser.add_argument("--batch", type=int, default=128, help="images per process per step (default 128)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    parser.add_argument("--warmup", type=int, help="untimed bare-loop steps first (default: --steps, as many as the "
                        "trainer's untimed first interval; a process's first steps run slower)")
    parser.add_argument("--processes", default="1,2", help="process counts, comma-separated (default 1,2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    parser.add_argument("--switches", default="", help=f"'all' or some of {','.join(SWITCHES)}")
    parser.add_argument("--syncs", type=int, default=20, help="steps over which host syncs are counted, with the "
                        "largest process count (scripts/count_syncs.py; 0 skips it)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    parser.add_argument("--processes-now", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--bare", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args()
    argv = (["--config", args.config] if args.config else []) + args.overrides
    args.warmup = args.steps if args.warmup is None else args.warmup
    try:
        if args.worker:
            return worker(args, argv)
        counts = sorted({int(p) for p in args.processes.split(",")})
        switches = list(SWITCHES) if args.switches == "all" else [s for s in args.switches.split(",") if s]
        unknown = [s for s in switches if s not in SWITCHES]
        if unknown or counts[0] != 1:
            raise UserError(f"unknown switch {unknown[0]}; choose from {', '.join(SWITCHES)}" if unknown else
                            "--processes must include 1: scaling and the bare loop are measured against it", code=2)
        cfg = load_config(argv)  # a bad key fails here, once, not in every launch
        if cfg.loss.r1_gamma > 0 or cfg.loss.r2_gamma > 0 or cfg.loss.kind in ("wgan_gp", "rpgan") or \
                cfg.loss.n_critic > 1 or cfg.loss.topk_gamma < 1 or cfg.model.cond or \
                cfg.train.mixed_precision == "fp16" or cfg.aug.kind != "none":
            raise UserError("the bare loop has plain unconditional D and G steps: benchmark without gradient "
                            "penalties, rpgan, top-k, model.cond, n_critic > 1, fp16 or augmentation (loss.r1_gamma=0, "
                            "loss.r2_gamma=0, loss.kind other than wgan_gp and rpgan, loss.topk_gamma=1, "
                            "model.cond=false, loss.n_critic=1, train.mixed_precision no or bf16, aug.kind=none; "
                            "--switches aug_ada,aug_diffaug times augmentation against the trainer without)", code=2)
        start = time.perf_counter()
        runs, done = {}, {}
        with tempfile.TemporaryDirectory() as tmp:
            for p in counts:
                r = launch(args, argv, p, True, Path(tmp), f"baseline_{p}")
                bare = [r.pop("bare_before")] + ([r.pop("bare_after")] if "bare_after" in r else [])
                seconds = sum(b["seconds"] for b in bare) / len(bare)
                r["bare"] = {"img_per_sec": p * args.steps * args.batch / seconds, "seconds": seconds,
                             "peak_mb": bare[0]["peak_mb"], "runs": bare}
                r["ratio"] = r["trainer"]["seconds"] / seconds
                for kind in ("bare", "trainer"):
                    if p > 1:
                        r[kind]["efficiency"] = r[kind]["img_per_sec"] / (p * runs["1"][kind]["img_per_sec"])
                runs[str(p)] = r
            syncs = count_syncs(argv, counts[-1], args.syncs, args.batch, Path(tmp)) if args.syncs else None
            for name in switches:
                overrides, p = SWITCHES[name]
                p = p or counts[-1]
                base = runs[str(p)]["trainer"]["img_per_sec"] if str(p) in runs else None
                r = launch(args, argv + overrides, p, False, Path(tmp), name)
                r |= {"overrides": overrides, "processes": p,
                      "speedup": r["trainer"]["img_per_sec"] / base if base else float("nan")}
                done[name] = r
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.code
    result = {"date": time.strftime("%Y-%m-%d"), "device": hardware(torch.cuda.is_available()),
              "torch": torch.__version__,
              "threads": args.threads, "batch_per_process": args.batch, "steps": args.steps,
              "command": " ".join(["python", "scripts/benchmark.py"] + sys.argv[1:]),
              "wall_s": time.perf_counter() - start, "runs": runs, "switches": done, "syncs": syncs,
              "sync_steps": args.syncs}
    print(markdown(result))
    print(f"\n(benchmark wall time {result['wall_s']:.0f} s)")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
