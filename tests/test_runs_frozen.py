"""A checkpoint leaves out the frozen towers' weights (the model rebuilds them from the backbone) and records their
names and digest: resuming from it ends exactly like an uninterrupted run, a changed backbone is refused with the
remedy, and a full checkpoint written before this still resumes."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine_helpers import REPO_ROOT, build_dataset, tiny_overrides

from mmgcs.digest import tensors_digest
from mmgcs.engine import main
from mmgcs.runs import checkpoints, frozen
from mmgcs.runs.failures import TrainingError
from mmgcs.runs.manifest import MANIFEST
from mmgcs.testing import tiny_model, tiny_text_backbone_dir

FUSION = REPO_ROOT / "configs" / "fusion.yaml"  # both towers frozen, their features cached
TEXT = REPO_ROOT / "configs" / "text.yaml"
TOWERS = ("text_tower.", "image_tower.")
# Two stages: towers frozen in epoch 1 (the whole towers left out), then BERT's last layer trains in epoch 2 (only
# its other parameters left out).
TWO_STAGE = {"train__freeze_epochs": 1, "train__text_finetune": "partial", "train__text_trainable_layers": 1}


def _args(data, out, root, config_extra=None):
    return tiny_overrides(data, out, train__epochs=2, train__early_stopping_patience=0,
                          train__cache_dir=root / "cache", **(config_extra or {}))


def _train_keeping_epoch_1(args, config, out, archive):
    """Run to the end, keeping a copy of every checkpoint the run prunes (epoch 1, when epoch 2 is the best)."""
    rmtree = shutil.rmtree

    def keep_a_copy(path, *a, **kw):
        path = Path(path)
        if path.parent == out / "checkpoints" and path.name.startswith("epoch_") and path.is_dir():
            shutil.copytree(path, archive / path.name)
        return rmtree(path, *a, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(shutil, "rmtree", keep_a_copy)
        metrics = main(args, default_config=config)
    if not (out / "checkpoints" / "epoch_001").exists():
        shutil.copytree(archive / "epoch_001", out / "checkpoints" / "epoch_001")
    return metrics


def _as_if_killed_after_epoch_1(reference: Path, out: Path) -> Path:
    shutil.copytree(reference, out)
    shutil.rmtree(out / "checkpoints" / "epoch_002")
    for name in ("metrics.json", "COMPLETE"):
        (out / name).unlink()
    return out / "checkpoints" / "epoch_001"


def _same_run(out: Path, reference: Path, metrics: dict, expected: dict) -> None:
    for key in ("test", "validation", "thresholds", "best_epoch", "epochs_run"):
        assert metrics[key] == expected[key], key
    strip = lambda h: [{k: v for k, v in r.items() if k != "time_s"} for r in h]  # noqa: E731
    assert strip(json.loads((out / "history.json").read_text())) == strip(
        json.loads((reference / "history.json").read_text()))
    a, b = load_file(reference / "model" / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module", params=["frozen", "two-stage"])
def reference(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"frozen-{request.param}")
    data = build_dataset(root, n=45, poster_every=1, plot_every=1)
    out = root / "reference"
    extra = TWO_STAGE if request.param == "two-stage" else {}
    args = _args(data, out, root, extra)
    return args, out, _train_keeping_epoch_1(args, FUSION, out, root / "archive"), request.param


def test_a_checkpoint_holds_neither_the_frozen_weights_nor_their_bytes(reference):
    _, out, _, kind = reference
    bundle = load_file(out / "model" / "model.safetensors")  # model/ stays complete
    towers = {k for k in bundle if k.startswith(TOWERS)}
    assert towers and {k.split("_tower.")[0] for k in towers} == {"text", "image"}
    for epoch in (1, 2):
        folder = out / "checkpoints" / f"epoch_{epoch:03d}"
        saved = load_file(folder / "model.safetensors")
        record = json.loads((folder / frozen.FROZEN_FILE).read_text())
        left_out = set(record["names"])
        assert set(saved) | left_out == set(bundle) and not set(saved) & left_out
        if kind == "frozen" or epoch == 1:
            assert left_out == towers  # every tower entry, BatchNorm statistics included
        else:  # the second stage trains BERT's last layer: it (and every buffer) is kept, the rest left out
            trained = {k for k in saved if k.startswith("text_tower.") and ".layer.1." in k}
            assert trained and not any(".layer.1." in k for k in left_out)
            assert {k for k in left_out if k.startswith("text_tower.")} == {
                k for k in towers if k.startswith("text_tower.") and ".layer.1." not in k}
            assert {k for k in towers if k.startswith("image_tower.")} <= left_out
        assert record["sha256"] == tensors_digest({k: bundle[k] for k in left_out})
        # The file is smaller by the left-out tensors' bytes (header aside).
        left_bytes = sum(bundle[k].numel() * bundle[k].element_size() for k in left_out)
        full = (out / "model" / "model.safetensors").stat().st_size
        assert (folder / "model.safetensors").stat().st_size < full - left_bytes + 64 * 1024
        manifest = json.loads((folder / MANIFEST).read_text())["files"]
        assert frozen.FROZEN_FILE in manifest and checkpoints.checkpoint_problem(folder) is None


def test_resume_without_the_frozen_weights_ends_like_the_uninterrupted_run(reference, tmp_path, caplog):
    args, ref_out, expected, _ = reference
    out = tmp_path / "run"
    first = _as_if_killed_after_epoch_1(ref_out, out)
    assert not any(k.startswith(TOWERS) for k in load_file(first / "model.safetensors"))
    args = [a.replace(str(ref_out), str(out)) for a in args]
    with caplog.at_level(logging.INFO):
        metrics = main([*args, "--resume"], default_config=FUSION)
    assert "Resumed from" in caplog.text and "epoch_001" in caplog.text
    _same_run(out, ref_out, metrics, expected)


def test_a_full_checkpoint_of_earlier_code_still_resumes(tmp_path, caplog):
    data = build_dataset(tmp_path, n=45, poster_every=1, plot_every=1)
    ref_out = tmp_path / "reference"
    with pytest.MonkeyPatch.context() as mp:  # how checkpoints were written before: accelerate's full state
        mp.setattr(checkpoints, "_save_state", lambda accelerator, folder: accelerator.save_state(str(folder)))
        expected = _train_keeping_epoch_1(_args(data, ref_out, tmp_path), FUSION, ref_out, tmp_path / "archive")
    out = tmp_path / "run"
    first = _as_if_killed_after_epoch_1(ref_out, out)
    assert not (first / frozen.FROZEN_FILE).exists()
    assert any(k.startswith("text_tower.") for k in load_file(first / "model.safetensors"))
    with caplog.at_level(logging.INFO):
        metrics = main([*_args(data, out, tmp_path), "--resume"], default_config=FUSION)
    assert "Resumed from" in caplog.text and "epoch_001" in caplog.text
    _same_run(out, ref_out, metrics, expected)


def test_resume_refuses_a_frozen_backbone_whose_weights_changed(tmp_path, capsys):
    """The text backbone is a local folder loaded with its weights; another version of them in that folder (same
    settings, same architecture) must not be mixed with the head trained on the old one."""
    data = build_dataset(tmp_path, n=30)
    backbone = tmp_path / "backbone"
    shutil.copytree(tiny_text_backbone_dir(), backbone)
    out = tmp_path / "run"
    args = tiny_overrides(data, out, train__epochs=2, train__max_steps=1, train__cache_dir=tmp_path / "cache",
                          model__pretrained="true", model__text_backbone=backbone)
    main(args, default_config=TEXT)
    assert not any(k.startswith("text_tower.") for k in load_file(out / "checkpoints" / "epoch_001" / "model.safetensors"))
    weights = load_file(backbone / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name] + 0.01
    save_file(weights, backbone / "model.safetensors", metadata={"format": "pt"})
    cached = sorted((tmp_path / "cache").rglob("*"))
    with pytest.raises(SystemExit) as e:
        main([*args, "train.epochs=3", "--resume"], default_config=TEXT)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert "frozen text backbone differs from the one the run" in err
    assert "Resume with the same backbone, or start a new run" in err
    assert sorted((tmp_path / "cache").rglob("*")) == cached  # refused before featurizing with the other weights


# ------------------------------------------------------------------------------------------------ units
def _frozen_model():
    model = tiny_model(text=True, image=True, lexical=True, lexical_features=256)
    model.text_tower.set_finetune("frozen")
    model.image_tower.set_finetune("partial", 1)
    return model


def test_frozen_names_are_the_towers_weights_that_do_not_train_never_the_head():
    model = _frozen_model()
    names = set(frozen.frozen_names(model))
    state = model.state_dict()
    assert {k for k in state if k.startswith("text_tower.")} <= names  # a frozen tower: all of it
    image_params = dict(model.image_tower.named_parameters(prefix="image_tower", remove_duplicate=False))
    assert {k for k in names if k.startswith("image_tower.")} == {k for k, p in image_params.items() if not p.requires_grad}
    assert not any(k.startswith("image_tower.") and "running_" in k for k in names)  # a tuned tower's buffers stay
    assert all(k.startswith(TOWERS) for k in names)
    assert not any(k.startswith("lexical.") for k in names)  # fitted, never graded: kept
    model.text_tower.set_finetune("full")
    model.image_tower.set_finetune("full")
    assert frozen.frozen_names(model) == []


def _checkpoint_of(model, folder: Path, names, left_out=None) -> Path:
    """What the save hook writes for a model: the frozen ``names`` recorded, ``left_out`` (default: them) left out."""
    folder.mkdir()
    state = model.state_dict()
    gone = set(names if left_out is None else left_out)
    save_file({k: v.contiguous() for k, v in state.items() if k not in gone}, folder / frozen.CHECKPOINT_WEIGHTS)
    (folder / frozen.FROZEN_FILE).write_text(json.dumps({
        "format": frozen.FROZEN_FORMAT, "weights": frozen.CHECKPOINT_WEIGHTS, "names": sorted(names),
        "sha256": tensors_digest({n: state[n] for n in names})}))
    return folder


def test_loading_is_strict_about_what_was_left_out(tmp_path):
    model = _frozen_model()
    names = frozen.frozen_names(model)
    folder = _checkpoint_of(model, tmp_path / "ok", names)
    other = _frozen_model()
    with torch.no_grad():
        for p in other.fusion.parameters():
            p.add_(1.0)
    frozen.load_without_frozen(other, folder)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    # A checkpoint that also lacks a head weight, or records as frozen a weight it holds, or holds one the model
    # does not have: refused, naming the weight the model has and the checkpoint lacks.
    head = next(k for k in model.state_dict() if k.startswith("fusion."))
    with pytest.raises(TrainingError, match=f"does not fit this model.*lacks {head}, which is not frozen.*start a new run"):
        frozen.load_without_frozen(other, _checkpoint_of(model, tmp_path / "head", names, left_out=[*names, head]))
    with pytest.raises(TrainingError, match="does not fit this model"):
        frozen.load_without_frozen(other, _checkpoint_of(model, tmp_path / "held", [*names, head], left_out=names))
    folder = _checkpoint_of(model, tmp_path / "extra", names)
    saved = load_file(folder / frozen.CHECKPOINT_WEIGHTS)
    save_file({**saved, "fusion.unknown": torch.zeros(2)}, folder / frozen.CHECKPOINT_WEIGHTS)
    with pytest.raises(TrainingError, match="holds 1 the model does not have"):
        frozen.load_without_frozen(other, folder)
    # The same names over other values: the digest says so, naming both towers involved.
    with torch.no_grad():
        other.text_tower.backbone.embeddings.word_embeddings.weight[0, 0] += 1.0
    with pytest.raises(TrainingError, match="frozen image and text backbones differ from those the run"):
        frozen.load_without_frozen(other, _checkpoint_of(model, tmp_path / "changed", names))


@pytest.mark.parametrize("record, reason", [
    ("{not json", "is not valid JSON"),
    ('{"format": 1, "weights": "model.safetensors", "names": [], "sha256": "00"}', "is not a valid record"),
    ('["a"]', "is not a valid record"),
])
def test_a_damaged_record_makes_the_checkpoint_untrusted(tmp_path, record, reason):
    (tmp_path / frozen.FROZEN_FILE).write_text(record)
    assert reason in frozen.frozen_problem(tmp_path)
    assert frozen.frozen_problem(tmp_path / "nothing-left-out") is None
