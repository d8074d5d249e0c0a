"""``ray job submit`` against a real local cluster: ``ray start --head`` plus a second ``ray start
--address`` node on this machine with its own custom resource, all on 127.0.0.1.

One cluster serves the module (starting a node costs ~10 s on 2 cores); every process it started is
ended in the fixture's finalizer by process group, never with ``ray stop`` (that would end every Ray
on the machine). Outputs are compared with a direct ``mmbalance rebalance --executor local`` run.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from corpora import RECIPE_FROM_ISSUE, held_out_table, write_shards

pytest.importorskip(
    "ray.dashboard.modules.job.cli",
    reason="`ray job submit` needs ray[default] (the `jobs` extra); install mmbalance[jobs]",
)
pytest.importorskip("aiohttp", reason="`ray job submit` needs ray[default] (the `jobs` extra); install mmbalance[jobs]")

from mmbalance.jobs.local_cluster import LocalCluster  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(300)]

SECOND = "mmb_node2"  # the custom resource only the second node has


# A port taken by another process, as Ray's processes write it: gRPC ("errno:98"), Ray's own checks
# ("errno: 98 (Address already in use)"), Python ("[Errno 98]") and the dashboard ("already occupied").
# Not "Address already in use" alone: Ray's fatal-check message quotes it as a hint on any failure.
PORT_TAKEN = re.compile(r"errno:? ?98\b|already occupied", re.IGNORECASE)


def port_taken(cluster: LocalCluster) -> bool:
    """Whether a failed start lost a port: LocalCluster picks ports by binding port 0 and closing the
    socket, so under load another process can take one before Ray binds it."""
    for path in Path(cluster.temp_dir).rglob("*"):
        if path.suffix in (".log", ".out", ".err") and path.is_file():
            try:
                if PORT_TAKEN.search(path.read_text(errors="replace")):
                    return True
            except OSError:
                continue
    return False


def start_cluster(setup, attempts: int = 3, **options) -> LocalCluster:
    """A started LocalCluster(**options) with ``setup(cluster)`` done (extra nodes). A start that
    failed on a taken port is stopped and retried with fresh ports; any other failure is raised."""
    for attempt in range(1, attempts + 1):
        c = LocalCluster(**options)
        try:
            c.start()
            setup(c)
            return c
        except BaseException as exc:
            retry = isinstance(exc, Exception) and attempt < attempts and port_taken(c)
            c.stop()
            if not retry:
                raise
            print(f"cluster start lost a port to another process (attempt {attempt}); retrying with fresh ports")
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def cluster():
    c = start_cluster(lambda c: c.add_node(num_cpus=1, resources={SECOND: 1}), num_cpus=2, object_store_mb=150)
    try:
        yield c
    finally:
        c.stop()
    assert not c.processes()


@pytest.mark.parametrize("text, taken", [
    # lines Ray 2.60 wrote when the GCS, raylet and dashboard ports were taken, and Python's own form
    ('UNKNOWN:Address already in use {created_time:"...", errno:98, os_error:"Address already in use"}', True),
    ("src/ray/rpc/grpc_server.cc:134 (PID: 9730, TID: 9730, errno: 98 (Address already in use)): ...", True),
    ("ValueError: Failed to bind to 127.0.0.1:39195 because it's already occupied.", True),
    ("OSError: [Errno 98] error while attempting to bind on address ('127.0.0.1', 4242)", True),
    # the hint Ray prints with every fatal gRPC failure is not by itself a taken port
    ("If the server startup error message is `Address already in use`, it indicates the server fails", False),
    ("The current node timed out during startup.", False),
])
def test_a_taken_port_is_told_from_other_start_failures(tmp_path, text, taken):
    c = LocalCluster(temp_dir=str(tmp_path))
    (tmp_path / "session_x" / "logs").mkdir(parents=True)
    (tmp_path / "session_x" / "logs" / "gcs_server.err").write_text(f"noise\n{text}\nmore noise\n")
    assert port_taken(c) is taken


@pytest.fixture(scope="module")
def job_inputs(tmp_path_factory):
    """A held-out corpus, a working dir holding the recipe, and the direct CLI run to compare with."""
    base = tmp_path_factory.mktemp("jobs")
    corpus = write_shards(base / "corpus", {f"part-{i}.parquet": held_out_table(900 + 100 * i, seed=40 + i) for i in range(8)})
    workdir = base / "workdir"
    workdir.mkdir()
    (workdir / "recipe.yaml").write_text(RECIPE_FROM_ISSUE.replace("cap: 1000", "cap: 200"))
    direct = base / "direct"
    res = subprocess.run(
        [sys.executable, "-m", "mmbalance.cli", "rebalance", str(corpus), "--out", str(direct),
         "--recipe", str(workdir / "recipe.yaml"), "--executor", "local", "-q"],
        capture_output=True, text=True, timeout=240,
    )
    assert res.returncode == 0, res.stderr
    return {"base": base, "corpus": corpus, "workdir": workdir, "direct": direct}


def ray_cli(cluster: LocalCluster, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ray.scripts.scripts", *args], env=cluster.env, capture_output=True, text=True, timeout=timeout
    )


def flatten(obj, prefix: str = "") -> dict[str, float]:
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in flatten(val, f"{prefix}/{key}").items()}
    if isinstance(obj, list):
        return {k: v for i, val in enumerate(obj) for k, v in flatten(val, f"{prefix}/{i}").items()}
    return {prefix: obj} if isinstance(obj, (int, float)) and not isinstance(obj, bool) else {}


def manifest_bytes(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run / "manifest").iterdir())}


def test_job_submit_with_working_dir_matches_a_direct_run(cluster, job_inputs):
    out = job_inputs["base"] / "job-out"
    sub = f"mmb-{uuid.uuid4().hex[:8]}"
    res = ray_cli(
        cluster, "job", "submit", "--address", cluster.dashboard_url, "--submission-id", sub,
        "--working-dir", str(job_inputs["workdir"]), "--",
        "python", "-m", "mmbalance.jobs.rebalance", "--recipe", "recipe.yaml",  # relative: inside the working dir
        "--input", str(job_inputs["corpus"]), "--out", f"file://{out}", "--log-every", "0",
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"Job '{sub}' succeeded" in res.stdout + res.stderr
    result = json.loads([ln for ln in res.stdout.splitlines() if ln.startswith('{"out"')][-1])
    assert result["rows"]["input"] == sum(900 + 100 * i for i in range(8))
    assert "mmbalance: scan: 1 units done" in res.stdout  # per-stage progress lines reach the job log
    assert manifest_bytes(out) == manifest_bytes(job_inputs["direct"])
    report = json.loads((out / "report.json").read_text())
    direct = json.loads((job_inputs["direct"] / "report.json").read_text())
    assert report["rows"] == direct["rows"]
    # float metrics agree to rounding (summation order may differ between executors; the manifest may not).
    # worst_pairs is left out: pairs whose |gap| ties are ordered by last-bit noise (reported to the lead)
    got, want = (
        {k: v for k, v in flatten(r["after_expected"]).items() if "worst_pairs" not in k} for r in (report, direct)
    )
    assert got == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_two_node_job_places_work_on_both_nodes(cluster, job_inputs):
    """The driver is pinned to the second node by its custom resource; the per-shard tasks spread over
    both nodes. Ray's state API says where each task ran."""
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_tasks

    nodes = {n["id"]: n["resources"] for n in cluster.wait_for_nodes(2)}
    second = next(i for i, r in nodes.items() if SECOND in r)
    out = job_inputs["base"] / "two-node-out"
    sub = f"mmb-{uuid.uuid4().hex[:8]}"
    runtime_env = {"working_dir": str(job_inputs["workdir"]), "env_vars": {"MMBALANCE_JOB_TEST": "1"}}
    res = ray_cli(
        cluster, "job", "submit", "--address", cluster.dashboard_url, "--submission-id", sub,
        "--runtime-env-json", json.dumps(runtime_env), "--entrypoint-resources", json.dumps({SECOND: 1}), "--",
        "python", "-m", "mmbalance.jobs.rebalance", "--recipe", "recipe.yaml",
        "--input", str(job_inputs["corpus"]), "--out", str(out), "--no-html",
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert manifest_bytes(out) == manifest_bytes(job_inputs["direct"])

    info = JobSubmissionClient(cluster.dashboard_url).get_job_info(sub)
    assert info.driver_node_id == second  # entrypoint resource honoured: the driver ran on node 2
    tasks = list_tasks(address=cluster.dashboard_url, filters=[("job_id", "=", info.job_id)], detail=True, limit=10_000, raise_on_missing_output=False)
    work = [t for t in tasks if "run_units" in t.name and t.state == "FINISHED"]  # the per-shard tasks
    placed = {t.node_id for t in work}
    assert placed == set(nodes), (len(work), placed, set(nodes))


def test_failed_job_exits_non_zero_with_the_reason_in_its_log(cluster, job_inputs):
    sub = f"mmb-{uuid.uuid4().hex[:8]}"
    missing = job_inputs["base"] / "no-such-shards"
    res = ray_cli(
        cluster, "job", "submit", "--address", cluster.dashboard_url, "--submission-id", sub,
        "--working-dir", str(job_inputs["workdir"]), "--",
        "python", "-m", "mmbalance.jobs.rebalance", "--recipe", "recipe.yaml", "--input", str(missing),
        "--out", str(job_inputs["base"] / "never"),
    )
    assert res.returncode != 0
    logs = ray_cli(cluster, "job", "logs", "--address", cluster.dashboard_url, sub)
    assert logs.returncode == 0, logs.stderr
    lines = [ln for ln in logs.stdout.splitlines() if ln.strip()]
    assert lines[-1] == f"mmbalance job failed: {missing}: input path does not exist", logs.stdout[-2000:]
    from ray.job_submission import JobStatus, JobSubmissionClient

    info = JobSubmissionClient(cluster.dashboard_url).get_job_info(sub)
    assert info.status == JobStatus.FAILED and "exit code 2" in info.message, info
    assert not (job_inputs["base"] / "never" / "manifest").exists()
