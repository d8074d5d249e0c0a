"""How a command ends: the errors a user can fix (one line, exit 2) and SIGTERM as an orderly exit.

The CLI, the Ray job entrypoint and the embedded local Ray session all use these, so a killed or
refused run reads the same wherever it ran.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


def known_error(exc: BaseException | None) -> BaseException | None:
    """The InputError/RecipeError (or a refused run lock) behind an exception, also when Ray
    wrapped it on the way back: the user can fix these, so they are exit 2 and one line."""
    from mmbalance.io.storage import RunLockedError
    from mmbalance.schemas.contract import InputError
    from mmbalance.schemas.recipe import RecipeError

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (InputError, RecipeError, RunLockedError)):
            return exc
        cause = getattr(exc, "cause", None)
        exc = cause if isinstance(cause, BaseException) else (exc.__cause__ or exc.__context__)
    return None


_terminated_by: list[int] = []  # the signal _exit_on_sigterm answered, if any


def _exit_on_sigterm(signum, frame):
    # as Ctrl-C does: the stack unwinds, temporaries are removed, the run lock is released, and
    # every finished shard keeps its done marker, so the same command resumes
    _terminated_by.append(signum)
    raise SystemExit(128 + signum)


def exit_code(exc: SystemExit) -> int:
    """The status a SystemExit ends the command with: 128 + the signal when SIGTERM raised it, also
    where Ray replaced our SystemExit with its own ``SystemExit(1)`` (a signal that arrives while the
    driver blocks in ``ray.wait`` surfaces from Ray's C++ as that), else its code (a non-integer: 1)."""
    if _terminated_by:
        return 128 + _terminated_by[-1]
    return exc.code if isinstance(exc.code, int) else 1


@contextlib.contextmanager
def sigterm_handler(handler=None) -> Iterator[None]:
    """Inside: ``handler`` answers SIGTERM in the main thread (None: whatever is installed stays);
    on the way out the handler from before is put back, also where code inside replaced it (ray.init
    does). Elsewhere nothing changes: Python installs handlers only in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if handler is not None:
        signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def sigterm_exits() -> contextlib.AbstractContextManager[None]:
    """Inside: SIGTERM raises SystemExit(128 + 15) in the main thread."""
    return sigterm_handler(_exit_on_sigterm)
