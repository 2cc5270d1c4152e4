"""The process-wide CPU policy, set by entry points (training scripts, the app, `mmgcs.evaluate`, the featurizer
workers), never by `import mmgcs`.

Idle OpenMP workers must sleep instead of spinning. On a CPU shared with other processes, spinning workers wait out
each other's time slices at every op: an epoch of the default head on 2 threads took 10-42 s spinning vs 3.5 s
passive while another process used the cores (3.0 s on 1 thread); one fused prediction in the app cost 1,160 ms of
CPU spinning vs 130 ms passive. GNU OpenMP reads `OMP_WAIT_POLICY` once, when torch loads it, so
`configure_cpu_policy` must run before torch is first imported; the user's own setting always wins.
"""

import os
import sys


def configure_cpu_policy() -> bool:
    """Make idle OpenMP workers sleep (`OMP_WAIT_POLICY=PASSIVE` unless the user chose). Returns False when torch
    was already loaded, so that the setting can no longer take effect in this process (its children still get it)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return "torch" not in sys.modules


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a container's quota), not the machine's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
