#!/usr/bin/env bash
# Build the deploy images with podman and prove they work: deploy/Dockerfile runs `mmbalance demo` and,
# as a head and a worker container (a 2-node Ray cluster on the host network), the README's job
# entrypoint through `ray job submit`, whose manifest must equal a local run's; deploy/Dockerfile.cuda
# imports torch and faiss (GPU builds), fails its HEALTHCHECK in one line without a GPU, and joins the
# CPU head as a Ray node. One line per check (PASS|FAIL name detail); exit 0 only if every check passed.
#
#   bash scripts/test_images.sh              # both (cold ~25 min: GBs of CUDA wheels, an 8.7 GB image)
#   bash scripts/test_images.sh --cpu-only   # deploy/Dockerfile only
#   bash scripts/test_images.sh --clean      # remove the cached base, images and build layers
#
# Needs root (debootstrap, rootful podman), Debian's podman, runc and debootstrap, and .venv from
# scripts/setup.sh (the local reference run and the `ray job submit` client). Registry images are not
# used: the base is Debian 12 made with debootstrap (what debian:bookworm-slim is made from) and
# imported with podman; it and the build layers are cached in $MMBALANCE_IMAGE_CACHE (default
# ~/.cache/mmbalance-images, a podman store of its own; MMBALANCE_IMAGE_STORAGE_DRIVER=vfs where the
# cache sits on overlayfs itself), so a rerun rebuilds only what changed; DEBIAN_MIRROR picks the mirror.
# Without podman it skips (exit 0) unless CI is set; any other missing prerequisite fails (exit 1).
# --keep keeps the work directory (logs, runs); a failed run keeps it anyway.
{  # read whole before it runs: an edit to this file during a run cannot derail it
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

CPU_ONLY=0 KEEP=0 CLEAN=0
for arg in "$@"; do
  case $arg in
    --cpu-only) CPU_ONLY=1 ;;
    --keep) KEEP=1 ;;
    --clean) CLEAN=1 ;;
    -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "test_images: unknown option $arg (see --help)" >&2; exit 2 ;;
  esac
done

FAILED=0
pass() { echo "PASS $1 ${*:2}"; }
fail() { echo "FAIL $1 ${*:2}"; FAILED=1; }
missing() {  # missing TOOL: skipped on a workstation without podman; any other gap, or in CI, fails
  if [ "$1" = podman ] && [ -z "${CI:-}" ]; then
    echo "SKIP images podman not found: apt-get install podman runc debootstrap to build and test the deploy images"; exit 0
  fi
  echo "FAIL images ${*:2}"; exit 1
}
log_tail() { [ -f "$1" ] && tail -n "${2:-25}" "$1" | sed 's/^/    | /' >&2; }

PY=$ROOT/.venv/bin/python
VERSIONS_PY='import importlib.metadata as m, platform
print("python=" + platform.python_version(), *(f"{d}={m.version(d)}" for d in ("numpy", "scipy", "pyarrow", "polars", "pandas", "faiss-cpu", "numba", "ray")))'
for tool in podman runc debootstrap; do
  command -v "$tool" >/dev/null || missing "$tool" "$tool not found${CI:+ (CI is set)}: apt-get install podman runc debootstrap"
done
[ "$(id -u)" = 0 ] || missing root "need root (debootstrap and rootful podman)"
[ -x "$PY" ] || missing venv ".venv not found: run bash scripts/setup.sh first"

CACHE=${MMBALANCE_IMAGE_CACHE:-${XDG_CACHE_HOME:-${HOME:-/var/tmp}/.cache}/mmbalance-images}
SUITE=${DEBIAN_SUITE:-bookworm}  # = the Dockerfiles' default debian:bookworm-slim (Python 3.11, the pins')
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)
BASE=localhost/mmbalance-test-base:$SUITE
CPU_IMAGE=localhost/mmbalance:$VERSION-cpu
CUDA_IMAGE=localhost/mmbalance:$VERSION-cuda
export PYTHONPATH=$ROOT OMP_NUM_THREADS=1 RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}

