"""mmgcs.serving without Gradio: the micro-batcher, limits and precision from the environment, model loading."""

from __future__ import annotations

import json

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import PIL.Image
import pytest

from mmgcs.serving import (
    BatchingPredictor,
    Limits,
    MicroBatcher,
    ModelNotFoundError,
    ServingConfigError,
    choose_precision,
    cpu_has_native_bf16,
    load_model,
)
from mmgcs.testing import tiny_model

LABELS = ["Action", "Comedy", "Drama", "Horror"]
PLOTS = [
    "A retired detective hunts a serial killer through the rainy streets of the city.",
    "Two friends open a bakery in Paris and fall in love with the same singer.",
    "A family moves into an old house where something waits in the cellar at night.",
    "Soldiers cross the desert to rescue a captured pilot before the war ends.",
]
WAIT = 30  # seconds; only reached when something is broken


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


class GatedSquares:
    """A batch function that records its batches, fails on negative items, and holds its first call until
    released (so that the test controls which requests queue up behind it)."""

    def __init__(self):
        self.batches: list[list[int]] = []
        self.started = threading.Event()
        self.release = threading.Event()

    def __call__(self, items: list[int]) -> list[int]:
        self.started.set()
        self.release.wait(WAIT)
        self.batches.append(list(items))
        if any(x < 0 for x in items):
            raise ValueError(f"negative item in {items}")
        return [x * x for x in items]


@pytest.fixture
def gated():
    fn = GatedSquares()
    batcher = MicroBatcher(fn, max_batch=4)
    yield fn, batcher
    fn.release.set()
    batcher.close(timeout=WAIT)


def test_requests_queued_while_busy_run_as_one_batch_and_each_caller_gets_its_own_answer(gated):
    fn, batcher = gated
    first = batcher.submit(10)
    assert fn.started.wait(WAIT)
    later = {x: batcher.submit(x) for x in (1, 2, 3, 4, 5, 6)}
    wait_for(lambda: batcher.pending() == 6, "6 queued requests")
    fn.release.set()
    assert first.result(WAIT) == 100
    assert {x: f.result(WAIT) for x, f in later.items()} == {x: x * x for x in later}
    assert fn.batches == [[10], [1, 2, 3, 4], [5, 6]]  # at most max_batch at once, in arrival order


def test_a_failing_item_fails_alone(gated):
    fn, batcher = gated
    batcher.submit(0)
    assert fn.started.wait(WAIT)
    futures = {x: batcher.submit(x) for x in (2, -3, 4)}
    wait_for(lambda: batcher.pending() == 3, "3 queued requests")
    fn.release.set()
    assert futures[2].result(WAIT) == 4 and futures[4].result(WAIT) == 16
    with pytest.raises(ValueError, match=r"negative item in \[-3\]"):
        futures[-3].result(WAIT)
    assert fn.batches[1] == [2, -3, 4]  # the shared batch failed, then each item ran alone
    assert sorted(map(tuple, fn.batches[2:])) == [(-3,), (2,), (4,)]
    assert batcher(5) == 25  # the worker is still serving


def test_a_single_caller_does_not_wait_for_company():
    batcher = MicroBatcher(lambda items: [x + 1 for x in items], max_batch=32)
    try:
        start = time.perf_counter()
        assert [batcher(i) for i in range(20)] == list(range(1, 21))
        assert time.perf_counter() - start < WAIT
    finally:
        batcher.close(timeout=WAIT)
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(1)


def test_a_wrong_number_of_results_is_an_error_not_a_mix_up():
    batcher = MicroBatcher(lambda items: items[:1], max_batch=8)  # drops all but the first answer of a batch
    try:
        assert batcher(7) == 7
        with ThreadPoolExecutor(6) as pool:  # batched or not, every caller gets its own answer, none hangs
            assert list(pool.map(lambda x: batcher.submit(x).result(WAIT), range(6))) == list(range(6))
    finally:
        batcher.close(timeout=WAIT)
    with pytest.raises(ValueError, match="at least 1"):
        MicroBatcher(lambda items: items, max_batch=0)


