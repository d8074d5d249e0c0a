"""Static checks of deploy/: the KubeRay manifests, the cluster launcher YAML and the Dockerfiles.

No cluster and no Docker engine here: the YAML files are parsed and checked for the fields KubeRay and
the launcher require and for consistency with the code (the job entrypoint's arguments parse, the
extras the images install exist, Ray versions agree); the Dockerfiles are read instruction by
instruction (every COPY source exists, every module they import exists).
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

    assert spec["rayVersion"] == ray.__version__ == args_of(DOCKERFILES["cpu"])["RAY_VERSION"] == args_of(DOCKERFILES["cuda"])["RAY_VERSION"]
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


# -- Dockerfiles ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["cpu", "cuda"])
def test_dockerfile_is_consistent_with_the_repo(kind):
    path = DOCKERFILES[kind]
    steps = dockerfile(path)
    ops = [op for op, _ in steps]
    assert ops.count("FROM") == 1 and ops.index("FROM") <= 1  # ARGs for the base image may come first
    assert ops[-1] in {"CMD", "ENTRYPOINT"}
    # every COPY source exists in the repo
    for op, a in steps:
        if op == "COPY":
            *sources, _dest = a.split()
            for src in sources:
                assert (ROOT / src).exists(), src
    text = " ".join(a for op, a in steps if op == "RUN")
    # the extras it installs are defined in pyproject
    extras = set()
    for group in re.findall(r'"\.\[([a-z,]+)\]"', text):
        extras |= set(group.split(","))
    assert extras and extras <= set(PYPROJECT["project"]["optional-dependencies"]), extras
    assert "jobs" in extras and "ray[default]" in " ".join(PYPROJECT["project"]["optional-dependencies"]["jobs"])
    if kind == "cuda":
        assert "embed" in extras
        # faiss-gpu replaces the base faiss-cpu after mmbalance is installed, then the build is checked
        steps_run = [a for op, a in steps if op == "RUN"]
        install = next(a for a in steps_run if '".[' in a)
        assert install.index('".[') < install.index("mmbalance.faiss_build --use gpu") < install.index("--require-gpu-build")
        assert install.count("pip install") == 2 and "pip install" not in install.split("faiss_build --use gpu")[1]
        health = [a for op, a in steps if op == "HEALTHCHECK"]
        assert len(health) == 1 and "mmbalance.faiss_build --require-gpus 1" in health[0]
    else:
        assert "faiss_build --use" not in text and all(op != "HEALTHCHECK" for op, _ in steps)
    # the modules its smoke check imports exist here (ray.dashboard only with ray[default])
    for module in re.findall(r"import ([\w., ]+)\"", text)[0].split(","):
        module = module.strip()
        if module.startswith("mmbalance"):
            assert importlib.util.find_spec(module) is not None, module
    assert "mmbalance --help" in text and "PYTHONUNBUFFERED=1" in " ".join(a for op, a in steps if op == "ENV")
    # KubeRay's probes need bash and wget; the user is uid 1000 like Ray's own images
    assert re.search(r"apt-get install[^&]*\bbash\b[^&]*\bwget\b", text)
    assert ("USER", "1000") in steps
    # the base image's Python satisfies requires-python
    base = args_of(path).get("PYTHON_IMAGE") or args_of(path)["CUDA_IMAGE"]
    minimum = tuple(int(x) for x in PYPROJECT["project"]["requires-python"].lstrip(">=").split("."))
    if kind == "cpu":
        version = tuple(int(x) for x in re.search(r"python:(\d+)\.(\d+)", base).groups())
    else:
        assert "ubuntu24.04" in base  # python3 = 3.12
        version = (3, 12)
    assert version >= minimum
