"""The genre metrics as a local `evaluate` module: loadable offline from the package, shipped in the wheel, and
giving the numbers of `mmgcs.metrics.compute_metrics` and of a training run's metrics.json."""

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import mmgcs.genre_metrics
from engine_helpers import REPO_ROOT, build_dataset, tiny_bundle, quick_overrides
from mmgcs.config import load_config
from mmgcs.metrics import compute_metrics

GENRES = ["Action", "Comedy", "Drama", "Horror"]


@pytest.fixture(scope="module")
def metric(tmp_path_factory):
    # A local folder: loaded with the Hub unreachable (the suite runs with HF_HUB_OFFLINE=1).
    return mmgcs.genre_metrics.load(cache_dir=str(tmp_path_factory.mktemp("evaluate-cache")))


def _predictions(seed: int = 0, n: int = 40):
    rng = np.random.RandomState(seed)
    labels = (rng.rand(n, len(GENRES)) > 0.6).astype(np.int64)
    labels[:, 3] = 0  # a genre without positives: AP undefined, left out of mAP
    return rng.rand(n, len(GENRES)), labels


@pytest.mark.parametrize("thresholds", [None, 0.4, [0.2, 0.35, 0.5, 0.65]])
def test_the_module_gives_the_numbers_of_compute_metrics(metric, thresholds):
    probs, labels = _predictions()
    expected = compute_metrics(probs, labels, GENRES, thresholds)
    got = metric.compute(predictions=probs, references=labels, label_names=GENRES, thresholds=thresholds)
    assert got == expected  # exactly: the same float64 inputs reach the same scikit-learn calls
    assert got["genres_without_positives"] == ["Horror"] and got["per_genre"]["Horror"]["ap"] is None


def test_the_module_scores_single_label_models_by_their_top_genre(metric):
    probs, labels = _predictions(seed=1)
    got = metric.compute(predictions=probs, references=labels, label_names=GENRES, argmax=True)
    assert got == compute_metrics(probs, labels, GENRES, argmax=True) and "accuracy" in got


def test_batches_added_one_by_one_give_the_same_numbers(metric):
    probs, labels = _predictions(seed=2)
    for start in range(0, len(probs), 16):
        metric.add_batch(predictions=probs[start:start + 16], references=labels[start:start + 16])
    assert metric.compute(label_names=GENRES) == compute_metrics(probs, labels, GENRES)


def test_the_module_and_a_training_run_give_the_same_numbers(metric, tmp_path):
    from mmgcs.engine import run

    data = build_dataset(tmp_path / "data", n=45)
    out = tmp_path / "run"
    metrics = run(load_config(overrides=quick_overrides(data, tiny_bundle(tmp_path / "bundle"), out)))
    saved = np.load(out / "test_predictions.npz")
    test = json.loads((out / "metrics.json").read_text())["test"]
    names = list(test["per_genre"])
    thresholds = [test["per_genre"][g]["threshold"] for g in names]
    got = metric.compute(predictions=saved["probs"], references=saved["labels"], label_names=names,
                         thresholds=thresholds)
    direct = compute_metrics(saved["probs"], saved["labels"], names, thresholds)
    assert got == direct
    assert {k: test[k] for k in got} == got  # metrics.json: the same numbers (it adds the loss)
    assert metrics["test"]["micro_f1"] == got["micro_f1"]


def test_the_wheel_ships_the_module(tmp_path):
    # Built from a copy: setuptools writes build/ and *.egg-info next to the sources.
    source = tmp_path / "src"
    shutil.copytree(REPO_ROOT / "mmgcs", source / "mmgcs", symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "model_card.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), "."],
        cwd=source, capture_output=True, text=True, timeout=300,
    )
    if build.returncode != 0 and "No module named" in build.stderr:
        pytest.skip(f"cannot build a wheel here: {build.stderr[-300:]}")
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = tmp_path.glob("mmgcs-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"mmgcs/genre_metrics/__init__.py", "mmgcs/genre_metrics/genre_metrics.py",
            "mmgcs/genre_metrics/README.md"} <= names


def test_the_module_folder_is_what_evaluate_loads():
    folder = Path(mmgcs.genre_metrics.PATH)
    assert (folder / f"{folder.name}.py").is_file()  # evaluate.load(<folder>) runs <folder>/<folder name>.py
