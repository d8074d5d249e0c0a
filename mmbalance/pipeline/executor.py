"""Execution backends for per-shard work: a plain local loop, or Ray tasks on a local or remote cluster.

Both run the same picklable function over the same picklable tasks (a stage's typed tasks) and yield
each task's result (a unit's summary) as it finishes; outputs are written by the function itself,
keyed by shard.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import pickle
from collections.abc import Callable, Iterator
from typing import Any

from mmbalance.errors import sigterm_exits, sigterm_handler

TaskFn = Callable[[Any], Any]


class LocalExecutor:
    """Runs tasks one after another in this process (debugging, tiny corpora, benchmarks)."""

    name = "local"

    def release(self) -> None:
        """Nothing runs beside the driver."""

    def map(self, fn: TaskFn, tasks: list[dict[str, Any]], **resources: Any) -> Iterator[dict[str, Any]]:
        for task in tasks:
            yield fn(task)


def _run_one(fn: TaskFn, task: dict[str, Any]) -> dict[str, Any]:
    """One task's summary, or its bad-input/output-filesystem error as data (see _TaskBatchRunner)."""
    from mmbalance.schemas.contract import InputError
    from mmbalance.schemas.recipe import RecipeError

    try:
        return {"ok": fn(task)}
    except (InputError, RecipeError) as err:
        return {"input_error": str(err), "type": type(err).__name__}
    except OSError as err:
        return {"os_error": str(err), "errno": err.errno}


def release_memory() -> None:
    """Give freed heap back to the OS. Arrow's allocator (mimalloc/jemalloc) and glibc keep freed
    pages for reuse; in a Ray worker that sits idle between stages that is hundreds of MB of RSS
    nobody uses (measured: ~300 MB per worker after the scan stage)."""
    import ctypes

    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def run_units(fn: TaskFn, tasks: list[dict[str, Any]]) -> dict[str, Any]:
    """Several small tasks in one Ray task: one scheduling round trip for all of them (a busy Ray
    worker's title is ``ray::run_units``). Returns their results and the worker's pid."""
    try:
        return {"pid": os.getpid(), "results": [_run_one(fn, t) for t in tasks]}
    finally:
        release_memory()


def _unwrap(result: dict[str, Any]) -> dict[str, Any]:
    if "os_error" in result:
        error = OSError(result["os_error"])
        error.errno = result["errno"]
        raise error
    if "input_error" in result:
        from mmbalance.schemas.contract import InputError
        from mmbalance.schemas.recipe import RecipeError

        raise (RecipeError if result["type"] == "RecipeError" else InputError)(result["input_error"])
    return result["ok"]


