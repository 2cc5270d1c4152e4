"""`python -m mmgcs.evaluate` on a saved tiny model, for a built dataset and for a raw source folder."""

import json
from pathlib import Path

import pytest
from PIL import Image

from mmgcs import testing
from mmgcs.data.build import BuildOptions, build
from mmgcs.evaluate import main

LABELS = ["Action", "Comedy", "Drama"]
GENRE_CYCLE = [["Action"], ["Comedy"], ["Drama"], ["Action", "Comedy"], ["Comedy", "Drama"], ["Action", "Drama"]]


def _poster(path: Path, i: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (24, 36), (20 * i % 256, 120, 200 - 10 * i % 200)).save(path, quality=90)
    return f"posters/{path.name}"


def _write_jsonl(folder: Path, rows: list, extra_lines: tuple = ()) -> Path:
    lines = [json.dumps(r) for r in rows] + list(extra_lines)
    (folder / "movies.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def _clean_rows(folder: Path, n: int) -> list:
    return [
        {
            "id": i,
            "title": f"Movie {i}",
            "plot": f"Plot of movie {i}: a story with a beginning, a middle and an end.",
            "genres": GENRE_CYCLE[i % len(GENRE_CYCLE)],
            "poster_file": _poster(folder / "posters" / f"{i}.jpg", i),
        }
        for i in range(1, n + 1)
    ]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle")
    model = testing.tiny_model(LABELS)
    model.config.thresholds = [0.45, 0.5, 0.55]  # as if tuned on validation
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def raw_source(tmp_path_factory):
    """A raw jsonl folder holding every kind of row evaluation must handle and report."""
    folder = tmp_path_factory.mktemp("raw")
    rows = _clean_rows(folder, 6)
    (folder / "posters" / "bad.jpg").write_bytes(b"this is not a jpeg")
    rows += [
        # corrupt poster: reported, scored with its plot
        {"id": 101, "title": "Bad poster", "plot": "A plot.", "genres": ["Drama"], "poster_file": "posters/bad.jpg"},
        # nothing to score on: skipped by id
        {"id": 102, "title": "Empty", "plot": "  ", "genres": ["Comedy"]},
        # genre spelled differently: mapped to "Comedy"
        {"id": 103, "title": "Lower", "plot": "Jokes.", "genres": ["comedy"]},
        # only a genre the model does not know: scored as all-negative, genre reported
        {"id": 104, "title": "Cowboys", "plot": "Horses.", "genres": ["Western"]},
        # no genres at all: no ground truth, skipped
        {"id": 105, "title": "Unlabelled", "plot": "Something.", "genres": []},
        # poster only
        {"id": 106, "title": "Poster only", "plot": None, "genres": ["Action", "Western"],
         "poster_file": _poster(folder / "posters" / "106.jpg", 7)},
    ]
    return _write_jsonl(folder, rows, extra_lines=("{this line is broken",))


def _run(tmp_path, *args):
    out = tmp_path / "report.json"
    returned = main([*args, "--out", str(out)])
    written = json.loads(out.read_text())
    assert written["counts"] == returned["counts"]
    return written


def test_raw_source_folder_reports_every_row(model_dir, raw_source, tmp_path):
    preds = tmp_path / "preds.jsonl"
    r = _run(tmp_path, "--model", str(model_dir), "--data", str(raw_source), "--predictions", str(preds), "--batch-size", "4")
    c = r["counts"]
    assert r["data_kind"] == "source:jsonl" and r["split"] is None
    assert c["rows"] == 13  # 12 movies + 1 unreadable line
    assert c["scored"] == 10 and c["skipped"] == 3 and c["rows"] == c["scored"] + c["skipped"]
    assert {(s["id"], s["reason"]) for s in r["skipped"]} == {(None, "malformed_line"), (102, "no input"), (105, "no genres")}
    assert [b["id"] for b in r["bad_posters"]] == [101]
    assert c["with_poster"] == 7 and c["with_plot"] == 9
    assert r["unknown_genres"] == {"Western": 2}
    assert r["rows_without_model_genre"] == [104]
    assert r["threshold_source"].startswith("bundle (per-genre")

    m = r["metrics"]
    assert m["n_samples"] == 10
    assert set(m["per_genre"]) == set(LABELS)
    # Supports from the rows above: Action 1,4,6,106 / Comedy 2,4,5,103 / Drama 3,5,6,101.
    assert {g: m["per_genre"][g]["support"] for g in LABELS} == {"Action": 4, "Comedy": 4, "Drama": 4}
    assert [m["per_genre"][g]["threshold"] for g in LABELS] == [0.45, 0.5, 0.55]
    for key in ("micro_f1", "macro_f1", "weighted_f1", "samples_f1", "mAP"):
        assert 0.0 <= m[key] <= 1.0
    assert "metrics_at_global_threshold" in r
    iv = r["intervals"]
    assert iv["n_boot"] == 1000 and iv["micro_f1"][0] <= m["micro_f1"] <= iv["micro_f1"][1]

    lines = [json.loads(x) for x in preds.read_text().splitlines()]
    assert len(lines) == 10 and {x["id"] for x in lines} >= {101, 103, 104, 106}
    by_id = {x["id"]: x for x in lines}
    assert by_id[103]["true"] == ["Comedy"] and by_id[104]["true"] == []
    # Predictions follow the bundle's per-genre thresholds.
    for x in lines:
        for g, t in zip(LABELS, [0.45, 0.5, 0.55]):
            if abs(x["scores"][g] - t) > 1e-6:  # scores are rounded to 6 places in the file
                assert (g in x["predicted"]) == (x["scores"][g] >= t)


def test_plot_only_and_poster_only_scores_match_withholding_the_other_input(model_dir, raw_source, tmp_path):
    from mmgcs.metrics import compute_metrics

    r = _run(tmp_path, "--model", str(model_dir), "--data", str(raw_source), "--bootstrap", "0")
    b = r["by_input"]
    assert b["movies"] == 6  # ids 1-6 have a plot and a poster
    thresholds = [0.45, 0.5, 0.55]
    for modality, name in (("both", "fused"), ("text", "plot_only"), ("image", "poster_only")):
        preds = tmp_path / f"{modality}.jsonl"
        main(["--model", str(model_dir), "--data", str(raw_source), "--modality", modality, "--bootstrap", "0",
              "--predictions", str(preds)])
        rows = [x for x in map(json.loads, preds.read_text().splitlines()) if x["id"] in range(1, 7)]
        probs = [[x["scores"][g] for g in LABELS] for x in rows]
        truth = [[int(g in x["true"]) for g in LABELS] for x in rows]
        expected = compute_metrics(probs, truth, LABELS, thresholds)
        assert b[name]["micro_f1"] == pytest.approx(expected["micro_f1"]), name
        assert b[name]["mAP"] == pytest.approx(expected["mAP"], abs=1e-3), name


def test_modality_and_threshold_options(model_dir, raw_source, tmp_path):
    r = _run(tmp_path, "--model", str(model_dir), "--data", str(raw_source), "--modality", "text", "--threshold", "0.3",
             "--bootstrap", "0")
    assert "intervals" not in r
    assert r["counts"]["with_poster"] == 0 and r["counts"]["with_plot"] == 9
    # The poster-only movie now has nothing to score on.
    assert {s["id"] for s in r["skipped"] if s["reason"] == "no input"} == {102, 106}
    assert r["threshold_source"].startswith("command line")
    assert {g["threshold"] for g in r["metrics"]["per_genre"].values()} == {0.3}
    assert "metrics_at_global_threshold" not in r


def test_rename_genre_maps_unknown_names(model_dir, raw_source, tmp_path):
    r = _run(tmp_path, "--model", str(model_dir), "--data", str(raw_source), "--rename-genre", "Western=Action")
    assert r["unknown_genres"] == {}
    assert r["metrics"]["per_genre"]["Action"]["support"] == 5  # 104 joins 1, 4, 6, 106
    with pytest.raises(SystemExit, match="not labels of the model"):
        main(["--model", str(model_dir), "--data", str(raw_source), "--rename-genre", "Western=Horse"])


@pytest.fixture(scope="module")
def built_dataset(tmp_path_factory):
    src = tmp_path_factory.mktemp("clean")
    _write_jsonl(src, _clean_rows(src, 16))
    out = tmp_path_factory.mktemp("built")
    build(
        BuildOptions(sources=[str(src)], out=str(out), min_genre_count=1, split_ratios=(0.5, 0.25, 0.25), progress=False)
    )
    return out


def test_built_dataset_split(model_dir, built_dataset, tmp_path):
    from mmgcs.data import load_movies

    test_split = load_movies(built_dataset)["test"]
    r = _run(tmp_path, "--model", str(model_dir), "--data", str(built_dataset), "--split", "test")
    assert r["data_kind"] == "dataset" and r["split"] == "test"
    assert r["counts"]["scored"] == len(test_split) > 0 and r["counts"]["skipped"] == 0
    assert r["counts"]["with_poster"] == len(test_split)
    assert r["labels_not_in_data"] == [] and r["unknown_genres"] == {}
    names = test_split.features["genres"].feature.names
    expected = {g: sum(names.index(g) in row for row in test_split["genres"]) for g in LABELS}
    assert {g: r["metrics"]["per_genre"][g]["support"] for g in LABELS} == expected

    with pytest.raises(SystemExit, match="no split 'dev'"):
        main(["--model", str(model_dir), "--data", str(built_dataset), "--split", "dev"])


def test_model_genre_missing_from_dataset_is_not_scored(built_dataset, tmp_path):
    bundle = tmp_path / "bundle"
    testing.tiny_model(LABELS + ["Horror"], image=False).save_pretrained(bundle)
    r = _run(tmp_path, "--model", str(bundle), "--data", str(built_dataset), "--split", "validation")
    assert r["labels_not_in_data"] == ["Horror"]
    assert set(r["metrics"]["per_genre"]) == set(LABELS)
    assert r["counts"]["with_poster"] == 0  # a text-only model never decodes posters
    assert r["threshold_source"] == "bundle (global)"


def test_a_model_trained_with_titles_is_scored_on_title_and_plot(raw_source, tmp_path):
    model = testing.tiny_model(LABELS, image=False)
    model.config.text_template = "{title}. {plot}"
    bundle = tmp_path / "bundle"
    model.save_pretrained(bundle)
    preds = tmp_path / "p.jsonl"
    r = _run(tmp_path, "--model", str(bundle), "--data", str(raw_source), "--predictions", str(preds), "--bootstrap", "0")
    assert r["counts"]["plots_without_title"] == 0
    rows = {x["id"]: x for x in map(json.loads, preds.read_text().splitlines())}
    for movie in map(json.loads, (raw_source / "movies.jsonl").read_text().splitlines()[:6]):
        expected = model.predict(plot=f"{movie['title']}. {movie['plot']}")["scores"]  # as training composed it
        assert rows[movie["id"]]["scores"] == pytest.approx(expected, abs=1e-5)
        assert rows[movie["id"]]["scores"] != pytest.approx(model.predict(plot=movie["plot"])["scores"], abs=1e-5)


def test_missing_data_path_is_a_clear_error(model_dir, tmp_path):
    with pytest.raises(SystemExit, match="mmgcs.data build"):
        main(["--model", str(model_dir), "--data", str(tmp_path / "nowhere")])


def test_bad_options_are_clear_errors(model_dir, raw_source, tmp_path):
    with pytest.raises(SystemExit, match=r"\[0, 1\]"):
        main(["--model", str(model_dir), "--data", str(raw_source), "--threshold", "1.5"])
    with pytest.raises(SystemExit, match="save_pretrained"):
        main(["--model", str(tmp_path / "no-model"), "--data", str(raw_source)])
    with pytest.raises(SystemExit, match="DATA_NAME=MODEL_NAME"):
        main(["--model", str(model_dir), "--data", str(raw_source), "--rename-genre", "Western"])
    with pytest.raises(SystemExit, match="--limit must be 0"):
        main(["--model", str(model_dir), "--data", str(raw_source), "--limit", "-1"])


def test_agrees_with_the_training_run_test_metrics(tmp_path):
    """`evaluate` on a run's bundle and test split reproduces the engine's metrics.json (same rows, thresholds)."""
    import engine_helpers as eh
    from huggingface_hub import ModelCard

    from mmgcs.engine import main as train

    data = eh.build_dataset(tmp_path, n=40)
    bundle = eh.tiny_bundle(tmp_path / "init")
    run = train(eh.quick_overrides(data, bundle, tmp_path / "run", train__epochs=1))["test"]
    r = _run(tmp_path, "--model", str(tmp_path / "run" / "model"), "--data", str(data), "--split", "test")
    m = r["metrics"]
    assert m["n_samples"] == run["n_samples"] and r["counts"]["skipped"] == 0
    for key in ("micro_f1", "macro_f1", "weighted_f1", "samples_f1", "mAP", "micro_ap"):
        assert m[key] == pytest.approx(run[key], abs=1e-6), key
    assert {g: v["threshold"] for g, v in m["per_genre"].items()} == {g: v["threshold"] for g, v in run["per_genre"].items()}
    # The run's plots and its card's model-index come from this stream's report code.
    assert (tmp_path / "run" / "per_genre_f1.png").stat().st_size > 2000
    card = ModelCard.load(tmp_path / "run" / "model" / "README.md")
    micro = {e.metric_name: e.metric_value for e in card.data.eval_results}["Micro F1"]
    assert micro == pytest.approx(run["micro_f1"], abs=1e-4)


def test_mmimdb_official_split_and_cross_vocabulary_genres(tmp_path):
    bundle = tmp_path / "bundle"
    testing.tiny_model(["Drama", "Science Fiction"], image=False).save_pretrained(bundle)
    root = tmp_path / "mmimdb"
    (root / "dataset").mkdir(parents=True)
    genres = {"0000001": ["Drama"], "0000002": ["Sci-Fi"], "0000003": ["Drama", "Sci-Fi"], "0000004": ["Sci-Fi"]}
    for stem, g in genres.items():
        (root / "dataset" / f"{stem}.json").write_text(json.dumps({"title": stem, "plot": [f"plot {stem}", "a longer plot"], "genres": g}))
    (root / "split.json").write_text(json.dumps({"train": ["0000001"], "dev": ["0000004"], "test": ["0000002", "0000003"]}))

    r = _run(tmp_path, "--model", str(bundle), "--data", str(root), "--split", "test")
    assert r["data_kind"] == "source:mmimdb" and r["split"] == "test"
    assert r["counts"]["scored"] == 2 and r["counts"]["rows_of_other_splits"] == 2
    assert r["genre_aliases"] == {"Sci-Fi": "Science Fiction"} and r["unknown_genres"] == {}
    assert r["metrics"]["per_genre"]["Science Fiction"]["support"] == 2
    assert r["metrics"]["per_genre"]["Drama"]["support"] == 1
    r = _run(tmp_path, "--model", str(bundle), "--data", str(root), "--split", "validation")
    assert r["counts"]["scored"] == 1 and r["split"] == "validation"


def test_single_label_model_is_scored_by_its_top_genre(raw_source, tmp_path):
    bundle = tmp_path / "bundle"
    testing.tiny_model(LABELS, task="singlelabel").save_pretrained(bundle)
    preds = tmp_path / "p.jsonl"
    r = _run(tmp_path, "--model", str(bundle), "--data", str(raw_source), "--predictions", str(preds))
    m = r["metrics"]
    assert 0.0 <= m["accuracy"] <= 1.0 and m["per_genre"]["Action"]["threshold"] is None
    # 104 (only "Western") has no right answer for a single-label model: skipped, as training does.
    assert {s["id"]: s["reason"] for s in r["skipped"]}[104] == "no genre known to the model"
    assert sum(g["predicted"] for g in m["per_genre"].values()) == m["n_samples"] == 9
    assert all(len(json.loads(x)["predicted"]) == 1 for x in preds.read_text().splitlines())


@pytest.mark.shared_data
def test_real_tmdb_sources(model_dir, shared_data, tmp_path):
    """The real held-out formats: tmdb5000 (plot + poster) and tmdb-plots-extra (plot, poster only by URL)."""
    r = _run(tmp_path, "--model", str(model_dir), "--data", str(shared_data / "tmdb5000"), "--limit", "24")
    c = r["counts"]
    assert c["rows"] == c["scored"] + c["skipped"] == 24
    assert c["with_poster"] == c["with_plot"] == c["scored"] and not r["bad_posters"]
    assert "Science Fiction" in r["unknown_genres"]  # real genres outside the tiny model's three are reported
    r = _run(tmp_path, "--model", str(model_dir), "--data", str(shared_data / "tmdb-plots-extra"), "--limit", "24")
    assert r["counts"]["with_poster"] == 0 and r["counts"]["poster_url_not_fetched"] == 24
    assert r["counts"]["scored"] == 24
