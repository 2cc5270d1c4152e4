"""/predict_batch (issue 20): several movies a call, answered through the same batcher as /predict. The app runs in a
subprocess with the tiny bundle and is called with gradio_client, as tests/test_app.py does; the batcher's groups
are tested without Gradio."""

from __future__ import annotations

import json
import threading

import pytest

from mmgcs.serving import MicroBatcher
from test_serving import WAIT, GatedSquares, wait_for


# ------------------------------------------------------------------------------------------------ the batcher
@pytest.fixture
def gated():
    fn = GatedSquares()
    batcher = MicroBatcher(fn, max_batch=4)
    yield fn, batcher
    fn.release.set()
    batcher.close(timeout=WAIT)


def test_a_group_is_taken_whole_and_split_only_at_max_batch_in_order(gated):
    fn, batcher = gated
    batcher.submit(10)
    assert fn.started.wait(WAIT)
    before = batcher.submit(1)
    group = batcher.submit_many([2, 3, 4, 5, 6, 7])
    after = batcher.submit(8)
    wait_for(lambda: batcher.pending() == 3, "a request, a group and a request queued")
    fn.release.set()
    assert [f.result(WAIT) for f in (before, *group, after)] == [x * x for x in range(1, 9)]
    # a group's rest runs first in the next batch, before what was queued after it
    assert fn.batches == [[10], [1, 2, 3, 4], [5, 6, 7, 8]]


def test_a_group_queued_alone_runs_as_one_call():
    batches = []
    batcher = MicroBatcher(lambda items: batches.append(list(items)) or items, max_batch=32)
    try:
        for _ in range(20):  # the worker is idle: it must not start on the group's first item alone
            assert [f.result(WAIT) for f in batcher.submit_many(list(range(16)))] == list(range(16))
        assert batches == [list(range(16))] * 20
        assert batcher.submit_many([]) == []
    finally:
        batcher.close(timeout=WAIT)


def test_a_failing_item_of_a_group_fails_alone(gated):
    fn, batcher = gated
    batcher.submit(0)
    assert fn.started.wait(WAIT)
    futures = batcher.submit_many([2, -3, 4])
    wait_for(lambda: batcher.pending() == 1, "the group queued")
    fn.release.set()
    assert futures[0].result(WAIT) == 4 and futures[2].result(WAIT) == 16
    with pytest.raises(ValueError, match=r"negative item in \[-3\]"):
        futures[1].result(WAIT)


class OneCallAtATime:
    """A batch function that records its batches and runs each only when the test allows it."""

    def __init__(self):
        self.batches: list[list[int]] = []
        self.allowed = threading.Semaphore(0)

    def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        assert self.allowed.acquire(timeout=WAIT)
        return [x * x for x in items]


def test_shutting_down_cancels_what_waits_and_the_rest_of_a_group_being_run():
    fn = OneCallAtATime()
    batcher = MicroBatcher(fn, max_batch=4)
    running = batcher.submit_many([1, 2, 3, 4, 5, 6])  # [1, 2, 3, 4] runs, [5, 6] is held by the worker
    wait_for(lambda: fn.batches == [[1, 2, 3, 4]], "the group's first batch running")
    queued = batcher.submit_many([7, 8])
    closing = threading.Thread(target=batcher.close, kwargs={"timeout": WAIT, "cancel_pending": True})
    closing.start()
    wait_for(lambda: batcher._cancelling, "close to begin")
    fn.allowed.release()  # the running call finishes
    closing.join(WAIT)
    assert [f.result(WAIT) for f in running[:4]] == [1, 4, 9, 16]
    assert all(f.cancelled() for f in (*running[4:], *queued))
    assert fn.batches == [[1, 2, 3, 4]]


# ----------------------------------------------------------------------------------------------- the endpoint
pytest.importorskip("gradio")
from gradio_client import handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from app_helpers import REPO, api_client, shared_app_server  # noqa: E402
from test_app import PLOTS, _close, files, import_app  # noqa: E402,F401  (files: the posters fixture)

from mmgcs.space import MODEL_FAILED  # noqa: E402

