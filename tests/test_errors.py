"""mmbalance.errors: how a SIGTERM ends a command."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap


def test_sigterm_exits_143_also_when_ray_replaces_our_systemexit_with_its_own():
    """A SIGTERM that arrives while the driver blocks in ray.wait runs our handler inside Ray's C++
    signal check, which then raises SystemExit(1) in place of ours (seen under load in
    test_sigterm_says_so_in_one_line_and_the_rerun_resumes[ray]); the command still exits 128 + 15."""
    script = textwrap.dedent("""
        import os, signal, sys
        from mmbalance.errors import exit_code, sigterm_exits
        with sigterm_exits():
            try:
                try:
                    os.kill(os.getpid(), signal.SIGTERM)
                    signal.pause()
                except SystemExit:
                    raise SystemExit(1)  # what Ray's check_status raises after our handler ran
            except SystemExit as exc:
                sys.exit(exit_code(exc))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr


def test_without_a_signal_the_code_is_the_exits_own():
    from mmbalance.errors import exit_code

    assert exit_code(SystemExit(3)) == 3
    assert exit_code(SystemExit("no good")) == 1
