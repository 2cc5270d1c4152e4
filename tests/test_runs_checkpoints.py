"""--resume verifies each checkpoint (digests, trainer state, RNG states) before anything uses its weights, falls
back to the previous intact one, and stops with a clear error when none is intact."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine_helpers import REPO_ROOT, build_dataset, tiny_overrides

from mmgcs.engine import main

CONFIG = REPO_ROOT / "configs" / "fusion.yaml"  # frozen towers on cached features: the case of the zeroed text tower


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    """A finished 2-epoch run whose folder holds both epoch checkpoints, and its metrics (the reference)."""
    root = tmp_path_factory.mktemp("ckpt")
    data = build_dataset(root, n=45, poster_every=1, plot_every=1)
    out = root / "reference"
    archive = root / "archive"
    rmtree = shutil.rmtree

    def keep_a_copy(path, *args, **kwargs):  # the run prunes epoch_001 when epoch 2 is the best: keep it here
        path = Path(path)
        if path.parent == out / "checkpoints" and path.name.startswith("epoch_") and path.is_dir():
            shutil.copytree(path, archive / path.name)
        return rmtree(path, *args, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(shutil, "rmtree", keep_a_copy)
    try:
        metrics = main(_args(data, out, root), default_config=CONFIG)
    finally:
        mp.undo()
    for name in ("epoch_001", "epoch_002"):
        if not (out / "checkpoints" / name).exists():
            shutil.copytree(archive / name, out / "checkpoints" / name)
    return data, out, metrics, root


def _args(data, out, root):
    return tiny_overrides(data, out, train__epochs=2, train__early_stopping_patience=0, train__cache_dir=root / "cache")


def _copy(runs_dir, tmp_path):
    data, reference, metrics, root = runs_dir
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    return data, out, metrics, root, reference


def _zero_tail(path):
    raw = bytearray(path.read_bytes())
    half = len(raw) // 2
    raw[half:] = bytes(len(raw) - half)
    path.write_bytes(bytes(raw))


def _redigest(folder):
    """What a checkpoint damaged *before* its digests were taken looks like (the semantic checks must catch it)."""
    from mmgcs.runs.manifest import write_manifest

    write_manifest(folder)


def _edit_state(folder, **changes):
    state = json.loads((folder / "trainer_state.json").read_text())
    state.update(changes)
    (folder / "trainer_state.json").write_text(json.dumps(state))
    _redigest(folder)


def _invalid_state(folder):
    (folder / "trainer_state.json").write_text('{"epoch": 2, "history": [')
    _redigest(folder)


def _garbage_rng(folder):
    (folder / "random_states_0.pkl").write_bytes(bytes(range(256)) * 4)
    _redigest(folder)


DAMAGE = {
    "zeroed weights": (lambda f: _zero_tail(f / "model.safetensors"), "model.safetensors does not match its recorded sha256"),
    "truncated optimizer": (lambda f: (f / "optimizer.bin").write_bytes((f / "optimizer.bin").read_bytes()[:100]),
                            "optimizer.bin has 100 bytes"),
    "deleted file": (lambda f: (f / "random_states_0.pkl").unlink(), "random_states_0.pkl is missing"),
    "no digests": (lambda f: (f / "MANIFEST.json").unlink(), "has no MANIFEST.json"),
    "invalid trainer_state.json": (_invalid_state, "trainer_state.json is not valid JSON"),
    "garbage RNG state": (_garbage_rng, "random_states_0.pkl does not hold valid random-number states"),
    "epoch 99": (lambda f: _edit_state(f, epoch=99), "epoch is 99"),
    "history of another epoch": (lambda f: _edit_state(f, global_step=1), "global_step 1 differs"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_latest_checkpoint_is_refused_and_resume_falls_back_to_the_intact_one(runs_dir, tmp_path, damage, caplog):
    data, out, reference, root, ref_out = _copy(runs_dir, tmp_path)
    corrupt, reason = DAMAGE[damage]
    corrupt(out / "checkpoints" / "epoch_002")
    (out / "metrics.json").unlink()  # as after a run killed once epoch 2 was checkpointed
    with caplog.at_level(logging.INFO):
        metrics = main([*_args(data, out, root), "--resume"], default_config=CONFIG)
    refused = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "cannot be trusted" in r.getMessage()]
    assert len(refused) == 1 and "epoch_002" in refused[0] and reason in refused[0], refused
    assert "Resumed from" in caplog.text and "epoch_001" in caplog.text
    # Epoch 2 trained again from the intact epoch 1: the same run as the uninterrupted one, and the saved model is
    # the one the metrics were computed with (a damaged tower must never reach model/).
    assert metrics["test"] == reference["test"] and metrics["best_epoch"] == reference["best_epoch"]
    a, b = load_file(ref_out / "model" / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (out / "COMPLETE").is_file()


def test_no_intact_checkpoint_is_a_clear_error_naming_each_and_the_remedy(runs_dir, tmp_path, capsys):
    data, out, _, root, _ = _copy(runs_dir, tmp_path)
    _zero_tail(out / "checkpoints" / "epoch_002" / "model.safetensors")
    (out / "checkpoints" / "epoch_001" / "trainer_state.json").unlink()  # not even listed by latest_checkpoint
    with pytest.raises(SystemExit) as e:
        main([*_args(data, out, root), "--resume"], default_config=CONFIG)
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert "no intact checkpoint" in err and "epoch_001: trainer_state.json is missing" in err
    assert "epoch_002: model.safetensors does not match" in err and "without --resume" in err
    assert "Traceback" not in err


def test_every_checkpoint_carries_digests_of_all_its_files(runs_dir):
    from mmgcs.runs.checkpoints import checkpoint_problem

    _, out, _, _ = runs_dir
    folder = out / "checkpoints" / "epoch_002"
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {"MANIFEST.json"}
    assert set(manifest["files"]) == on_disk and {"model.safetensors", "trainer_state.json"} <= on_disk
    assert checkpoint_problem(folder) is None
    state = json.loads((folder / "trainer_state.json").read_text())
    assert state["epoch"] == 2 and state["epochs"] == 2


@pytest.mark.slow
def test_ddp_resume_skips_a_damaged_checkpoint_on_every_process(runs_dir, tmp_path):
    import socket
    import subprocess
    import sys

    from engine_helpers import subprocess_env

    data, out, _, root, _ = _copy(runs_dir, tmp_path)
    _zero_tail(out / "checkpoints" / "epoch_002" / "model.safetensors")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           str(REPO_ROOT / "training" / "train_fusion.py"), *_args(data, out, root), "--resume"]
    env = subprocess_env()
    env.pop("ACCELERATE_USE_CPU")
    proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert log.count("cannot be trusted") == 1 and "epoch_002" in log  # decided once, on the main process
    assert "Resumed from" in log and (out / "COMPLETE").is_file()
    history = json.loads((out / "history.json").read_text())
    assert [r["epoch"] for r in history] == [1, 2] and history[1]["processes"] == 2
