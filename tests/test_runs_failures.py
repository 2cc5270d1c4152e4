"""An output folder that takes no writes fails at once with a clear error (before featurizing); a disk that fills
up during a checkpoint or the final save fails clearly too, whichever writer ran out of space (Python's files,
safetensors, torch.save), keeps the saved model, leaves no partial file and resumes (issue 18)."""

from __future__ import annotations

import errno
import json
import os

import pytest
from safetensors import SafetensorError

from engine_helpers import REPO_ROOT, build_dataset, tiny_overrides

from mmgcs.engine import main
from mmgcs.runs import failures

CONFIG = REPO_ROOT / "configs" / "fusion.yaml"
# What each writer raises on a full disk, copied from a run on a full 2 MB tmpfs (safetensors 0.8, torch 2.14).
SAFETENSORS_FULL = "Error while serializing: I/O error: No space left on device (os error 28)"
TORCH_FULL = "[enforce fail at inline_container.cc:672] . unexpected pos 60800 vs 60688"


def disk_full_error(kind: str) -> BaseException:
    if kind == "OSError":
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return SafetensorError(SAFETENSORS_FULL) if kind == "SafetensorError" else RuntimeError(TORCH_FULL)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_dataset(tmp_path_factory.mktemp("output-data"), n=30)


def _unwritable(tmp_path, kind):
    if kind == "a file in the way":
        (tmp_path / "blocker").write_text("a file where the run's parent folder should be")
        return tmp_path / "blocker" / "run"
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    folder = tmp_path / "readonly"
    folder.mkdir()
    folder.chmod(0o555)
    return folder / "run"


@pytest.mark.parametrize("kind", ["a file in the way", "read-only parent"])
def test_an_unwritable_output_folder_fails_before_featurizing(tmp_path, data, kind, capsys):
    out = _unwritable(tmp_path, kind)
    cache = tmp_path / "cache"
    with pytest.raises(SystemExit) as e:
        main(tiny_overrides(data, out, train__epochs=1, train__cache_dir=cache), default_config=CONFIG)
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"The output folder {out} is not writable" in err and "train.output_dir" in err
    assert not cache.exists()  # nothing was featurized first
    assert not list(tmp_path.rglob(".model.tmp"))


class DiskFull:
    """GenreClassifier.save_pretrained that runs out of space from its ``fail_from``-th call on, half-way."""

    def __init__(self, real, fail_from: int, error: str = "OSError"):
        self.real, self.fail_from, self.calls, self.error = real, fail_from, 0, error

    def __call__(self, model, folder, *args, **kwargs):
        self.calls += 1
        if self.calls < self.fail_from:
            return self.real(model, folder, *args, **kwargs)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "model.safetensors"), "wb") as f:
            f.write(b"\0" * 64)
        raise disk_full_error(self.error)


@pytest.mark.parametrize("error", ["OSError", "SafetensorError"])
def test_a_full_disk_on_the_final_save_is_a_clear_error_and_the_run_resumes(tmp_path, data, capsys, monkeypatch,
                                                                             error):
    from safetensors.torch import load_file

    from mmgcs.models.classifier import GenreClassifier

    out = tmp_path / "run"
    args = tiny_overrides(data, out, train__epochs=1)
    # call 1: the epoch's best bundle; 2: the final one
    full = DiskFull(GenreClassifier.save_pretrained, fail_from=2, error=error)
    monkeypatch.setattr(GenreClassifier, "save_pretrained", lambda self, *a, **k: full(self, *a, **k))
    with pytest.raises(SystemExit) as e:
        main(args, default_config=CONFIG)
    err = capsys.readouterr().err
    assert e.value.code == 2 and full.calls == 2
    assert f"Could not save the final model and metrics in {out}: the disk is full" in err and "--resume" in err
    assert "Traceback" not in err
    assert not (out / ".model.tmp").exists() and not (out / "COMPLETE").exists() and not (out / "metrics.json").exists()
    assert load_file(out / "model" / "model.safetensors")  # the best bundle saved during the epoch is intact
    monkeypatch.undo()

    metrics = main([*args, "--resume"], default_config=CONFIG)  # space freed: the run finishes
    assert metrics["epochs_run"] == 1 and json.loads((out / "metrics.json").read_text())["test"] == metrics["test"]
    assert (out / "COMPLETE").is_file()


