#!/usr/bin/env bash
# The GPU machines lent to this project (the device tool) have torch and nvidia-ml-py but no network.
# This packs the Python 3.12 x86-64 wheels they lack, at this venv's versions, into
# build/device-site.tar.xz (git-ignored, ~36 MB) to carry along: `run` with carry=[that file] and
#   tar -xJf build/device-site.tar.xz -C /tmp && export PYTHONPATH=/tmp/site NO_ALBUMENTATIONS_UPDATE=1
# Run from the repo root: bash benchmarks/device_bundle.sh
set -euo pipefail
names='albucore|albumentations|annotated-types|donfig|google-crc32c|imagecodecs|numcodecs|openslide-bin|openslide-python|pydantic|pydantic_core|pydicom|shapely|simsimd|stringzilla|tifffile|typing-inspection|typing_extensions|zarr'
pins=$(.venv/bin/pip freeze 2>/dev/null | grep -iE "^($names)==")
work=$(mktemp -d)
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 -d "$work/wheels" $pins 2>&1 | grep -v 'is ignored' || true
mkdir -p "$work/site" build
for wheel in "$work"/wheels/*.whl; do unzip -q -o -d "$work/site" "$wheel"; done
tar -C "$work" -cf - site | xz -T2 -6 > build/device-site.tar.xz
rm -rf "$work"
ls -l build/device-site.tar.xz