BATCH = "/predict_batch"
FILE_DATA = {"_type": "gradio.FileData"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    return shared_app_server(tmp_path_factory)


@pytest.fixture(scope="module")
def client(server):
    c = api_client(server.url)
    yield c
    c.close()


def test_the_api_page_documents_predict_batch(client):
    named = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert [p["parameter_name"] for p in named[BATCH]["parameters"]] == ["movies"]
    assert client.predict(api_name="/model_info")["limits"]["max_batch_movies"] == 16


def test_each_answer_equals_the_single_predict_answer(client, files):
    movies = [
        {"plot": PLOTS[0]},
        {"poster": handle_file(files["good_png"])},
        {"plot": PLOTS[1], "poster": handle_file(files["good_jpg"]), "title": "Amélie"},
        {"plot": PLOTS[2], "title": None, "poster": None},
        {"plot": PLOTS[3], "poster": handle_file(files["good_png"])},
    ]
    answers = client.predict(movies=movies, api_name=BATCH)
    assert len(answers) == len(movies)
    for movie, answer in zip(movies, answers):
        single = client.predict(**movie, api_name="/predict")
        assert answer.keys() == single.keys() and answer["genres"] == single["genres"]
        assert _close(answer["scores"], single["scores"], 1e-5)
        assert answer["by_modality"].keys() == single["by_modality"].keys()
        for view, scores in single["by_modality"].items():
            assert _close(answer["by_modality"][view], scores, 1e-5)
    assert not _close(answers[0]["scores"], answers[3]["scores"], 1e-3)  # each movie its own answer


def test_unusable_movies_are_answered_by_index_and_the_others_still_are(client, files):
    movies = [
        {"plot": PLOTS[0]},
        {},
        {"poster": handle_file(files["text"])},
        {"plot": PLOTS[1], "poster": handle_file(files["truncated"])},
        {"poster": handle_file(files["too_many_pixels"])},
        {"plot": "word " * 500},
        {"plot": PLOTS[2], "title": "T" * 301},
        {"plot": PLOTS[3]},
    ]
    answers = client.predict(movies=movies, api_name=BATCH)
    expected = {1: "Nothing to classify", 2: "not a recognised image", 3: "truncated", 4: "over the limit of 1,000,000",
                5: "limit is 2,000", 6: "limit is 300"}
    for i, answer in enumerate(answers):
        if i in expected:
            assert answer["index"] == i and expected[i] in answer["error"], (i, answer)
            assert "Traceback" not in answer["error"] and str(REPO) not in answer["error"]
        else:
            assert answer["scores"] and "error" not in answer
    assert _close(answers[7]["scores"], client.predict(plot=PLOTS[3], api_name="/predict")["scores"], 1e-5)


@pytest.mark.parametrize("movies, message", [
    ([{"plot": "a plot"}] * 17, "at most 16 movies a call; the request sent 17"),
    ([], "a list of 1 to 16 objects"),
    ("a plot", "a list of 1 to 16 objects"),
    ([{"plot": "a plot"}, "a plot"], "movies[1] must be an object"),
    ([{"plot": "a plot"}, {"plot": "b", "genre": "x"}], "movies[1] has unknown keys ['genre']"),
    ([{"plot": 3}], "movies[0]: `plot` must be text or null, not int"),
    ([{"plot": "a plot"}, {"poster": "/etc/passwd"}], "movies[1]: `poster` must be a file"),
], ids=["over-the-cap", "empty", "not-a-list", "not-an-object", "unknown-key", "plot-not-text", "poster-a-string"])
def test_a_malformed_call_is_refused_whole_naming_the_movie(client, movies, message):
    with pytest.raises(AppError) as err:
        client.predict(movies=movies, api_name=BATCH)
    assert message in str(err.value)


def _raw_call(server, data: list) -> tuple[str, object]:
    """POST /gradio_api/call/predict_batch as a raw client: (the final event, its data)."""
    import httpx

    r = httpx.post(server.url + "/gradio_api/call/predict_batch", json={"data": data}, timeout=WAIT)
    assert r.status_code == 200, r.text
    text = httpx.get(server.url + f"/gradio_api/call/predict_batch/{r.json()['event_id']}", timeout=WAIT).text
    events = [line.split(": ", 1)[1] for line in text.splitlines() if line.startswith(("event:", "data:"))]
    return events[-2], json.loads(events[-1])


def test_a_server_file_is_never_read_through_a_batch(server, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("MMGCS-SECRET-7f3a")
    for poster in ({"path": str(secret), "meta": FILE_DATA}, {"path": str(secret)}, {"path": "/etc/passwd", "meta": FILE_DATA}):
        event, data = _raw_call(server, [[{"plot": "a plot"}, {"poster": poster}]])
        assert event == "error" and data["error"], data
        assert "MMGCS-SECRET" not in json.dumps(data) and "root:" not in json.dumps(data)
    assert _raw_call(server, [[{"plot": "a plot"}]])[0] == "complete"  # the server still answers


def test_a_batch_cannot_run_outside_the_queue(server):
    import httpx

    r = httpx.post(server.url + "/gradio_api/run/predict_batch", json={"data": [[{"plot": "a plot"}]]}, timeout=WAIT)
    # api_open=False: only the queue runs it, so its caps and concurrency hold for batches too
    assert r.status_code == 404 and "join the queue" in r.text


# ------------------------------------------------------------------------------------------------ in-process
@pytest.fixture(scope="module")
def app_module(tmp_path_factory):
    from app_helpers import save_tiny_bundle

    return import_app(save_tiny_bundle(tmp_path_factory.mktemp("batch") / "model"), "mmgcs_space_app_batch")


def test_a_batchs_posters_within_a_small_pixel_budget_are_all_answered(app_module, files, monkeypatch):
    from mmgcs.uploads import PixelBudget

    # room for one poster at a time: the call sends what it holds before decoding the next, never waiting on itself
    monkeypatch.setattr(app_module.SPACE, "pixel_budget", PixelBudget(60 * 90, timeout=5))
    poster = files["good_png"].read_bytes()
    answers = app_module.predict_batch([{"plot": PLOTS[i % 4], "poster": poster} for i in range(6)])
    assert all(a["scores"] and "error" not in a for a in answers), answers
    assert app_module.SPACE.pixel_budget.in_use == 0  # every poster's pixels given back


def test_a_model_failure_is_that_movies_error_without_details(app_module, monkeypatch):
    real = app_module.SPACE.predictor.predictor.predict_batch

    def failing_on_ghosts(plots, *args, **kwargs):
        if any(p and "ghost" in p for p in plots):
            raise RuntimeError("/secret/path exploded")
        return real(plots, *args, **kwargs)

    monkeypatch.setattr(app_module.SPACE.predictor.predictor, "predict_batch", failing_on_ghosts)
    answers = app_module.predict_batch([{"plot": "A ghost in the attic."}, {"plot": PLOTS[0]}])
    assert answers[0] == {"index": 0, "error": MODEL_FAILED}
    assert answers[1]["scores"]


def test_the_server_logged_no_traceback(server):
    assert server.alive()
    assert "Traceback" not in server.log_text(), server.log_text()[-3000:]  # every refusal above was a message