def test_a_full_disk_on_a_checkpoint_is_a_clear_error(tmp_path, data, capsys, monkeypatch):
    import accelerate

    out = tmp_path / "run"

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(accelerate.Accelerator, "save_state", full)
    with pytest.raises(SystemExit) as e:
        main(tiny_overrides(data, out, train__epochs=1), default_config=CONFIG)
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"Could not save the checkpoint of epoch 1 in {out / 'checkpoints'}: the disk is full" in err


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("output-cache")  # the runs below featurize once


@pytest.mark.parametrize("writer", ["safetensors", "torch.save", "torch.save, space left"])
def test_every_checkpoint_writer_running_out_of_space_is_a_clear_error(tmp_path, data, shared_cache, capsys,
                                                                        monkeypatch, writer):
    """accelerate writes a checkpoint's weights with safetensors and its optimizer, scheduler and RNG states with
    torch.save: a failed write of either is the documented message, and the partial checkpoint is removed."""
    import accelerate.utils.other
    import torch

    def partial_then(error):
        def write(obj, path, *args, **kwargs):
            with open(path, "wb") as f:
                f.write(b"\0" * 64)  # what a full disk leaves: the start of the file
            raise error
        return write

    if writer == "safetensors":
        monkeypatch.setattr(accelerate.utils.other, "safe_save_file", partial_then(disk_full_error("SafetensorError")))
    else:
        monkeypatch.setattr(torch, "save", partial_then(disk_full_error("RuntimeError")))
    full = writer != "torch.save, space left"  # torch does not say why: the free space does
    monkeypatch.setattr(failures.shutil, "disk_usage", lambda path: shutil_usage(free=0 if full else 10 << 30))
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(tiny_overrides(data, out, train__epochs=1, train__cache_dir=shared_cache), default_config=CONFIG)
    err = capsys.readouterr().err
    why = "the disk is full" if full else "the write failed ([enforce fail at inline_container.cc:672]"
    assert e.value.code == 2 and f"Could not save the checkpoint of epoch 1 in {out / 'checkpoints'}: {why}" in err
    assert "--resume" in err and "Traceback" not in err and "SafetensorError" not in err
    assert list((out / "checkpoints").iterdir()) == []  # the partial .tmp-epoch_001 is gone
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]


def shutil_usage(free: int):
    import shutil

    return shutil._ntuple_diskusage(total=100 << 30, used=(100 << 30) - free, free=free)


@pytest.mark.parametrize("error, expected", [
    (OSError(errno.EACCES, "Permission denied"), errno.EACCES),
    (disk_full_error("SafetensorError"), errno.ENOSPC),
    # the message of older safetensors releases (and of the feature cache's test)
    (SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on '
                     'device" })'), errno.ENOSPC),
    (disk_full_error("RuntimeError"), -1),
    (RuntimeError("basic_ios::clear: iostream error"), -1),
])
def test_write_failures_are_recognised_with_their_reason(error, expected):
    found = failures.write_failure(error)
    assert found is not None and found.errno == expected


def test_the_message_of_a_failed_save_names_what_where_why_and_the_remedy(tmp_path, monkeypatch):
    message = failures.save_failed("the best model", tmp_path)
    full = message(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    assert full.startswith(f"Could not save the best model in {tmp_path}: the disk is full. Free some space")
    assert "run again with --resume" in full
    assert ": Permission denied." in message(OSError(errno.EACCES, "Permission denied"))
    torch_failed = failures.write_failure(disk_full_error("RuntimeError"))  # torch does not say why: free space does
    monkeypatch.setattr(failures.shutil, "disk_usage", lambda path: shutil_usage(free=10 << 30))
    assert "the disk is full" not in message(torch_failed)
    monkeypatch.setattr(failures.shutil, "disk_usage", lambda path: shutil_usage(free=1000))
    assert "the disk is full" in message(torch_failed)
    refused = failures.not_writable(tmp_path, OSError(errno.ENOSPC, "No space left on device"))
    assert isinstance(refused, failures.TrainingError) and "the disk is full; free some space" in str(refused)
