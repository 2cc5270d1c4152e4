"""predict / predict_batch / Predictor on raw inputs: real posters, bad inputs, thresholds, modalities."""

import io
import json

import PIL.Image
import pytest
import torch

from mmgcs import GenreClassifier, Predictor
from mmgcs.data.images import InvalidImageError
from mmgcs.models.fusion import FUSIONS
from mmgcs.testing import tiny_model
from mmgcs.processor import GenreProcessor

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
    predictor = Predictor(GenreClassifier.from_pretrained(tmp_path))
    assert predictor.labels == LABELS
    poster = png_bytes("RGB", color=(30, 90, 150))
    assert predictor(plot=PLOT, poster=poster)["scores"] == pytest.approx(model.predict(plot=PLOT, poster=poster)["scores"], abs=1e-6)
    # preprocessing comes from the bundle: a different stored mean changes the pixels the model sees
    config["image_mean"] = [0.0, 0.0, 0.0]
    (tmp_path / "config.json").write_text(json.dumps(config))
    shifted = Predictor(GenreClassifier.from_pretrained(tmp_path))
    batch_a = predictor.processor([None], [poster])["pixel_values"]
    batch_b = shifted.processor([None], [poster])["pixel_values"]
    assert not torch.allclose(batch_a, batch_b)
    # the predict path sits below the classifier: it takes a loaded model, and a path says how to load one
    with pytest.raises(TypeError, match=r"Predictor\(GenreClassifier.from_pretrained\(path_or_hub_id\)\)"):
        Predictor(tmp_path)


def test_predict_in_the_middle_of_training_is_deterministic_and_keeps_training_mode():
    model = tiny_model(LABELS, dropout=0.5).train()
    first = model.predict(plot=PLOT)["scores"]
    assert model.training
    assert model.predict(plot=PLOT)["scores"] == pytest.approx(first)


def _full_forward_probs(model, plots, posters, withhold=None) -> torch.Tensor:
    """What the model says when run end to end (towers included) with one modality withheld: the reference
    for the per-modality views, which re-run only the fusion head over features encoded once."""
    batch = GenreProcessor.from_model(model)(plots, posters)
    if withhold is not None and f"{withhold}_mask" in batch:
        batch[f"{withhold}_mask"] = torch.zeros_like(batch[f"{withhold}_mask"])
    with torch.inference_mode():
        return model.probabilities(model(**batch)["logits"])


@pytest.mark.parametrize("fusion", sorted(FUSIONS.names()))
def test_by_modality_views_equal_full_forwards_with_the_other_input_withheld(fusion):
    model = tiny_model(LABELS, fusion=fusion).eval()
    posters = [png_bytes("RGB", color=(200, 10, 10)), None, png_bytes("RGB", color=(10, 10, 200)), png_bytes("L")]
    plots = [PLOT, "Two friends fall in love in Paris.", None, "A ghost haunts the old house at night."]
    results = model.predict_batch(plots, posters, by_modality=True)
    views = {name: _full_forward_probs(model, plots, posters, withhold)
             for name, withhold in (("fused", None), ("text", "image"), ("image", "text"))}
    for i, result in enumerate(results):
        assert set(result["by_modality"]) == {"fused"} | ({"text"} if plots[i] else set()) | ({"image"} if posters[i] else set())
        assert list(result["scores"].values()) == pytest.approx(views["fused"][i].tolist(), abs=1e-6)
        for name, scores in result["by_modality"].items():
            assert list(scores.values()) == pytest.approx(views[name][i].tolist(), abs=1e-6), (i, name)
    # and each view of a one-movie call equals a call given only that input
    single = model.predict(plot=plots[0], poster=posters[0], by_modality=True)["by_modality"]
    assert single["text"] == pytest.approx(model.predict(plot=plots[0])["scores"], abs=1e-6)
    assert single["image"] == pytest.approx(model.predict(poster=posters[0])["scores"], abs=1e-6)


def _rows_seen(tower) -> tuple[list, object]:
    seen: list[int] = []
    handle = tower.register_forward_hook(lambda module, args, kwargs, out: seen.append(out.shape[0]), with_kwargs=True)
    return seen, handle


def test_each_tower_runs_once_and_only_on_rows_that_have_its_input(model):
    text_rows, h1 = _rows_seen(model.text_tower)
    image_rows, h2 = _rows_seen(model.image_tower)
    try:
        model.predict(plot=PLOT, by_modality=True)
        assert (text_rows, image_rows) == ([1], [])  # a plot-only call never runs the image tower
        model.predict(poster=png_bytes("RGB"), by_modality=True)
        assert (text_rows, image_rows) == ([1], [1])
        text_rows.clear(), image_rows.clear()
        plots = [PLOT, None, "Two friends fall in love in Paris.", None, PLOT]
        posters = [None, png_bytes("RGB"), png_bytes("RGB"), png_bytes("L"), None]
        model.predict_batch(plots, posters, by_modality=True)
        assert text_rows == [3] and image_rows == [3]  # one pass each over the 3 rows with that input
    finally:
        h1.remove(), h2.remove()