# ---------------------------------------------------------------------------------------------------------------
# BatchingPredictor over a real (tiny) model.


@pytest.fixture(scope="module")
def model():
    return tiny_model(LABELS, thresholds=[0.0, 1.0, 0.5, 0.5]).eval()


def _poster(color) -> PIL.Image.Image:
    return PIL.Image.new("RGB", (40, 60), color)


def test_concurrent_predictions_each_get_their_own_movie(model):
    predictor = BatchingPredictor(model, max_batch=8)
    inputs = [(PLOTS[i % 4], _poster((40 * i, 20, 200 - 20 * i)) if i % 2 else None) for i in range(10)]
    inputs.append((None, _poster((0, 200, 0))))
    inputs.append((PLOTS[0], b"not an image"))  # fails inside the model's batch
    try:
        futures = [predictor.submit((plot, poster)) for plot, poster in inputs]  # as concurrent callers do
        for (plot, poster), future in zip(inputs[:-1], futures):
            expected = model.predict(plot=plot, poster=poster, by_modality=True)
            result = future.result(WAIT)
            assert result["genres"] == expected["genres"]
            assert result["scores"] == pytest.approx(expected["scores"], abs=1e-5)
            assert set(result["by_modality"]) == set(expected["by_modality"])
            for view, scores in expected["by_modality"].items():
                assert result["by_modality"][view] == pytest.approx(scores, abs=1e-5)
            assert all(type(p) is float for p in result["scores"].values())  # plain JSON types
        with pytest.raises(ValueError, match="not a recognised image"):
            futures[-1].result(WAIT)
    finally:
        predictor.close(timeout=WAIT)


def test_bfloat16_serving_stays_close_to_float32(model):
    fast = BatchingPredictor(model, max_batch=8, precision="bf16")
    try:
        exact = model.predict(plot=PLOTS[0], by_modality=True)
        result = fast(PLOTS[0], None)
    finally:
        fast.close(timeout=WAIT)
    assert result["scores"].keys() == exact["scores"].keys()
    assert result["scores"] == pytest.approx(exact["scores"], abs=0.02)
    assert result["scores"] != pytest.approx(exact["scores"], abs=1e-7)  # bfloat16 really ran
    with pytest.raises(ValueError, match="choose_precision"):
        BatchingPredictor(model, max_batch=8, precision="auto")


def test_the_title_reaches_a_model_trained_with_titles():
    titled = tiny_model(LABELS, image=False).eval()
    titled.config.text_template = "{title}. {plot}"
    predictor = BatchingPredictor(titled, max_batch=4)
    try:
        plot = "A retired soldier must save his daughter."
        served = predictor(plot, None, "Taken")
        assert served["scores"] == pytest.approx(titled.predict(plot=f"Taken. {plot}")["scores"], abs=1e-6)
        assert predictor.submit((plot, None)).result(WAIT)["scores"] == pytest.approx(
            titled.predict(plot=plot)["scores"], abs=1e-6
        )
    finally:
        predictor.close(timeout=WAIT)


# ---------------------------------------------------------------------------------------------------------------
# Settings and loading.


def test_limits_from_the_environment():
    assert Limits.from_env({}) == Limits()
    limits = Limits.from_env({"MMGCS_MAX_PLOT_CHARS": "2_000", "MMGCS_MAX_BATCH": " 8 ", "MMGCS_QUEUE_SIZE": ""})
    assert (limits.max_plot_chars, limits.max_batch, limits.queue_size) == (2000, 8, Limits().queue_size)
    with pytest.raises(ServingConfigError, match=r"MMGCS_MAX_FILE_MB='ten' is not a whole number; unset it to use 10\."):
        Limits.from_env({"MMGCS_MAX_FILE_MB": "ten"})
    with pytest.raises(ServingConfigError, match="MMGCS_CONCURRENCY=-1 must be positive; unset it to use 16"):
        Limits.from_env({"MMGCS_CONCURRENCY": "-1"})


