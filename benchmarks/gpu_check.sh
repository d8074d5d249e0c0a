#!/usr/bin/env bash
# Issue 16's GPU check in one prepared run: installs what it needs from the repo's files, runs the GPU
# tests, measures embed (decode, model only, end to end), faiss k-means + assignment and `mmbalance
# rebalance` with embed, and writes benchmarks/results/gpu_check_cuda.json (gpu_check_cpu_check.json
# without CUDA, at small sizes: CI runs it that way). Sized for under 8 minutes on one H100/H200.
#
#   bash benchmarks/gpu_check.sh            # CUDA: full sizes; no CUDA: --small automatically
#   bash benchmarks/gpu_check.sh --small    # small sizes anywhere
#   bash benchmarks/gpu_check.sh --wheels [--install-only]
#
# Installing: with --wheels, the wheels under .whl/ (bash benchmarks/gpu_wheels.sh makes them, for a
# machine without a package index) go into $GPU_CHECK_SITE (default /tmp/mmbalance-site); the repo itself
# is used in place (PYTHONPATH), so nothing is resolved against an index. Without wheels the Python
# environment must already hold mmbalance's dependencies (e.g. `pip install -e '.[embed]'`). faiss-gpu is
# never installed here: on a GPU node run `python -m mmbalance.faiss_build --use gpu` first, else the
# faiss section records why it has no GPU figure. Where Ray is absent, the rebalance runs on the local
# executor and a stand-in `ray` module supplies run.json's version record.
#
# Env: PYTHON (default .venv/bin/python, else python3); OUT (a directory: the JSON and the test log are
# copied there too). Other arguments go to benchmarks/gpu_check.py.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
SITE=${GPU_CHECK_SITE:-/tmp/mmbalance-site}
install_only=0
use_wheels=0
args=()
for a in "$@"; do
  case "$a" in
    --install-only) install_only=1 ;;
    --wheels) use_wheels=1 ;;
    *) args+=("$a") ;;
  esac
done

wheels=""
[ "$use_wheels" = 1 ] && wheels=$(find .whl -type f -name '*.whl' 2>/dev/null | sort)
if [ -n "$wheels" ]; then
  echo "gpu_check: installing $(echo "$wheels" | wc -l) wheels from .whl into $SITE" >&2
  # shellcheck disable=SC2086
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" $wheels || exit 2
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import ray" 2>/dev/null; then
  mkdir -p "$SITE-stubs/ray"
  cat > "$SITE-stubs/ray/__init__.py" <<'PYEOF'
"""Stand-in written by benchmarks/gpu_check.sh where Ray is not installed: run.json's version record
imports ray; the local executor uses nothing else from it."""
MMBALANCE_STUB = True
__version__ = "absent (gpu_check stand-in)"


def __getattr__(name):
    raise ImportError(f"ray is not installed here (gpu_check stand-in has no ray.{name})")
PYEOF
  export PYTHONPATH="$PYTHONPATH:$SITE-stubs"
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
missing=$("$PY" - <<'PYEOF'
import importlib.util
need = ["torch", "torchvision", "open_clip", "pydantic", "polars", "faiss", "yaml", "typer", "rich", "numba", "scipy", "sklearn", "psutil", "pyarrow"]
print(" ".join(m for m in need if importlib.util.find_spec(m) is None))
PYEOF
)
if [ -n "$missing" ]; then
  echo "gpu_check: missing Python modules: $missing (carry wheels: bash benchmarks/gpu_wheels.sh, or pip install -e '.[embed]')" >&2
  exit 2
fi
[ "$install_only" = 1 ] && { echo "gpu_check: installed into $SITE" >&2; exit 0; }

cuda=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))")
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -m mmbalance.faiss_build || true
log=${GPU_CHECK_LOG:-benchmarks/results/gpu_check_tests.log}
tests_rc=0
if [ "$cuda" = 1 ]; then
  mkdir -p "$(dirname "$log")"
  # the GPU tests, and any other test file that carries the gpu marker
  files=$(grep -rl --include='test_*.py' "mark.gpu" tests | sort)
  # shellcheck disable=SC2086
  timeout 240 "$PY" -m pytest -q -m gpu -p no:cacheprovider $files 2>&1 | tee "$log"
  tests_rc=${PIPESTATUS[0]}
else
  echo "gpu_check: no CUDA, small sizes; the GPU tests are not run (they skip without CUDA)" >&2
fi
timeout 420 "$PY" benchmarks/gpu_check.py ${args[@]+"${args[@]}"}
check_rc=$?
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
  cp benchmarks/results/gpu_check_*.json "$OUT"/ 2>/dev/null || true
  [ -f "$log" ] && cp "$log" "$OUT"/
fi
echo "gpu_check: tests rc=$tests_rc, measurements rc=$check_rc" >&2
[ "$tests_rc" = 0 ] && [ "$check_rc" = 0 ]
