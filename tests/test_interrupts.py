"""Ctrl-C and SIGTERM during training (issue 18): one line naming how far the run got and the exact command that
resumes it, exit code 130 / 143, no traceback, no half-written file; that command then finishes the run. The
signal handling itself (mmgcs.interrupts) is checked in-process: saves are never cut, handlers are restored."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine_helpers import REPO_ROOT, build_dataset, subprocess_env, tiny_overrides

from mmgcs import interrupts
from mmgcs.interrupts import Interrupted, launcher_command, rerun_command, saving, stop_on_signals

LINE = re.compile(r"^interrupted (?:during epoch \d+; the last checkpoint is epoch \d+|after epoch \d+[^;]*); "
                  r"rerun with --resume: (?P<command>.+)$")
EPOCHS = 4  # after the first checkpoint, 3 epochs and the final evaluation remain: time to send the signal


# ------------------------------------------------------------------------------------------- in-process
def test_a_signal_raises_interrupted_with_the_shells_exit_code_and_the_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with pytest.raises(Interrupted) as e, stop_on_signals():
        signal.raise_signal(signal.SIGTERM)
    assert e.value.exit_code == 143 and isinstance(e.value, KeyboardInterrupt)
    with pytest.raises(Interrupted) as e, stop_on_signals():
        signal.raise_signal(signal.SIGINT)
    assert e.value.exit_code == 130
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_a_signal_during_a_save_waits_for_the_save_and_later_ones_are_only_logged(tmp_path, caplog):
    written = []
    with pytest.raises(Interrupted) as e, stop_on_signals():
        with saving():
            with saving():  # nested: the outermost block decides
                signal.raise_signal(signal.SIGINT)
                written.append("first half")
            signal.raise_signal(signal.SIGTERM)  # a second signal during the same save changes nothing
            written.append("second half")
    assert written == ["first half", "second half"] and e.value.signum == signal.SIGINT
    assert "stopping once the save in progress is complete" in caplog.text

    with pytest.raises(Interrupted), stop_on_signals():
        try:
            signal.raise_signal(signal.SIGINT)
        finally:  # the clean-up after the first signal is not cut by a second one
            signal.raise_signal(signal.SIGINT)
            written.append("cleaned up")
    assert written[-1] == "cleaned up" and "already stopping" in caplog.text


def test_a_failed_save_keeps_its_own_error_before_a_pending_signal():
    with pytest.raises(OSError), stop_on_signals():
        with saving():
            signal.raise_signal(signal.SIGINT)
            raise OSError(28, "No space left on device")


def _sleep_in_child() -> None:
    time.sleep(60)


def test_a_forked_child_keeps_the_handler_it_had_before():
    """A DataLoader worker forked during the run dies of SIGTERM as it would have without the run's handler."""
    with stop_on_signals():
        child = multiprocessing.get_context("fork").Process(target=_sleep_in_child)
        child.start()
        time.sleep(0.2)
        os.kill(child.pid, signal.SIGTERM)
        child.join(timeout=30)
    assert child.exitcode == -signal.SIGTERM


def test_the_rerun_command_is_the_launchers_as_typed():
    script = "training/train_fusion.py"
    parent = ["/v/bin/python3", "/v/bin/accelerate", "launch", "--num_processes", "1", script, "data.path=a b"]
    assert launcher_command(parent, script) == parent[1:]
    module = ["/v/bin/python", "-m", "accelerate.commands.launch", script]
    assert launcher_command(module, script) == module
    assert launcher_command(["/bin/bash"], script) is None and launcher_command(None, script) is None
    assert rerun_command("--resume", ["x=1"]) == "main(['x=1', '--resume'])"  # called from Python, not a shell
    assert rerun_command("--resume", ["--resume", "x=1"]) == "main(['--resume', 'x=1'])"
    assert rerun_command(None, ["x=1"]) == "main(['x=1'])"  # the sweep: the same command continues
    assert rerun_command().endswith(shlex.join(sys.argv[1:]))  # this process's own command line


# ------------------------------------------------------------------------------------------ a real run
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_dataset(tmp_path_factory.mktemp("interrupt-data"), n=30)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("interrupt-cache")


def _interrupted_run(out: Path, args: list[str], signum: int, logs: Path) -> tuple[int, str]:
    """Train in a subprocess, send ``signum`` to its whole process group (what a terminal's Ctrl-C does) once the
    first checkpoint is on disk; returns the exit code and what the run wrote to stderr."""
    err = logs / "stderr.txt"
    with open(logs / "stdout.txt", "w") as stdout, open(err, "w") as stderr:  # files: a full pipe would stall it
        proc = subprocess.Popen([sys.executable, "training/train_fusion.py", *args], cwd=REPO_ROOT,
                                env=subprocess_env(), stdout=stdout, stderr=stderr, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not (out / "history.json").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, f"the run ended before the signal:\n{err.read_text()[-3000:]}"
        os.killpg(proc.pid, signum)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return code, err.read_text()


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_run_ends_with_one_line_and_its_command_resumes(tmp_path, data, cache, signum):
    out = tmp_path / "run"
    args = tiny_overrides(data, out, train__epochs=EPOCHS, train__early_stopping_patience=0, train__cache_dir=cache)
    code, err = _interrupted_run(out, args, signum, tmp_path)
    lines = [line.strip() for line in re.split(r"[\r\n]", err) if line.strip()]
    assert code == 128 + signum, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    found = LINE.match(lines[-1])
    assert found, lines[-3:]
    assert [line for line in lines if line.startswith("interrupted ")] == [lines[-1]]  # one line
    command = shlex.split(found["command"])
    assert command[:2] == [sys.executable, "training/train_fusion.py"] and command[2:] == [*args, "--resume"]
    assert not [p.name for p in out.rglob("*") if ".tmp" in p.name or p.name.startswith(".")]  # nothing half-written
    assert not (out / "COMPLETE").exists()

    resumed = subprocess.run(command, cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (out / "COMPLETE").is_file()
    assert json.loads((out / "metrics.json").read_text())["epochs_run"] == EPOCHS


def test_the_module_state_is_clean_after_each_block():
    with pytest.raises(Interrupted), stop_on_signals():
        with saving():
            signal.raise_signal(signal.SIGTERM)
    assert interrupts._State.owner_pid is None and interrupts._State.saving_depth == 0
    assert interrupts._State.pending is None and not interrupts._State.stopping