def test_precision_setting():
    assert choose_precision("cpu", {"MMGCS_PRECISION": "fp32"}) == "fp32"
    assert choose_precision("cpu", {"MMGCS_PRECISION": " BF16 "}) == "bf16"
    assert choose_precision("cuda", {"MMGCS_PRECISION": "auto"}) == "fp32"
    assert choose_precision("cpu", {}) == "fp32"  # a bundle tuned in fp32 (the default) serves in fp32
    assert choose_precision("cpu", {}, tuned="bf16") == ("bf16" if cpu_has_native_bf16() else "fp32")
    with pytest.raises(ServingConfigError, match="fp32, bf16 or auto"):
        choose_precision("cpu", {"MMGCS_PRECISION": "fp8"})


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_follows_the_bundle_where_the_cpu_has_it(monkeypatch, native):
    """One policy: a bundle tuned in bf16 serves in bf16 on a CPU with native bfloat16 and in fp32 on one without;
    a bundle tuned in fp32 serves in fp32 everywhere; an explicit setting wins."""
    import mmgcs.serving as serving

    monkeypatch.setattr(serving, "cpu_has_native_bf16", lambda: native)
    assert choose_precision("cpu", {}, tuned="bf16") == ("bf16" if native else "fp32")
    assert choose_precision("cpu", {}, tuned="fp32") == "fp32"
    assert choose_precision("cuda", {}, tuned="bf16") == "fp32"
    assert choose_precision("cpu", {"MMGCS_PRECISION": "bf16"}, tuned="fp32") == "bf16"
    assert choose_precision("cpu", {"MMGCS_PRECISION": "fp32"}, tuned="bf16") == "fp32"


def test_a_bundle_records_its_tuned_precision(model, tmp_path):
    from mmgcs.hub.errors import BundleError
    from mmgcs.models.classifier import GenreClassifier

    assert model.config.tuned_precision == "fp32"
    model.config.tuned_precision = "bf16"
    model.save_pretrained(tmp_path / "bf16")
    assert GenreClassifier.from_pretrained(tmp_path / "bf16").config.tuned_precision == "bf16"
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    config["tuned_precision"] = "fp8"
    (tmp_path / "bf16" / "config.json").write_text(json.dumps(config))
    with pytest.raises(BundleError, match="tuned_precision"):
        GenreClassifier.from_pretrained(tmp_path / "bf16")


