"""Stopping a run the way a scheduler does: SIGTERM once it has done some work."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable


def sigterm_when(proc: subprocess.Popen, ready: Callable[[], bool], wait_s: float = 150, poll_s: float = 0.005,
                 before: Callable[[], None] | None = None, timeout: float = 120) -> str:
    """Send SIGTERM to ``proc`` (started with ``start_new_session`` and ``stderr=PIPE``) once
    ``ready()`` holds; returns its stderr. ``before`` runs just before the signal. The process group
    is killed if the process outlives the test."""
    try:
        deadline = time.monotonic() + wait_s
        while proc.poll() is None and time.monotonic() < deadline:
            if ready():
                break
            time.sleep(poll_s)
        assert proc.poll() is None, "the run ended before one shard was scanned"
        if before is not None:
            before()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=timeout)
        return err
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
