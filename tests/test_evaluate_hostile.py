"""`mmgcs evaluate` under hostile input and outputs (issue 18): a line nested 100,000 deep, a plot over the cap and
an id on two rows are reported and every other row scored; --out and --predictions are checked before the model
loads, and a write that fails mid-run is a message, not a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import PIL.Image
import pytest

from mmgcs import evaluate as evaluation
from mmgcs.data.inputs import Movie, Movies
from mmgcs.data.records import MAX_PLOT_CHARS
from mmgcs.evaluate import main
from mmgcs.models.classifier import GenreClassifier
from mmgcs.testing import tiny_model

LABELS = ["Action", "Comedy", "Drama"]
DEEP = "[" * 100_000 + "]" * 100_000


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundle")
    tiny_model(LABELS, image=False).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def hostile_source(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hostile")
    rows = [json.dumps({"id": i, "plot": f"plot {i}: a heist, a ghost", "genres": [LABELS[i % 3]]}) for i in range(6)]
    rows += ['{"id": 90, "plot": ' + DEEP + ', "genres": ["Drama"]}',
             json.dumps({"id": 91, "plot": "p" * (MAX_PLOT_CHARS + 1), "genres": ["Drama"]}),
             json.dumps({"id": 3, "plot": "the same id again, another plot", "genres": ["Action"]})]
    (folder / "movies.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder


def test_hostile_rows_are_reported_and_every_other_row_is_scored(model_dir, hostile_source, tmp_path, capsys):
    out = tmp_path / "report.json"
    main(["--model", str(model_dir), "--data", str(hostile_source), "--bootstrap", "0", "--out", str(out)])
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["counts"]["scored"] == 7 and report["counts"]["rows"] == 9
    skipped = {s["id"]: s for s in report["skipped"]}
    assert skipped[90]["reason"] == "malformed_line" and "nests too deeply" in skipped[90]["detail"]
    assert skipped[90]["where"] == "movies.jsonl:7"
    assert skipped[91]["reason"] == "plot_too_long" and "10,001 characters" in skipped[91]["detail"]
    assert report["counts"]["duplicate_ids"] == 1 and report["duplicate_ids"] == [3]
    assert "ids scored on more than one row (each row counts as a movie): 1 (3)" in capsys.readouterr().out


def test_a_built_datasets_over_cap_plot_is_skipped_by_id(model_dir):
    rows = [Movie(id=1, plot="x" * (MAX_PLOT_CHARS + 1), poster=None, genres=["Drama"]),
            Movie(id=2, plot="a fine plot", poster=None, genres=["Comedy"])]
    data = Movies(rows=rows, kind="dataset", vocabulary=LABELS)
    report = evaluation.evaluate(GenreClassifier.from_pretrained(model_dir), data, n_boot=0)
    assert report["counts"]["scored"] == 1
    assert report["skipped"] == [{"id": 1, "reason": "plot_too_long", "detail": (
        "the plot is 10,001 characters long; the limit is 10,000. Give a summary of a paragraph or two, like the "
        "plots the model was trained on")}]


@pytest.mark.parametrize("option", ["--out", "--predictions"])
def test_an_unwritable_output_is_refused_before_the_model_loads(hostile_source, tmp_path, monkeypatch, option):
    monkeypatch.setattr(GenreClassifier, "from_pretrained", lambda *a, **k: pytest.fail("model loaded"))
    (tmp_path / "a-folder.json").mkdir()
    with pytest.raises(SystemExit) as raised:
        main(["--model", "unused", "--data", str(hostile_source), option, str(tmp_path / "a-folder.json")])
    assert str(raised.value).startswith(f"{option} ") and "is a folder" in str(raised.value)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_predictions_on_a_full_disk_is_a_message(model_dir, hostile_source, tmp_path):
    full = tmp_path / "preds.jsonl"
    full.symlink_to("/dev/full")
    with pytest.raises(SystemExit) as raised:
        main(["--model", str(model_dir), "--data", str(hostile_source), "--bootstrap", "0", "--predictions", str(full)])
    message = str(raised.value)
    assert message.startswith("Could not write --predictions") and "No space left on device" in message


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_report_on_a_full_disk_is_a_message_after_the_summary(model_dir, hostile_source, tmp_path, capsys):
    full = tmp_path / "report.json"
    full.symlink_to("/dev/full")
    with pytest.raises(SystemExit) as raised:
        main(["--model", str(model_dir), "--data", str(hostile_source), "--bootstrap", "0", "--out", str(full)])
    assert str(raised.value).startswith("Could not write the report to --out") and "the summary above" in str(raised.value)
    assert "scored: 7" in capsys.readouterr().out


def test_a_sources_poster_path_is_read_only_inside_its_folder(tmp_path):
    """A data file's poster_file is not trusted: evaluate reads it as mmgcs predict and the builder do (confined to
    the source folder, regular files only), so a path out of the folder is a bad poster named by id, never opened."""
    bundle = tmp_path / "bundle"
    tiny_model(LABELS).save_pretrained(bundle)
    outside = tmp_path / "outside.png"
    PIL.Image.new("RGB", (40, 60), (200, 10, 10)).save(outside)
    source = tmp_path / "source"
    (source / "posters").mkdir(parents=True)
    PIL.Image.new("RGB", (40, 60), (10, 200, 10)).save(source / "posters" / "1.png")
    rows = [{"id": 1, "plot": "a heist", "genres": ["Action"], "poster_file": "posters/1.png"},
            {"id": 2, "plot": "a ghost", "genres": ["Drama"], "poster_file": "../outside.png"},
            {"id": 3, "plot": "a fifo", "genres": ["Comedy"], "poster_file": "posters"}]
    (source / "movies.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "report.json"
    main(["--model", str(bundle), "--data", str(source), "--bootstrap", "0", "--out", str(out)])
    report = json.loads(out.read_text(encoding="utf-8"))
    bad = {b["id"]: b["error"] for b in report["bad_posters"]}
    assert set(bad) == {2, 3}
    assert "outside the source folder" in bad[2] and "is a folder" in bad[3]
    assert report["counts"]["scored"] == 3 and report["counts"]["with_poster"] == 1  # scored on their plots