def test_load_model(model, tmp_path):
    with pytest.raises(ModelNotFoundError, match="No model at .*train_fusion.py.*MMGCS_MODEL"):
        load_model(str(tmp_path / "no-such-run" / "model"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(ModelNotFoundError, match="Could not load the model .*train_fusion.py"):
        load_model(str(tmp_path / "broken"))
    model.save_pretrained(tmp_path / "bundle")
    loaded = load_model(str(tmp_path / "bundle"))
    assert not loaded.training and loaded.config.labels == LABELS


def test_load_model_out_of_memory_names_memory_not_training(model, tmp_path, monkeypatch):
    """A bundle that does not fit in memory is fine: the server says memory, never "train one"."""
    from mmgcs.hub.errors import BundleMemoryError
    from mmgcs.models.classifier import GenreClassifier

    model.save_pretrained(tmp_path / "bundle")

    def no_memory(*args, **kwargs):
        raise BundleMemoryError("Out of memory while loading the model: it needs about 160 MB; free memory")

    monkeypatch.setattr(GenreClassifier, "from_pretrained", no_memory)
    with pytest.raises(ModelNotFoundError) as info:
        load_model(str(tmp_path / "bundle"))
    assert "Out of memory" in str(info.value) and "train_fusion.py" not in str(info.value)



# ---------------------------------------------------------------------------------------------------------------
# Explanations apart (issue 18): their own worker, at a lower CPU priority, never holding up the plain batches.


def test_an_explanation_never_holds_up_plain_predictions(model):
    predictor = BatchingPredictor(model, max_batch=8)
    explaining, release = threading.Event(), threading.Event()
    plain_predict = predictor.predictor.predict

    def slow_explain(*args, explain=False, **kwargs):
        if explain:
            explaining.set()
            release.wait(WAIT)
        return plain_predict(*args, explain=explain, **kwargs)

    predictor.predictor.predict = slow_explain
    try:
        with ThreadPoolExecutor(2) as pool:
            explained = pool.submit(predictor, PLOTS[2], _poster((20, 20, 20)), None, True)
            assert explaining.wait(WAIT)
            start = time.perf_counter()
            plain = predictor(PLOTS[0], None)  # served while the explanation is still running
            assert time.perf_counter() - start < WAIT / 3 and not explained.done()
            assert plain["scores"] == pytest.approx(model.predict(plot=PLOTS[0])["scores"], abs=1e-5)
            release.set()
            assert set(explained.result(WAIT)["explanation"]["genres"]) == set(explained.result()["genres"])
    finally:
        release.set()
        predictor.close(timeout=WAIT)
    assert not predictor.explainer._worker.is_alive() and not predictor._worker.is_alive()


@pytest.mark.skipif(not hasattr(os, "getpriority"), reason="thread priorities are a Linux feature here")
def test_the_explainer_runs_at_a_lower_priority():
    from mmgcs.serving import EXPLAIN_NICE, lower_thread_priority

    seen = {}

    def run():
        tid = threading.get_native_id()
        before = os.getpriority(os.PRIO_PROCESS, tid)
        seen["took"] = lower_thread_priority(EXPLAIN_NICE)
        seen["delta"] = os.getpriority(os.PRIO_PROCESS, tid) - before

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(WAIT)
    assert seen["took"] and seen["delta"] == min(EXPLAIN_NICE, 19 - os.getpriority(os.PRIO_PROCESS, 0))
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) <= os.getpriority(os.PRIO_PROCESS, 0)


def test_the_guard_limits_from_the_environment():
    limits = Limits.from_env({"MMGCS_EXPLAIN_CONCURRENCY": "2", "MMGCS_MAX_JOBS_PER_SESSION": "3",
                              "MMGCS_MAX_JOBS_PER_IP": "9", "MMGCS_MAX_UPLOAD_FOLDER_MB": "64",
                              "MMGCS_MAX_UPLOAD_AGE_S": "600"})
    assert (limits.explain_concurrency, limits.max_jobs_per_session, limits.max_jobs_per_ip,
            limits.max_upload_folder_mb, limits.max_upload_age_s) == (2, 3, 9, 64, 600)
    defaults = Limits()
    assert defaults.explain_concurrency == 1 < defaults.max_jobs_per_session <= defaults.max_jobs_per_ip
    with pytest.raises(ServingConfigError, match="MMGCS_MAX_JOBS_PER_IP=0 must be positive"):
        Limits.from_env({"MMGCS_MAX_JOBS_PER_IP": "0"})


def test_closing_for_a_shutdown_cancels_what_waits_and_lets_the_running_call_finish(gated):
    fn, batcher = gated
    running = batcher.submit(1)
    assert fn.started.wait(WAIT)
    waiting = [batcher.submit(x) for x in (2, 3)]
    wait_for(lambda: batcher.pending() == 2, "2 queued requests")
    closer = threading.Thread(target=batcher.close, kwargs={"timeout": WAIT, "cancel_pending": True})
    closer.start()  # while the worker still runs its call
    wait_for(lambda: all(f.cancelled() for f in waiting), "the waiting requests cancelled")
    fn.release.set()
    closer.join(WAIT)
    assert running.result(WAIT) == 1
    assert not batcher._worker.is_alive() and fn.batches == [[1]]
