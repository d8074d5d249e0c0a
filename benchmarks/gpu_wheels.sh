#!/usr/bin/env bash
# Wheels for benchmarks/gpu_check.sh on a GPU machine without a package index (the device machine of
# this workplace: Python 3.12, x86-64, with torch, torchvision, numpy, pyarrow, scipy, scikit-learn,
# numba, matplotlib, typer, rich, pyyaml, psutil, pytest already installed). Run here, where pip works:
#
#   bash benchmarks/gpu_wheels.sh       # -> .whl/base (~25 MB) and .whl/polars (~55 MB)
#
# A device call carries at most 64 MiB, so the two folders travel in two calls to one warm machine
# (it stays warm about 30 s after a call, and keeps $GPU_CHECK_SITE between calls):
#   1. carry [".whl/polars"], command: bash benchmarks/gpu_check.sh --wheels --install-only
#   2. carry [".whl/base"],   command: bash benchmarks/gpu_check.sh --wheels
# faiss-gpu-cu12 is not among them: with its CUDA 12 cuBLAS wheel it is over 500 MB, so on such a
# machine the faiss section records that faiss has no GPU and the k-means runs nowhere.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PYVER=${PYVER:-3.12}
if [ -d .git/info ] && ! grep -qx '/.whl/' .git/info/exclude 2>/dev/null; then echo '/.whl/' >> .git/info/exclude; fi
download() {
  local dest=$1; shift
  mkdir -p "$dest"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$dest" "$@"
}
download .whl/base open_clip_torch==3.3.0 ftfy wcwidth "pydantic>=2.6" annotated-types typing-inspection \
  typing-extensions "faiss-cpu>=1.8" "polars>=1.0"
pin() {  # the exact version a downloaded wheel requires of another distribution
  unzip -p "$1" '*/METADATA' | sed -n "s/^Requires-Dist: $2==\([^ ;]*\).*/\1/p" | head -1
}
download .whl/base "pydantic-core==$(pin .whl/base/pydantic-2*.whl pydantic-core)"
download .whl/polars "polars-runtime-32==$(pin .whl/base/polars-*.whl polars-runtime-32)"
du -sh .whl/base .whl/polars 2>/dev/null
