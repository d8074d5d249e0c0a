"""A throwaway Ray cluster on this machine, bound to the loopback address: a head node plus optional
extra nodes (``ray start --address ...``), each with its own ports, CPUs and custom resources.

Use it to try the cluster path (``ray job submit``, ``mmbalance rebalance --address``) without a
cluster, and in tests. Every process it starts is ended by ``stop()``, and only those: ``ray stop``
would end every Ray on the machine, including other users' sessions.

    with LocalCluster(num_cpus=2) as cluster:
        cluster.add_node(num_cpus=1, resources={"second": 1})
        subprocess.run(["ray", "job", "submit", "--address", cluster.dashboard_url, "--", ...])

Loopback only: ``ray start --node-ip-address=127.0.0.1`` alone is not enough in Ray 2.60 (it
resolves localhost to the machine's outward address and binds GCS/raylet on every interface).
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` makes Ray pick 127.0.0.1 everywhere; the worker-node start
needs the multi-node check switched back on in its own process, which ``_ray_start`` does.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

LOOPBACK = "127.0.0.1"

# Run ``ray start`` for a node of a loopback cluster (see the module docstring).
_RAY_START = """\
import sys
import ray._private.ray_constants as constants
import ray._private.services as services
constants.ENABLE_RAY_CLUSTER = True  # allow `ray start --address` (a worker node) ...
services.get_node_ip_address = lambda address=None: "127.0.0.1"  # ... on the loopback address
from ray.scripts.scripts import main
sys.argv = ["ray", *sys.argv[1:]]
sys.exit(main())
"""


def cluster_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for every process that talks to a loopback cluster (drivers, ``ray job`` CLI)."""
    env = dict(os.environ if base is None else base)
    env.update(
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # node IP = 127.0.0.1, no outward address
        RAY_USAGE_STATS_ENABLED="0",  # no usage report leaves the machine
        RAY_AUTH_MODE=env.get("RAY_AUTH_MODE", "disabled"),
        OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"),
    )
    env.pop("RAY_ADDRESS", None)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


@dataclass
class Node:
    name: str
    pgid: int
    num_cpus: int
    resources: dict[str, float] = field(default_factory=dict)
    node_id: str | None = None


