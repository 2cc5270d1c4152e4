"""The process-wide CPU policy, set by entry points (training scripts, the app, `mmgcs.evaluate`, the featurizer
workers), never by `import mmgcs`.

Idle OpenMP workers must sleep instead of spinning. On a CPU shared with other processes, spinning workers wait out
each other's time slices at every op: an epoch of the default head on 2 threads took 10-42 s spinning vs 3.5 s
passive while another process used the cores (3.0 s on 1 thread); one fused prediction in the app cost 1,160 ms of
CPU spinning vs 130 ms passive. GNU OpenMP reads `OMP_WAIT_POLICY` once, when torch loads it, so
`configure_cpu_policy` must run before torch is first imported; the user's own setting always wins.
"""

import ctypes
import functools
import logging
import os
import sys
import time
from typing import Callable, Mapping, Optional

from mmgcs.config import ConfigError

logger = logging.getLogger(__name__)


def configure_cpu_policy() -> bool:
    """Make idle OpenMP workers sleep (`OMP_WAIT_POLICY=PASSIVE` unless the user chose). Returns False when torch
    was already loaded, so that the setting can no longer take effect in this process (its children still get it)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return "torch" not in sys.modules


def refuse_imports(*names: str) -> list[str]:
    """Make `import <name>` raise ImportError in this process, for each of `names` not loaded yet; returns those.

    A `None` in `sys.modules` is Python's own way of saying "this module is not available". A library that only
    tries such a module (`try: import x / except ImportError`) then skips it. For a serving process, that keeps
    modules it never uses out of its memory.
    """
    refused = [name for name in names if name not in sys.modules]
    for name in refused:
        sys.modules[name] = None
    return refused


def skip_triton_without_gpu() -> bool:
    """On a machine without a CUDA GPU, make `import triton` fail fast, so the GPU kernel compiler stays unloaded.

    Importing torchvision (timm's image transforms) imports `torch._dynamo`, which imports triton just to see
    whether it is installed: 125 MB of a serving process's memory (69 MB of libtriton.so pages, 56 MB of heap) and
    ~0.1 s, for a compiler that only generates GPU kernels (on CPU, torch.compile writes C++). torch reads the
    ImportError as "triton is not installed". Call it before torchvision loads; returns whether it took effect
    (not with a GPU, or once triton is loaded).
    """
    import torch  # here, not at the top: configure_cpu_policy must run before torch first loads

    return not torch.cuda.is_available() and bool(refuse_imports("triton"))


def release_freed_memory() -> None:
    """Hand the heap's freed pages back to the system (glibc's `malloc_trim`; a no-op on other C libraries).

    Building the serving model (the state dict read next to the module, the ONNX export of the text tower) frees
    hundreds of MB in small blocks that glibc otherwise keeps as the process's resident memory.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Optional[Callable[[int], int]]:
    """glibc's `malloc_trim`, looked up once among the symbols already loaded (a server trims every second;
    `ctypes.util.find_library` would run `ldconfig` in a subprocess each time), or None without it (musl, macOS)."""
    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)
    except OSError:
        return None


class PeriodicTrim:
    """`release_freed_memory`, at most once every `interval_s` seconds however often it is called (a server calls
    it after each batch; one trim of a ~1.5 GB heap takes ~5 ms)."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic):
        self.interval_s, self.clock = interval_s, clock
        self.last: Optional[float] = None
        self.count = 0

    def __call__(self) -> bool:
        now = self.clock()
        if self.last is not None and now - self.last < self.interval_s:
            return False
        release_freed_memory()
        self.last, self.count = self.clock(), self.count + 1
        return True


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a container's quota), not the machine's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def launcher_thread_cap(env: Mapping[str, str], device_type: str, local_processes: int, cores: int) -> Optional[int]:
    """The CPU threads each process should use when `accelerate launch` left PyTorch on one, else None.

    Without `--num_cpu_threads_per_process`, `accelerate launch` exports OMP_NUM_THREADS=1 to a process on a GPU-less
    machine (it raises the value only with an explicit `--cpu`, and its own multi-CPU fix applies only when the
    variable is unset, which it never is after the launcher), so the cold default run featurizes and trains on one
    core. A "1" under the launcher is that default; any other value, or MMGCS_NUM_THREADS, is the user's choice.
    """
    if "MMGCS_NUM_THREADS" in env:
        try:
            return max(1, int(env["MMGCS_NUM_THREADS"]))
        except ValueError:
            raise ConfigError(f"MMGCS_NUM_THREADS: expected a whole number of threads, got {env['MMGCS_NUM_THREADS']!r}") from None
    launched = "ACCELERATE_DYNAMO_BACKEND" in env  # exported by every `accelerate launch` launcher
    if device_type != "cpu" or not launched or env.get("OMP_NUM_THREADS") != "1":
        return None
    threads = max(1, cores // max(1, local_processes))
    return threads if threads > 1 else None


def launched_threads(device_type: str, num_processes: int, current: int) -> Optional[int]:
    """``launcher_thread_cap`` for this process: the threads to use instead of `accelerate launch`'s one, or None.
    ``current``: the threads torch uses now (a change is logged)."""
    # Processes sharing this machine's cores: torchrun/accelerate export LOCAL_WORLD_SIZE for multi-process jobs.
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or num_processes)
    threads = launcher_thread_cap(os.environ, device_type, local, available_cores())
    if threads is not None and threads != current:
        logger.info("Using %d CPU threads per process (accelerate launch set OMP_NUM_THREADS=1; "
                    "set MMGCS_NUM_THREADS to choose)", threads)
    return threads


def stage_threads(device_type: str, head_only: bool, run_threads: int) -> Optional[int]:
    """The threads of a training stage on CPU: one while only the fusion head runs (on cached features), else the
    run's; None when the user chose (MMGCS_NUM_THREADS) or off the CPU. The head's ops are tiny: while another
    process used the cores, an epoch of the default head took 2.9 s on one thread, 3.5 s on two with
    OMP_WAIT_POLICY=PASSIVE and 244 s on two spinning ones (OpenMP workers wait out each other's time slices)."""
    if device_type != "cpu" or "MMGCS_NUM_THREADS" in os.environ:
        return None
    return 1 if head_only else run_threads


def setup_logging() -> None:
    """Log lines with time and module, at INFO on the main process (RANK 0) and WARNING on the others."""
    level = logging.INFO if int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)) or 0) == 0 else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=level)
    # accelerate reports every file of every checkpoint at INFO
    logging.getLogger("accelerate").setLevel(logging.WARNING)
