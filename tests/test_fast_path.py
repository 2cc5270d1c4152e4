"""The fast serving path (mmgcs.fast_path): the eager scores within 1e-4 for every fusion head, and the eager
towers, with one log line, whenever the fast encoder is unavailable, fails or disagrees."""

import importlib.util
import logging
import os
import sys
from pathlib import Path

import pytest
import torch

from mmgcs import fast_path
from mmgcs.fast_path import FastPath
from mmgcs.inference import Predictor
from mmgcs.models.fusion import FUSIONS
from mmgcs.serving import BatchingPredictor, ServingConfigError, fast_path_wanted
from mmgcs.testing import tiny_model

LABELS = ["Action", "Comedy", "Drama"]
FIXTURES = Path(__file__).parent / "fixtures"
POSTERS = [str(FIXTURES / "poster_0.png"), str(FIXTURES / "poster_1.png"), str(FIXTURES / "poster_0.png")]
HAS_ORT = importlib.util.find_spec("onnxruntime") is not None  # the optional extra mmgcs[fast]
PLOTS = ["A retired soldier must save his daughter from a gang of killers.", None,
         "Two friends fall in love during a long summer by the sea, and a storm changes everything."]


def scores(predictor, plots=PLOTS, posters=POSTERS):
    probs, views = predictor.probabilities(plots, posters, by_modality=True)
    return {name: p for name, (p, _) in views.items()}


@pytest.mark.parametrize("fusion", sorted(FUSIONS.names()))
def test_fast_scores_equal_eager_for_every_fusion_head(fusion):
    model = tiny_model(LABELS, fusion=fusion).eval()
    predictor = Predictor(model, fast=True)
    eager, fast = scores(Predictor(model)), scores(predictor)
    assert predictor.fast.image_kind() == "torchscript-frozen"  # the fast encoders really served
    assert predictor.fast.text_kind() == ("onnxruntime" if HAS_ORT else "eager")
    assert eager.keys() == fast.keys() == {"fused", "text", "image"}
    for name in eager:
        assert (eager[name] - fast[name]).abs().max().item() <= 1e-4, name


def test_the_fast_path_serves_other_batch_sizes_and_poster_only_rows():
    model = tiny_model(LABELS).eval()
    fast = Predictor(model, fast=True)
    scores(fast, [None], POSTERS[:1])  # built on a batch of 1
    eager, quick = scores(Predictor(model)), scores(fast)  # then a batch of 3, one row poster-only
    assert all((eager[k] - quick[k]).abs().max().item() <= 1e-4 for k in eager)
    assert fast.fast.image_kind() == "torchscript-frozen"


def test_a_failing_fast_encoder_falls_back_to_eager_with_one_log_line(monkeypatch, caplog):
    model = tiny_model(LABELS).eval()

    def broken(sample):
        raise RuntimeError("no backend here")

    monkeypatch.setattr(model.image_tower, "fast_encoder", broken)
    predictor = Predictor(model, fast=True)
    with caplog.at_level(logging.INFO, logger="mmgcs.fast_path"):
        fast = scores(predictor)
        scores(predictor)  # a second call does not try (nor log) again
    eager = scores(Predictor(model))
    assert all((eager[k] - fast[k]).abs().max().item() <= 1e-4 for k in eager)
    assert predictor.fast.image_kind() == "eager"
    lines = [r for r in caplog.records if r.name == "mmgcs.fast_path" and "image" in r.getMessage()]
    assert len(lines) == 1 and "RuntimeError" in lines[0].getMessage() and "eager" in lines[0].getMessage()


def test_a_fast_encoder_that_disagrees_is_not_used(monkeypatch, caplog):
    model = tiny_model(LABELS).eval()
    real = model.image_tower.fast_encoder

    def off_by_a_little(sample):
        encoder = real(sample)
        return lambda pixels: encoder(pixels) + 1e-2

    monkeypatch.setattr(model.image_tower, "fast_encoder", off_by_a_little)
    predictor = Predictor(model, fast=True)
    with caplog.at_level(logging.INFO, logger="mmgcs.fast_path"):
        fast = scores(predictor)
    eager = scores(Predictor(model))
    assert all((eager[k] - fast[k]).abs().max().item() <= 1e-4 for k in eager)
    assert any("disagrees" in r.getMessage() for r in caplog.records)


def test_a_tower_without_a_fast_encoder_and_a_text_only_model_run_eagerly(monkeypatch):
    model = tiny_model(LABELS).eval()
    monkeypatch.setattr(model.image_tower, "fast_encoder", lambda sample: None)  # as Tower's default says
    path = FastPath(model)
    pixels = torch.randn(2, 3, model.config.image_size, model.config.image_size)
    assert torch.allclose(path.encode_image(pixels), model.encode_image(pixels), atol=1e-6)
    assert path.image_kind() == "eager"
    text_only = tiny_model(LABELS, image=False).eval()
    fast_scores = Predictor(text_only, fast=True).predict(plot=PLOTS[0])["scores"]
    eager_scores = Predictor(text_only).predict(plot=PLOTS[0])["scores"]
    # the text tower runs in ONNX Runtime when it is installed: the same scores within the fast path's 1e-4
    assert fast_scores.keys() == eager_scores.keys()
    assert all(abs(fast_scores[g] - eager_scores[g]) <= 1e-4 for g in eager_scores)