def test_single_tower_models_give_their_one_view():
    text_only = tiny_model(LABELS, image=False).eval()
    result = text_only.predict(plot=PLOT, by_modality=True)
    assert set(result["by_modality"]) == {"text", "fused"}
    assert result["by_modality"]["text"] == pytest.approx(result["scores"])
    assert list(result["scores"].values()) == pytest.approx(_full_forward_probs(text_only, [PLOT], [None])[0].tolist(), abs=1e-6)
    image_only = tiny_model(LABELS, text=False).eval()
    poster = png_bytes("RGB", color=(40, 160, 40))
    result = image_only.predict(poster=poster, by_modality=True)
    assert set(result["by_modality"]) == {"image", "fused"}
    assert list(result["by_modality"]["image"].values()) == pytest.approx(
        _full_forward_probs(image_only, [None], [poster])[0].tolist(), abs=1e-6)


def test_a_model_trained_with_titles_reads_the_title_with_the_plot():
    model = tiny_model(LABELS, image=False).eval()
    model.config.text_template = "{title}. {plot}"
    title = "Die Hard"
    composed = model.predict(plot=f"{title}. {PLOT}")["scores"]  # no title given: the plot is read alone
    assert model.predict(plot=PLOT, title=title)["scores"] == pytest.approx(composed, abs=1e-6)
    assert model.predict(plot=PLOT, title=title)["scores"] != pytest.approx(model.predict(plot=PLOT)["scores"])
    assert model.predict(plot=PLOT, title="  ")["scores"] == pytest.approx(model.predict(plot=PLOT)["scores"], abs=1e-6)

    plots = [PLOT, "Two friends open a bakery.", "A ghost haunts a house."]
    titles = [title, None, "The Others"]
    batch = Predictor(model).predict_batch(plots, titles=titles)
    for plot, t, result in zip(plots, titles, batch):
        assert result["scores"] == pytest.approx(model.predict(plot=plot, title=t)["scores"], abs=1e-6)
    assert batch[2]["scores"] == pytest.approx(model.predict(plot=f"The Others. {plots[2]}")["scores"], abs=1e-6)

    with pytest.raises(ValueError, match="2 titles for 3 movies"):
        model.predict_batch(plots, titles=titles[:2])
    with pytest.raises(TypeError, match="title #0 must be a string"):
        model.predict(plot=PLOT, title=42)


def test_the_default_template_ignores_the_title(model):
    assert model.config.text_template == "{plot}"
    with_title = model.predict(plot=PLOT, title="Die Hard", by_modality=True)
    assert with_title == model.predict(plot=PLOT, by_modality=True)


def test_without_modality_drops_the_inputs_and_masks_the_rows(model):
    from mmgcs.inference import without_modality

    batch = GenreProcessor.from_model(model)([PLOT, None], [png_bytes("RGB"), png_bytes("L")])
    no_text = without_modality(batch, "text")
    assert not {"input_ids", "attention_mask", "text_features", "lexical_ids"} & set(no_text)
    assert no_text["text_mask"].tolist() == [False, False] and torch.equal(no_text["pixel_values"], batch["pixel_values"])
    assert batch["text_mask"].tolist() == [True, False], "the caller's batch is not changed"
    no_image = without_modality({"text_features": torch.ones(3, 4)}, "image")  # no mask given: one is made
    assert no_image["image_mask"].tolist() == [False] * 3
    # the same scores as a forward that keeps the inputs under a False mask
    with torch.inference_mode():
        masked = dict(batch, image_mask=torch.zeros_like(batch["image_mask"]))
        torch.testing.assert_close(model(**without_modality(batch, "image"))["logits"], model(**masked)["logits"], rtol=0, atol=0)
    with pytest.raises(ValueError, match="Unknown modality 'audio'; available"):
        without_modality(batch, "audio")


def test_decisions_are_the_metrics_rule(model):
    """Scores → genres in one place (mmgcs.metrics.decide, at mmgcs.metrics.decision_thresholds): predict's genres
    are those, highest score first."""
    from mmgcs.metrics import decide, decision_thresholds

    model.config.thresholds = [0.3, 0.4, 0.5, 0.6]
    try:
        results = model.predict_batch([PLOT, "Two friends fall in love in Paris.", None],
                                      [None, png_bytes("RGB"), png_bytes("L")])
        probs = torch.tensor([list(r["scores"].values()) for r in results])
        expected = decide(probs.numpy(), LABELS, decision_thresholds(model.config))
        assert [sorted(r["genres"]) for r in results] == [sorted(g) for g in expected]
        for r in results:
            assert [r["scores"][g] for g in r["genres"]] == sorted((r["scores"][g] for g in r["genres"]), reverse=True)
        assert model.decision_thresholds() == [0.3, 0.4, 0.5, 0.6]
    finally:
        model.config.thresholds = None
    assert decision_thresholds(model.config).tolist() == [0.5] * 4
