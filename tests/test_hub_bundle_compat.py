"""A bundle saved by earlier code (tests/fixtures/bundle_v1, written by make_bundle_v1.py at commit 72a32b7) still
loads strictly and predicts the scores it gave then: restructurings must keep the bundle format and the maths."""

import json
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def test_a_bundle_saved_before_the_restructuring_predicts_the_same_scores():
    from mmgcs import GenreClassifier

    expected = json.loads((FIXTURES / "bundle_v1_expected.json").read_text())
    model = GenreClassifier.from_pretrained(FIXTURES / "bundle_v1")
    inputs = expected["inputs"]
    results = model.predict_batch(
        [x["plot"] for x in inputs], [(FIXTURES / x["poster"]).read_bytes() if x["poster"] else None for x in inputs],
        by_modality=True, titles=[x["title"] for x in inputs],
    )
    for got, want in zip(results, expected["results"]):
        assert got["genres"] == want["genres"]
        assert got["scores"] == pytest.approx(want["scores"], abs=1e-6)
        assert got["by_modality"].keys() == want["by_modality"].keys()
        for view in want["by_modality"]:
            assert got["by_modality"][view] == pytest.approx(want["by_modality"][view], abs=1e-6)
