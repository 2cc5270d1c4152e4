"""The Space (app.py) through its API: started once in a subprocess with a tiny model, called with gradio_client."""

from __future__ import annotations

import importlib.util
import io
import os
import random
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

pytest.importorskip("gradio")
from gradio_client import handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402
from PIL import Image  # noqa: E402

from app_helpers import (  # noqa: E402
    LABELS, REPO, TEST_LIMITS, THRESHOLDS, api_client, save_tiny_bundle, shared_app_server,
)

PLOTS = [
    "A retired detective hunts a serial killer through the rainy streets of the city.",
    "Two friends open a bakery in Paris and fall in love with the same singer.",
    "A family moves into an old house where something waits in the cellar at night.",
    "Soldiers cross the desert to rescue a captured pilot before the war ends.",
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    return shared_app_server(tmp_path_factory)


@pytest.fixture(scope="module")
def client(server):
    c = api_client(server.url)
    yield c
    c.close()


@pytest.fixture(scope="module")
def reference(server):
    """The same bundle loaded in the test process: what the app must answer."""
    from mmgcs import GenreClassifier

    return GenreClassifier.from_pretrained(server.model_dir)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("posters")
    rng = random.Random(0)

    def noise(w, h):
        return Image.frombytes("RGB", (w, h), bytes(rng.randrange(256) for _ in range(w * h * 3)))

    out = {"good_png": d / "poster.png", "good_jpg": d / "poster.jpg"}
    noise(60, 90).save(out["good_png"])
    noise(80, 120).save(out["good_jpg"], quality=90)
    out["text"] = d / "notes.png"  # a text file wearing an image's name
    out["text"].write_text("This is the plot, not a poster.")
    out["truncated"] = d / "truncated.jpg"
    data = io.BytesIO()
    noise(200, 300).save(data, format="JPEG", quality=95)
    out["truncated"].write_bytes(data.getvalue()[: len(data.getvalue()) // 2])
    out["too_many_pixels"] = d / "huge.png"  # 1.2 MP, over the test limit of 1 MP; a small file
    Image.new("RGB", (1200, 1000), (200, 30, 30)).save(out["too_many_pixels"])
    out["too_big_file"] = d / "big.png"  # incompressible noise: ~1.5 MB, over the 1 MB upload limit
    noise(710, 710).save(out["too_big_file"])
    return out


def _close(a: dict, b: dict, tol: float = 1e-4) -> bool:
    return a.keys() == b.keys() and all(abs(a[k] - b[k]) <= tol for k in a)


def _check_result(result: dict, expected: dict) -> None:
    """A /predict answer: JSON scores over exactly the model's genres, the thresholded genre set, the expected values."""
    assert {"scores", "genres", "by_modality"} <= set(result)
    scores = result["scores"]
    assert list(scores) == LABELS
    assert all(isinstance(p, float) and 0.0 <= p <= 1.0 for p in scores.values())
    assert 0.0 < sum(scores.values()) < len(LABELS)  # independent sigmoids: not a distribution
    thresholds = dict(zip(LABELS, THRESHOLDS))
    assert set(result["genres"]) == {g for g, p in scores.items() if p >= thresholds[g]}
    assert "Action" in result["genres"] and "Comedy" not in result["genres"]
    assert _close(scores, expected["scores"], 1e-5), (scores, expected["scores"])
    assert result["by_modality"]["fused"] == pytest.approx(scores)


def test_api_page_lists_the_named_endpoints(client):
    api = client.view_api(return_format="dict", print_info=False)
    named = api["named_endpoints"]
    assert set(named) == {"/predict", "/predict_batch", "/model_info"}  # the UI's rendering step stays private
    params = named["/predict"]["parameters"]
    assert [p["parameter_name"] for p in params] == ["plot", "poster", "title", "explain"]
    assert all(p["parameter_has_default"] for p in params)  # any may be left out
    assert params[3]["parameter_default"] is False  # a plain /predict does no explanation work


def test_model_info_reports_labels_thresholds_and_limits(client):
    info = client.predict(api_name="/model_info")
    assert info["labels"] == LABELS
    assert info["thresholds"] == dict(zip(LABELS, THRESHOLDS))
    assert info["reads_plot"] and info["reads_poster"]
    assert "/" not in info["text_backbone"]  # the tiny BERT lives in a temp folder: only its name is shown
    assert info["limits"]["max_plot_chars"] == int(TEST_LIMITS["MMGCS_MAX_PLOT_CHARS"])
    assert info["limits"]["max_image_pixels"] == int(TEST_LIMITS["MMGCS_MAX_IMAGE_PIXELS"])


def test_plot_only(client, reference):
    result = client.predict(plot=PLOTS[0], api_name="/predict")
    _check_result(result, reference.predict(plot=PLOTS[0]))
    assert set(result["by_modality"]) == {"text", "fused"}
    assert _close(result["by_modality"]["text"], result["scores"], 1e-6)


def test_the_title_is_optional_and_ignored_by_a_model_trained_without_titles(client, reference):
    assert reference.config.text_template == "{plot}"
    result = client.predict(plot=PLOTS[0], title="Se7en", api_name="/predict")
    _check_result(result, reference.predict(plot=PLOTS[0]))
    assert client.predict(api_name="/model_info")["reads_title"] is False


def test_poster_only(client, reference, files):
    result = client.predict(poster=handle_file(files["good_png"]), api_name="/predict")
    _check_result(result, reference.predict(poster=Image.open(files["good_png"])))
    assert set(result["by_modality"]) == {"image", "fused"}


@pytest.mark.skipif(not Path("/proc/self/maps").exists() or torch.cuda.is_available(),
                    reason="reads the server's memory map from /proc; with a GPU, triton may load")
def test_the_serving_process_loads_neither_matplotlib_nor_triton(client, server, files):
    # Gradio tries matplotlib around every event and torchvision tries triton at import (app.main, runtime):
    # 150 MB a CPU Space never uses. Checked after a served request, in the server's own memory map.
    client.predict(plot=PLOTS[0], poster=handle_file(str(files["good_png"])), api_name="/predict")
    mapped = {line.split()[-1] for line in Path(f"/proc/{server.proc.pid}/maps").read_text().splitlines()
              if line.split()[-1].startswith("/")}
    assert any("libtorch_cpu" in path for path in mapped)  # the map is the server's, with torch in it
    assert not [path for path in mapped if "/matplotlib/" in path or "triton" in path]


def test_plot_and_poster_shows_each_modality(client, reference, files):
    result = client.predict(plot=PLOTS[1], poster=handle_file(files["good_jpg"]), api_name="/predict")
    poster = Image.open(files["good_jpg"]).convert("RGB")
    _check_result(result, reference.predict(plot=PLOTS[1], poster=poster))
    views = result["by_modality"]
    assert set(views) == {"text", "image", "fused"}
    assert _close(views["text"], reference.predict(plot=PLOTS[1])["scores"], 1e-5)
    assert _close(views["image"], reference.predict(poster=poster)["scores"], 1e-5)
    assert not _close(views["fused"], views["text"], 1e-6)  # the poster changed the answer


@pytest.mark.parametrize(
    "inputs, expected",
    [
        (lambda f: {}, "Nothing to classify"),
        (lambda f: {"plot": "  \n\t "}, "Nothing to classify"),
        (lambda f: {"poster": handle_file(f["text"])}, "not a recognised image"),
        (lambda f: {"plot": PLOTS[0], "poster": handle_file(f["truncated"])}, "truncated"),
        (lambda f: {"poster": handle_file(f["too_many_pixels"])}, "over the limit of 1,000,000"),
        (lambda f: {"plot": "word " * 500}, "limit is 2,000"),
        (lambda f: {"plot": PLOTS[0], "title": "T" * 301}, "limit is 300"),
    ],
    ids=["nothing", "blank-plot", "not-an-image", "truncated-jpeg", "too-many-pixels", "plot-too-long", "title-too-long"],
)
def test_bad_input_gets_a_clear_error(client, files, inputs, expected):
    with pytest.raises(AppError) as err:
        client.predict(**inputs(files), api_name="/predict")
    message = str(err.value)
    assert expected in message
    assert "Traceback" not in message and "/tmp" not in message and str(REPO) not in message


def test_upload_over_the_size_limit_is_refused(client, server, files):
    import httpx

    with pytest.raises(ValueError, match="exceeds the maximum file size"):  # the client reads the app's limit
        client.predict(poster=handle_file(files["too_big_file"]), api_name="/predict")
    with files["too_big_file"].open("rb") as f:  # and the server enforces it for any other client
        response = httpx.post(server.url + "/gradio_api/upload", files={"files": f}, timeout=30)
    assert response.status_code == 413
    assert "1 MB" in response.text or "1048576" in response.text or "size" in response.text.lower()


def test_concurrent_calls_are_batched_without_mixing_answers(server, reference, files):
    """Good and bad requests at once: each good one gets its own movie's scores, each bad one its own error."""

    def call(i: int):
        c = api_client(server.url)
        try:
            if i % 3 == 2:
                return c.predict(plot=PLOTS[i % 4], poster=handle_file(files["text"]), api_name="/predict")
            return c.predict(plot=PLOTS[i % 4], api_name="/predict")
        except AppError as e:
            return e
        finally:
            c.close()

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(call, range(12)))
    for i, result in enumerate(results):
        if i % 3 == 2:
            assert isinstance(result, AppError) and "not a recognised image" in str(result)
        else:
            assert isinstance(result, dict), result
            assert _close(result["scores"], reference.predict(plot=PLOTS[i % 4])["scores"], 1e-4)


def test_explanations_over_the_api(client, reference, files):
    plain = client.predict(plot=PLOTS[2], poster=handle_file(files["good_png"]), api_name="/predict")
    assert "explanation" not in plain
    result = client.predict(plot=PLOTS[2], poster=handle_file(files["good_png"]), explain=True, api_name="/predict")
    assert _close(result["scores"], plain["scores"], 1e-6)
    explanation = result["explanation"]
    assert set(explanation["genres"]) == set(result["genres"])
    expected = reference.predict(plot=PLOTS[2], poster=Image.open(files["good_png"]), explain=True)["explanation"]
    assert explanation["text"] == expected["text"]
    for genre, entry in explanation["genres"].items():
        assert 0.0 <= entry["plot_share"] <= 1.0
        assert len(entry["occlusion"]) == 7 and all(len(row) == 7 for row in entry["occlusion"])
        want = expected["genres"][genre]["lexical"]
        assert [name for name, _ in entry["lexical"]["up"]] == [name for name, _ in want["up"]]
        assert [c for _, c in entry["lexical"]["up"]] == pytest.approx([c for _, c in want["up"]], abs=1e-5)
        assert entry["plot_share"] == pytest.approx(expected["genres"][genre]["plot_share"], abs=1e-4)
    # the tiny bundle's lexical branch learnt "old house at night" as Horror (app_helpers.LEXICAL_PLOTS)
    from mmgcs.inference import Predictor

    horror = Predictor(reference).explain(PLOTS[2], genres=["Horror"])["genres"]["Horror"]["lexical"]
    assert {name for name, _ in horror["up"][:4]} & {"house", "night", "old", "at night", "old house"}


@pytest.mark.parametrize("value", ["yes", 1, [True]])
def test_explain_must_be_a_boolean(client, value):
    with pytest.raises(AppError, match="`explain` must be true or false"):
        client.predict(plot=PLOTS[0], explain=value, api_name="/predict")


def test_server_is_healthy_after_the_bad_inputs(client, server):
    assert server.alive()
    assert client.predict(plot=PLOTS[2], api_name="/predict")["scores"]
    log = server.log_text()
    assert "Traceback" not in log, log[-3000:]  # bad input is a user error, not a server failure


# ------------------------------------------------------------------------------------------------------------------
# In-process: the parts of app.py not reachable through the API.


def import_app(bundle: Path, name: str, **extra_env: str):
    """app.py imported as a fresh module serving `bundle` (the environment is restored afterwards)."""
    import gradio.utils

    # GRADIO_TEMP_DIR as this process has it: the app would otherwise make (and set) a folder of its own
    env = {"MMGCS_MODEL": str(bundle), "MMGCS_EXAMPLES": "", "MMGCS_PRECISION": "fp32",
           "GRADIO_TEMP_DIR": gradio.utils.get_upload_folder(), **TEST_LIMITS, **extra_env}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        spec = importlib.util.spec_from_file_location(name, REPO / "app.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
        spec.loader.exec_module(module)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert not (REPO / "app.pyi").exists()  # no Gradio stub written next to the app
    return module


@pytest.fixture(scope="module")
def app_module(tmp_path_factory):
    return import_app(save_tiny_bundle(tmp_path_factory.mktemp("inproc") / "model"), "mmgcs_space_app")


def test_a_plot_only_model_ignores_a_poster_and_says_so(tmp_path, files):
    import gradio as gr

    from mmgcs.testing import tiny_model

    tiny_model(LABELS, image=False).save_pretrained(tmp_path / "text-only")
    app = import_app(tmp_path / "text-only", "mmgcs_space_app_text_only")
    assert app.SPACE.reads_plot and not app.SPACE.reads_poster
    result = app.predict(plot=PLOTS[0], poster=files["good_png"].read_bytes())  # in-process: bytes, as an upload gives
    assert result["notes"] == ["This model reads plots only; the poster was ignored."]
    assert set(result["by_modality"]) == {"text", "fused"}
    with pytest.raises(gr.Error, match="give a plot"):
        app.predict(poster=files["good_png"].read_bytes())


def test_an_internal_failure_reaches_the_user_without_details(app_module, monkeypatch):
    import gradio as gr

    def broken(plot, poster, title=None):
        raise RuntimeError("boom in /srv/secret/model.py")

    monkeypatch.setattr(app_module.SPACE, "predictor", broken)
    with pytest.raises(gr.Error) as err:
        app_module.predict(plot=PLOTS[0])
    assert "/srv/secret" not in str(err.value) and "boom" not in str(err.value)
    assert "Try again" in str(err.value)


def test_render_shows_verdict_scores_and_each_modality(app_module):
    result = app_module.predict(plot=PLOTS[3])
    verdict, scores, table = app_module.render(result, "Dr. *Strange* <b>love</b>")
    assert "Dr\\. \\*Strange\\* &lt;b&gt;love&lt;/b&gt;" in verdict  # the title is shown literally
    assert "Predicted genres:" in verdict and "Action" in verdict and "plot only" in verdict
    assert scores == result["scores"]
    rows = table.value["data"]
    assert [r[0] for r in rows] == sorted(LABELS, key=lambda g: -result["scores"][g])
    by_genre = {r[0]: r for r in rows}
    assert by_genre["Action"][5] == "✓" and by_genre["Comedy"][5] == ""
    assert all(r[2] == "—" for r in rows)  # no poster: its column is empty
    assert by_genre["Comedy"][4] == "100%"  # the per-genre threshold


@pytest.mark.parametrize(
    "env, message",
    [
        ({"MMGCS_MAX_BATCH": "lots"}, "MMGCS_MAX_BATCH='lots' is not a whole number; unset it to use 32"),
        ({"MMGCS_CONCURRENCY": "0"}, "MMGCS_CONCURRENCY=0 must be positive"),
        ({"MMGCS_PRECISION": "fp8"}, "fp32, bf16 or auto"),
    ],
    ids=["not-a-number", "not-positive", "unknown-precision"],
)
def test_a_bad_setting_stops_the_app_with_its_remedy(tmp_path, env, message):
    save_tiny_bundle(tmp_path / "model")
    with pytest.raises(SystemExit, match=message):
        import_app(tmp_path / "model", "mmgcs_space_app_bad_setting", **env)


def test_the_app_serves_with_the_settings_it_reports(app_module):
    from mmgcs.serving import BatchingPredictor, Limits

    assert app_module.LIMITS == Limits.from_env(TEST_LIMITS) != Limits()
    space = app_module.SPACE
    assert isinstance(space.predictor, BatchingPredictor)
    assert space.predictor.max_batch == app_module.LIMITS.max_batch
    assert space.predictor.precision == space.precision == app_module.model_info()["precision"] == "fp32"


def test_the_queue_summarizes_its_events_once_every_thousand_not_after_each(app_module, monkeypatch):
    queue = app_module.demo._queue  # Gradio's summary for its /monitoring page, rebuilt from every event it keeps
    built = []
    summarize = type(queue)._get_df
    monkeypatch.setattr(queue, "_get_df", lambda records: built.append(len(records)) or summarize(records))
    for counter in ("events_recorded", "event_count_at_last_cache"):  # given back after the test
        monkeypatch.setattr(queue, counter, getattr(queue, counter))
    record = {"time": 0.0, "status": "success", "process_time": 0.1, "function": "predict", "session_hash": "s"}
    for _ in range(1500):  # what the queue does after each event
        queue.events_recorded += 1
        queue.compute_analytics_summary([record])
    assert len(built) == 1


def test_the_page_shows_highlighted_words_and_a_heat_map(app_module):
    from mmgcs.uploads import UploadedPoster

    poster = io.BytesIO()
    Image.new("RGB", (40, 60), (20, 20, 20)).save(poster, format="PNG")
    upload = UploadedPoster(poster.getvalue(), "The poster")
    result = app_module.predict(plot=PLOTS[2], poster=poster.getvalue(), explain=True)
    genre, words, heat = app_module.explanation_view(result, None, upload)
    first = next(iter(result["explanation"]["genres"]))
    assert genre.value == first and genre.choices
    assert "".join(segment for segment, _ in words) == result["explanation"]["text"]  # the whole plot, in order
    assert all(score is None or -1.0 <= score <= 1.0 for _, score in words)
    assert any(score for _, score in words)
    assert heat.size == (40, 60)
    # the heat map's colours: tests/test_render.py
    assert app_module.explanation_view({"scores": {}, "genres": []}, None, None)[1:] == (None, None)


def test_starting_the_space_warms_the_model_up_then_serves_with_the_body_limit(app_module, monkeypatch):
    from mmgcs.space_guards import max_request_bytes

    calls = []
    monkeypatch.setattr(app_module, "warm_up", lambda space: calls.append(("warm_up", space)))
    monkeypatch.setattr(app_module.demo, "launch", lambda **kwargs: calls.append(("launch", kwargs)))
    # recorded, not run: refusing matplotlib here would refuse it to the rest of this test process, and a SIGTERM
    # handler would be this test process's
    monkeypatch.setattr(app_module, "refuse_imports", lambda *names: calls.append(("refuse_imports", names)))
    monkeypatch.setattr(app_module, "clean_up_at_exit", lambda *args: calls.append(("clean_up_at_exit", args)))

    class Predictor:
        def close(self, **kwargs):
            calls.append(("close", kwargs))

    monkeypatch.setattr(app_module.SPACE, "predictor", Predictor())
    app_module.main()
    assert [c[0] for c in calls] == ["refuse_imports", "clean_up_at_exit", "warm_up", "launch", "close"]
    assert calls[4][1]["cancel_pending"]  # once stopped, no model call waits: the process exits cleanly
    assert calls[0][1] == ("matplotlib",) and calls[2][1] is app_module.SPACE
    assert calls[1][1] == (app_module.UPLOAD_FOLDER, False)  # GRADIO_TEMP_DIR was set: not the app's own folder
    launch = calls[3][1]
    assert launch["show_error"] is False and launch["max_file_size"] == app_module.LIMITS.max_file_mb * 2**20
    body, uploads, jobs = launch["app_kwargs"]["middleware"]
    assert body.kwargs["max_bytes"] == max_request_bytes(app_module.LIMITS)
    assert uploads.kwargs["folder"].max_bytes == app_module.LIMITS.max_upload_folder_mb * 2**20
    assert jobs.kwargs["quota"].max_per_ip == app_module.LIMITS.max_jobs_per_ip
    (reroute,) = jobs.kwargs["reroutes"]
    fns = app_module.demo.fns
    assert fns[reroute.source].api_name == "predict" and fns[reroute.target].api_name == "predict_explained"
    assert fns[reroute.target].concurrency_id == "explain" != fns[reroute.source].concurrency_id
    assert fns[reroute.target].concurrency_limit == app_module.LIMITS.explain_concurrency


def test_the_warm_up_predicts_once_with_what_the_model_reads(app_module, monkeypatch):
    seen = []
    monkeypatch.setattr(app_module.SPACE, "predictor", lambda plot, poster: seen.append((plot, poster)))
    app_module.warm_up(app_module.SPACE)
    ((plot, poster),) = seen
    assert plot and poster.size == (64, 96)


def test_app_without_a_model_exits_with_the_remedy(tmp_path):
    import subprocess

    from app_helpers import app_env

    run = subprocess.run(
        [sys.executable, "app.py"], cwd=REPO, env=app_env(tmp_path / "no-model"), capture_output=True, text=True,
        timeout=120,
    )
    assert run.returncode == 1
    assert "train_fusion.py" in run.stderr and "MMGCS_MODEL" in run.stderr
    assert "Traceback" not in run.stderr


def test_examples_come_from_the_users_dataset(app_module, tmp_path):
    import datasets

    features = datasets.Features(
        {
            "id": datasets.Value("int64"),
            "title": datasets.Value("string"),
            "plot": datasets.Value("string"),
            "poster": datasets.Image(),
            "genres": datasets.Sequence(datasets.ClassLabel(names=LABELS)),
            "source": datasets.Value("string"),
        }
    )
    poster = Image.new("RGB", (40, 60), (10, 90, 200))
    rows = {
        "id": [1, 2, 3, 4],
        "title": ["No Poster", "Night House", "Same Genres", "Desert War"],
        "plot": ["A plot.", PLOTS[2], PLOTS[2], PLOTS[3]],
        "poster": [None, poster, poster, poster],
        "genres": [[0], [3], [3], [0, 2]],
        "source": ["test"] * 4,
    }
    (tmp_path / "data").mkdir()
    for split in ("train", "validation", "test"):
        datasets.Dataset.from_dict(rows, features=features).to_parquet(
            str(tmp_path / "data" / f"{split}-00000-of-00001.parquet")
        )
    examples = app_module.load_examples(str(tmp_path), n=4)
    # no poster → skipped; "Same Genres" adds no genre not already shown → skipped
    assert [e[0] for e in examples] == ["Night House", "Desert War"]
    for title, plot, file in examples:
        assert Image.open(file).size == (40, 60)
        assert not Path(file).is_relative_to(REPO)  # posters never land in the repository
    assert app_module.load_examples(str(tmp_path / "absent")) == []
