"""mmgcs.page_checks: what the page's own handlers accept back from a client (a predict result, an explanation, a
genre), and the PageInputError naming what is malformed."""

from __future__ import annotations

import json

import pytest

from mmgcs.page_checks import PageInputError, checked_explanation, checked_genre, checked_result

LABELS = ["Action", "Comedy", "Drama", "Horror"]


RESULT = {
    "scores": {"Action": 0.9, "Comedy": 0.1, "Drama": 0.6, "Horror": 0.2},
    "genres": ["Action", "Drama"],
    "by_modality": {"text": {"Action": 0.8, "Comedy": 0.1, "Drama": 0.5, "Horror": 0.2}},
    "explanation": {"text": "A ghost haunts the house.", "covers": "...", "grid": 7, "genres": {
        "Horror": {"words": [[2, 7, 0.5], [8, 14, -0.25]], "occlusion": [[0.1] * 7 for _ in range(7)], "lexical": {}},
        "Drama": {"words": [], "occlusion": None},
    }},
}


def test_a_predict_result_passes_its_checks():
    result = checked_result(RESULT, LABELS)
    assert result["scores"] == RESULT["scores"] and result["genres"] == ["Action", "Drama"]
    assert result["by_modality"] == RESULT["by_modality"] and result["notes"] == []
    explanation = checked_explanation(RESULT, LABELS, 100)
    assert explanation["text"] == RESULT["explanation"]["text"]
    assert explanation["genres"]["Horror"]["words"] == [(2, 7, 0.5), (8, 14, -0.25)]
    assert explanation["genres"]["Drama"] == {"words": [], "occlusion": None}
    assert checked_result(None, LABELS) is None and checked_explanation({"scores": {}}, LABELS, 100) is None
    assert checked_genre("Drama", ["Horror", "Drama"]) == "Drama"
    for bad in ("Nope", None, 3, ["Drama"], "x" * 10_000):
        assert checked_genre(bad, ["Horror", "Drama"]) == "Horror"


def _with(path: str, value):
    result = json.loads(json.dumps(RESULT))
    *parents, last = path.split(".")
    node = result
    for key in parents:
        node = node[key]
    node[last] = value
    return result


@pytest.mark.parametrize("result", [
    "a string", [1, 2], {"genres": []}, _with("scores", {"Nope": 0.5}), _with("scores", {"Action": float("nan")}),
    _with("scores", {"Action": "high"}), _with("genres", ["Horror", "Nope"]), _with("genres", "Action"),
    _with("by_modality", {"audio": {}}), _with("notes", ["x" * 10_000]),
], ids=["str", "list", "no-scores", "unknown-genre", "nan", "str-score", "unscored-genre", "genres-str",
        "unknown-view", "huge-note"])
def test_a_malformed_result_is_a_page_input_error(result):
    with pytest.raises(PageInputError):
        checked_result(result, LABELS)


@pytest.mark.parametrize("result", [
    _with("explanation", "why"), _with("explanation.text", "x" * 101), _with("explanation.text", 5),
    _with("explanation.genres", {"Nope": {}}), _with("explanation.genres.Horror.words", [[0, 500, 0.1]]),
    _with("explanation.genres.Horror.words", [[3, 2, 0.1]]), _with("explanation.genres.Horror.words", [[0, 1]]),
    _with("explanation.genres.Horror.words", [["a", "b", 0.1]]),
    _with("explanation.genres.Horror.occlusion", [[0.1] * 7] * 6),
    _with("explanation.genres.Horror.occlusion", [[0.1] * 6300] * 6300),
    _with("explanation.genres.Horror.occlusion", [[float("inf")] * 7] * 7),
    _with("explanation.genres.Horror", "entry"),
], ids=["not-dict", "text-too-long", "text-int", "unknown-genre", "span-outside", "span-reversed", "span-short",
        "span-str", "grid-not-square", "grid-huge", "grid-inf", "entry-str"])
def test_a_malformed_explanation_is_a_page_input_error(result):
    with pytest.raises(PageInputError):
        checked_explanation(result, LABELS, 100)
