"""Two machines on one box: `accelerate launch --num_machines 2 --machine_rank {0,1} --main_process_ip 127.0.0.1`
started from two working folders (each with its own copy of the dataset and its own datasets cache, as on two
disks), CPU and gloo over loopback only. The run folder is one shared folder (what every machine must see:
train.output_dir); the feature cache is each machine's own folder, or one folder both share (an NFS mount).

Each run ends with the metrics of one process with the same seed and the same rows per optimizer step (one process
with batch B*N against N processes with batch B each; no dropout, frozen towers, a train split that every global
batch divides). Losses and probabilities agree to ~1e-7, not bit for bit: DDP averages the processes' gradients
(an all-reduce: a sum in another order than one process's single backward over the whole batch), and a row's logits
come out of a matmul over another batch shape. The metrics, taken from those probabilities, are equal.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine_helpers import REPO_ROOT, TINY_TOWERS, build_dataset, subprocess_env, split_sizes

from mmgcs.testing import tiny_text_backbone_dir

pytestmark = pytest.mark.slow

SCRIPT = str(REPO_ROOT / "training" / "train_fusion.py")
GLOBAL_BATCH = 8
ENTRIES = 6  # train / validation / test x text / image: the cached features of one run
TIMEOUT_S = 420
# "process 1 (local 0, host vm, cache /x/node1/cache): computed 6, read 0" (mmgcs.loaders, logged by the main process)
REPORT = re.compile(r"process (\d+) \(local (\d+), host [^,]+, cache ([^)]+)\): computed (\d+), read (\d+)")


def _settings(data, out, cache, batch_size: int) -> list[str]:
    settings = {
        "data.path": data, "train.output_dir": out, "train.cache_dir": cache, "train.seed": 7,
        "train.epochs": 2, "train.batch_size": batch_size, "train.eval_batch_size": 4, "train.lr": 0.01,
        "train.log_with": "none", "train.early_stopping_patience": 0,
        # No dropout and no lexical branch: every process's arithmetic is that of one process (the branch's fit
        # would be too, but it makes this tiny task perfectly separable: metrics of 1.0 compare nothing).
        "model.dropout": 0, "model.modality_dropout": 0, "model.lexical": "false",
        **TINY_TOWERS, "model.text_backbone": tiny_text_backbone_dir(),
    }
    return [f"{k}={v}" for k, v in settings.items()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_env(node: Path) -> dict:
    env = subprocess_env()
    env.pop("ACCELERATE_USE_CPU")  # the engine itself picks the CPU backend when no GPU is visible
    env["HF_DATASETS_CACHE"] = str(node / "datasets-cache")  # each machine prepares the dataset on its own disk
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    return env


def run_two_machines(root: Path, dataset: Path, out, cache_of, processes: int, expect_ok: bool = True,
                     extra: tuple = ()) -> list[str]:
    """Both machines' launchers at once, each from its own working folder holding a copy of ``dataset``;
    ``cache_of(node)``: the machine's train.cache_dir; ``out`` relative: a run folder on each machine's own disk.
    ``extra``: more key=value settings (after the others: they win). Returns each machine's output (rank 0's first);
    with ``expect_ok`` both must have succeeded."""
    port, launchers = _free_port(), []
    for rank in (0, 1):
        node = root / f"machine{rank}"
        shutil.copytree(dataset, node / "movies")
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
               "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
               "--num_processes", str(processes), "--mixed_precision", "no", "--dynamo_backend", "no",
               SCRIPT, *_settings("movies", out, cache_of(node), GLOBAL_BATCH // processes), *extra]
        launchers.append(subprocess.Popen(cmd, cwd=node, env=_launch_env(node), stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True, start_new_session=True))
    try:
        logs = [p.communicate(timeout=TIMEOUT_S)[0] for p in launchers]
    finally:
        for p in launchers:  # a machine left waiting for its peer must not outlive the test
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    for rank, (p, log) in enumerate(zip(launchers, logs)):
        assert (p.returncode == 0) == expect_ok, f"machine {rank} exited {p.returncode}:\n{log[-4000:]}"
        if expect_ok:
            assert "Traceback" not in training_output(log), log[-4000:]
    return logs


# torch's elastic agent of a machine that finishes after the machine hosting the rendezvous store may log the store's
# disconnect at its exit barrier ("Error waiting on exit barrier", a C++ frame dump, a Traceback): after training,
# with every process already exited 0. A race of the launchers' shutdown, not of the run; it is left out of the check.
_EXIT_BARRIER = re.compile(r"torch/distributed/elastic/agent/server/api\.py:\d+\]|^\s*(Exception raised from |frame #\d+:|"
                           r"<omitting python frames>)")


def training_output(log: str) -> str:
    """The launcher's output without the elastic agent's exit-barrier report."""
    return "\n".join(line for line in log.splitlines() if not _EXIT_BARRIER.search(line))


def cache_report(main_log: str, cache: str = "Feature cache") -> list[tuple[int, int, str, int, int]]:
    """(process, local process, cache folder, computed, read) of each process, from the main process's log
    (``cache``: "Feature cache", or "Prefix cache" for the text prefix of partial fine-tuning)."""
    lines = [line for line in main_log.splitlines() if f"{cache} per process:" in line]
    assert len(lines) == 1, main_log[-4000:]
    return [(int(p), int(local), folder, int(computed), int(read))
            for p, local, folder, computed, read in REPORT.findall(lines[0])]


def entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.safetensors"))


def assert_same_run(out: Path, reference: Path, processes: int, inputs: str = "features") -> None:
    """``out`` trained one model on ``processes`` processes and ended where the one-process ``reference`` did."""
    history, expected = (json.loads((d / "history.json").read_text()) for d in (out, reference))
    assert len(history) == len(expected) == 2
    for record, ref in zip(history, expected):
        assert record["processes"] == processes and record["replicas_in_sync"] is True
        assert record["inputs"] == ref["inputs"] == inputs
        for key in ("train_loss", "val_loss", "val_micro_f1", "val_macro_f1", "val_mAP"):
            assert record[key] == pytest.approx(ref[key], abs=1e-6), key
    probs, ref_probs = (np.load(d / "test_predictions.npz") for d in (out, reference))
    assert probs["ids"].tolist() == ref_probs["ids"].tolist()
    np.testing.assert_allclose(probs["probs"], ref_probs["probs"], rtol=0, atol=1e-6)
    metrics, ref_metrics = (json.loads((d / "metrics.json").read_text()) for d in (out, reference))
    for split in ("validation", "test"):
        for key in ("n_samples", "micro_f1", "macro_f1", "weighted_f1", "samples_f1", "mAP", "subset_accuracy"):
            assert metrics[split][key] == ref_metrics[split][key], (split, key)
    assert metrics["thresholds"] == ref_metrics["thresholds"] and metrics["best_epoch"] == ref_metrics["best_epoch"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The dataset (a train split of 56 rows: 7 global batches of 8) and the one-process run of it."""
    root = tmp_path_factory.mktemp("multinode")
    dataset = build_dataset(root / "build", n=70)
    assert split_sizes(dataset)["train"] % GLOBAL_BATCH == 0
    out = root / "one-process"
    proc = subprocess.run([sys.executable, SCRIPT, *_settings(dataset, out, root / "one-process-cache", GLOBAL_BATCH)],
                          env=_launch_env(root), cwd=REPO_ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 < metrics["test"]["micro_f1"] < 1  # a task the comparison can tell apart
    return dataset, out


def test_two_machines_each_with_its_own_cache_end_like_one_process(tmp_path, one_process):
    """Two processes a machine, each machine with its own cache folder: on each machine its first process computes
    the entries while its second waits, then reads them from that machine's disk."""
    dataset, reference = one_process
    out = tmp_path / "shared" / "run"
    logs = run_two_machines(tmp_path, dataset, out, cache_of=lambda node: node / "cache", processes=4)

    # Each machine computed its own cache: the same entries in both folders, the one-process run's.
    expected = entries(reference.parent / "one-process-cache")
    assert len(expected) == ENTRIES
    for rank in (0, 1):
        assert entries(tmp_path / f"machine{rank}" / "cache") == expected
    caches = [str(tmp_path / f"machine{rank}" / "cache") for rank in (0, 1)]
    assert cache_report(logs[0]) == [(0, 0, caches[0], ENTRIES, 0), (1, 1, caches[0], 0, ENTRIES),
                                     (2, 0, caches[1], ENTRIES, 0), (3, 1, caches[1], 0, ENTRIES)]
    assert_same_run(out, reference, processes=4)


def test_two_machines_sharing_one_cache_folder_compute_each_entry_once(tmp_path, one_process):
    """One process a machine, one cache folder for both (an NFS mount): both machines' first processes featurize at
    the same time, and the entry's lock lets one of them compute each entry; the other waits and reads it."""
    dataset, reference = one_process
    shared = tmp_path / "nfs"
    out = shared / "run"
    logs = run_two_machines(tmp_path, dataset, out, cache_of=lambda node: shared / "cache", processes=2)

    assert entries(shared / "cache") == entries(reference.parent / "one-process-cache")
    assert not list((shared / "cache").glob(".tmp-*"))
    report = cache_report(logs[0])
    assert [(p, local, folder) for p, local, folder, _, _ in report] == [(0, 0, str(shared / "cache")),
                                                                        (1, 0, str(shared / "cache"))]
    assert sum(computed for *_, computed, _ in report) == ENTRIES  # each entry computed once, on either machine
    assert sum(read for *_, read in report) == ENTRIES
    assert_same_run(out, reference, processes=2)


def test_a_run_folder_on_each_machines_own_disk_is_refused_before_training(tmp_path, one_process):
    """train.output_dir must be one folder every machine sees: a relative one (each machine's own working folder)
    is refused on every process before any featurizing, not after training when the best model is missing."""
    dataset, _ = one_process
    logs = run_two_machines(tmp_path, dataset, "run", cache_of=lambda node: node / "cache", processes=2,
                            expect_ok=False)
    assert "is not the folder the main process locked" in logs[1], logs[1][-4000:]
    assert "must be one folder every machine sees" in logs[1]
    for rank in (0, 1):
        assert not list((tmp_path / f"machine{rank}" / "cache").glob("*.safetensors"))  # stopped before featurizing
