"""Rows → batches: undecodable posters in the raw-input path, and frozen towers read from the feature cache."""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import PIL.Image
import pytest

from engine_helpers import GENRES, REPO_ROOT, build_dataset, corrupt_posters, split_sizes, tiny_overrides

from mmgcs.batching import BAD_POSTERS, BadPosterReport, RowCollator
from mmgcs.engine import main
from mmgcs.processor import GenreProcessor


def _jpeg(colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    PIL.Image.new("RGB", (20, 30), colour).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_dataset(tmp_path_factory.mktemp("batching-data"), n=45, poster_every=1, plot_every=1)


@pytest.fixture(scope="module")
def corrupt_data(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("batching-corrupt") / "movies"
    return out, corrupt_posters(data, out, per_split=1)


def test_undecodable_poster_is_masked_and_listed_by_row_id(caplog):
    from mmgcs.testing import tiny_model

    model = tiny_model(labels=GENRES)
    good = _jpeg()
    rows = [
        {"id": 7, "plot": "a ghost in the dark", "poster": {"bytes": good, "path": None}, "genres": [3]},
        {"id": 8, "plot": "love and a wedding", "poster": {"bytes": good[:150], "path": None}, "genres": [4]},
        {"id": 9, "plot": "a family drama", "poster": None, "genres": [2]},
    ]
    collate = RowCollator(GenreProcessor.from_model(model), np.arange(len(GENRES)), len(GENRES), "multilabel", train=True)
    batch = collate(rows)
    assert batch["image_mask"].tolist() == [True, False, False]
    assert batch["text_mask"].tolist() == [True, True, True]  # the row keeps its plot
    assert [row_id for row_id, _ in batch[BAD_POSTERS]] == [8]
    assert "truncated" in batch[BAD_POSTERS][0][1]
    assert list(batch)[-1] == BAD_POSTERS  # accelerate reads the batch size from the first value

    report = BadPosterReport()
    with caplog.at_level(logging.WARNING, logger="mmgcs.batching"):
        for _ in range(3):  # e.g. three epochs
            cleaned = report.take(collate(rows))
            assert BAD_POSTERS not in cleaned
            model(**cleaned)  # the model takes the cleaned batch as is
    assert caplog.text.count("Poster of row id 8 could not be decoded") == 1
    assert "truncated" in caplog.text and "image_mask False" in caplog.text


def test_a_batch_without_bad_posters_has_no_extra_key():
    from mmgcs.testing import tiny_model

    model = tiny_model(labels=GENRES, text=False)
    rows = [{"id": 1, "poster": {"bytes": _jpeg(), "path": None}, "genres": [0]}]
    batch = RowCollator(GenreProcessor.from_model(model), np.arange(len(GENRES)), len(GENRES), "multilabel", train=False,
                        use_text=False)(rows)
    assert BAD_POSTERS not in batch and batch["image_mask"].tolist() == [True]


def test_fine_tuning_on_raw_posters_survives_a_corrupt_poster_and_reports_it_once(tmp_path, corrupt_data, caplog):
    path, bad = corrupt_data
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        metrics = main(tiny_overrides(path, out, train__epochs=2, train__image_finetune="partial",
                                      train__image_trainable_blocks=1, train__early_stopping_patience=0),
                       default_config=REPO_ROOT / "configs" / "image.yaml")
    history = json.loads((out / "history.json").read_text())
    assert [h["inputs"] for h in history] == ["raw", "raw"]
    # Nothing dropped: every row trained / scored, the corrupt ones with their image masked out.
    assert metrics["rows"] == split_sizes(path)
    assert metrics["test"]["n_samples"] == split_sizes(path)["test"]
    for split, ids in bad.items():
        for row_id in ids:
            # once per row, although each split is read every epoch (and the test split three times at the end)
            assert caplog.text.count(f"Poster of row id {row_id} could not be decoded") == 1, split
    saved = np.load(out / "test_predictions.npz")
    bad_test = saved["ids"].tolist().index(bad["test"][0])
    assert not saved["has_image"][bad_test] and saved["has_image"].sum() == len(saved["ids"]) - 1
