"""Serving a GenreClassifier to many concurrent callers: input limits from the environment, the numeric
precision, loading the model for a server, and a micro-batcher that runs the requests queued while the model
was busy as one batch. The Space (`app.py`) is a UI over this; nothing here needs Gradio.

    limits = Limits.from_env()                       # MMGCS_MAX_PLOT_CHARS, ... (see Limits)
    model = load_model("runs/fusion/model")          # a folder or a Hub id; ModelNotFoundError says what to do
    predictor = BatchingPredictor(model, limits.max_batch, choose_precision(model.device.type))
    predictor("A plot...", poster_image, "A title")  # {"scores", "genres", "by_modality"}, plain JSON types
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import queue
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from mmgcs.data.images import MAX_IMAGE_PIXELS
from mmgcs.data.records import MAX_PLOT_CHARS
from mmgcs.fast_path import fast_path_setting
from mmgcs.inference import Predictor
from mmgcs.models.load import ModelNotFoundError, load_model  # the one model loader (issue 22); re-exported
from mmgcs.runtime import PeriodicTrim

PRECISIONS = ("auto", "fp32", "bf16")
# On the fast path the worker's batch runs as chunks of this many movies, sorted by plot length: the text tower
# pads a chunk to its longest plot, and small chunks keep activations in cache. On 2 cores
# (benchmarks/bench_predict.py, fast path, one thread) a MiniLM movie took ~19 ms at chunks of 1 and 4, 22 at 8, 26
# at 16, 32 at 32. For mpnet the padding is most of the difference: batches of 12 of the bench's TMDb movies pad
# 21 % more tokens at chunks of 4 than of 1 (7.5 % at 2), and the ONNX text tower took 144 ms of CPU a plot at
# chunks of 1 and 2, 155 at 4, 221 at 12 (one thread, 4 x 48 plots); the whole path 203-211 ms a movie at 2 vs
# 207-241 at 4. The eager towers (bf16) keep the whole batch as one chunk: at chunks of 4 the app at 16 callers fell
# from 47.5 to 32-38 movies/s (benchmarks/bench_app_load.py, bf16, idle machine).
SERVE_CHUNK = 2
# Decoding posters on 16 request threads while the batches run leaves freed pages scattered over glibc's heaps: the
# app's memory climbed ~200 MB under 16 callers. Trimming after a batch, at most this often, cost ~5 ms a trim
# (benchmarks/bench_app_load.py, MiniLM + Lite0, 16 callers: peak 1,545 MB untrimmed, 1,521 every 2 s, 1,501 every
# 0.5 s; same movies/s).
TRIM_INTERVAL_S = 1.0


class ServingConfigError(ValueError):
    """A serving setting in the environment is invalid; the message names the variable and the fix."""


# ----------------------------------------------------------------------------------------------------- limits
def env_int(name: str, default: int, environ: Optional[Mapping[str, str]] = None) -> int:
    """A positive whole number from the environment (`10_000` allowed), or `default` when unset or empty."""
    environ = os.environ if environ is None else environ
    raw = environ.get(name, "").strip().replace("_", "")
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ServingConfigError(f"{name}={environ[name]!r} is not a whole number; unset it to use {default}.") from None
    if value <= 0:
        raise ServingConfigError(f"{name}={value} must be positive; unset it to use {default}.")
    return value


@dataclass(frozen=True)
class Limits:
    """What one request may send, and how many are served at once. Each field is read from `MMGCS_<FIELD>`."""

    # TMDb overviews are under 1,000 characters and Wikipedia plots a few thousand. The text tower reads only its
    # first `max_text_length` tokens; far longer text is refused, as it is not a plot summary.
    max_plot_chars: int = MAX_PLOT_CHARS  # the cap of every entry point (mmgcs.data.records)
    max_image_pixels: int = MAX_IMAGE_PIXELS
    # Decoded poster pixels all requests may hold at once (a 78 KB PNG can decode to 40 MP, 120 MB of RGB);
    # 4 of the largest posters, ~0.5 GB. A request beyond it waits for others (see mmgcs.uploads.PixelBudget).
    max_decoded_pixels: int = 4 * MAX_IMAGE_PIXELS
    # A poster is ~15 KB-2 MB; 10 MB leaves room for a phone photo of one.
    max_file_mb: int = 10
    # Requests validated and decoded at once; their model work is batched (see BatchingPredictor).
    concurrency: int = 16
    queue_size: int = 256
    max_batch: int = 32
    # Movies one /predict_batch call may send. Its movies join the same micro-batches as single requests, and a batch
    # job counts as its movies against the per-client caps; 16 keep one call's answer within a second or two on CPU.
    max_batch_movies: int = 16
    # Explained requests computed at once. They have their own queue share (an explanation costs ~6x a plain
    # prediction) and run on their own worker at a lower CPU priority, so plain predictions keep their latency.
    explain_concurrency: int = 1
    # Jobs one client may have queued or running at once, counted by its session and by its address
    # (mmgcs.quotas.JobQuota); one more is refused when it joins (HTTP 429), before it waits in the queue.
    max_jobs_per_session: int = 4
    max_jobs_per_ip: int = 32
    # The upload folder: files older than this are deleted (Gradio's delete_cache, checked every
    # max_upload_age_s / 6), and uploads are refused while the folder holds more than max_upload_folder_mb.
    max_upload_age_s: int = 1800
    max_upload_folder_mb: int = 1024

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None) -> "Limits":
        return cls(**{
            f.name: env_int(f"MMGCS_{f.name.upper()}", f.default, environ) for f in dataclasses.fields(cls)
        })


# -------------------------------------------------------------------------------------------------- precision
def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def choose_precision(device_type: str, environ: Optional[Mapping[str, str]] = None, tuned: str = "fp32") -> str:
    """`MMGCS_PRECISION`: fp32, bf16, or auto (default) = the precision the bundle was tuned at (`tuned`, its
    config's `tuned_precision`) where this device runs it natively, else fp32.

    One policy with training: a bundle's thresholds hold for the scores of the precision they were tuned at. Serving
    an fp32-tuned bundle in bfloat16 moved scores by 0.002 on average and at most 0.08 (a trained MiniLM +
    EfficientNet-Lite0 attention-fusion model, 128 real TMDb movies: 3 of 2,432 genre decisions flipped), and on a
    CPU without native bfloat16 (no AVX512-BF16 / AMX) bf16 matmuls are emulated: 0.3 GFLOP/s against 43 in fp32
    on one thread of this project's 2-core EPYC. An explicit fp32 or bf16 always wins.
    """
    environ = os.environ if environ is None else environ
    wanted = environ.get("MMGCS_PRECISION", "auto").strip().lower() or "auto"
    if wanted not in PRECISIONS:
        raise ServingConfigError(f"MMGCS_PRECISION={wanted!r}: use fp32, bf16 or auto.")
    if wanted != "auto":
        return wanted
    if tuned == "bf16" and not (device_type == "cpu" and cpu_has_native_bf16()):
        logging.getLogger(__name__).info(
            "The model was tuned in bf16 but this %s has no native bfloat16: serving in fp32 (scores may differ "
            "slightly from the tuned ones; MMGCS_PRECISION=bf16 forces bf16)", device_type)
    return "bf16" if tuned == "bf16" and device_type == "cpu" and cpu_has_native_bf16() else "fp32"


def fast_path_wanted(environ: Optional[Mapping[str, str]] = None) -> bool:
    """`MMGCS_FAST_PATH`: 1 (default) serves fp32 through the fast tower calls (mmgcs.fast_path), 0 the eager ones."""
    try:
        return fast_path_setting(environ)
    except ValueError as e:
        raise ServingConfigError(str(e)) from None


_logged_failures: set[str] = set()


def log_failure(log: logging.Logger, what: str, error: BaseException) -> None:
    """A failure in the server log: the traceback the first time an exception type is seen, one line after
    that (a client repeating a bad request must not flood the log)."""
    kind = type(error).__name__
    if kind in _logged_failures:
        log.warning("%s (%s; traceback logged before)", what, kind)
    else:
        _logged_failures.add(kind)
        log.error("%s (%s)", what, kind, exc_info=error)


def jsonable(value: Any) -> Any:
    """Model outputs (tensors, numpy floats) → plain JSON types."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value


# ------------------------------------------------------------------------------------------------- batching
_STOP = object()


class MicroBatcher:
    """Runs `fn(items) -> results` (one result per item, in order) on the requests that arrived while the
    previous call ran, so concurrent callers share one batched call (dynamic batching).

    A single caller pays no waiting time: a batch is whatever is queued when the worker becomes free. When a
    batch fails, each of its items is retried alone, so one bad request gets its own exception and the others
    still get their answers. `submit_many` queues a caller's items as one group, taken together (split only at
    `max_batch`, its rest first in the next batch): the worker, waking on a group's first item, cannot start a
    batch of one while the caller is still queueing the others.
    """

    def __init__(self, fn: Callable[[list], list], max_batch: int, name: str = "mmgcs-batcher", nice: int = 0):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.fn = fn
        self.max_batch = max_batch
        self.nice = nice  # how much lower the worker thread's CPU priority is (see lower_thread_priority)
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = self._cancelling = False
        self._worker = threading.Thread(target=self._serve, name=name, daemon=True)
        self._worker.start()

    def submit(self, item: Any) -> concurrent.futures.Future:
        if self._closed:
            raise RuntimeError("This batcher is closed; create a new one")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._requests.put((item, future))
        return future

    def submit_many(self, items: list) -> list[concurrent.futures.Future]:
        """Submit several items as one group (see the class); one future per item, in order."""
        if self._closed:
            raise RuntimeError("This batcher is closed; create a new one")
        group = [(item, concurrent.futures.Future()) for item in items]
        if group:
            self._requests.put(group)
        return [future for _, future in group]

    def __call__(self, item: Any) -> Any:
        return self.submit(item).result()

    def pending(self) -> int:
        """Requests waiting for the worker (not counting the batch it is running; a group counts once)."""
        return self._requests.qsize()

    def close(self, timeout: Optional[float] = None, cancel_pending: bool = False) -> None:
        """Answer what is already queued (or with `cancel_pending`, cancel it: a server shutting down), then stop
        the worker, waiting at most `timeout` seconds for the call it is running."""
        self._closed, self._cancelling = True, cancel_pending
        while cancel_pending:
            try:
                request = self._requests.get_nowait()
            except queue.Empty:
                break
            if request is not _STOP:
                for _, future in _requests_of(request):
                    future.cancel()
        self._requests.put(_STOP)
        self._worker.join(timeout)

    def _serve(self) -> None:
        if self.nice:
            lower_thread_priority(self.nice)
        waiting: list = []  # (item, future) taken from the queue, not run yet: a group's rest comes first
        stop = False
        while True:
            if self._cancelling:  # a server shutting down: the rest of a group held here is cancelled like the queue
                for _, future in waiting:
                    future.cancel()
                waiting = []
            if not waiting:
                request = _STOP if stop else self._requests.get()
                if request is _STOP:
                    return
                waiting = list(_requests_of(request))
            while len(waiting) < self.max_batch and not stop:
                try:
                    request = self._requests.get_nowait()
                except queue.Empty:
                    break
                if request is _STOP:
                    stop = True
                else:
                    waiting += _requests_of(request)
            batch, waiting = waiting[: self.max_batch], waiting[self.max_batch :]
            # A caller may have cancelled its future while it waited.
            self._run([(item, f) for item, f in batch if f.set_running_or_notify_cancel()])

    def _run(self, batch: list) -> None:
        if not batch:
            return
        try:
            results = self.fn([item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"the batch function returned {len(results)} results for {len(batch)} items")
        except Exception as e:
            if len(batch) > 1:  # isolate the request that broke the batch; the others still get answers
                for one in batch:
                    self._run([one])
            else:
                batch[0][1].set_exception(e)
            return
        for (_, future), result in zip(batch, results):
            future.set_result(result)


def _requests_of(request) -> list:
    """The (item, future) pairs of a queue entry: one request, or a group (`submit_many`)."""
    return request if isinstance(request, list) else [request]


def lower_thread_priority(nice: int) -> bool:
    """Lower the calling thread's CPU priority by `nice` (Linux: a thread is a task with its own nice value; the
    OpenMP workers torch starts from this thread inherit it). Whether it took effect (not on other systems)."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
        return True
    except (AttributeError, OSError):
        return False


# An explanation runs on its own worker at this much lower priority: on a busy CPU the plain batches take the cores
# (nice 10 weighs ~1/10 of nice 0 in Linux's scheduler) and explanations use what is left, so a flood of explain
# requests waits instead of slowing every caller (issue 18: 16 explain callers took a plain p50 from 169 ms to 16 s).
EXPLAIN_NICE = 10


class BatchingPredictor(MicroBatcher):
    """`predictor(plot, poster, title=None) -> {"scores", "genres", "by_modality"}` (plain JSON types), with
    concurrent calls batched into one `Predictor.predict_batch` (mmgcs.inference, the one predict path). Validate
    and decode each input before calling it; a request that still fails gets its own exception. The title is read
    only by a model whose `text_template` uses it; `explain=True` adds the explanation (mmgcs.explain), computed
    one at a time on a second worker at a lower CPU priority (`EXPLAIN_NICE`), so that explanations never hold up
    the plain batches. Items submitted directly are `(plot, poster)`, `(plot, poster, title)` or
    `(plot, poster, title, explain)` (an explained item submitted so runs on the batch worker, after the batch). `release_eager_text=True`: the server owns the model and serves nothing else
    with it, so on the fp32 fast path the text tower's eager weights are let go (see `Predictor`). After a batch,
    the heap's freed pages go back to the system at most once a second (`runtime.PeriodicTrim`)."""

    def __init__(self, model, max_batch: int, precision: str = "fp32", release_eager_text: bool = False):
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16' (resolve 'auto' with choose_precision), got {precision!r}")
        self.model = model
        # The fast path gives the eager fp32 scores (within 1e-4); under bf16 autocast the eager towers serve.
        self.predictor = Predictor(model, fast=precision == "fp32" and fast_path_wanted(),
                                   release_eager_text=release_eager_text)
        self.precision = precision
        self._trim = PeriodicTrim(TRIM_INTERVAL_S)
        super().__init__(self._predict, max_batch)
        self.explainer = MicroBatcher(self._predict, 1, name="mmgcs-explainer", nice=EXPLAIN_NICE)

    def __call__(self, plot: Optional[str], poster: Any, title: Optional[str] = None, explain: bool = False) -> dict:
        if explain:
            return self.explainer((plot, poster, title, True))
        return super().__call__((plot, poster, title, False))

    def submit_movies(self, movies: list[tuple]) -> list[concurrent.futures.Future]:
        """Several movies `(plot, poster, title)`, validated and decoded, queued as one group (`submit_many`): the
        same batches, the same path and so the same answers as one call each; one future per movie, in order."""
        return self.submit_many([(plot, poster, title, False) for plot, poster, title in movies])

    def pending(self) -> int:
        return super().pending() + self.explainer.pending()

    def close(self, timeout: Optional[float] = None, cancel_pending: bool = False) -> None:
        self.explainer.close(timeout, cancel_pending)
        super().close(timeout, cancel_pending)

    def _predict(self, items: list[tuple]) -> list[dict]:
        items = [(*item, None, False)[:4] for item in items]  # a (plot, poster) item has no title, no explain
        plain = [i for i, item in enumerate(items) if not item[3]]
        out: list = [None] * len(items)
        with torch.autocast(self.model.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            if plain:
                chosen = [items[i] for i in plain]
                results = self.predictor.predict_batch([p for p, _, _, _ in chosen], [q for _, q, _, _ in chosen],
                                                       batch_size=SERVE_CHUNK if self.predictor.fast else self.max_batch,
                                                       by_modality=True,
                                                       titles=[t for _, _, t, _ in chosen])
                for i, result in zip(plain, results):
                    out[i] = result
            # An explained request runs alone, on this worker (the towers on 1 + grid² posters), after the batch.
            for i in sorted(set(range(len(items))) - set(plain)):
                plot, poster, title, _ = items[i]
                out[i] = self.predictor.predict(plot, poster, by_modality=True, title=title, explain=True)
        self._trim()
        return [jsonable(r) for r in out]


__all__ = [
    "BatchingPredictor", "Limits", "MicroBatcher", "ModelNotFoundError", "ServingConfigError", "choose_precision",
    "cpu_has_native_bf16", "env_int", "fast_path_wanted", "jsonable", "load_model", "log_failure",
]