def group_tasks(sizes: list[int], slots: int, rows_per_group: int) -> list[list[int]]:
    """Consecutive task indices grouped so a group holds about ``rows_per_group`` rows, but never
    fewer than ``2 * slots`` groups while there are tasks enough (every CPU busy, the tail short)."""
    n = len(sizes)
    if n == 0:
        return []
    total = sum(max(s, 1) for s in sizes)
    groups_wanted = min(n, max(2 * slots, -(-total // max(rows_per_group, 1))))
    target = total / groups_wanted
    groups: list[list[int]] = [[]]
    filled = 0
    for i, size in enumerate(sizes):
        if groups[-1] and filled + max(size, 1) / 2 > target:
            groups.append([])
            filled = 0
        groups[-1].append(i)
        filled += max(size, 1)
    return groups


def _packed(value: Any) -> str:
    """A task or a result as a Ray Data cell: pickled (typed tasks), as text."""
    return base64.b64encode(pickle.dumps(value)).decode()


def _unpacked(cell: Any) -> Any:
    return pickle.loads(base64.b64decode(str(cell)))


class _TaskBatchRunner:
    """Ray Data batch function: each row carries one task. Bad input (InputError, RecipeError) comes
    back as data (``_run_one``), so the driver can say it in one line: Ray would wrap the exception
    in its own error types and tracebacks."""

    def __init__(self, fn: TaskFn):
        self.fn = fn

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[str]]:
        return {"result": [_packed(_run_one(self.fn, _unpacked(t))) for t in batch["task"]]}


class RayExecutor:
    """Plain Ray tasks with a bounded number in flight, results as they finish. Small tasks (e.g.
    shards of a few thousand rows) are grouped so that one Ray task does several: on a small
    machine a Ray task costs milliseconds of scheduling and a Ray Data job per stage seconds.
    Work that loads a model once per process runs on a pool of actors (Ray Data).

    ``pool`` (the embedded Ray): the groups run on one long-lived worker per CPU instead, started
    when the executor is made and kept for every per-unit stage (and M4's streamed evaluations),
    so no stage waits for workers to start (~0.6 s each on 2 busy cores, and they exit when idle
    there) nor the driver for them to exit. ``release`` ends them when no per-unit work follows."""

    name = "ray"
    ROWS_PER_GROUP = 250_000  # rows one Ray task handles when the tasks are small

    def __init__(self, num_cpus_per_task: float = 1.0, pool: bool = False):
        self.num_cpus_per_task = num_cpus_per_task
        self.use_pool = pool
        self._pool: list = []
        self._worker_pids: set[int] = set()
        if pool:
            self._start_pool()

    def _slots(self, cpus: float) -> int:
        import ray

        return max(1, int(ray.cluster_resources().get("CPU", 1) // max(cpus, 1e-3)))

    def _start_pool(self) -> None:
        """One worker per task slot, each holding its CPU: nothing else asks for CPUs while it lives
        (an actor-pool stage ends it first), so no task can starve behind it (stack-notes). A worker
        killed mid-task is restarted and its task retried, as Ray retries a task."""
        import ray

        worker = ray.remote(num_cpus=self.num_cpus_per_task, max_restarts=-1, max_task_retries=3)(UnitWorker)
        self._pool = [worker.remote() for _ in range(self._slots(self.num_cpus_per_task))]

    def release(self, timeout_s: float = 3.0) -> None:
        """No per-unit work follows (the driver's last global stages): end the pool's workers and wait
        until they have exited, so their memory is free before the driver's grows."""
        if not self._pool:
            return
        import time

        import psutil
        import ray

        for actor in self._pool:
            ray.kill(actor)
        self._pool = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(psutil.pid_exists(p) for p in self._worker_pids):
            time.sleep(0.02)
        self._worker_pids.clear()

    def map(
        self, fn: TaskFn, tasks: list[dict[str, Any]], actors: int | None = None, num_cpus: float | None = None,
        num_gpus: float = 0.0, sizes: list[int] | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Tasks by default (``sizes``: rows per task, for grouping small ones); ``actors``: a pool of
        that many long-lived actors, for work that loads a model once per process (the function
        caches it), with ``num_cpus``/``num_gpus`` each."""
        if not tasks:
            return
        cpus = self.num_cpus_per_task if num_cpus is None else num_cpus
        if not actors:
            yield from self._task_map(fn, tasks, cpus, sizes)
            return
        self.release()  # the pool holds every CPU: an actor pool's stage starts it again after
        import ray.data

        logging.getLogger("ray.data").setLevel(logging.WARNING)  # per-dataset INFO lines drown the stage bars
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "bars disabled": ours replace them
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # the CLI draws one bar per stage itself
        ctx.print_on_execution_start = False
        items = [{"task": _packed(t)} for t in tasks]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.map_batches(
            _TaskBatchRunner, fn_constructor_kwargs={"fn": fn}, batch_size=1, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cpus, num_gpus=num_gpus or None,
        )
        for row in ds.iter_rows():
            yield _unwrap(_unpacked(row["result"]))

    def _task_map(self, fn: TaskFn, tasks: list[dict[str, Any]], cpus: float, sizes: list[int] | None):
        import ray

        if self.use_pool and not self._pool:
            self._start_pool()
        slots = len(self._pool) if self._pool else self._slots(cpus)
        groups = group_tasks(sizes if sizes is not None else [1] * len(tasks), slots,
                             self.ROWS_PER_GROUP if sizes is not None else 1)
        fn_ref = ray.put(fn)
        if self._pool:
            # two groups queued per worker: it starts the next as soon as it returns one
            workers = [w for w in self._pool for _ in range(2)]
            submit = lambda group, worker: worker.run_units.remote(fn_ref, [tasks[i] for i in group])  # noqa: E731
        else:
            # retried if a worker dies; SPREAD: shards are independent, so use every node of a cluster
            remote = ray.remote(num_cpus=cpus, max_retries=3, scheduling_strategy="SPREAD")(run_units)
            workers = [None] * (2 * slots)  # bounded: the driver never holds every result at once
            submit = lambda group, _: remote.remote(fn_ref, [tasks[i] for i in group])  # noqa: E731
        pending = iter(groups)
        in_flight: dict = {}  # ref -> the worker it was given to (None: any)
        try:
            while True:
                while workers:
                    group = next(pending, None)
                    if group is None:
                        break
                    worker = workers.pop()
                    in_flight[submit(group, worker)] = worker
                if not in_flight:
                    return
                ready, _ = ray.wait(list(in_flight), num_returns=1)
                workers.append(in_flight.pop(ready[0]))
                done = ray.get(ready[0])
                self._worker_pids.add(done["pid"])
                for result in done["results"]:
                    yield _unwrap(result)
        except (SystemExit, KeyboardInterrupt):
            # SIGTERM or Ctrl-C: the run ends and ray.shutdown stops what is in flight. Cancelling a
            # task that is completing at that moment trips a Ray CHECK that aborts the driver
            # (task_manager.cc "Tried to complete task that was not pending"; 2 runs in 10)
            in_flight = {}
            raise
        finally:
            for ref in in_flight:  # an error or a closed generator: stop what is still running
                ray.cancel(ref, force=False)


class UnitWorker:
    """A pool worker (a Ray actor): groups of units, one after another, in one process for the run.
    Loads what every per-unit stage's function needs when it starts, before its first group."""

    def __init__(self):
        import mmbalance.pipeline.stages  # noqa: F401

    def run_units(self, fn: TaskFn, tasks: list[dict[str, Any]]) -> dict[str, Any]:
        return run_units(fn, tasks)


# Outlives the driver for one reason: the driver's Ray processes get SIGKILL with it (PDEATHSIG),
# but the raylet's own children (DashboardAgent, RuntimeEnvAgent) do not and would live on. It
# notes every Ray process the driver starts after it (polling), and when its stdin closes without a
# "done" (the driver died, even by kill -9) ends the ones still alive: TERM, then KILL.
_RAY_WATCHDOG = r"""
import os, select, signal, sys
import psutil
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGHUP, signal.SIG_IGN)
driver, me = psutil.Process(int(sys.argv[1])), psutil.Process()
since = me.create_time()  # the driver's processes from before the session are older: never ours
known = {}
def note():
    try:
        children = driver.children(recursive=True)
    except psutil.Error:
        return
    for child in children:
        try:
            if child.pid == me.pid or child.pid in known or child.create_time() < since:
                continue
            command = " ".join(child.cmdline())
            if "ray::" in command or "/ray/" in command:  # Ray's binaries, scripts and workers only
                known[child.pid] = child
        except psutil.Error:
            pass
clean = False
while True:
    if select.select([sys.stdin], [], [], 1.0)[0]:
        data = os.read(sys.stdin.fileno(), 64)
        clean = b"done" in data
        if not data or clean:
            break
    note()
left = [p for p in known.values() if p.is_running()]
_, left = psutil.wait_procs(left, timeout=5 if clean else 1)  # a clean shutdown ends them itself
for p in left:
    try:
        p.terminate()
    except psutil.Error:
        pass
_, left = psutil.wait_procs(left, timeout=3)
for p in left:
    try:
        p.kill()
    except psutil.Error:
        pass
"""


def _start_ray_watchdog():
    import subprocess
    import sys

    return subprocess.Popen(
        [sys.executable, "-c", _RAY_WATCHDOG, str(os.getpid())], stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )


def _stop_ray_watchdog(watchdog) -> None:
    try:
        watchdog.stdin.write(b"done")
        watchdog.stdin.close()
    except OSError:
        pass


@contextlib.contextmanager
def _without_head_monitors():
    """A new local head without the autoscaler monitor and the log monitor: a fixed one-node Ray
    has nothing to autoscale, and with ``log_to_driver=False`` nobody reads what the log monitor
    forwards (worker logs stay in the session's files). ~160 MB of RSS on this box. ``ray.init``
    does not expose the two switches (``ray start`` does), so they are set on its RayParams; a Ray
    without them is left as it is."""
    try:
        from ray._private import parameter
    except ImportError:
        yield
        return
    original = parameter.RayParams.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if hasattr(self, "no_monitor") and hasattr(self, "include_log_monitor"):
            self.no_monitor, self.include_log_monitor = True, False

    parameter.RayParams.__init__ = init
    try:
        yield
    finally:
        parameter.RayParams.__init__ = original


class _DropDefaultAuthNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


@contextlib.contextmanager
def _quiet_default_auth_notice():
    """The embedded Ray keeps Ray's default for a new local cluster (token authentication); the
    notice Ray logs about that default on every start is not the user's business, so it is
    dropped while this run starts its own cluster. Nothing else Ray logs is touched."""
    log = logging.getLogger("ray._private.authentication.authentication_token_setup")
    notice = _DropDefaultAuthNotice()
    log.addFilter(notice)
    try:
        yield
    finally:
        log.removeFilter(notice)


@contextlib.contextmanager
def _environment(**values: str):
    """These environment variables set while the block runs (for the processes it starts)."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None, object_store_mb: int | None = None):
    """Connect to a cluster (``address`` or RAY_ADDRESS), or start a local Ray for this run and stop it
    afterwards, also on SIGTERM or Ctrl-C, so no processes are left behind; a watchdog process ends
    the local Ray's processes also when the driver itself is killed (kill -9)."""
    import ray

    if ray.is_initialized():  # inside a Ray job, or a caller's session: theirs to manage
        yield False
        return
    with sigterm_handler():  # ray.init installs handlers for its node (they exit 1) and leaves them behind
        yield from _session(ray, address, num_cpus, object_store_mb)


def _session(ray, address: str | None, num_cpus: int | None, object_store_mb: int | None):
    target = address or os.environ.get("RAY_ADDRESS")
    threads = os.environ.get("OMP_NUM_THREADS", "1")
    watchdog = None
    if target:
        ray.init(address=target, log_to_driver=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": threads}},
                 logging_level=logging.WARNING)
    else:
        watchdog = _start_ray_watchdog()
        try:
            # the workers inherit the raylet's environment, which is this one: a runtime_env would
            # start every worker through Ray's setup_worker.py, which imports Ray twice (~1 s a worker)
            with _without_head_monitors(), _quiet_default_auth_notice(), _environment(OMP_NUM_THREADS=threads):
                ray.init(
                    address="local",
                    logging_level=logging.WARNING,
                    num_cpus=num_cpus,
                    include_dashboard=False,
                    log_to_driver=False,
                    object_store_memory=(object_store_mb or 512) * 1024 * 1024,
                    # no idle workers kept: between per-shard stages the driver works alone (fit,
                    # solve, report) and two idle workers held ~550 MB. A worker idle for 0.5 s ends:
                    # back-to-back task maps keep theirs warm. The rebalance's per-unit stages run on
                    # the executor's own pool of workers instead (RayExecutor(pool=True)).
                    _system_config={"num_workers_soft_limit": 0, "idle_worker_killing_time_threshold_ms": 500,
                                    "kill_idle_workers_interval_ms": 50, "enable_worker_prestart": False},
                )
        except BaseException:
            _stop_ray_watchdog(watchdog)
            raise
    interrupted = False
    with sigterm_exits():  # ours until Ray is down, also while it shuts down
        try:
            yield watchdog is not None  # True: this run's own local Ray
        except (SystemExit, KeyboardInterrupt):
            interrupted = True
            raise
        finally:
            with _shutdown_after_interrupt() if interrupted else contextlib.nullcontext():
                ray.shutdown()
            if watchdog is not None:
                _stop_ray_watchdog(watchdog)
                if interrupted:  # our Ray's processes gone before the caller cleans up after them
                    _wait_for_children(5.0)


def _wait_for_children(timeout: float) -> None:
    """Wait (at most ``timeout`` s) for this process's children (an embedded Ray's processes after
    its shutdown) to exit."""
    import psutil

    try:
        psutil.wait_procs(psutil.Process().children(recursive=True), timeout=timeout)
    except psutil.Error:
        pass


@contextlib.contextmanager
def _shutdown_after_interrupt() -> Iterator[None]:
    """Ray's shutdown after SIGTERM or Ctrl-C: a second SIGTERM does not cut it short, and what Ray's
    core prints about the work it abandons (e.g. "Failed to push error to driver" for a pool worker's
    group) goes nowhere: the run's one line says what happened and that a rerun resumes."""
    import signal
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        with sigterm_handler(signal.SIG_IGN):
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
