#!/usr/bin/env bash
# Every check that needs a CUDA GPU, sized for the device tool (15 minutes of device time a session,
# a machine's start of a minute or two included; 10 minutes a call): two calls, the headline
# figures first, then the others if time is left:
#   bash benchmarks/device_bundle.sh                   # here, once: build/device-site.tar.xz
#   run: bash benchmarks/device_checks.sh tests train  # carry it; timeout_s 400
#   run: bash benchmarks/device_checks.sh large segment  # at once (warm 30 s); timeout_s 420
#   run: bash benchmarks/device_checks.sh cli          # timeout_s 420
#   run: bash benchmarks/device_checks.sh cohort       # timeout_s 240
# Steps:
#   tests    starts building the 60,000 px slide in the background (one core), then the GPU tests
#            (inference with bf16, pinned workers, scales, mirrors and compile; training with bf16,
#            channels_last, workers and compile), the counts of synchronising CUDA operations
#            in the tile loop and the training step, stain normalisation applied on the GPU,
#            and resume on CUDA (train.deterministic);
#   train    training images/s and GPU utilisation against a plain PyTorch loop at batch 64 with
#            15 workers (stop 23 also ran 8 workers, batch 8 and compiled: dropped to fit the
#            time), the patch stream one worker feeds on one of this machine's cores, and a
#            cProfile of the loop's main thread over the same steps (train.prof: where it spends);
#   segment  inference on the quick slide, eager and compiled, with where the time goes and the
#            ratio of end to end to the model alone on pre-decoded tiles; the sub-pixel decoder
#            against the folded model alone (on CUDA only once this says it is faster);
#   large    that slide end to end, with its tile loop alone and where its time goes (waits
#            for the build);
#   cli      `biopsy segment` on that slide: labels.ome.tif, objects.geojson and overview.png
#            (the outlines are made on the CPU: 27 s for a 30,000 px map on a 2-core CPU);
#   cohort   `biopsy batch` over 8 synthetic slides with one rank and with two sharing the GPU
#            (whether a rank's CPU scoring overlapping another's segmentation pays).
# Each step's output goes to $OUT (or build/device-out); a step that fails or runs out of time
# does not stop the next.
set -uo pipefail
tar -xJf build/device-site.tar.xz -C /tmp
export PYTHONPATH="/tmp/site:$PWD" NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1
out=${OUT:-build/device-out}
work=/tmp/biopsy-bench  # benchmarks/segment.py's default work dir
large=$work/large-60000px/slide.svs
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c 'import sys, torch, torchvision; print(sys.version.split()[0], torch.__version__,
torchvision.__version__, torch.cuda.get_device_name(0))' | tee -a "$out/gpu.txt"
steps=("$@")
[ $# -gt 0 ] || steps=(tests train segment large cli cohort)
for name in "${steps[@]}"; do
    echo "== $name ($(date +%T))"
    case $name in
      train)
        timeout 170 python3 benchmarks/train.py --device cuda --batch-size 64 --workers 15 \
          --steps 200 --profile "$out/train.prof" 2>&1 | grep -v 'fit:' | tee "$out/train.txt" ;;
      segment)
        timeout 150 python3 benchmarks/segment.py --device cuda --quick --parts \
          --methods ours ours-compile --workers 14 2>&1 | tee "$out/segment.txt"
        timeout 60 python3 benchmarks/subpixel.py --device cuda --batch-size 64 2>&1 \
          | tee "$out/subpixel.txt" ;;
      tests)
        [ -e "$large" ] || setsid nohup timeout 400 python3 -c "import sys; from pathlib import Path
sys.path.insert(0, 'benchmarks'); from segment_inputs import make_large_slide, make_slide
make_large_slide(Path('$large'), 60000, make_slide(Path('$work/synth-1.5mm'), 1, 1.5, 0.8))" \
          > /tmp/large-build.log 2>&1 < /dev/null &
        timeout 150 python3 -m pytest -q -rs -m gpu tests/test_infer.py tests/test_training.py \
          tests/test_stainnorm.py 2>&1 | tee "$out/gpu-tests.txt"
        timeout 60 python3 -m pytest -q tests/test_training.py -k resume 2>&1 \
          | tee "$out/resume-on-cuda.txt" ;;
      large)
        for _ in $(seq 200); do pgrep -f make_large_slide > /dev/null || break; sleep 1; done
        cat /tmp/large-build.log 2>/dev/null
        timeout 230 python3 benchmarks/segment.py --device cuda --quick --methods ours \
          --large-px 60000 --workers 14 2>&1 | tee "$out/segment-large.txt" ;;
      cli)  # its "seconds": segmenting (labels.ome.tif written meanwhile); the wall: all outputs
        TIMEFORMAT="biopsy segment: %R s wall"
        { time timeout 400 python3 -m biopsy segment "$large" --workers 14 \
            --model biopsy/models/default.safetensors --out /tmp/cli-60000px; } 2>&1 | tail -4 \
          | tee "$out/cli-large.txt" ;;
      cohort)
        timeout 230 python3 benchmarks/cohort.py --slides 8 --core-length-mm 2 --ranks 1 2 \
          --workers 7 2>&1 | tail -6 | tee "$out/cohort.txt" ;;
      *) echo "unknown step $name (train, segment, tests, large, cli, cohort)" ;;
    esac
done
