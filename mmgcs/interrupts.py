"""Stopping a training run on Ctrl-C (SIGINT) or SIGTERM with one line instead of tracebacks (issue 18).

    with stop_on_signals():          # the entry point (mmgcs.engine.main)
        ...
        with saving():               # mmgcs.runs: a checkpoint, bundle or report being written
            ...

Inside ``stop_on_signals`` both signals raise ``Interrupted`` (a KeyboardInterrupt, so ``except Exception`` never
swallows it) in the main thread. Inside ``saving`` the signal is held back until the outermost save is complete, so
an interrupted run leaves no half-written file; after the first signal, later ones are only logged (the clean-up
runs undisturbed; SIGKILL still stops at once). A forked child that inherited the handler (a DataLoader worker)
gets the handler it had before. ``rerun_command`` is the command line that started this process, the launcher's
under ``accelerate launch`` / ``torchrun``, with an argument added (``--resume``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import Iterator, Optional, Sequence

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# Environment variables every process started by `accelerate launch` / `torchrun` has.
LAUNCHER_MARKERS = ("ACCELERATE_DYNAMO_BACKEND", "TORCHELASTIC_RUN_ID")
LAUNCHERS = ("accelerate", "torchrun")


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; ``exit_code`` is the shell's convention, 128 + the signal's number."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class _State:
    """The handler's state: one set per process (signal handlers run in the main thread only)."""

    owner_pid: Optional[int] = None  # the process whose stop_on_signals is active
    previous: dict = {}  # signal -> the handler stop_on_signals replaced
    saving_depth = 0  # nested saving() blocks now open
    pending: Optional[int] = None  # a signal held back by saving()
    stopping = False  # an Interrupted was raised: later signals are only logged


def _handle(signum: int, frame) -> None:
    if os.getpid() != _State.owner_pid:  # a forked child: what it would have done without us
        previous = _State.previous.get(signum, signal.SIG_DFL)
        if callable(previous):
            return previous(signum, frame)
        signal.signal(signum, previous)
        os.kill(os.getpid(), signum)
        return
    name = signal.Signals(signum).name
    if _State.stopping:
        logger.warning("%s: already stopping (SIGKILL stops at once)", name)
        return
    if _State.saving_depth:
        if _State.pending is None:
            logger.warning("%s: stopping once the save in progress is complete", name)
            _State.pending = signum
        return
    _State.stopping = True
    raise Interrupted(signum)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise ``Interrupted`` inside the block; the previous handlers are back after it. Only the
    main thread can set handlers: elsewhere (and when already active) the block runs unchanged."""
    if threading.current_thread() is not threading.main_thread() or _State.owner_pid == os.getpid():
        yield
        return
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    _State.previous = {s: signal.SIG_DFL if h is None else h for s, h in previous.items()}  # None: set outside Python
    _State.owner_pid, _State.pending, _State.stopping = os.getpid(), None, False
    try:
        for s in STOP_SIGNALS:
            signal.signal(s, _handle)
        yield
    finally:
        for s, handler in _State.previous.items():
            signal.signal(s, handler)
        _State.owner_pid, _State.pending, _State.stopping = None, None, False


@contextlib.contextmanager
def saving() -> Iterator[None]:
    """A write that must not be cut: a signal arriving inside is raised once the outermost block completes (not
    when it fails: its own error goes first)."""
    _State.saving_depth += 1
    try:
        yield
    finally:
        _State.saving_depth -= 1
    if _State.saving_depth == 0 and _State.pending is not None and not _State.stopping:
        signum, _State.pending, _State.stopping = _State.pending, None, True
        raise Interrupted(signum)


def rerun_command(extra: Optional[str] = None, argv: Optional[Sequence[str]] = None) -> str:
    """The shell command that started this process with ``extra`` appended (once), for a user to paste.

    ``argv``: the arguments a caller handed to its ``main`` instead of the command line's (shown as that call)."""
    def with_extra(args: list[str]) -> list[str]:
        return args if extra is None or extra in args else [*args, extra]

    if argv is not None and list(argv) != sys.argv[1:]:
        return f"main({with_extra(list(argv))!r})"
    launched = any(marker in os.environ for marker in LAUNCHER_MARKERS)
    parent = _parent_command() if launched else None
    command = launcher_command(parent, sys.argv[0]) or list(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
    return shlex.join(with_extra(command))


def launcher_command(parent: Optional[Sequence[str]], script: str) -> Optional[list[str]]:
    """The launcher's command line (``parent``) when it is the one that ran ``script``, as typed: a console script
    runs as ``python .../bin/accelerate launch ...``, shown as ``.../bin/accelerate launch ...``."""
    if not parent or script not in parent:
        return None
    parent = list(parent)
    if len(parent) > 1 and Path(parent[1]).name in LAUNCHERS and Path(parent[0]).name.startswith("python"):
        parent = parent[1:]
    return parent


def _parent_command() -> Optional[list[str]]:
    """The parent process's arguments (Linux /proc), or None where they cannot be read."""
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


__all__ = ["Interrupted", "STOP_SIGNALS", "launcher_command", "rerun_command", "saving", "stop_on_signals"]