# podman: its own store and settings (runc; no default ulimits, since a sandbox's may be lower)
mkdir -p "$CACHE"
cat > "$CACHE/containers.conf" <<'EOF'
[containers]
default_ulimits = []
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
printf '[storage]\ndriver = "%s"\ngraphroot = "%s/storage"\nrunroot = "%s/run"\n' \
  "${MMBALANCE_IMAGE_STORAGE_DRIVER:-overlay}" "$CACHE" "$CACHE" > "$CACHE/storage.conf"
export CONTAINERS_CONF=$CACHE/containers.conf CONTAINERS_STORAGE_CONF=$CACHE/storage.conf

if [ "$CLEAN" = 1 ]; then
  podman rmi -af >/dev/null 2>&1; rm -rf "$CACHE"; echo "removed $CACHE"; exit 0
fi

WORK=$(mktemp -d /var/tmp/mmbalance-images.XXXXXX)
chmod 0777 "$WORK"  # the containers run as uid 1000 and write runs here
LOGS=$WORK/logs; mkdir -p "$LOGS"
RUN_ID=mmbt-$$
CONTAINERS=()
cleanup() {
  for c in "${CONTAINERS[@]}"; do podman rm -f -t 5 "$c" >/dev/null 2>&1; done
  if [ "$KEEP" = 1 ] || [ "$FAILED" = 1 ]; then echo "kept $WORK" >&2; else rm -rf "$WORK"; fi  # a failure keeps its logs
}
trap cleanup EXIT
trap 'exit 130' INT TERM
now() { date +%s; }

