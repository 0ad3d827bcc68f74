#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in steps sized for the device tool (15 minutes of device time a
# session, 10 a call; none of it timed there yet, so each step has its own time limit):
#   bash benchmarks/device_bundle.sh                      # here, once: build/device-site.tar.xz
#   run: bash benchmarks/device_checks.sh tests train segment   # carry build/device-site.tar.xz
#   run: bash benchmarks/device_checks.sh large                 # on the same warm machine
# Steps (default: all four, in this order, the most wanted first):
#   tests    the GPU tests (inference with bf16, pinned workers, scales, mirrors and compile;
#            training with bf16, channels_last, workers and compile), then resume on CUDA;
#   train    training images/s and GPU utilisation against a plain PyTorch loop, 4 / 8 / 15 workers;
#   segment  inference on the quick slide, eager and compiled, with where the time goes and the
#            ratio of end to end to the model alone on pre-decoded tiles;
#   large    a 60,000 x 60,000 px slide end to end, with where its time goes.
# Each step's output goes to $OUT (or build/device-out); a step that fails or runs out of time
# does not stop the next.
set -uo pipefail
tar -xJf build/device-site.tar.xz -C /tmp
export PYTHONPATH="/tmp/site:$PWD" NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1
out=${OUT:-build/device-out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
steps=("$@")
[ $# -gt 0 ] || steps=(tests train segment large)
for name in "${steps[@]}"; do
    echo "== $name ($(date +%T))"
    case $name in
      tests)
        timeout 240 python3 -m pytest -q -rs -m gpu tests/test_infer.py tests/test_training.py \
          2>&1 | tee "$out/gpu-tests.txt"
        timeout 90 python3 -m pytest -q tests/test_training.py -k resume 2>&1 \
          | tee "$out/resume-on-cuda.txt" ;;
      train)
        timeout 240 python3 benchmarks/train.py --device cuda --workers 4 8 15 2>&1 \
          | tee "$out/train.txt" ;;
      segment)
        timeout 240 python3 benchmarks/segment.py --device cuda --quick --parts \
          --methods ours ours-compile --workers 14 2>&1 | tee "$out/segment.txt" ;;
      large)
        timeout 540 python3 benchmarks/segment.py --device cuda --quick --methods ours \
          --large-px 60000 --workers 14 2>&1 | tee "$out/segment-large.txt" ;;
      *) echo "unknown step $name (tests, train, segment, large)" ;;
    esac
done
