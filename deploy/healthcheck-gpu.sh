#!/bin/sh
# HEALTHCHECK of deploy/Dockerfile.cuda: healthy when faiss and torch both see a GPU. What the engine
# keeps (docker inspect, podman healthcheck) is one line: faiss_build's JSON report when healthy, every
# reason it gives when not (e.g. "unhealthy: faiss sees 0 GPUs, 1 required (...); torch sees 0 CUDA
# devices, 1 required").
out=$(python -m mmbalance.faiss_build --require-gpus 1 --torch 2>&1)
rc=$?
if [ "$rc" = 0 ]; then
  printf '%s\n' "$out" | tail -n 1
  exit 0
fi
reasons=$(printf '%s\n' "$out" | sed -n 's/^faiss_build: //p' | paste -sd ';' - | sed 's/;/; /g')
echo "unhealthy: ${reasons:-$(printf '%s\n' "$out" | tail -n 1)}"
exit 1