# -- base: Debian by debootstrap, cached by its inputs ------------------------------------------------
# The host's own CA certificates go in too (a TLS-intercepting proxy between here and PyPI); the
# Dockerfiles install ca-certificates, which trusts them.
CA_FILES=$(ls /usr/local/share/ca-certificates/*.crt 2>/dev/null || true)
# the suites debian:*-slim has: the release, its updates and security updates
SOURCES=$(printf 'deb %s %s main\ndeb %s %s-updates main\ndeb %s %s-security main\n' \
  "$MIRROR" "$SUITE" "$MIRROR" "$SUITE" "${MIRROR%/debian}/debian-security" "$SUITE")
KEY=$( { echo "$SUITE minbase"; echo "$SOURCES"; for f in $CA_FILES; do sha256sum "$f"; done; } | sha256sum | cut -c1-16)
if [ "$(podman image inspect --format '{{index .Labels "mmbalance.base"}}' "$BASE" 2>/dev/null)" != "$KEY" ]; then
  t=$(now); TAR=$CACHE/base-$SUITE-$KEY.tar
  if [ ! -f "$TAR" ]; then
    rm -rf "$CACHE/rootfs"
    if ! debootstrap --variant=minbase "$SUITE" "$CACHE/rootfs" "$MIRROR" > "$LOGS/debootstrap.log" 2>&1; then
      rm -rf "$CACHE/rootfs"; fail base "debootstrap $SUITE from $MIRROR failed: $LOGS/debootstrap.log"
      log_tail "$LOGS/debootstrap.log"; exit 1
    fi
    echo "$SOURCES" > "$CACHE/rootfs/etc/apt/sources.list"
    mkdir -p "$CACHE/rootfs/usr/local/share/ca-certificates"
    for f in $CA_FILES; do cp "$f" "$CACHE/rootfs/usr/local/share/ca-certificates/"; done
    rm -rf "$CACHE/rootfs/var/cache/apt/archives/"*.deb "$CACHE/rootfs/var/lib/apt/lists/"*
    tar -C "$CACHE/rootfs" -cf "$TAR.tmp" . && mv "$TAR.tmp" "$TAR" && rm -rf "$CACHE/rootfs"
    rm -f "$CACHE"/base-"$SUITE"-*.tar.tmp
    find "$CACHE" -maxdepth 1 -name "base-$SUITE-*.tar" ! -name "base-$SUITE-$KEY.tar" -delete
  fi
  if podman import --change "LABEL mmbalance.base=$KEY" --change 'CMD ["bash"]' "$TAR" "$BASE" > "$LOGS/import.log" 2>&1; then
    pass base "$SUITE minbase by debootstrap, imported as $BASE ($(( $(now) - t )) s)"
  else
    fail base "podman import failed: $LOGS/import.log"; log_tail "$LOGS/import.log"; exit 1
  fi
else
  pass base "$BASE (cached, key $KEY)"
fi

build() {  # build KIND DOCKERFILE IMAGE
  local t; t=$(now)
  if podman build --format docker --network host --build-arg "BASE_IMAGE=$BASE" -f "$2" --ignorefile "$2.dockerignore" \
       -t "$3" . > "$LOGS/build-$1.log" 2>&1; then
    pass "build-$1" "$3 from $2, $(podman image inspect --format '{{.Size}}' "$3" | awk '{printf "%.2f GB", $1/1e9}'), $(( $(now) - t )) s"
    podman image prune -f >/dev/null 2>&1  # the previous build of the tag, now dangling
    return 0
  fi
  fail "build-$1" "podman build -f $2 failed after $(( $(now) - t )) s: $LOGS/build-$1.log"; log_tail "$LOGS/build-$1.log"
  return 1
}

in_image() {  # in_image IMAGE CMD...: a throwaway container on the host network, data dir mounted
  podman run --rm --network host --shm-size=1g -v "$WORK:$WORK" -e RAY_AUTH_MODE "$@"
}

rows_accounted() {  # rows_accounted INPUT_DIR RUN_DIR: "input manifest rejected", exit 1 unless they add up
  "$PY" - "$1" "$2" <<'EOF'
import sys
from pathlib import Path
import pyarrow.parquet as pq
rows = lambda paths: sum(pq.ParquetFile(p).metadata.num_rows for p in paths)
inp, run = Path(sys.argv[1]), Path(sys.argv[2])
n_in, n_man = rows(inp.rglob("*.parquet")), rows((run / "manifest").glob("*.parquet"))
n_rej = rows((run / "rejects").rglob("*.parquet"))
print(f"input {n_in} = manifest {n_man} + rejected {n_rej}")
sys.exit(0 if n_in == n_man + n_rej and n_man > 0 else 1)
EOF
}

cpu_ok=0; cuda_ok=0
build cpu deploy/Dockerfile "$CPU_IMAGE" && cpu_ok=1
if [ "$CPU_ONLY" = 0 ]; then build cuda deploy/Dockerfile.cuda "$CUDA_IMAGE" && cuda_ok=1; fi

# -- CPU image: the demo, as the non-root user ----------------------------------------------------------
if [ "$cpu_ok" = 1 ]; then
  t=$(now)
  if in_image "$CPU_IMAGE" bash -c 'test "$(id -u)" = 1000 && mmbalance demo --rows 4000 --shards 4 --out '"$WORK/demo" \
       > "$LOGS/demo.log" 2>&1 && detail=$(rows_accounted "$WORK/demo/corpus" "$WORK/demo/run"); then
    pass demo "mmbalance demo as uid 1000: $detail ($(( $(now) - t )) s)"
  else
    fail demo "mmbalance demo in $CPU_IMAGE failed: $LOGS/demo.log"; log_tail "$LOGS/demo.log"
  fi
fi

# -- CUDA image: imports, the health check without a GPU --------------------------------------------------
if [ "$cuda_ok" = 1 ]; then
  if out=$(in_image "$CUDA_IMAGE" python -c "
import faiss, open_clip, torch
assert torch.version.cuda, 'torch is a CPU build'
assert hasattr(faiss, 'StandardGpuResources'), 'faiss has no GPU support'
print(f'torch {torch.__version__} (CUDA {torch.version.cuda}), faiss {faiss.__version__} GPU build, open_clip {open_clip.__version__}')
" 2>"$LOGS/cuda-imports.log"); then
    pass cuda-imports "$out"
  else
    fail cuda-imports "$(tail -1 "$LOGS/cuda-imports.log")"
  fi
  health=$(podman image inspect --format '{{json .Config.Healthcheck}}' "$CUDA_IMAGE" 2>/dev/null)
  if [ -z "$health" ] || [ "$health" = null ]; then
    fail cuda-healthcheck "the image has no HEALTHCHECK (built without --format docker?)"
  else
    name=$RUN_ID-health; CONTAINERS+=("$name")
    # (podman without systemd logs that it cannot schedule checks: they are run by hand here)
    podman run -d --name "$name" --network host --health-interval=disable "$CUDA_IMAGE" sleep 600 > "$LOGS/health-run.log" 2>&1
    podman healthcheck run "$name" > "$LOGS/healthcheck.log" 2>&1; rc=$?
    # what the engine recorded of the image's own check: exit 1 and one line with both reasons
    podman inspect --format '{{json .State.Health.Log}}' "$name" > "$LOGS/healthcheck.json" 2>&1
    if [ "$rc" != 0 ] && detail=$("$PY" - "$LOGS/healthcheck.json" 2>&1 <<'EOF'
import json, sys
last = json.load(open(sys.argv[1]))[-1]
out = last["Output"].strip()
assert last["ExitCode"] == 1 and "\n" not in out, last
assert out.startswith("unhealthy: faiss sees 0 GPUs") and "torch sees 0 CUDA devices" in out, out
print(out)
EOF
    ); then
      pass cuda-healthcheck "without a GPU: podman healthcheck run exit $rc ($(tr -d '\n' < "$LOGS/healthcheck.log")); the check: $detail"
    else
      fail cuda-healthcheck "expected a non-zero health check with one line naming the missing GPU, got exit $rc: $(echo "$detail" | tail -1)"
    fi
    podman rm -f -t 0 "$name" >/dev/null 2>&1
  fi
fi

# -- 2-node Ray cluster of the CPU image, the README's job entrypoint submitted to it ---------------------
if [ "$cpu_ok" = 1 ]; then
  # inputs on the host: a synthetic corpus plus a shard of damaged rows (rejects), the demo recipe
  mkdir -p "$WORK/job"
  "$PY" - "$WORK" > "$LOGS/inputs.log" 2>&1 <<'EOF' || { fail job-inputs "$LOGS/inputs.log"; log_tail "$LOGS/inputs.log"; }
import sys
from pathlib import Path
import numpy as np, pyarrow as pa, pyarrow.parquet as pq, yaml
from mmbalance.synth import DEMO_RECIPE, synth_corpus
work = Path(sys.argv[1])
synth_corpus(work / "corpus", 6000, 3, seed=7)
t = pq.read_table(sorted((work / "corpus").glob("*.parquet"))[0]).slice(0, 40)
uid = [f"damaged-{i}" for i in range(40)]
uid[:10] = [None] * 10                                      # null uid
uid[30:] = t.column("uid").to_pylist()[30:]                 # uids already in the corpus: duplicates
emb = t.column("image_emb").to_pylist()
dim = len(emb[0])
emb[10:20] = [None] * 10                                    # missing image embedding
emb[20:30] = [[0.0] * dim] * 10                             # all-zero embedding
t = t.set_column(t.schema.get_field_index("uid"), "uid", pa.array(uid, pa.string()))
t = t.set_column(t.schema.get_field_index("image_emb"), "image_emb", pa.array(emb, t.schema.field("image_emb").type))
pq.write_table(t, work / "corpus" / "zz-damaged.parquet")
(work / "job" / "recipe.yaml").write_text(yaml.safe_dump(DEMO_RECIPE, sort_keys=False))
EOF
  t=$(now)
  if "$PY" -m mmbalance.cli rebalance "$WORK/corpus" --out "$WORK/local" --recipe "$WORK/job/recipe.yaml" --executor local \
       > "$LOGS/local.log" 2>&1; then
    pass local-run "mmbalance rebalance --executor local on the host ($(( $(now) - t )) s)"
  else
    fail local-run "$LOGS/local.log"; log_tail "$LOGS/local.log"
  fi

  ports=($("$PY" -c 'import socket
socks = [socket.socket() for _ in range(21)]
for s in socks: s.bind(("", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))'))
  NODE_IP=$("$PY" -c 'import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.connect(("192.0.2.1", 9)); print(s.getsockname()[0])' 2>/dev/null || echo 127.0.0.1)
  GCS=${ports[0]} DASH=${ports[1]}
  node_ports() {  # distinct per node: both nodes share the host's network
    echo "--node-manager-port=${ports[$1]} --object-manager-port=${ports[$1+1]} --dashboard-agent-listen-port=${ports[$1+2]}" \
         "--dashboard-agent-grpc-port=${ports[$1+3]} --runtime-env-agent-port=${ports[$1+4]} --metrics-export-port=${ports[$1+5]}"
  }
  start_node() {  # start_node NAME IMAGE RAY-START-ARGS...
    local role=$1 image=$2; shift 2
    CONTAINERS+=("$RUN_ID-$role")
    podman run -d --name "$RUN_ID-$role" --network host --shm-size=1g -v "$WORK:$WORK" -e RAY_AUTH_MODE \
      "$image" ray start --block --node-ip-address="$NODE_IP" --object-store-memory=200000000 --disable-usage-stats "$@" \
      > "$LOGS/start-$role.log" 2>&1
  }
  alive_nodes() {  # alive Ray nodes with CPUs, asked through the head
    podman exec "$RUN_ID-head" python -c "import ray; ray.init(address='$NODE_IP:$GCS', logging_level='ERROR', log_to_driver=False)
print(sum(1 for n in ray.nodes() if n['Alive']))" 2>/dev/null | tail -1
  }
  wait_nodes() {  # wait_nodes N: up to 120 s
    for _ in $(seq 60); do [ "$(alive_nodes)" = "$1" ] && return 0; sleep 2; done; return 1
  }
  t=$(now)
  # like deploy/kuberay: no CPUs on the head (driver and global steps only), so the shards run on the worker
  start_node head "$CPU_IMAGE" --head --port="$GCS" --dashboard-host=127.0.0.1 --dashboard-port="$DASH" \
    --ray-client-server-port="${ports[2]}" --num-cpus=0 $(node_ports 3)
  start_node worker "$CPU_IMAGE" --address="$NODE_IP:$GCS" --num-cpus=2 $(node_ports 9)
  if wait_nodes 2; then
    pass cluster "head + worker containers joined as 2 Ray nodes at $NODE_IP:$GCS ($(( $(now) - t )) s)"
    t=$(now)
    "$PY" -m ray.scripts.scripts job submit --address "http://127.0.0.1:$DASH" --submission-id "$RUN_ID" \
      --working-dir "$WORK/job" -- python -m mmbalance.jobs.rebalance --recipe recipe.yaml \
      --input "$WORK/corpus" --out "$WORK/job-out" --log-every 0 > "$LOGS/job.log" 2>&1; rc=$?
    if [ "$rc" = 0 ] && grep -q "Job '$RUN_ID' succeeded" "$LOGS/job.log"; then
      pass job-submit "ray job submit ... python -m mmbalance.jobs.rebalance exit 0 ($(( $(now) - t )) s)"
    else
      fail job-submit "exit $rc: $LOGS/job.log"; log_tail "$LOGS/job.log"
      for c in head worker; do podman logs "$RUN_ID-$c" > "$LOGS/$c.log" 2>&1; done
    fi
    # where the per-shard tasks ran, from Ray's state API: the head has no CPUs, so all on the worker
    if detail=$("$PY" - "http://127.0.0.1:$DASH" "$RUN_ID" 2>&1 <<'EOF'
import sys
from collections import Counter
from ray.job_submission import JobSubmissionClient
from ray.util.state import list_nodes, list_tasks
address, submission = sys.argv[1:]
job_id = JobSubmissionClient(address).get_job_info(submission).job_id
head = {n.node_id for n in list_nodes(address=address) if n.is_head_node}
tasks = list_tasks(address=address, filters=[("job_id", "=", job_id)], detail=True, limit=10_000, raise_on_missing_output=False)
units = Counter("head" if t.node_id in head else "worker" for t in tasks if "run_units" in t.name and t.state == "FINISHED")
assert units["worker"] > 0 and units["head"] == 0, dict(units)
print(f"{units['worker']} per-shard tasks ran on the worker container, none on the head")
EOF
    ); then pass job-placement "$detail"; else fail job-placement "$(echo "$detail" | tail -1)"; fi
    if detail=$(rows_accounted "$WORK/corpus" "$WORK/job-out" 2>&1) && [ -n "$(ls "$WORK/job-out/rejects/"*/ 2>/dev/null)" ]; then
      pass job-rows "$detail"
    else
      fail job-rows "${detail:-no run}"
    fi
    if detail=$("$PY" - "$WORK/job-out" "$WORK/local" 2>&1 <<'EOF'
import sys
from pathlib import Path
runs = [sorted((Path(r) / "manifest").glob("*.parquet")) for r in sys.argv[1:]]
names = [[p.name for p in r] for r in runs]
assert names[0] and names[0] == names[1], f"manifest files differ: {names}"
same = [a.read_bytes() == b.read_bytes() for a, b in zip(*runs)]
assert all(same), f"{same.count(False)} of {len(same)} manifest files differ"
print(f"{len(same)} manifest files byte-identical to the local run")
EOF
    ); then
      pass job-manifest "$detail"
    else
      # where the two runs part: each stage's outputs compared in pipeline order, and the versions of
      # the numeric packages on each side (the host's .venv, the image's /opt/venv)
      versions=$(podman exec "$RUN_ID-head" python -c "$VERSIONS_PY" 2>&1 | tail -1)
      where=$("$PY" - "$WORK/job-out" "$WORK/local" "$("$PY" -c "$VERSIONS_PY")" "$versions" 2>&1 <<'EOF'
import sys
from pathlib import Path
sys.path.insert(0, "scripts")
from compare_runs import outputs  # every file of a run; JSON without its timings
job, local = (outputs(Path(p)) for p in sys.argv[1:3])
order = ["uids", "rejects", "tags", "sample", "dedup", "models", "fit", "assign", "signatures", "solve", "after", "manifest"]
parts = []
for stage in order:
    names = sorted(rel for rel in set(job) & set(local) if rel.split("/")[0] == stage)
    differ = [rel for rel in names if job[rel] != local[rel]]
    if differ:
        parts.append(f"{stage} {len(differ)}/{len(names)} ({differ[0]})")
host, image = (dict(kv.split("=", 1) for kv in v.split() if "=" in kv) for v in sys.argv[3:5])
drift = [f"{k} {host.get(k)} here, {image.get(k)} in the image" for k in sorted(set(host) | set(image)) if host.get(k) != image.get(k)]
print(f"differing outputs in pipeline order: {'; '.join(parts) or 'none'}; "
      f"package versions: {'; '.join(drift) or 'the same on both sides'}")
EOF
      )
      fail job-manifest "$(echo "$detail" | tail -1); $(echo "$where" | tail -1)"
    fi
    if [ "$cuda_ok" = 1 ]; then  # a GPU node of deploy/Dockerfile.cuda joins the CPU head: same Python, same Ray
      t=$(now)
      start_node cuda "$CUDA_IMAGE" --address="$NODE_IP:$GCS" --num-cpus=1 $(node_ports 15)
      if wait_nodes 3; then
        pass cuda-joins-cluster "a $CUDA_IMAGE container joined the CPU head as a third Ray node ($(( $(now) - t )) s)"
      else
        podman logs "$RUN_ID-cuda" > "$LOGS/cuda-node.log" 2>&1
        fail cuda-joins-cluster "no third node after 120 s: $LOGS/cuda-node.log"; log_tail "$LOGS/cuda-node.log"
      fi
    fi
  else
    for c in head worker; do podman logs "$RUN_ID-$c" > "$LOGS/$c.log" 2>&1; done
    fail cluster "2 nodes did not come up in 120 s: $LOGS/head.log $LOGS/worker.log"; log_tail "$LOGS/worker.log"
  fi
fi

[ "$FAILED" = 0 ] && echo "images: all checks passed" || echo "images: some checks FAILED (logs: $LOGS)"
exit "$FAILED"
}
