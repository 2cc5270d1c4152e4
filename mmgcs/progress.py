"""Progress bars for every long step (featurizing, the feature cache, evaluation, batch prediction): one policy.

A bar shows its rate and ETA on a terminal. In a log (stderr not a TTY: CI, `nohup`, a job scheduler) the same
bar prints one plain line at most every `LOG_INTERVAL_S`, so a log shows progress without thousands of redraws.
Silenced by `MMGCS_QUIET=1` (what `--quiet` sets) and on every process but a node's first (`LOCAL_RANK` > 0 under
`accelerate launch`): N processes must not draw N bars.
"""

from __future__ import annotations

import os
import sys
from typing import Iterable, Mapping, Optional, TextIO

from tqdm.auto import tqdm

# In a log, a line every 30 s: a ten-minute featurization writes ~20 lines, enough to tell progress from a hang.
LOG_INTERVAL_S = 30.0
QUIET_ENV = "MMGCS_QUIET"


def set_quiet(quiet: bool = True) -> None:
    """Silence (or restore) every progress bar of this process and of the processes it starts."""
    if quiet:
        os.environ[QUIET_ENV] = "1"
    else:
        os.environ.pop(QUIET_ENV, None)


def progress_enabled(environ: Optional[Mapping[str, str]] = None) -> bool:
    """False under `MMGCS_QUIET` (any value but "", "0", "false", "no") or on a process that is not its node's first."""
    environ = os.environ if environ is None else environ
    quiet = environ.get(QUIET_ENV, "").strip().lower() not in ("", "0", "false", "no")
    return not quiet and environ.get("LOCAL_RANK", "0") in ("", "0")


class _LogLines:
    """A file for tqdm that turns its in-place redraws (`\\r...`) into one line each, for logs."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").rstrip("\n")
        if text.strip():
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress(iterable: Optional[Iterable] = None, *, total: Optional[int] = None, desc: str, unit: str,
             enabled: Optional[bool] = None, stream: Optional[TextIO] = None) -> tqdm:
    """A tqdm bar (use as an iterable wrapper or call `.update(n)`); `enabled=None` follows `progress_enabled()`."""
    stream = sys.stderr if stream is None else stream
    on = progress_enabled() if enabled is None else enabled
    tty = bool(getattr(stream, "isatty", lambda: False)())
    return tqdm(
        iterable, total=total, desc=desc, unit=unit, disable=not on, dynamic_ncols=tty,
        file=stream if tty else _LogLines(stream),
        mininterval=0.5 if tty else LOG_INTERVAL_S,
        # tqdm draws a non-TTY bar as if 80+ columns wide: keep the rate and the ETA, drop the bar itself
        bar_format=None if tty else "{desc}: {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}, {rate_fmt}]",
    )


__all__ = ["LOG_INTERVAL_S", "QUIET_ENV", "progress", "progress_enabled", "set_quiet"]
