"""predict / predict_batch / Predictor on raw inputs: real posters, bad inputs, thresholds, modalities."""

import io
import json

import PIL.Image
import pytest
import torch

from mmgcs import Predictor
from mmgcs.data.images import InvalidImageError
from mmgcs.testing import tiny_model

LABELS = ["Action", "Comedy", "Drama", "Horror"]
PLOT = "A retired soldier must save his daughter from a gang of killers."


@pytest.fixture(scope="module")
def model():
    return tiny_model(LABELS, fusion="gated").eval()


def png_bytes(mode, size=(40, 60), color=None):
    img = PIL.Image.new(mode, size, color if color is not None else (0 if mode in ("L", "1") else (10,) * len(mode)))
    buf = io.BytesIO()
    img.save(buf, format="TIFF" if mode == "CMYK" else "PNG")
    return buf.getvalue()


def test_predict_on_a_real_poster(model, shared_data):
    poster = shared_data / "tmdb5000" / "posters" / "11.jpg"
    by_path = model.predict(plot=PLOT, poster=str(poster))
    assert set(by_path["scores"]) == set(LABELS)
    assert all(0.0 <= p <= 1.0 for p in by_path["scores"].values())
    by_bytes = model.predict(plot=PLOT, poster=poster.read_bytes())
    by_pil = model.predict(plot=PLOT, poster=PIL.Image.open(poster))
    assert by_bytes["scores"] == pytest.approx(by_path["scores"])
    assert by_pil["scores"] == pytest.approx(by_path["scores"])
    poster_only = model.predict(poster=poster)
    assert poster_only["scores"] != pytest.approx(by_path["scores"])


def test_genres_follow_the_per_genre_thresholds(model):
    scores = model.predict(plot=PLOT)["scores"]
    ordered = sorted(LABELS, key=lambda g: scores[g])
    # put the thresholds just around the scores: the top two pass, the others do not
    thresholds = [scores[g] - 1e-4 if g in ordered[-2:] else min(1.0, scores[g] + 1e-4) for g in LABELS]
    model.config.thresholds = thresholds
    try:
        result = model.predict(plot=PLOT)
    finally:
        model.config.thresholds = None
    assert result["genres"] == [ordered[-1], ordered[-2]]  # highest score first
    model.config.threshold = 1.0
    try:
        assert model.predict(plot=PLOT)["genres"] == []
    finally:
        model.config.threshold = 0.5


def test_both_missing_names_the_remedy(model):
    for plot, poster in [(None, None), ("", None), ("   \n", None)]:
        with pytest.raises(ValueError, match="give the movie's plot .*its poster .*or both"):
            model.predict(plot=plot, poster=poster)
    with pytest.raises(ValueError, match="movie #1: Nothing to classify"):
        model.predict_batch([PLOT, ""], [None, None])


def test_empty_plot_with_a_poster_uses_the_poster_only(model):
    poster = png_bytes("RGB")
    assert model.predict(plot="", poster=poster)["scores"] == pytest.approx(model.predict(poster=poster)["scores"])


def test_wrong_plot_type(model):
    with pytest.raises(TypeError, match="plot #0 must be a string"):
        model.predict(plot=123)


def test_corrupt_and_huge_images_are_refused(model):
    with pytest.raises(InvalidImageError, match="poster #0: .*not a recognised image"):
        model.predict(plot=PLOT, poster=b"this is not an image at all")
    data = png_bytes("RGB")
    with pytest.raises(InvalidImageError, match="truncated|corrupt"):
        model.predict(poster=data[: len(data) // 2])
    big = PIL.Image.new("1", (20000, 20000))
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    with pytest.raises(InvalidImageError, match="(20000x20000|400000000 pixels).*Resize"):
        model.predict(poster=buf.getvalue())


@pytest.mark.parametrize("mode", ["CMYK", "RGBA", "L", "P", "LA"])
def test_other_colour_modes_are_converted(model, mode):
    result = model.predict(poster=png_bytes(mode))
    assert set(result["scores"]) == set(LABELS)
    assert all(0.0 <= p <= 1.0 for p in result["scores"].values())


def test_predict_batch_matches_single_predictions_in_order(model):
    posters = [png_bytes("RGB", color=(200, 10, 10)), None, png_bytes("RGB", color=(10, 10, 200))]
    plots = [PLOT, "Two friends fall in love in Paris.", None]
    batch = model.predict_batch(plots, posters, batch_size=2)
    assert len(batch) == 3
    for plot, poster, result in zip(plots, posters, batch):
        assert result["scores"] == pytest.approx(model.predict(plot=plot, poster=poster)["scores"], abs=1e-5)
    with pytest.raises(ValueError, match="3 plots and 2 posters"):
        model.predict_batch(plots, posters[:2])


def test_by_modality_views(model):
    poster = png_bytes("RGB", color=(200, 10, 10))
    result = model.predict(plot=PLOT, poster=poster, by_modality=True)
    views = result["by_modality"]
    assert set(views) == {"text", "image", "fused"}
    assert views["fused"] == pytest.approx(result["scores"])
    assert views["text"] == pytest.approx(model.predict(plot=PLOT)["scores"])
    assert views["image"] == pytest.approx(model.predict(poster=poster)["scores"])
    assert set(model.predict(plot=PLOT, by_modality=True)["by_modality"]) == {"text", "fused"}


def test_single_modality_models_say_what_they_read():
    text_only = tiny_model(LABELS, image=False)
    with pytest.raises(ValueError, match="reads plots only; pass plot="):
        text_only.predict(poster=png_bytes("RGB"))
    assert set(text_only.predict(plot=PLOT, poster=png_bytes("RGB"))["scores"]) == set(LABELS)
    image_only = tiny_model(LABELS, text=False)
    with pytest.raises(ValueError, match="reads posters only; pass poster="):
        image_only.predict(plot=PLOT)


def test_singlelabel_predicts_one_class():
    model = tiny_model(["poster", "not_poster"], text=False, task="singlelabel")
    result = model.predict(poster=png_bytes("RGB"))
    assert len(result["genres"]) == 1
    assert result["genres"][0] == max(result["scores"], key=result["scores"].get)
    assert sum(result["scores"].values()) == pytest.approx(1.0)


def test_predictor_loads_a_bundle_and_uses_its_preprocessing(model, tmp_path):
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    predictor = Predictor(tmp_path)
    assert predictor.labels == LABELS
    poster = png_bytes("RGB", color=(30, 90, 150))
    assert predictor(plot=PLOT, poster=poster)["scores"] == pytest.approx(model.predict(plot=PLOT, poster=poster)["scores"], abs=1e-6)
    # preprocessing comes from the bundle: a different stored mean changes the pixels the model sees
    config["image_mean"] = [0.0, 0.0, 0.0]
    (tmp_path / "config.json").write_text(json.dumps(config))
    shifted = Predictor(tmp_path)
    batch_a = predictor.model.preprocess([None], [poster])["pixel_values"]
    batch_b = shifted.model.preprocess([None], [poster])["pixel_values"]
    assert not torch.allclose(batch_a, batch_b)


def test_predict_in_the_middle_of_training_is_deterministic_and_keeps_training_mode():
    model = tiny_model(LABELS, dropout=0.5).train()
    first = model.predict(plot=PLOT)["scores"]
    assert model.training
    assert model.predict(plot=PLOT)["scores"] == pytest.approx(first)
