"""Static checks of deploy/: the KubeRay manifests, the cluster launcher YAML, the Dockerfiles and the
pinned requirements the images install.

The YAML files are parsed and checked for the fields KubeRay and the launcher require and for
consistency with the code (the job entrypoint's arguments parse, Ray versions agree); the Dockerfiles
are read instruction by instruction (every COPY source exists and is in the build context, every
module they import exists); the pins are checked against pyproject.toml. Building and running the
images is scripts/test_images.sh (podman; a CI step of its own).
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import sys
from pathlib import Path

import pytest
import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
DOCKERFILES = {"cpu": DEPLOY / "Dockerfile", "cuda": DEPLOY / "Dockerfile.cuda"}
_spec = importlib.util.spec_from_file_location("deploy_lock", DEPLOY / "lock.py")
LOCK = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(LOCK)


def load(path: Path) -> dict:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert len(docs) == 1, path
    return docs[0]


def dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#")))
    out = []
    for line in text.splitlines():
        if line.strip():
            op, _, rest = line.strip().partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def args_of(path: Path) -> dict[str, str]:
    return dict(a.split("=", 1) for op, a in dockerfile(path) if op == "ARG" and "=" in a)


def image_tags(kind: str) -> str:
    return f"mmbalance:{PYPROJECT['project']['version']}-{kind}"


# -- KubeRay ------------------------------------------------------------------------------------------


def cluster_specs() -> dict[str, dict]:
    cluster = load(DEPLOY / "kuberay" / "raycluster.yaml")
    job = load(DEPLOY / "kuberay" / "rayjob.yaml")
    return {"RayCluster": cluster["spec"], "RayJob": job["spec"]["rayClusterSpec"]}


@pytest.mark.parametrize("name, kind", [("raycluster.yaml", "RayCluster"), ("rayjob.yaml", "RayJob")])
def test_kuberay_resources_have_the_required_fields(name, kind):
    doc = load(DEPLOY / "kuberay" / name)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])  # a DNS-1123 label
    assert isinstance(doc["spec"], dict)


@pytest.mark.parametrize("source", ["RayCluster", "RayJob"])
def test_cluster_spec_head_cpu_group_and_gpu_group(source):
    spec = cluster_specs()[source]
    import ray

    assert spec["rayVersion"] == ray.__version__ == LOCK.RAY_VERSION == pins("cpu")["ray"] == pins("cuda")["ray"]
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"  # the job submitter reaches it from its pod
    assert all(isinstance(v, str) for v in head["rayStartParams"].values())  # KubeRay wants strings
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert len(groups) == len(spec["workerGroupSpecs"]) == 2
    for group in groups.values():
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())

    def container(group_spec):
        containers = group_spec["template"]["spec"]["containers"]
        assert len(containers) == 1
        c = containers[0]
        for part in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c["resources"][part]), c["name"]
        mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
        assert "/dev/shm" in mounts  # the object store: a memory-backed emptyDir, not the 64 MB default
        return c

    head_c = container(head)
    assert head_c["image"].endswith(image_tags("cpu"))
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert {p["containerPort"] for p in head_c["ports"]} >= {6379, 8265}

    gpu = [g for g in groups.values() if "nvidia.com/gpu" in container(g)["resources"]["limits"]]
    cpu = [g for g in groups.values() if g not in gpu]
    assert len(gpu) == 1 and len(cpu) == 1
    g, c = gpu[0], cpu[0]
    gpu_c, cpu_c = container(g), container(c)
    assert gpu_c["image"].endswith(image_tags("cuda")) and cpu_c["image"].endswith(image_tags("cpu"))
    assert g["rayStartParams"]["num-gpus"] == gpu_c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert g["rayStartParams"]["num-cpus"] == gpu_c["resources"]["limits"]["cpu"]
    assert c["rayStartParams"]["num-cpus"] == cpu_c["resources"]["limits"]["cpu"]
    assert "num-gpus" not in c["rayStartParams"] and "nvidia.com/gpu" not in cpu_c["resources"]["limits"]
    assert any(t["key"] == "nvidia.com/gpu" for t in g["template"]["spec"].get("tolerations", []))


def test_rayjob_and_raycluster_describe_the_same_cluster():
    specs = cluster_specs()
    assert specs["RayJob"] == specs["RayCluster"]


def test_rayjob_entrypoint_is_the_job_module_with_valid_arguments():
    from mmbalance.jobs.rebalance import build_parser

    spec = load(DEPLOY / "kuberay" / "rayjob.yaml")["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", "mmbalance.jobs.rebalance"]
    assert importlib.util.find_spec(argv[2]) is not None
    args = build_parser().parse_args(argv[3:])  # SystemExit on an unknown or missing option
    assert "://" in args.recipe and "://" in args.out and "://" in args.input
    assert spec["shutdownAfterJobFinishes"] is True and spec["backoffLimit"] >= 1
    assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)
    assert spec["submissionMode"] in {"K8sJobMode", "HTTPMode", "SidecarMode"}


# -- cluster launcher -------------------------------------------------------------------------------


def test_cluster_launcher_yaml():
    doc = load(DEPLOY / "ray-cluster.yaml")
    for key in ("cluster_name", "max_workers", "provider", "available_node_types", "head_node_type",
                "head_start_ray_commands", "worker_start_ray_commands", "docker"):
        assert key in doc, key
    assert doc["provider"]["type"] and doc["provider"]["region"]
    types = doc["available_node_types"]
    assert doc["head_node_type"] in types
    assert types[doc["head_node_type"]]["resources"] == {"CPU": 0}
    workers = {n: t for n, t in types.items() if n != doc["head_node_type"]}
    assert sum(t["max_workers"] for t in workers.values()) <= doc["max_workers"]
    for name, t in types.items():
        assert t["node_config"].get("InstanceType"), name
        assert t.get("min_workers", 0) <= t.get("max_workers", 0) or name == doc["head_node_type"]
    gpu = [t for t in workers.values() if t["resources"].get("GPU")]
    assert len(gpu) == 1 and gpu[0]["docker"]["worker_image"].endswith(image_tags("cuda"))
    assert "--gpus all" in gpu[0]["docker"]["worker_run_options"]
    assert any(t["resources"].get("CPU") and not t["resources"].get("GPU") for t in workers.values())
    assert doc["docker"]["image"].endswith(image_tags("cpu"))
    head_cmd = " ".join(doc["head_start_ray_commands"])
    worker_cmd = " ".join(doc["worker_start_ray_commands"])
    assert "ray start --head" in head_cmd and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_cmd
    assert "ray start --address=$RAY_HEAD_IP:6379" in worker_cmd
    assert "--dashboard-host=127.0.0.1" in head_cmd  # not exposed: reach it with `ray dashboard`


# -- Dockerfiles and their pins ---------------------------------------------------------------------

# the Python of each Debian release a base image may be (the pins are resolved for one Python)
DEBIAN_PYTHON = {"bookworm": (3, 11), "12": (3, 11), "trixie": (3, 13), "13": (3, 13)}


def lock_lines(kind: str) -> list[str]:
    return (DEPLOY / f"requirements-{kind}.txt").read_text().splitlines()


def pins(kind: str) -> dict[str, str]:
    out = {}
    for line in lock_lines(kind):
        if line and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and re.fullmatch(r"[a-z0-9][a-z0-9.-]*", name) and re.fullmatch(r"[\w.!+]+", version), line
            out[name] = version
    return out


def lock_python(kind: str) -> tuple[int, int]:
    return tuple(int(x) for x in re.search(r"^# Python (\d+)\.(\d+),", "\n".join(lock_lines(kind)), re.M).groups())


@pytest.mark.parametrize("kind", ["cpu", "cuda"])
def test_pins_are_current_and_satisfy_pyproject(kind):
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    wanted = LOCK.image_requirements(kind)
    # the header records what was resolved: a dependency changed in pyproject means a stale lock
    recorded = [ln[4:] for ln in lock_lines(kind) if ln.startswith("#   ")]
    assert recorded == wanted, f"deploy/requirements-{kind}.txt is stale: run .venv/bin/python deploy/lock.py"
    pinned = {canonicalize_name(n): v for n, v in pins(kind).items()}
    env = {"python_version": "%d.%d" % lock_python(kind), "python_full_version": "%d.%d.0" % lock_python(kind),
           "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
           "implementation_name": "cpython", "platform_python_implementation": "CPython"}
    for text in wanted:
        req = Requirement(text)
        if req.marker and not req.marker.evaluate(env):
            continue
        name = canonicalize_name(req.name)
        assert name in pinned, f"{text}: not pinned in requirements-{kind}.txt"
        assert req.specifier.contains(pinned[name], prereleases=True), f"{text}: pinned {pinned[name]}"
    assert "mmbalance" not in pinned  # installed from the source the image copies


def test_pins_of_both_images_agree():
    """Both images join one Ray cluster: the same Python, Ray and every shared package; one faiss build each."""
    from mmbalance import faiss_build

    cpu, cuda = pins("cpu"), pins("cuda")
    assert lock_python("cpu") == lock_python("cuda")
    assert {n: v for n, v in cpu.items() if n in cuda} == {n: v for n, v in cuda.items() if n in cpu}
    faiss = {kind: [n for n in p if n in faiss_build.FAISS_DISTRIBUTIONS] for kind, p in (("cpu", cpu), ("cuda", cuda))}
    assert faiss == {"cpu": ["faiss-cpu"], "cuda": ["faiss-gpu-cu12"]}
    assert set(cpu) - set(cuda) == {"faiss-cpu"}  # the CUDA image is the CPU one plus embed and GPU faiss
    assert "torch" in cuda and "open-clip-torch" in cuda and "torch" not in cpu


@pytest.mark.parametrize("kind", ["cpu", "cuda"])
def test_dockerfile_is_consistent_with_the_repo(kind):
    path = DOCKERFILES[kind]
    steps = dockerfile(path)
    ops = [op for op, _ in steps]
    assert ops.count("FROM") == 1 and ops[:2] == ["ARG", "FROM"] and steps[1][1] == "${BASE_IMAGE}"
    assert ops[-1] in {"CMD", "ENTRYPOINT"}
    # a public Debian image by default; the pins are for its Python, which meets requires-python
    base = args_of(path)["BASE_IMAGE"]
    assert base == args_of(DOCKERFILES["cpu"])["BASE_IMAGE"]  # Ray nodes must agree on Python
    release = re.fullmatch(r"debian:(\w+)-slim", base).group(1)
    minimum = tuple(int(x) for x in PYPROJECT["project"]["requires-python"].lstrip(">=").split("."))
    assert DEBIAN_PYTHON[release] == lock_python(kind) >= minimum
    # every COPY source exists in the repo and in the build context the ignore file leaves
    ignore = [ln for ln in (path.parent / f"{path.name}.dockerignore").read_text().splitlines() if ln and not ln.startswith("#")]
    assert ignore[0] == "*"  # an allow-list: no .venv, data or runs from the checkout
    allowed = {ln[1:] for ln in ignore if ln.startswith("!")}
    copied = set()
    for op, a in steps:
        if op == "COPY":
            *sources, _dest = a.split()
            for src in sources:
                assert (ROOT / src).exists(), src
                copied.add(src)
    assert copied == allowed, (copied, allowed)
    assert f"deploy/requirements-{kind}.txt" in copied and "mmbalance" in copied
    runs = [a for op, a in steps if op == "RUN"]
    # pinned dependencies first (a layer that survives code changes), then mmbalance itself without deps
    deps = next(i for i, a in enumerate(runs) if "pip install" in a)
    assert runs[deps] == f"pip install --no-deps -r requirements-{kind}.txt"
    install = runs[deps + 1]
    assert install.startswith("pip install --no-deps --no-build-isolation . ") and "pip check" in install
    assert ops.index("COPY") < [i for i, (op, a) in enumerate(steps) if op == "RUN" and a == runs[deps]][0]
    if kind == "cuda":
        assert install.index("pip check") < install.index("mmbalance.faiss_build --require-gpu-build")
        health = [a for op, a in steps if op == "HEALTHCHECK"]
        assert len(health) == 1 and health[0].endswith('CMD ["sh", "/opt/mmbalance/healthcheck-gpu.sh"]')
        assert ("WORKDIR", "/opt/mmbalance") in steps and "deploy/healthcheck-gpu.sh" in copied
        assert "python -m mmbalance.faiss_build --require-gpus 1 --torch" in (DEPLOY / "healthcheck-gpu.sh").read_text()
    else:
        assert "faiss_build" not in install and all(op != "HEALTHCHECK" for op, _ in steps)
    # the modules its smoke check imports exist here (ray.dashboard only with ray[default])
    for module in re.findall(r'import ([\w., ]+)"', install)[0].split(","):
        module = module.strip()
        if module.startswith("mmbalance"):
            assert importlib.util.find_spec(module) is not None, module
    assert "mmbalance --help" in install and "PYTHONUNBUFFERED=1" in " ".join(a for op, a in steps if op == "ENV")
    # KubeRay's probes need bash and wget; the user is uid 1000 like Ray's own images
    assert re.search(r"apt-get install[^&]*\bbash\b[^&]*\bwget\b", " ".join(runs))
    assert ("USER", "1000") in steps


def test_this_environment_runs_the_versions_the_cpu_image_pins():
    """scripts/setup.sh installs within deploy/requirements-cpu.txt: the suite, the benchmarks and the
    host reference run of scripts/test_images.sh (whose manifests must equal a cluster job's, byte for
    byte) use the image's numerics, not a release PyPI made since the lock."""
    from importlib import metadata

    from packaging.utils import canonicalize_name

    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
    drift = {name: (installed[canonicalize_name(name)], pin) for name, pin in pins("cpu").items()
             if canonicalize_name(name) in installed and installed[canonicalize_name(name)].split("+")[0] != pin}
    assert not drift, (f"installed (here, pinned): {drift}: rerun bash scripts/setup.sh, or after an upgrade "
                       f"on purpose .venv/bin/python deploy/lock.py")
