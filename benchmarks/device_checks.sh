#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one call of the device tool (not yet timed there):
#   bash benchmarks/device_bundle.sh                 # here, once: build/device-site.tar.xz
#   run: bash benchmarks/device_checks.sh            # carry build/device-site.tar.xz
# 1. the GPU tests (inference with bf16, pinned workers and compile; training with bf16,
#    channels_last, workers and compile), then resume-continues-exactly on CUDA;
# 2. inference: ours and ours-compile on the quick slide, and a 60,000 x 60,000 px slide end to end
#    with where its time goes;
# 3. training images/s and GPU utilisation against a plain PyTorch loop, 4 / 8 / 15 workers.
# Each step's output goes to $OUT (or build/device-out) and the script goes on past a failure.
set -uo pipefail
tar -xJf build/device-site.tar.xz -C /tmp
export PYTHONPATH="/tmp/site:$PWD" NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1
out=${OUT:-build/device-out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -m pytest -q -rs -m gpu tests/test_infer.py tests/test_training.py 2>&1 | tee "$out/gpu-tests.txt"
python3 -m pytest -q tests/test_training.py -k resume 2>&1 | tee "$out/resume-on-cuda.txt"
python3 benchmarks/segment.py --device cuda --quick --methods ours ours-compile --large-px 60000 \
    --workers 14 2>&1 | tee "$out/segment.txt"
python3 benchmarks/train.py --device cuda --workers 4 8 15 2>&1 | tee "$out/train.txt"
