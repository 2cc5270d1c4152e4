"""An output folder that takes no writes fails at once with a clear error (before featurizing); a disk that fills
up during the final save fails clearly too, keeps the saved model and resumes."""

from __future__ import annotations

import errno
import json
import os

import pytest

from engine_helpers import REPO_ROOT, build_dataset, tiny_overrides

from mmgcs.engine import main

CONFIG = REPO_ROOT / "configs" / "fusion.yaml"


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

    def __init__(self, real, fail_from: int):
        self.real, self.fail_from, self.calls = real, fail_from, 0

    def __call__(self, model, folder, *args, **kwargs):
        self.calls += 1
        if self.calls < self.fail_from:
            return self.real(model, folder, *args, **kwargs)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "model.safetensors"), "wb") as f:
            f.write(b"\0" * 64)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_on_the_final_save_is_a_clear_error_and_the_run_resumes(tmp_path, data, capsys, monkeypatch):
    from safetensors.torch import load_file

    from mmgcs.models.classifier import GenreClassifier

    out = tmp_path / "run"
    args = tiny_overrides(data, out, train__epochs=1)
    full = DiskFull(GenreClassifier.save_pretrained, fail_from=2)  # call 1: the epoch's best bundle; 2: the final one
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
