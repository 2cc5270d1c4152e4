"""mmgcs.runs.manifest: a checkpoint's MANIFEST.json lists the size and sha256 of every file; any change, loss, extra
file or a manifest naming a path outside the checkpoint is named as the reason it cannot be trusted."""

from __future__ import annotations

import hashlib
import json

import pytest

from mmgcs.runs.manifest import MANIFEST, MANIFEST_FORMAT, manifest_problem, write_manifest


@pytest.fixture
def checkpoint(tmp_path):
    folder = tmp_path / "epoch_001"
    (folder / "sub").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights" * 1000)
    (folder / "sub" / "scheduler.bin").write_bytes(b"state")
    write_manifest(folder)
    return folder


def test_the_manifest_records_every_files_size_and_sha256(checkpoint):
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    assert manifest["format"] == MANIFEST_FORMAT
    assert manifest["files"] == {
        "model.safetensors": {"bytes": 7000, "sha256": hashlib.sha256(b"weights" * 1000).hexdigest()},
        "sub/scheduler.bin": {"bytes": 5, "sha256": hashlib.sha256(b"state").hexdigest()},
    }
    assert manifest_problem(checkpoint) is None


def _changed(folder):
    (folder / "model.safetensors").write_bytes(b"Weights" * 1000)  # same size, other bytes


def _outside(folder):
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"]["../elsewhere"] = {"bytes": 1, "sha256": "0" * 64}
    (folder / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage, reason", [
    (_changed, "model.safetensors does not match its recorded sha256"),
    (lambda f: (f / "model.safetensors").write_bytes(b"cut"), "model.safetensors has 3 bytes, not the 7000 recorded"),
    (lambda f: (f / "sub" / "scheduler.bin").unlink(), "sub/scheduler.bin is missing"),
    (lambda f: (f / "extra.bin").write_bytes(b"?"), "it holds files its manifest does not list (extra.bin)"),
    (lambda f: (f / MANIFEST).unlink(), f"it has no {MANIFEST}"),
    (lambda f: (f / MANIFEST).write_text("{not json"), f"its {MANIFEST} is not a valid manifest"),
    (lambda f: (f / MANIFEST).write_text(json.dumps({"format": 99, "files": {"a": {}}})), "is not a valid manifest"),
    (_outside, f"its {MANIFEST} names a file outside the checkpoint"),
])
def test_every_damage_is_named(checkpoint, damage, reason):
    damage(checkpoint)
    assert reason in manifest_problem(checkpoint)
