"""The CPU policy is the entry points' business: `import mmgcs` changes no environment, and every entry point sets
OMP_WAIT_POLICY=PASSIVE before torch is first imported (GNU OpenMP reads it only then), the user's setting winning."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch  # noqa: F401  (loaded in this process: the policy comes too late for it)

from mmgcs import runtime

REPO = Path(__file__).resolve().parents[1]

# Runs an entry point in a fresh interpreter and prints the policy torch saw when it was first imported ("-" when
# the run never imported torch) and the policy at the end.
SPY = r"""
import os, runpy, sys

seen = {}


class TorchImportSpy:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and "torch" not in seen:
            seen["torch"] = os.environ.get("OMP_WAIT_POLICY")
        return None


sys.meta_path.insert(0, TorchImportSpy())
kind, target, *argv = sys.argv[1:]
sys.argv = [target, *argv]
try:
    if kind == "path":
        runpy.run_path(target, run_name="__main__")
    else:
        runpy.run_module(target, run_name="__main__", alter_sys=True)
except SystemExit:
    pass
finally:
    print("torch-saw", seen.get("torch", "-"), "end", os.environ.get("OMP_WAIT_POLICY"))
"""


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    return {**env, "HF_HUB_OFFLINE": "1", **extra}


def _spy(kind: str, target: str, *argv: str, **env: str) -> str:
    run = subprocess.run(
        [sys.executable, "-c", SPY, kind, target, *argv], cwd=REPO, env=_env(**env), capture_output=True, text=True,
        timeout=300,
    )
    lines = [line for line in run.stdout.splitlines() if line.startswith("torch-saw")]
    assert lines, run.stderr[-3000:]
    return lines[-1]


def test_importing_mmgcs_changes_no_environment():
    run = subprocess.run(
        [sys.executable, "-c", "import os, mmgcs; print('OMP_WAIT_POLICY' in os.environ)"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120,
    )
    assert run.stdout.strip() == "False", run.stderr


@pytest.mark.parametrize("script", ["train_text.py", "train_image.py", "train_fusion.py", "sweep.py"])
def test_training_scripts_set_the_policy_before_torch_loads(script, tmp_path):
    # A missing config file stops the run right after the imports: torch is loaded by then.
    line = _spy("path", f"training/{script}", "--config", str(tmp_path / "absent.yaml"))
    assert line == "torch-saw PASSIVE end PASSIVE"


def test_the_app_sets_the_policy_before_torch_loads(tmp_path):
    # No model: the app stops with its remedy after loading torch to look for one.
    line = _spy("path", "app.py", MMGCS_MODEL=str(tmp_path / "no-model"), MMGCS_EXAMPLES="")
    assert line == "torch-saw PASSIVE end PASSIVE"


def test_evaluate_sets_the_policy():
    line = _spy("module", "mmgcs.evaluate", "--help")
    assert line.endswith("end PASSIVE") and line.split()[1] in ("PASSIVE", "-")


def test_the_users_own_setting_wins(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    runtime.configure_cpu_policy()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_too_late_is_reported(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "x")
    monkeypatch.delenv("OMP_WAIT_POLICY")
    assert runtime.configure_cpu_policy() is False
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"


def test_available_cores_is_this_processes_share():
    cores = runtime.available_cores()
    assert 1 <= cores <= (os.cpu_count() or 1)
    if hasattr(os, "sched_getaffinity"):
        assert cores == len(os.sched_getaffinity(0))


# Runs app.py (no model: it stops after its imports) and says whether triton, the GPU kernel compiler, got loaded.
TRITON_SPY = r"""
import runpy, sys
sys.argv = ["app.py"]
try:
    runpy.run_path("app.py", run_name="__main__")
except SystemExit:
    pass
import torch, torchvision, torch._dynamo.utils  # what imported triton before: torchvision -> torch._dynamo
from torch.utils._triton import has_triton_package
print("triton", "absent" if sys.modules.get("triton", "unloaded") is None else "loaded", has_triton_package())
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU, triton is allowed to load")
def test_the_app_keeps_triton_unloaded_without_a_gpu(tmp_path):
    run = subprocess.run([sys.executable, "-c", TRITON_SPY], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env=_env(MMGCS_MODEL=str(tmp_path / "no-model"), MMGCS_EXAMPLES=""))
    assert "triton absent False" in run.stdout, run.stderr[-3000:]


def test_triton_is_kept_when_already_loaded(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", object())  # stands for a loaded triton: it must stay
    assert runtime.skip_triton_without_gpu() is False
    assert sys.modules["triton"] is not None


def test_refused_imports_raise_import_error_and_loaded_ones_stay(monkeypatch):
    monkeypatch.delitem(sys.modules, "mmgcs_not_a_module_yet", raising=False)
    monkeypatch.setitem(sys.modules, "json", sys.modules["json"])  # restored after the test
    assert runtime.refuse_imports("mmgcs_not_a_module_yet", "json") == ["mmgcs_not_a_module_yet"]
    try:
        with pytest.raises(ImportError):
            import mmgcs_not_a_module_yet  # noqa: F401
        import json  # loaded already: untouched
        assert json.dumps([1]) == "[1]"
    finally:
        del sys.modules["mmgcs_not_a_module_yet"]


def test_periodic_trim_runs_at_most_once_per_interval(monkeypatch):
    trims, now = [], [100.0]
    monkeypatch.setattr(runtime, "release_freed_memory", lambda: trims.append(now[0]))
    trim = runtime.PeriodicTrim(1.0, clock=lambda: now[0])
    for t in (100.0, 100.4, 100.99, 101.0, 101.5, 103.0):
        now[0] = t
        trim()
    assert trims == [100.0, 101.0, 103.0] and trim.count == 3
