"""Explanations (mmgcs.explain): the lexical branch's words, the plot/poster share and the poster occlusion map."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mmgcs.explain import cell_edges, explain_movie, lexical_contributions, occluded
from mmgcs.inference import Predictor
from mmgcs.serving import BatchingPredictor
from mmgcs.testing import TINY_IMAGE_SIZE, tiny_model
from mmgcs.processor import GenreProcessor

GENRES = ["Action", "Comedy", "Horror"]
TEXTS = [
    "a ghost haunts the old house at night", "the haunted house hides a ghost in the cellar",
    "a haunted doll and a ghost terrify a family", "two friends open a funny bakery",
    "a funny wedding goes wrong for two friends", "a clumsy dog and his funny friends",
    "soldiers fight a battle in the desert", "a police team chases a gang in a car",
    "an agent fights a gang to save the city",
]
TARGETS = np.array([[0, 0, 1]] * 3 + [[0, 1, 0]] * 3 + [[1, 0, 0]] * 3)
PLOT = "A family moves into a haunted house where a ghost waits at night."


@pytest.fixture(scope="module")
def model():
    m = tiny_model(GENRES, lexical=True, lexical_features=4096, lexical_min_df=1)
    m.lexical.fit(TEXTS, TARGETS, c=10.0)
    m.config.lexical_weight = 0.7
    return m.eval()


def _noise_poster(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (96, 64, 3), dtype=np.uint8))


def test_contributions_sum_to_the_lexical_logit_minus_its_bias(model):
    explanation = Predictor(model).explain(PLOT, None, genres=GENRES)
    parts = lexical_contributions(model, PLOT)
    batch = GenreProcessor.from_model(model)([PLOT])
    with torch.no_grad():
        branch = model.lexical(batch["lexical_ids"], batch["lexical_values"])[0]
        with_branch = model(**batch)["logits"][0]
        model.config.lexical_weight = 0.0
        without = model(**batch)["logits"][0]
        model.config.lexical_weight = 0.7
    for j, genre in enumerate(GENRES):
        lexical = explanation["genres"][genre]["lexical"]
        total = float(parts["contributions"][:, j].sum())
        assert total == pytest.approx(0.7 * float(branch[j] - model.lexical.bias[j]), abs=1e-5)
        assert lexical["logit"] == pytest.approx(float(with_branch[j] - without[j]), abs=1e-5)
        words = explanation["genres"][genre]["words"]
        assert sum(s for _, _, s in words) == pytest.approx(total, abs=1e-5)  # the words share the n-grams out


def test_a_horror_word_in_the_fitted_weights_shows_as_horror(model):
    explanation = Predictor(model).explain(PLOT, None, genres=["Horror", "Comedy"])
    horror = explanation["genres"]["Horror"]["lexical"]
    top = [name for name, _ in horror["up"][:4]]
    assert {"ghost", "haunted"} & set(top), horror["up"]
    comedy_down = {name for name, _ in explanation["genres"]["Comedy"]["lexical"]["down"]}
    assert {"ghost", "haunted"} & comedy_down
    grams = set(model.lexical.analyze(PLOT))
    # ids mapped back to the plot's own n-grams (n-grams sharing a hash bucket are joined with " / ")
    assert all(part in grams for name, _ in horror["up"] + horror["down"] for part in name.split(" / "))
    spans = {PLOT[s:e].lower(): score for s, e, score in explanation["genres"]["Horror"]["words"]}
    assert spans["ghost"] > 0 and spans["haunted"] > 0


def test_the_occlusion_map_is_flat_on_a_blank_region(model):
    size = TINY_IMAGE_SIZE  # the model's input size: the eval transform leaves the poster as it is
    rng = np.random.default_rng(1)
    d = rng.integers(0, 128, (size // 2, size // 2, 3))
    poster = np.full((size, size, 3), 128, dtype=np.uint8)
    # columns in pairs 128 + d, 128 - d: the textured top half averages exactly 128, the colour of the blank
    # bottom half, so the poster's mean colour (the fill) is the blank colour
    poster[: size // 2, 0::2] = 128 + d
    poster[: size // 2, 1::2] = 128 - d
    explanation = Predictor(model).explain(PLOT, Image.fromarray(poster), genres=GENRES, grid=7)
    edges = cell_edges(size, 7)
    blank_rows = [r for r in range(7) if edges[r] >= size // 2]
    assert blank_rows
    for genre in GENRES:
        grid = np.array(explanation["genres"][genre]["occlusion"])
        assert grid.shape == (7, 7)
        assert np.abs(grid[blank_rows]).max() < 1e-4, grid
    textured = np.abs(np.array([explanation["genres"][g]["occlusion"] for g in GENRES])[:, :3]).max()
    assert textured > 1e-4  # the textured half does move the scores


def test_occluded_paints_one_cell_per_copy():
    pixels = torch.arange(3 * 8 * 8, dtype=torch.float32).reshape(3, 8, 8)
    out = occluded(pixels, 2)
    assert out.shape == (4, 3, 8, 8)
    changed = (out != pixels).any(dim=1)  # (4, 8, 8)
    assert changed[0, :4, :4].all() and not changed[0, 4:].any() and not changed[0, :, 4:].any()
    assert changed[3, 4:, 4:].all() and not changed[3, :4].any()


def test_the_share_of_plot_and_poster(model):
    poster = _noise_poster()
    result = model.predict(PLOT, poster, explain=True)
    for genre in result["genres"] or []:
        entry = result["explanation"]["genres"][genre]
        assert 0.0 <= entry["plot_share"] <= 1.0
        by = model.predict(PLOT, poster, by_modality=True)["by_modality"]
        poster_alone = float(torch.logit(torch.tensor(by["image"][genre])))
        assert entry["plot_effect"] == pytest.approx(entry["logit"] - poster_alone, abs=1e-3)
    plot_only = model.predict(PLOT, explain=True)["explanation"]
    entry = next(iter(plot_only["genres"].values()))
    assert entry["plot_share"] == 1.0 and entry["occlusion"] is None and plot_only["grid"] == 0
    poster_only = model.predict(None, poster, explain=True)["explanation"]
    entry = next(iter(poster_only["genres"].values()))
    assert entry["plot_share"] == 0.0 and entry["lexical"] is None and entry["words"] == []
    assert np.array(entry["occlusion"]).shape == (7, 7)


def test_explain_is_only_computed_when_asked(model):
    plain = model.predict_batch([PLOT, "two funny friends"], [None, _noise_poster()])
    assert all("explanation" not in r for r in plain)
    explained = model.predict_batch([PLOT, "two funny friends"], [None, _noise_poster()], explain=True)
    for r, p in zip(explained, plain):
        assert r["scores"] == pytest.approx(p["scores"])
        assert set(r["explanation"]["genres"]) == set(r["genres"] or [max(r["scores"], key=r["scores"].get)])
        for genre, entry in r["explanation"]["genres"].items():
            assert entry["score"] == pytest.approx(r["scores"][genre], abs=1e-5)


def test_unknown_genre_is_refused_with_the_choices(model):
    with pytest.raises(ValueError, match="not genres of this model; choose from"):
        explain_movie(Predictor(model), PLOT, None, ["Western"])


def test_the_serving_batcher_passes_explain_through(model):
    predictor = BatchingPredictor(model, max_batch=4)
    try:
        futures = [predictor.submit((PLOT, None, None, i % 2 == 1)) for i in range(4)]
        results = [f.result(timeout=60) for f in futures]
    finally:
        predictor.close()
    assert ["explanation" in r for r in results] == [False, True, False, True]
    assert results[0]["scores"] == pytest.approx(results[1]["scores"])
    assert isinstance(results[1]["explanation"]["genres"][results[1]["genres"][0]]["words"][0][2], float)


@pytest.mark.parametrize("towers", [dict(image=False), dict(text=False)], ids=["plot-only model", "poster-only model"])
def test_a_one_tower_model_is_explained_with_what_it_reads(towers):
    model = tiny_model(GENRES, **towers).eval()
    result = model.predict(PLOT if "image" in towers else None, None if "image" in towers else _noise_poster(),
                           explain=True)
    entry = next(iter(result["explanation"]["genres"].values()))
    assert entry["lexical"] is None  # no lexical branch in these models
    assert entry["plot_share"] == (1.0 if "image" in towers else 0.0)
    assert (entry["occlusion"] is None) == ("image" in towers)
