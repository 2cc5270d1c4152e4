"""The `mmgcs` command end to end in subprocesses (`python -m mmgcs`, what the console script runs), offline, on
tiny models saved to a temporary folder: predict over a CSV with broken rows, --resume, a poster folder, a built
dataset; the delegated evaluate; serve without app.py (doctor: tests/test_doctor.py)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_helpers import image_bytes
from engine_helpers import GENRES, REPO_ROOT, build_dataset, subprocess_env

from mmgcs.batch_predict import explain_supported
from mmgcs.inference import Predictor
from mmgcs.models.classifier import GenreClassifier
from mmgcs.testing import tiny_model


def mmgcs(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmgcs", *map(str, args)], env=subprocess_env(), cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cli") / "model"
    tiny_model(GENRES).save_pretrained(folder)
    return folder


BROKEN_CSV = """id,title,plot,poster_path
1,Good,A detective hunts a killer in the city,posters/1.jpg
2,Empty,,
3,Corrupt,A love story,posters/3.jpg
4,Missing,,posters/missing.jpg
5,Outside,,../outside.jpg
x,BadId,a plot,
6,PlotOnly,The family goes on a journey,
7,UrlOnly,,https://example.com/7.jpg
8,PosterOnly,,posters/1.jpg
"""


@pytest.fixture(scope="module")
def broken_csv(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("source")
    (root / "src" / "posters").mkdir(parents=True)
    (root / "src" / "posters" / "1.jpg").write_bytes(image_bytes(size=(40, 60)))
    (root / "src" / "posters" / "3.jpg").write_bytes(b"<html>not an image</html>")
    (root / "outside.jpg").write_bytes(image_bytes(seed=1))  # a real image, but outside the input's folder
    path = root / "src" / "movies.csv"
    path.write_text(BROKEN_CSV, encoding="utf-8")
    return path


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_help_names_the_subcommands_and_the_training_commands():
    run = mmgcs("--help")
    assert run.returncode == 0, run.stderr
    for name in ("predict", "evaluate", "data", "sweep", "serve", "doctor",
                 "accelerate launch training/train_fusion.py", "accelerate launch training/train_text.py",
                 "accelerate launch training/train_image.py"):
        assert name in run.stdout


def test_predict_csv_gives_every_row_with_its_error_and_the_good_rows_the_predictor_scores(bundle, broken_csv, tmp_path):
    out = tmp_path / "preds.csv"
    run = mmgcs("predict", "--model", bundle, "--input", broken_csv, "--out", out, "--by-modality")
    assert run.returncode == 0, run.stderr
    rows = {r["id"]: r for r in read_csv(out)}
    assert list(rows) == ["1", "2", "3", "4", "5", "x", "6", "7", "8"]  # input order, nothing dropped
    errors = {i: r["error"] for i, r in rows.items()}
    assert "empty plot and no poster" in errors["2"]
    assert "not a recognised image" in errors["3"] and "<html>" not in errors["3"]  # no file content
    assert "not found" in errors["4"]
    assert "outside the source folder" in errors["5"]
    assert "not an integer" in errors["x"]
    assert "URL" in errors["7"]
    for good in ("1", "6", "8"):
        assert errors[good] == "" and rows[good]["genres"], rows[good]
    assert rows["2"]["Action"] == "" and rows["2"]["genres"] == ""
    # The scores are the one predict path's, to the 6 decimals written.
    predictor = Predictor(GenreClassifier.from_pretrained(bundle))
    expected = predictor.predict(plot="The family goes on a journey", title="PlotOnly", by_modality=True)
    for genre in GENRES:
        assert float(rows["6"][genre]) == pytest.approx(expected["scores"][genre], abs=1e-6)
        assert float(rows["6"][f"plot_only.{genre}"]) == pytest.approx(expected["scores"][genre], abs=1e-6)
    assert rows["6"]["poster_only.Action"] == ""  # no poster: no poster-only view
    assert rows["1"]["poster_only.Action"] != "" and rows["8"]["plot_only.Action"] == ""
    assert rows["6"]["genres"].split("|") == expected["genres"]
    assert "9 movies written" in run.stdout and "6 with an error" in run.stdout


def test_resume_skips_ids_already_written_and_repairs_a_half_written_line(bundle, broken_csv, tmp_path):
    out = tmp_path / "preds.jsonl"
    assert mmgcs("predict", "--model", bundle, "--input", broken_csv, "--out", out).returncode == 0
    full = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    again = mmgcs("predict", "--model", bundle, "--input", broken_csv, "--out", out)
    assert again.returncode == 2 and "--resume" in again.stderr  # an existing output is never overwritten silently
    lines = out.read_text(encoding="utf-8").splitlines(keepends=True)
    out.write_text("".join(lines[:3]) + lines[3][:20], encoding="utf-8")  # interrupted in the 4th row
    run = mmgcs("predict", "--model", bundle, "--input", broken_csv, "--out", out, "--resume")
    assert run.returncode == 0, run.stderr
    assert "6 movies written" in run.stdout and "3 already there" in run.stdout
    resumed = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in resumed] == [r["id"] for r in full]
    assert resumed == full
    other = mmgcs("predict", "--model", bundle, "--input", broken_csv, "--out", out, "--resume", "--by-modality")
    assert other.returncode == 2 and "other columns" in other.stderr


def test_a_folder_of_posters_one_row_per_image(bundle, tmp_path):
    folder = tmp_path / "posters"
    folder.mkdir()
    for i in range(3):
        (folder / f"movie-{i}.jpg").write_bytes(image_bytes(seed=i, size=(40, 60)))
    (folder / "broken.png").write_bytes(image_bytes()[:100])
    (folder / "notes.txt").write_text("not a poster")
    out = tmp_path / "p.csv"
    run = mmgcs("predict", "--model", bundle, "--input", folder, "--out", out)
    assert run.returncode == 0, run.stderr
    rows = {r["id"]: r for r in read_csv(out)}
    assert sorted(rows) == ["broken", "movie-0", "movie-1", "movie-2"]
    assert rows["broken"]["error"] and all(rows[f"movie-{i}"]["genres"] for i in range(3))
    assert len({rows[f"movie-{i}"]["Action"] for i in range(3)}) == 3  # each poster read, not one repeated


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return build_dataset(tmp_path_factory.mktemp("dataset"), n=40)


def test_a_built_dataset_split_and_the_delegated_evaluate(bundle, dataset, tmp_path):
    from mmgcs.data import load_movies

    out = tmp_path / "val.parquet"
    run = mmgcs("predict", "--model", bundle, "--input", dataset, "--split", "validation", "--out", out)
    assert run.returncode == 0, run.stderr
    import pyarrow.parquet as pq

    table = pq.read_table(out).to_pylist()
    expected_ids = [str(i) for i in load_movies(dataset)["validation"]["id"]]
    assert [r["id"] for r in table] == expected_ids
    assert all(r["error"] is None and r["genres"] is not None for r in table)
    missing = mmgcs("predict", "--model", bundle, "--input", dataset, "--split", "nope", "--out", tmp_path / "x.csv")
    assert missing.returncode == 2 and "no split 'nope'" in missing.stderr
    scored = mmgcs("evaluate", "--model", bundle, "--data", dataset, "--split", "validation", "--bootstrap", "0")
    assert scored.returncode == 0, scored.stderr
    assert "micro" in scored.stdout.lower() and f"scored: {len(expected_ids)}" in scored.stdout


def test_data_and_sweep_are_their_modules_own_command_lines():
    data = mmgcs("data", "build", "--help")
    assert data.returncode == 0 and "--source" in data.stdout and "--min-genre-count" in data.stdout
    sweep = mmgcs("sweep", "--help")
    assert sweep.returncode == 0 and "SWEEP_FILE" in sweep.stdout


def test_serve_without_app_py_says_so(monkeypatch, tmp_path, capsys):
    from mmgcs import cli

    monkeypatch.setattr(cli.resources, "editable_checkout", lambda: None)  # a wheel install...
    monkeypatch.chdir(tmp_path)  # ...run from a folder without app.py
    assert cli.main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "app.py not found" in err and "clone" in err and "pip install -e ." in err


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_memory_stays_flat_over_100000_rows(fmt):
    """100,000 generated plot-only movies (JSONL or CSV in, CSV out) through a tiny text model in one process: the
    peak RSS after them is that after the first 10,000 (results are written batch by batch, the reader streams;
    reading the CSV whole cost ~50 MB more at 100,000 rows)."""
    run = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "bench_predict_memory.py"),
                          "--rows", "100000", "--small", "10000", "--format", fmt],
                         env=subprocess_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    results = json.loads(next(line for line in reversed(run.stderr.splitlines()) if line.startswith("{")))
    small, large = results["10000"], results["100000"]
    assert small["rows"] == 10_000 and large["rows"] == 100_000
    # Kept results would cost well over 100 MB for 90,000 more rows (scores dicts, genre lists, ids).
    assert large["peak_rss_mb"] - small["peak_rss_mb"] < 20, results


@pytest.mark.skipif(not explain_supported(),
                    reason="the predictor has no explain option")
def test_explain_adds_the_words_behind_each_predicted_genre(tmp_path):
    from app_helpers import save_tiny_bundle

    bundle = save_tiny_bundle(tmp_path / "lexical")
    source = tmp_path / "movies.jsonl"
    source.write_text(json.dumps({"id": 1, "plot": "A ghost haunts a haunted house."}) + "\n"
                      + json.dumps({"id": 2, "plot": ""}) + "\n", encoding="utf-8")
    out = tmp_path / "why.jsonl"
    run = mmgcs("predict", "--model", bundle, "--input", source, "--out", out, "--explain")
    assert run.returncode == 0, run.stderr
    good, bad = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert bad["explanation"] is None and bad["error"]
    # What the one predict path explains in-process, with the lexical n-grams of the plot behind each genre.
    expected = Predictor(GenreClassifier.from_pretrained(bundle)).predict(plot="A ghost haunts a haunted house.",
                                                                         explain=True)
    assert list(good["explanation"]["genres"]) == expected["genres"] or expected["genres"] == []
    for genre, entry in good["explanation"]["genres"].items():
        assert entry["lexical"] is not None and entry["score"] == pytest.approx(good[genre], abs=1e-6)
        want = expected["explanation"]["genres"][genre]["lexical"]
        for side in ("up", "down"):
            assert [n for n, _ in entry["lexical"][side]] == [n for n, _ in want[side]]
            assert [c for _, c in entry["lexical"][side]] == pytest.approx([c for _, c in want[side]])
    named = {name for entry in good["explanation"]["genres"].values()
             for name, _ in entry["lexical"]["up"] + entry["lexical"]["down"]}
    assert named & {"ghost", "haunts", "haunted", "house"}


def test_the_three_formats_hold_the_same_rows_and_parquet_resumes(bundle, broken_csv, tmp_path):
    import pyarrow.parquet as pq

    from mmgcs.batch_predict import predict_file

    predictor = Predictor(GenreClassifier.from_pretrained(bundle))
    paths = {fmt: tmp_path / f"p.{fmt}" for fmt in ("csv", "jsonl", "parquet")}
    for path in paths.values():
        stats = predict_file(predictor, str(broken_csv), path, batch_size=3, progress=False)
        assert (stats.written, stats.errors) == (9, 6)
    as_csv = read_csv(paths["csv"])
    as_jsonl = [json.loads(line) for line in paths["jsonl"].read_text(encoding="utf-8").splitlines()]
    as_parquet = pq.read_table(paths["parquet"]).to_pylist()
    for c, j, p in zip(as_csv, as_jsonl, as_parquet, strict=True):
        assert c["id"] == j["id"] == p["id"]
        assert (c["error"] or None) == j["error"] == p["error"]
        assert (c["genres"].split("|") if c["genres"] else None) == j["genres"] == p["genres"]
        for genre in GENRES:
            assert (float(c[genre]) if c[genre] else None) == j[genre] == p[genre]
    # Parquet cannot be appended to: a resumed run copies the rows already there and adds only the others.
    half = tmp_path / "half.parquet"
    pq.write_table(pq.read_table(paths["parquet"]).slice(0, 4), half)
    stats = predict_file(predictor, str(broken_csv), half, resume=True, progress=False)
    assert (stats.skipped, stats.written) == (4, 5)
    assert pq.read_table(half).to_pylist() == as_parquet
    assert not half.with_name(half.name + ".partial").exists()


def test_serve_runs_app_py_with_the_environment_and_its_options(monkeypatch):
    from mmgcs import cli

    calls = []
    monkeypatch.setattr(cli.subprocess, "call", lambda argv, env, cwd: calls.append((argv, env, cwd)) or 0)
    monkeypatch.setenv("MMGCS_EXAMPLES", "examples.jsonl")
    assert cli.main(["serve", "--model", "runs/x/model", "--port", "7999"]) == 0
    (argv, env, cwd), = calls
    assert argv == [sys.executable, str(REPO_ROOT / "app.py")] and cwd == REPO_ROOT
    assert env["MMGCS_MODEL"] == "runs/x/model" and env["GRADIO_SERVER_PORT"] == "7999"
    assert env["MMGCS_EXAMPLES"] == "examples.jsonl"  # the caller's environment goes through
    assert env.get("GRADIO_SERVER_NAME") == os.environ.get("GRADIO_SERVER_NAME")  # untouched without --host


@pytest.mark.shared_data
def test_predict_reads_the_real_tmdb_source_format(bundle, shared_data, tmp_path):
    """The first 30 movies of ../shared/data/tmdb5000 (posters copied beside them: a poster is read only inside
    the input's folder) through the command: every one predicted, none with an error."""
    source = tmp_path / "tmdb"
    (source / "posters").mkdir(parents=True)
    lines = (shared_data / "tmdb5000" / "movies.jsonl").read_text(encoding="utf-8").splitlines()[:30]
    for line in lines:
        poster = json.loads(line).get("poster_file")
        if poster:
            (source / poster).write_bytes((shared_data / "tmdb5000" / poster).read_bytes())
    (source / "movies.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "p.csv"
    run = mmgcs("predict", "--model", bundle, "--input", source, "--out", out, "--by-modality")
    assert run.returncode == 0, run.stderr
    rows = read_csv(out)
    assert [r["id"] for r in rows] == [str(json.loads(line)["id"]) for line in lines]
    assert all(r["error"] == "" and all(r[g] != "" for g in GENRES) for r in rows)
    assert sum(r["poster_only.Action"] != "" for r in rows) == sum('"poster_file"' in line for line in lines) > 0


def test_one_deeply_nested_line_stops_none_of_predict_build_and_evaluate(bundle, tmp_path):
    """Issue 18's reproduction through the command: a JSONL line nested 100,000 deep among good rows."""
    source = tmp_path / "src"
    source.mkdir()
    rows = [json.dumps({"id": i, "title": f"M{i}", "plot": f"a detective and a ghost, movie {i}",
                        "genres": [GENRES[i % len(GENRES)]]}) for i in range(30)]
    rows.insert(1, '{"id": 999, "plot": ' + "[" * 100_000 + "]" * 100_000 + "}")
    (source / "movies.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    out = tmp_path / "p.csv"
    run = mmgcs("predict", "--model", bundle, "--input", source, "--out", out)  # the default batch of 32
    assert run.returncode == 0, run.stderr
    predicted = read_csv(out)
    assert len(predicted) == 31 and sum(bool(r["error"]) for r in predicted) == 1
    assert predicted[1]["id"] == "999" and "nests too deeply" in predicted[1]["error"]
    built = mmgcs("data", "build", "--source", source, "--out", tmp_path / "ds", "--min-genre-count", "1",
                  "--no-progress")
    assert built.returncode == 0 and "Traceback" not in built.stderr, built.stderr
    assert "malformed_line 1" in built.stdout and "30 movies kept of 31 read" in built.stdout
    scored = mmgcs("evaluate", "--model", bundle, "--data", source, "--bootstrap", "0")
    assert scored.returncode == 0 and "Traceback" not in scored.stderr, scored.stderr
    assert "scored: 30, skipped: 1" in scored.stdout