def test_serving_uses_the_fast_path_for_fp32_only_and_the_switch_is_checked():
    model = tiny_model(LABELS).eval()
    fp32, bf16 = BatchingPredictor(model, 4, "fp32"), BatchingPredictor(model, 4, "bf16")
    try:
        assert fp32.predictor.fast is not None and bf16.predictor.fast is None
        eager = Predictor(model).predict(PLOTS[0], POSTERS[0])["scores"]
        assert fp32(PLOTS[0], POSTERS[0])["scores"] == pytest.approx(eager, abs=1e-4)
    finally:
        fp32.close(5)
        bf16.close(5)
    assert fast_path_wanted({}) and fast_path_wanted({"MMGCS_FAST_PATH": "1"})
    assert not fast_path_wanted({"MMGCS_FAST_PATH": "0"})
    with pytest.raises(ServingConfigError, match="MMGCS_FAST_PATH"):
        fast_path_wanted({"MMGCS_FAST_PATH": "maybe"})


@pytest.mark.parametrize("how", ["onnxruntime missing", "export fails"])
def test_the_text_tower_falls_back_to_eager_with_one_log_line(monkeypatch, caplog, how):
    model = tiny_model(LABELS).eval()
    if how == "onnxruntime missing":
        monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    else:
        def broken(*args, **kwargs):
            raise RuntimeError("the exporter cannot handle this tower")

        monkeypatch.setattr(fast_path.torch.onnx, "export", broken)
    predictor = Predictor(model, fast=True)
    with caplog.at_level(logging.INFO, logger="mmgcs.fast_path"):
        fast = scores(predictor)
        scores(predictor)
    eager = scores(Predictor(model))
    assert all((eager[k] - fast[k]).abs().max().item() <= 1e-4 for k in eager)
    assert predictor.fast.text_kind() == "eager"
    lines = [r.getMessage() for r in caplog.records if r.name == "mmgcs.fast_path" and "text" in r.getMessage()]
    assert len(lines) == 1 and ("mmgcs[fast]" if how == "onnxruntime missing" else "RuntimeError") in lines[0]


@pytest.mark.skipif(not HAS_ORT, reason="onnxruntime (mmgcs[fast]) not installed")
def test_the_onnx_text_encoder_takes_other_lengths_and_batch_sizes():
    model = tiny_model(LABELS).eval()
    path = FastPath(model)
    tokenizer = model.tokenizer
    short = tokenizer(["A short plot."], return_tensors="pt")
    path.encode_text(short["input_ids"], short["attention_mask"])  # built on 1 row of a few tokens
    assert path.text_kind() == "onnxruntime"
    longer = tokenizer([PLOTS[0], PLOTS[2], "Another."], padding="longest", return_tensors="pt")
    ids, mask = longer["input_ids"], longer["attention_mask"]
    assert (path.encode_text(ids, mask) - model.encode_text(ids, mask)).abs().max().item() <= 1e-4


@pytest.mark.skipif(not HAS_ORT, reason="onnxruntime (mmgcs[fast]) not installed")
def test_serving_releases_the_eager_text_weights_once_onnx_runtime_serves():
    model = tiny_model(LABELS).eval()
    eager = scores(Predictor(model))  # before: the eager towers' scores
    text_weights = sum(p.numel() for p in model.text_tower.parameters())
    served = BatchingPredictor(model, 4, "fp32", release_eager_text=True)
    try:
        answer = served(PLOTS[0], POSTERS[0])
        assert isinstance(model.text_tower, fast_path.OnnxTextTower)
        assert text_weights > 0 and not list(model.text_tower.parameters())  # the eager weights are gone
        assert answer["scores"] == pytest.approx({g: float(eager["fused"][0, i]) for i, g in enumerate(LABELS)},
                                                 abs=1e-4)
        after = scores(Predictor(model))  # any later caller of the model's text tower gets the same scores
        assert all((eager[k] - after[k]).abs().max().item() <= 1e-4 for k in eager)
    finally:
        served.close(5)


def test_the_eager_text_weights_stay_when_the_fast_encoder_is_unavailable(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    model = tiny_model(LABELS).eval()
    eager = scores(Predictor(model))
    predictor = Predictor(model, fast=True, release_eager_text=True)
    fast = scores(predictor)
    assert predictor.fast.text_kind() == "eager" and list(model.text_tower.parameters())
    assert all((eager[k] - fast[k]).abs().max().item() <= 1e-4 for k in eager)


def test_without_release_the_text_tower_stays_eager():
    model = tiny_model(LABELS).eval()
    tower = model.text_tower
    scores(Predictor(model, fast=True))
    assert model.text_tower is tower


TELEMETRY_PROBE = """
import os
from mmgcs.fast_path import FastPath
from mmgcs.testing import tiny_model
model = tiny_model(["Action", "Comedy"]).eval()
path = FastPath(model)
batch = model.tokenizer(["A short plot."], return_tensors="pt")
path.encode_text(batch["input_ids"], batch["attention_mask"])
print(path.text_kind(), os.environ.get("ORT_DISABLE_TELEMETRY"))
"""


@pytest.mark.skipif(not HAS_ORT, reason="onnxruntime (mmgcs[fast]) not installed")
def test_onnx_runtime_records_no_telemetry(tmp_path):
    """ONNX Runtime 1.32 writes a telemetry event (device id, interpreter path, OS) to
    ~/.cache/Microsoft/DeveloperTools/.onnxruntime/onnxruntime.db when it loads, unless told not to (issue 18)."""
    import subprocess

    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    run = subprocess.run([sys.executable, "-c", TELEMETRY_PROBE], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split()[-2:] == ["onnxruntime", "1"]  # ONNX Runtime really ran, with telemetry off
    written = [str(p.relative_to(home)) for p in home.rglob("*") if p.is_file()]
    assert not [p for p in written if "Microsoft" in p or "onnxruntime" in p], written
