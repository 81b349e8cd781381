#!/usr/bin/env bash
# Every GPU row of docs/performance.md in one call on a machine with one CUDA GPU (issue 14), under 8 minutes:
# install, then the seed DCGAN at batch 128 and 1024 in fp32 (TF32 convolutions, torch's default), bf16, and bf16 +
# compile + channels_last (+ CUDA graphs at 128); each as trainer / bare loop, data wait, host syncs per step
# (scripts/count_syncs.py with torch.cuda.set_sync_debug_mode) and graphs compiled; then resume on the GPU: 40 steps
# straight against 20 + 20, with deterministic algorithms (bit-exact expected) and without (max difference).
#
#   bash scripts/gpu_check.sh OUT_DIR [speed|quality]    (MNIST's four IDX files in data/mnist, or MNIST_DIR=...)
#
# `quality` (a call of its own, under 9 minutes) trains the GPU quality row instead (issue 23):
# scripts/quality.py --suite mnist --configs configs/mnist_best.yaml, which writes OUT_DIR/results.md (the row for
# docs/results.md) and OUT_DIR/images/mnist_best.png, and keeps the run in OUT_DIR/quality/.
#
# The device machine has torch, accelerate, safetensors, Pillow and tqdm but no network: the rest travels as wheels
# in .whl (git-ignored; name it and data/mnist in the device call's carry list), fetched here with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl omegaconf antlr4-python3-runtime webdataset braceexpand
# Every run here has wandb.mode=disabled, so W&B is never imported.
#
# Each stage has its own time limit and writes OUT_DIR/<stage>.md (+ .json, .err); a stage that fails or runs out
# of time leaves the others standing, so one call always returns rows. summary.md gathers them.
set -u
OUT=${1:?usage: bash scripts/gpu_check.sh OUT_DIR [speed|quality]}
PART=${2:-speed}
case $PART in speed|quality) ;; *) echo "error: the part to run is speed or quality, not '$PART'" >&2; exit 2 ;; esac
MNIST=${MNIST_DIR:-data/mnist}
mkdir -p "$OUT"
START=$(date +%s)
stage() {  # stage NAME SECONDS COMMAND...: run it under a time limit, log its status
    local name=$1 limit=$2
    shift 2
    timeout "$limit" "$@" >"$OUT/$name.md" 2>"$OUT/$name.err"
    echo "$name: exit $? after $(($(date +%s) - START)) s" | tee -a "$OUT/stages.txt"
}

nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
if [ -d .whl ]; then
    stage install 120 python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
else
    stage install 240 python3 -m pip install -q -e .
fi
export PYTHONUNBUFFERED=1
python() { python3 "$@"; }
python -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))" >"$OUT/torch.txt"

# MNIST's shards once, outside the timed stages (the device cache reads the IDX files; evaluation and the loader
# switch read the shards).
stage mnist_shards 120 python3 scripts/prepare_mnist.py --src "$MNIST" --out "$OUT/mnist-shards"

if [ "$PART" = quality ]; then
    # --jobs 1: one training on the one GPU, one seed within the device budget; the classifier (FCD, IS) is trained on
    # first use, under a minute there.
    stage quality 480 python3 scripts/quality.py --suite mnist --configs configs/mnist_best.yaml --jobs 1 --seeds 1 \
        --out "$OUT/results.md" --runs "$OUT/quality" --set "data.mnist_dir=$MNIST" --set "data.cache_dir=$OUT/mnist-shards"
    { echo "# GPU quality row, $(date +%F), $(cat "$OUT/torch.txt")"; echo; cat "$OUT/quality.md"; echo
      cat "$OUT/stages.txt"; } >"$OUT/summary.md"
    echo "done in $(($(date +%s) - START)) s; see $OUT/summary.md"
    exit 0
fi

BENCH=(python3 scripts/benchmark.py --processes 1 "data.mnist_dir=$MNIST" "data.cache_dir=$OUT/mnist-shards")
FAST=(train.mixed_precision=bf16 perf.compile=true perf.channels_last=true optim.impl=fused)
stage b128_fp32 60 "${BENCH[@]}" --batch 128 --steps 200 --syncs 50 --out "$OUT/b128_fp32.json"
stage b128_fast_graphs 120 "${BENCH[@]}" --batch 128 --steps 200 --syncs 50 --out "$OUT/b128_fast_graphs.json" \
    "${FAST[@]}" perf.compile_mode=reduce-overhead
stage b1024_fp32 60 "${BENCH[@]}" --batch 1024 --steps 50 --syncs 0 --out "$OUT/b1024_fp32.json"
stage b1024_bf16 60 "${BENCH[@]}" --batch 1024 --steps 50 --syncs 0 --out "$OUT/b1024_bf16.json" \
    train.mixed_precision=bf16 optim.impl=fused
stage b1024_fast 120 "${BENCH[@]}" --batch 1024 --steps 100 --syncs 20 --out "$OUT/b1024_fast.json" "${FAST[@]}"

# Resume on the GPU: A trains 40 steps; B trains 20, stops, and is rerun to 40. Deterministic kernels need cuBLAS's
# fixed workspace; without them, atomics in the convolution backward make runs differ slightly anyway.
RUN=(train.steps=40 train.batch_size=128 ckpt.every=10 log.every=10 log.sample_every=40 eval.every=0
     wandb.mode=disabled "data.mnist_dir=$MNIST" "data.cache_dir=$OUT/mnist-shards")
TRAIN='import sys, torch
from gan_dist.config import load_config
from gan_dist.loop import train
torch.use_deterministic_algorithms(sys.argv[1] == "det", warn_only=True)  # warns where none exists
train(load_config(sys.argv[2:]))'
COMPARE='import sys
from safetensors.torch import load_file
worst = 0.0
for name in ("generator", "generator_ema", "discriminator"):
    a, b = (load_file(f"{run}/final/{name}.safetensors") for run in sys.argv[1:3])
    worst = max([worst] + [(a[k].double() - b[k].double()).abs().max().item() for k in a])
print(f"| resume on the GPU ({sys.argv[3]}): 40 steps straight vs 20 + 20, max abs difference | {worst:.3g} |")'
for mode in det nondet; do
    rm -rf "$OUT/resume_$mode"
    stage "resume_${mode}_a" 60 env CUBLAS_WORKSPACE_CONFIG=:4096:8 python3 -c "$TRAIN" $mode "${RUN[@]}" \
        "run.dir=$OUT/resume_$mode/a"
    stage "resume_${mode}_b1" 60 env CUBLAS_WORKSPACE_CONFIG=:4096:8 python3 -c "$TRAIN" $mode "${RUN[@]}" \
        train.steps=20 "run.dir=$OUT/resume_$mode/b"
    stage "resume_${mode}_b2" 60 env CUBLAS_WORKSPACE_CONFIG=:4096:8 python3 -c "$TRAIN" $mode "${RUN[@]}" \
        "run.dir=$OUT/resume_$mode/b"
    python -c "$COMPARE" "$OUT/resume_$mode/a" "$OUT/resume_$mode/b" "$mode" >>"$OUT/resume.md" 2>>"$OUT/resume.err"
done

{
    echo "# GPU check, $(date +%F), $(cat "$OUT/torch.txt")"
    for f in "$OUT"/b*.md "$OUT/resume.md"; do
        [ -s "$f" ] && { echo; echo "## $(basename "$f" .md)"; cat "$f"; }
    done
    echo; cat "$OUT/stages.txt"
} >"$OUT/summary.md"
echo "done in $(($(date +%s) - START)) s; see $OUT/summary.md"
