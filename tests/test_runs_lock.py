"""One run per output folder: a second run is refused with the other run's pid and host, a lock left by a killed
run is taken over, and under DDP every process stops (none waits for the others forever)."""

from __future__ import annotations

import json
import logging
import signal
import socket
import subprocess
import sys
import time

import pytest

from engine_helpers import REPO_ROOT, TINY_TOWERS, build_dataset, subprocess_env, tiny_overrides

from mmgcs.engine import main

CONFIG = REPO_ROOT / "configs" / "text.yaml"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_dataset(tmp_path_factory.mktemp("lock-data"), n=30)


def _start_long_run(data, out):
    args = tiny_overrides(data, out, train__epochs=1000, train__early_stopping_patience=0)
    proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "training" / "train_text.py"), *args], env=subprocess_env(),
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 180
    while not (out / "checkpoints" / "epoch_001").exists():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() < deadline, "the first checkpoint never appeared"
        time.sleep(0.05)
    return proc


def test_a_second_run_in_the_folder_is_refused_and_a_killed_runs_lock_is_taken_over(tmp_path, data, capsys, caplog):
    out = tmp_path / "run"
    first = _start_long_run(data, out)
    try:
        # Same folder, another seed: before the lock, this run trained alongside and reported the other's model.
        with pytest.raises(SystemExit) as e:
            main([*tiny_overrides(data, out, train__epochs=1, train__seed=7), "--resume"], default_config=CONFIG)
        err = capsys.readouterr().err
        assert e.value.code == 2
        assert f"Another run is using the output folder {out}" in err
        assert f"pid {first.pid} on host {socket.gethostname()}" in err
        assert first.poll() is None  # the refused run did not disturb the first one
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=30)
    # The killed run's lock file is still there; this host can tell its process is gone and takes it over.
    with caplog.at_level(logging.WARNING, logger="mmgcs.runs"):
        metrics = main([*tiny_overrides(data, out, train__epochs=1), "--resume"], default_config=CONFIG)
    assert f"Taking over the stale lock of {out}: pid {first.pid}" in caplog.text and "no longer running" in caplog.text
    assert metrics["epochs_run"] >= 1 and (out / "COMPLETE").is_file()
    assert not (out / ".mmgcs-run.lock").exists()  # released when the run ends


def test_a_lock_of_another_host_is_never_taken_over(tmp_path, data, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = json.dumps({"pid": 4242, "host": "gpu-node-17", "since": time.time()})
    (out / ".mmgcs-run.lock").write_text(holder)
    with pytest.raises(SystemExit) as e:
        main(tiny_overrides(data, out, train__epochs=1), default_config=CONFIG)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "pid 4242 on host gpu-node-17" in err and "delete" in err
    assert (out / ".mmgcs-run.lock").read_text() == holder
    assert not (out / "checkpoints").exists()


def test_the_lock_is_released_when_a_run_fails(tmp_path, data, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit):
        main(tiny_overrides(data, out, train__epochs=1, data__train_split="nope"), default_config=CONFIG)
    assert "no split 'nope'" in capsys.readouterr().err
    assert not (out / ".mmgcs-run.lock").exists()
    assert main(tiny_overrides(data, out, train__epochs=1, train__max_steps=1), default_config=CONFIG)["epochs_run"] == 1


@pytest.mark.slow
def test_a_ddp_run_on_a_locked_folder_stops_on_every_process(tmp_path, data):
    from mmgcs.runs.lock import RunLock
    from mmgcs.testing import tiny_text_backbone_dir

    out = tmp_path / "run"
    lock = RunLock(out).acquire()  # held by this test process: alive, on this host
    try:
        settings = {"data.path": data, "train.output_dir": out, "train.epochs": 1, "train.log_with": "none",
                    "train.cache_dir": tmp_path / "cache", **TINY_TOWERS, "model.text_backbone": tiny_text_backbone_dir()}
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(port), str(REPO_ROOT / "training" / "train_text.py"), *[f"{k}={v}" for k, v in settings.items()]]
        env = subprocess_env()
        env.pop("ACCELERATE_USE_CPU")
        proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=180)
    finally:
        lock.release()
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0
    # Both processes report the refusal (the second learns it from the first) and exit: no deadlock.
    assert log.count(f"error: Another run is using the output folder {out}") == 2, log[-3000:]
    assert not (out / "checkpoints").exists()
