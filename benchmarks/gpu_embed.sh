#!/usr/bin/env bash
# GPU embed throughput (issue 4): ViT-B-32 (random init: speed does not depend on the weights),
# batch 256, fp16 autocast, JPEG bytes (512 px long side) decoded by nvJPEG and resized on the GPU
# (image_decode auto); the _draft run decodes on the host with PIL at a reduced DCT scale; captions
# tokenised and embedded too. benchmarks/gpu_check.sh is issue 16's whole GPU check (embed, faiss,
# rebalance). The same command on any machine with a CUDA GPU:
#
#     bash benchmarks/gpu_embed.sh            # -> benchmarks/results/embed_cuda.json (+ _draft.json)
#
# Prints one JSON line per run; "end_to_end.images_per_s" is the figure (rows/s with decode overlapped).
# Env: PYTHON (default .venv/bin/python, else python3); IMAGES (rows, default 20480); THREADS (decode
# threads, default nproc); DRAFT=0 skips the JPEG draft-decode variant; WHEELS=dir installs wheels from
# dir first (pip --no-index): a GPU image with torch but without open_clip_torch/ftfy/pydantic needs
#   .venv/bin/pip download --no-deps -d .wheels open_clip_torch==3.3.0 ftfy wcwidth pydantic pydantic-core \
#       annotated-types typing-inspection
# made beforehand and carried along. Extra arguments go to bench_embed.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if [ -n "${WHEELS:-}" ]; then
  "$PY" -m pip install -q --no-index --no-deps "$WHEELS"/*.whl
fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_embed.sh: no CUDA device visible to $PY (torch $("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo missing))" >&2
  exit 3
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
THREADS=${THREADS:-$(nproc)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
common=(--model ViT-B-32 --device cuda --num-gpus 1 --batch-size 256 --precision amp
        --images "${IMAGES:-20480}" --stage-images 2048 --pool 256 --long-side 512
        --decode-threads "$THREADS" --threads "$OMP_NUM_THREADS" --warmup 3)
"$PY" benchmarks/bench_embed.py "${common[@]}" --out benchmarks/results/embed_cuda.json "$@"
if [ "${DRAFT:-1}" = "1" ]; then
  "$PY" benchmarks/bench_embed.py "${common[@]}" --jpeg-draft --out benchmarks/results/embed_cuda_draft.json "$@"
fi
