"""Damaged bundles built in code for the bundle tests: a copy with config.json values changed, and model.safetensors
files whose header says what the test needs (an extra tensor, another shape or dtype) over sparse data."""

import json
import shutil
from pathlib import Path

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1, "BOOL": 1}


def tampered(bundle: Path, tmp_path: Path, name: str = "bad", **changes) -> Path:
    """A copy of the bundle whose config.json has `changes` applied (nested dicts are merged). Python's json
    writes NaN and Infinity as the literals a hand-edited or hostile file would hold."""
    dest = tmp_path / name
    shutil.copytree(bundle, dest)
    config = json.loads((dest / "config.json").read_text())
    for key, value in changes.items():
        merge = isinstance(value, dict) and isinstance(config.get(key), dict)
        config[key] = {**config[key], **value} if merge else value
    (dest / "config.json").write_text(json.dumps(config))
    return dest


def read_raw_header(file: Path) -> tuple[dict, bytes]:
    """(the header as JSON, the data section's bytes) of a safetensors file."""
    blob = file.read_bytes()
    length = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8:8 + length]), blob[8 + length:]


def write_safetensors(file: Path, header: dict, data: bytes, data_size: int) -> None:
    """A safetensors file of `header` and `data`, extended to `data_size` bytes of data by a sparse hole (a
    tensor the header claims costs no disk and no memory until someone reads it)."""
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data section to 8 bytes
    with open(file, "wb") as handle:
        handle.write(len(raw).to_bytes(8, "little") + raw + data)
        handle.truncate(8 + len(raw) + data_size)


def retyped_weights(bundle: Path, dest_name: str, tmp_path: Path, tensors: dict) -> Path:
    """A copy of the bundle whose header gives the named tensors a (dtype, shape) of the test's choosing: an
    existing name is re-declared at the end of the data, a new name is added there; the data stays sparse."""
    dest = tmp_path / dest_name
    shutil.copytree(bundle, dest)
    header, data = read_raw_header(dest / "model.safetensors")
    end = len(data)
    for name, (dtype, shape) in tensors.items():
        size = DTYPE_BYTES[dtype] if dtype in DTYPE_BYTES else 1
        for n in shape:
            size *= n
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [end, end + size]}
        end += size
    write_safetensors(dest / "model.safetensors", header, data, end)
    return dest
