"""mmgcs.render: the /predict answer drawn for people, and nothing drawn from a malformed one."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest

pytest.importorskip("gradio")
from PIL import Image  # noqa: E402

from mmgcs.render import explanation_view, heat_map, highlighted, render  # noqa: E402
from mmgcs.serving import Limits  # noqa: E402
from mmgcs.uploads import PixelBudget, Thumbnails, UploadedPoster  # noqa: E402

LABELS = ["Comedy", "Drama", "Horror"]


def space():
    def decode(poster):
        return Image.open(io.BytesIO(poster.data)).convert("RGB")

    return SimpleNamespace(labels=LABELS, thresholds={"Comedy": 0.5, "Drama": 0.4, "Horror": 0.5},
                           limits=Limits(), thumbnails=Thumbnails(), pixel_budget=PixelBudget(10**6), decode=decode)


def test_the_verdict_and_table_show_each_modality():
    result = {"scores": {"Comedy": 0.2, "Drama": 0.9, "Horror": 0.1}, "genres": ["Drama"],
              "by_modality": {"text": {"Comedy": 0.3, "Drama": 0.8, "Horror": 0.1},
                              "fused": {"Comedy": 0.2, "Drama": 0.9, "Horror": 0.1}}}
    verdict, scores, table = render(result, "Dr. *Strange*", space())
    assert verdict.startswith("### Dr\\. \\*Strange\\*")  # the title shown literally, no markup
    assert "**Predicted genres:** Drama" in verdict and "From the plot only." in verdict
    assert scores == result["scores"]
    assert table.value["data"][0] == ["Drama", "80%", "—", "90%", "40%", "✓"]
    none = render({**result, "genres": []}, None, space())[0]
    assert "No genre passed its threshold.** The closest is Drama (90%)" in none
    assert render({"scores": {"Alien genre": 1.0}, "genres": []}, None, space()) == ("", None, None)


def test_the_plot_is_highlighted_word_by_word():
    segments = highlighted("a dark house", [(2, 6, -0.5), (7, 12, 1.0)])
    assert segments == [("a ", None), ("dark", -0.5), (" ", None), ("house", 1.0)]
    assert highlighted("", []) is None


def test_the_heat_map_reddens_what_raised_the_genre():
    grid = [[0.0] * 7 for _ in range(7)]
    grid[0][0] = 0.5  # one region raised the score: the top-left turns red, the rest keeps the poster's colour
    shown = heat_map(Image.new("RGB", (70, 70), (20, 20, 20)), grid)
    assert shown.getpixel((2, 2))[0] > 100 and shown.getpixel((65, 65)) == (20, 20, 20)
    assert heat_map(None, grid) is None


def test_an_explanation_is_drawn_on_the_posters_thumbnail():
    poster = io.BytesIO()
    Image.new("RGB", (40, 60), (20, 20, 20)).save(poster, format="PNG")
    upload = UploadedPoster(poster.getvalue(), "The poster")
    grid = [[0.1] * 7 for _ in range(7)]
    entry = {"words": [[0, 5, 0.4]], "occlusion": grid, "lexical": {"up": [], "down": []}, "plot_share": 0.5}
    result = {"scores": {"Comedy": 0.9, "Drama": 0.1, "Horror": 0.1}, "genres": ["Comedy"],
              "explanation": {"text": "Funny things happen.", "genres": {"Comedy": entry}}}
    here = space()
    genre, words, heat = explanation_view(result, None, upload, here)
    assert genre.value == "Comedy" and words[0] == ("Funny", 1.0) and heat.size == (40, 60)
    assert here.thumbnails.get(upload.data) is not None and here.pixel_budget.in_use == 0
    assert explanation_view({"scores": {}, "genres": []}, None, None, here)[1:] == (None, None)
