#!/usr/bin/env bash
# .venv-consumers: the trainer-side libraries the export round-trip tests read mmbalance's exports
# with (mosaicml-streaming, Hugging Face datasets), pinned in scripts/consumers-requirements.txt.
# mosaicml-streaming pins numpy < 2.2, which .venv cannot have, so they get their own environment.
# It borrows torch, torchvision and their CUDA wheels from .venv when .venv has them (symlinks on
# a .pth path: ~6 GB and most of the install time saved); otherwise pip installs torch here too.
# Needs only PyPI; safe to rerun (kept as is while the requirements and the borrowed torch match).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${MMBALANCE_CONSUMERS_VENV:-.venv-consumers}  # the tests read the same variable
REQS=scripts/consumers-requirements.txt
start=$(date +%s)
purelib() { "$1" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }
MAIN_SITE=""
if [ -x .venv/bin/python ]; then
  MAIN_SITE=$(purelib .venv/bin/python)
  [ -d "$MAIN_SITE/torch" ] || MAIN_SITE=""
fi
want=$( { cat "$REQS"; [ -z "$MAIN_SITE" ] || ls -d "$MAIN_SITE"/torch-*.dist-info "$MAIN_SITE"/torchvision-*.dist-info; } | sha256sum | cut -d' ' -f1)
installed='import importlib.metadata as m; [m.version(p) for p in ("mosaicml-streaming", "datasets", "torch")]'
if [ "$(cat "$VENV/.requirements.sha256" 2>/dev/null)" = "$want" ] && "$VENV/bin/python" -c "$installed" 2>/dev/null; then
  echo "setup_consumers: $VENV is up to date"
  exit 0
fi
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
if [ -n "$MAIN_SITE" ]; then
  mkdir -p "$VENV/borrowed"
  for entry in "$MAIN_SITE"/{torch,torchgen,functorch,torchvision,torchvision.libs,triton,nvidia,cuda} \
               "$MAIN_SITE"/{torch-,torchvision-,triton-,nvidia_,cuda_}*.dist-info; do
    [ -e "$entry" ] && ln -s "$(realpath "$entry")" "$VENV/borrowed/"
  done
  realpath "$VENV/borrowed" > "$(purelib "$VENV/bin/python")/mmbalance-borrowed-torch.pth"
fi
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q -r "$REQS"
"$VENV/bin/python" -c "import streaming, datasets"
echo "$want" > "$VENV/.requirements.sha256"
echo "setup_consumers: $VENV ready in $(( $(date +%s) - start )) s"