class LocalCluster:
    def __init__(
        self,
        num_cpus: int = 2,
        object_store_mb: int = 200,
        dashboard: bool = True,
        resources: dict[str, float] | None = None,
        temp_dir: str | None = None,
        python: str = sys.executable,
        start_timeout: float = 120.0,
    ):
        self.num_cpus = num_cpus
        self.object_store_mb = object_store_mb
        self.dashboard = dashboard
        self.head_resources = resources or {}
        # Unix socket paths live under the temp dir and must stay short (108 bytes): not pytest's tmp_path.
        self.temp_dir = temp_dir or tempfile.mkdtemp(prefix="mmbr-", dir="/tmp")
        self._own_temp_dir = temp_dir is None
        self.python = python
        self.start_timeout = start_timeout
        self.env = cluster_env()
        # a job's entrypoint (`python -m ...`) runs with the cluster's PATH: make `python` this interpreter
        self.env["PATH"] = os.pathsep.join([os.path.dirname(python), self.env.get("PATH", "")])
        self.nodes: list[Node] = []
        self.port = free_port()
        self.dashboard_port = free_port()
        self.client_port = free_port()

    # -- addresses ---------------------------------------------------------------------------

    @property
    def address(self) -> str:
        """GCS address: ``ray.init(address=...)``, ``mmbalance rebalance --address``, RAY_ADDRESS."""
        return f"{LOOPBACK}:{self.port}"

    @property
    def dashboard_url(self) -> str:
        """``ray job submit --address`` (needs ray[default])."""
        return f"http://{LOOPBACK}:{self.dashboard_port}"

    # -- lifecycle ---------------------------------------------------------------------------

    def _node_ports(self) -> list[str]:
        return [
            f"--node-manager-port={free_port()}",
            f"--object-manager-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--metrics-export-port={free_port()}",
        ]

    def _ray_start(self, name: str, args: list[str], num_cpus: int, resources: dict[str, float]) -> Node:
        log = Path(self.temp_dir) / f"ray-start-{name}.log"
        cmd = [
            self.python, "-c", _RAY_START, "start",
            f"--node-ip-address={LOOPBACK}",
            f"--num-cpus={num_cpus}",
            f"--object-store-memory={self.object_store_mb * 1024 * 1024}",
            f"--temp-dir={self.temp_dir}",
            "--disable-usage-stats",
            *self._node_ports(),
            *args,
        ]
        if resources:
            cmd.append(f"--resources={json.dumps(resources)}")
        with open(log, "w") as out:
            # its own session: every daemon it forks shares this process group, so stop() finds them all
            proc = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        node = Node(name, proc.pid, num_cpus, dict(resources))
        self.nodes.append(node)
        try:
            rc = proc.wait(timeout=self.start_timeout)
        except subprocess.TimeoutExpired:
            rc = None
        if rc != 0:
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"ray start ({name}) failed with {rc}: {tail}")
        return node

    def start(self) -> "LocalCluster":
        args = ["--head", f"--port={self.port}", f"--ray-client-server-port={self.client_port}"]
        if self.dashboard:
            args += ["--include-dashboard=true", f"--dashboard-host={LOOPBACK}", f"--dashboard-port={self.dashboard_port}"]
        else:
            args += ["--include-dashboard=false"]
        self._ray_start("head", args, self.num_cpus, self.head_resources)
        return self

    def add_node(self, num_cpus: int = 1, resources: dict[str, float] | None = None) -> Node:
        """Another node on this machine, joined to the head (as ``ray start --address`` on a second host)."""
        name = f"node{len(self.nodes)}"
        node = self._ray_start(name, [f"--address={self.address}"], num_cpus, resources or {})
        self.wait_for_nodes(len(self.nodes))
        return node

    def wait_for_nodes(self, count: int, timeout: float = 60.0) -> list[dict]:
        """The alive nodes once ``count`` have registered (from the GCS, via a short-lived driver)."""
        probe = (
            "import json, ray; ray.init(address=%r, logging_level='ERROR', log_to_driver=False);"
            "print(json.dumps([{'id': n['NodeID'], 'resources': n['Resources']} for n in ray.nodes() if n['Alive']]))"
        ) % self.address
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            res = subprocess.run([self.python, "-c", probe], env=self.env, capture_output=True, text=True, timeout=120)
            if res.returncode == 0:
                nodes = json.loads(res.stdout.strip().splitlines()[-1])
                if len(nodes) >= count:
                    return nodes
                last = res.stdout
            else:
                last = res.stderr[-1000:]
            time.sleep(1.0)
        raise RuntimeError(f"cluster did not reach {count} nodes in {timeout}s: {last}")

    def processes(self) -> list:
        """Every live process of this cluster: its process groups and everything they spawned
        (job drivers start their own sessions, so descendants are followed too)."""
        import psutil

        groups = {n.pgid for n in self.nodes}
        found: dict[int, psutil.Process] = {}
        for proc in psutil.process_iter(["pid"]):
            try:
                if os.getpgid(proc.pid) in groups:
                    found[proc.pid] = proc
            except (ProcessLookupError, psutil.Error):
                continue
        for proc in list(found.values()):
            try:
                for child in proc.children(recursive=True):
                    found[child.pid] = child
            except psutil.Error:
                continue
        return list(found.values())

    def stop(self, grace: float = 5.0) -> None:
        """End this cluster's processes (SIGTERM, then SIGKILL) and remove its temp dir."""
        import psutil

        procs = self.processes()
        for proc in procs:
            try:
                proc.send_signal(signal.SIGTERM)
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=grace)
        for proc in alive + self.processes():
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=grace)
        self.nodes.clear()
        if self._own_temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> "LocalCluster":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
