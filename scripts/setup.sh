#!/usr/bin/env bash
# Set up a development environment from the repo's own files: .venv with mmbalance[dev,embed] (torch and
# open_clip for the embedding and training tests), and Chromium
# (Debian's package) for the report test. Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! command -v chromium >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "setup: chromium not found and cannot be installed here; the HTML report test will be skipped" >&2
  fi
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/pip install -q --upgrade pip
# within the deploy images' pins (deploy/requirements-cpu.txt): the tests, the benchmarks and
# scripts/test_images.sh's reference run use the versions the images run, not whatever PyPI released
# since the lock (a newer polars made a host run and a cluster job of the same recipe differ)
.venv/bin/pip install -q -e ".[dev,embed]" -c deploy/requirements-cpu.txt
# img2dataset for tests/test_img2dataset.py, without its pins (pandas<3 would replace ours); its
# other dependencies are in the dev extra
.venv/bin/pip install -q --no-deps img2dataset==1.47.0
# exactly one faiss build: a rerun after `python -m mmbalance.faiss_build --use gpu` reinstalls faiss-cpu beside it
.venv/bin/python -m mmbalance.faiss_build > /dev/null
bash scripts/setup_consumers.sh  # .venv-consumers: mosaicml-streaming + HF datasets for the export round trips
