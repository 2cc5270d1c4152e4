"""model.safetensors: its header checked against the model before any tensor is read, then the tensors copied in.

The header (names, dtypes, shapes, offsets) is read with a bounded read of the file's first bytes, not through
safetensors' memory map of the whole file: a header claiming a 4 GiB extra tensor (a sparse file costs nothing on
disk) is refused before anything maps, reads or allocates it, and a map of a huge file under an address-space limit
would itself fail and look like a lack of memory. Once the header matches the model exactly, the file's tensors are
the model's own size; they are copied in one at a time (the peak is the model plus its largest tensor, not two
copies of the model).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from mmgcs import bundle_checks as checks
from mmgcs.hub.errors import BundleError, is_out_of_memory

HEADER_LIMIT = 100_000_000  # bytes; safetensors' own bound on a header
# safetensors' dtype names → bytes per value, and the kind a model tensor of that dtype must have.
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
               "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # any of them loads into a float parameter (cast on copy)


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as the header describes it."""

    dtype: str  # safetensors' name: F32, I64, ...
    shape: tuple
    nbytes: int


def _corrupt(file: Path, reason: str) -> BundleError:
    return BundleError(f"{file} is corrupt or truncated ({reason}); re-save or re-download the bundle")


def _raw_header(file: Path) -> tuple[bytes, int]:
    """The header's JSON bytes and the file's size: 8 bytes of length, then at most HEADER_LIMIT bytes."""
    size = file.stat().st_size
    with open(file, "rb") as handle:
        prefix = handle.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else 0
        if not 0 < length <= min(HEADER_LIMIT, size - 8):
            raise _corrupt(file, f"its header length {length:,} does not fit a file of {size:,} bytes")
        return handle.read(length), size


def _entry(file: Path, name: str, entry) -> tuple[TensorEntry, int]:
    """A header entry checked for form: (the tensor, where its data ends)."""
    ok = isinstance(entry, dict) and isinstance(entry.get("dtype"), str) and isinstance(entry.get("shape"), list)
    offsets = entry.get("data_offsets") if ok else None
    ok = ok and all(isinstance(n, int) and n >= 0 for n in entry["shape"])
    ok = ok and isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(n, int) for n in offsets)
    if not ok or not 0 <= offsets[0] <= offsets[1]:
        raise _corrupt(file, f"the header entry of tensor {name!r} is malformed")
    shape, nbytes = tuple(entry["shape"]), offsets[1] - offsets[0]
    width = DTYPE_BYTES.get(entry["dtype"])
    if width is not None and math.prod(shape) * width != nbytes:
        raise _corrupt(file, f"tensor {name!r} of shape {shape} takes {nbytes:,} bytes in the file")
    return TensorEntry(entry["dtype"], shape, nbytes), offsets[1]


def read_header(file: Path) -> dict[str, TensorEntry]:
    """The tensors model.safetensors declares, read without mapping or reading their data. A damaged header, or
    data that ends past the end of the file, is a BundleError ("corrupt or truncated")."""
    raw, size = _raw_header(file)
    if checks.json_too_deep(raw):
        raise _corrupt(file, "its header nests too deep")
    try:
        header = json.loads(raw)
    except ValueError:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise _corrupt(file, "its header is not JSON") from None
    if not isinstance(header, dict):
        raise _corrupt(file, "its header is not a JSON object")
    tensors, data_end = {}, 0
    for name, entry in header.items():
        if name != "__metadata__":
            tensors[name], end = _entry(file, name, entry)
            data_end = max(data_end, end)
    if 8 + len(raw) + data_end > size:
        raise _corrupt(file, f"its tensors end at byte {8 + len(raw) + data_end:,} of a {size:,}-byte file")
    return tensors


def expected_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict (on the meta device: shapes and dtypes, nothing allocated)."""
    return dict(model.state_dict())


def _kind(dtype: str) -> str:
    return "float" if dtype in FLOAT_DTYPES else "bool" if dtype == "BOOL" else "int" if dtype in DTYPE_BYTES else dtype


def _model_kind(tensor: torch.Tensor) -> str:
    return "float" if tensor.is_floating_point() else "bool" if tensor.dtype == torch.bool else "int"


def _shown(names: list) -> str:
    return ", ".join(names[:5]) + (f", ... ({len(names)} in all)" if len(names) > 5 else "")


def check_header(header: dict[str, TensorEntry], expected: dict[str, torch.Tensor], source: str) -> None:
    """Every tensor present, expected, of the right shape and of the right kind of dtype (a float parameter takes
    F16/BF16/F32/F64, an integer buffer an integer); otherwise a BundleError listing them, before any read."""
    missing = sorted(set(expected) - set(header))
    unexpected = sorted(set(header) - set(expected))
    common = sorted(set(header) & set(expected))
    misshaped = [f"{k}: file {header[k].shape} vs model {tuple(expected[k].shape)}"
                 for k in common if header[k].shape != tuple(expected[k].shape)]
    mistyped = [f"{k}: file {header[k].dtype} vs model {str(expected[k].dtype).removeprefix('torch.')}"
                for k in common if _kind(header[k].dtype) != _model_kind(expected[k])]
    problems = [f"{what} tensors: {_shown(keys)}" for what, keys in
                (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped), ("mis-typed", mistyped))
                if keys]
    if problems:
        raise BundleError(
            f"{source} does not match the model described by its config.json ({'; '.join(problems)}). "
            "The weights and config.json must come from the same save_pretrained call"
        )


def copy_weights(model: torch.nn.Module, file: Path) -> None:
    """Each tensor of the file (whose header `check_header` passed) copied into the model, one at a time; a NaN or
    Inf in a float tensor is a BundleError naming every such tensor."""
    targets = model.state_dict()
    damaged = []
    try:
        with safe_open(str(file), framework="pt", device="cpu") as weights, torch.no_grad():
            for name, target in targets.items():
                tensor = weights.get_tensor(name)
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    damaged.append(name)
                target.copy_(tensor)
                del tensor
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        if is_out_of_memory(e):
            raise
        raise _corrupt(file, f"{type(e).__name__}: {e}") from None
    if damaged:
        raise BundleError(f"{file} holds NaN or infinite values in {_shown(sorted(damaged))}: the weights are damaged "
                          "or come from a diverged training run. Re-download the bundle or re-train the model")


def need_bytes(header: dict[str, TensorEntry]) -> int:
    """Memory a load takes beyond the process itself: the built model (the size of its tensors) plus the largest
    tensor, read beside it while it is copied in."""
    sizes = [entry.nbytes for entry in header.values()]
    return sum(sizes) + max(sizes, default=0)


__all__ = ["TensorEntry", "check_header", "copy_weights", "expected_tensors", "need_bytes", "read_header"]
