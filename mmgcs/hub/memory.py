"""Running out of memory while a bundle loads, reported as memory: how much the bundle needs (from the weights'
header, known before anything is allocated), what this machine and process allow, and the remedy. Without this a
failed allocation surfaced as whatever the failing step called its errors ("model.safetensors is corrupt or
truncated (... Cannot allocate memory (12))", "config.json describes a model that cannot be built"), sending users
to re-download or re-train a bundle that is fine.
"""

from __future__ import annotations

import contextlib
import resource
from pathlib import Path

from mmgcs.hub import weights
from mmgcs.hub.errors import BundleError, BundleMemoryError, is_out_of_memory


def _gigabytes(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def bundle_need(weights_file: Path) -> str:
    """How much memory loading the bundle takes, in words, from its weights' header (a bounded read of a few KB;
    the file's size when the header cannot be read)."""
    try:
        header = weights.read_header(weights_file)
    except (BundleError, OSError, MemoryError):
        try:
            return f"about {_gigabytes(weights_file.stat().st_size)} for the weights in {weights_file.name}"
        except OSError:
            return "more memory than is free"
    weight_bytes = sum(entry.nbytes for entry in header.values())
    return (f"about {_gigabytes(weights.need_bytes(header))} beyond the program itself ({_gigabytes(weight_bytes)} of "
            f"weights in {weights_file.name}, plus its largest tensor read beside them)")


def out_of_memory_message(weights_file: Path) -> str:
    """Out of memory, said as memory: how much the bundle needs, what the machine allows, and the remedy."""
    limits = memory_limits()
    return (
        f"Out of memory while loading the model in {weights_file.parent}: it needs {bundle_need(weights_file)}"
        f"{'; ' + limits if limits else ''}. The bundle is not damaged: free memory or load it on a machine with more "
        "(or raise the process's memory limit), or use a smaller model (smaller text and image backbones)"
    )


def memory_limits() -> str:
    """What this machine and process allow, in words ("" when unknown): the memory available now and any
    address-space limit (ulimit -v, prlimit --as)."""
    parts = []
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        parts.append(f"this process may use at most {_gigabytes(soft)} of address space (ulimit -v / prlimit --as)")
    try:
        meminfo = Path("/proc/meminfo").read_text().split("\n")
        available = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
        parts.append(f"the machine has {_gigabytes(available)} available")
    except (OSError, StopIteration, ValueError, IndexError):
        pass
    return " and ".join(parts)


@contextlib.contextmanager
def memory_reported(weights_file: Path):
    """Turns running out of memory inside the block into a BundleMemoryError that says so (never "corrupt" or
    "cannot be built", which would send the user to re-download or re-train a bundle that is fine)."""
    try:
        yield
    except BundleMemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - only failed allocations are translated; the rest re-raise as they are
        if not is_out_of_memory(e):
            raise
        raise BundleMemoryError(out_of_memory_message(weights_file)) from None


__all__ = ["bundle_need", "memory_limits", "memory_reported", "out_of_memory_message"]
