"""Helpers of the speed benchmarks (bench_predict.py, bench_app_load.py): this machine's fp32 matmul rate, the
FLOPs of one predict call, a per-stage profile of one movie, the fast path's exactness over a test split, and the
app server's CPU samples per stage from a py-spy record (bench_app_load.py --spy)."""

from __future__ import annotations

import contextlib
import functools
import statistics
import time
from collections import Counter, defaultdict


def matmul_rate(threads: int, n: int = 1024, repeats: int = 5) -> float:
    """fp32 FLOP/s of an n³ matmul on `threads` torch threads (the best of `repeats`): the compute ceiling."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(saved)
    return 2 * n ** 3 / best


def count_flops(predictor, plot, poster, by_modality: bool) -> int:
    """FLOPs of one `predictor.predict` call (eager: the counter does not see inside a TorchScript graph)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        predictor.predict(plot=plot, poster=poster, by_modality=by_modality)
    return counter.get_total_flops()


class _Stages:
    """Wall time per named stage within one call; nested stages are not double-counted by the caller."""

    def __init__(self):
        self.now: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self.calls: list[dict[str, float]] = []

    def wrap(self, name: str, fn):
        @functools.wraps(fn)
        def timed(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.now[name] += (time.perf_counter() - start) * 1000
                self.counts[name] += 1
        return timed

    def end_call(self) -> None:
        self.calls.append(dict(self.now))
        self.now.clear()


@contextlib.contextmanager
def _patched(obj, name: str, value):
    had = name in vars(obj)
    saved = vars(obj).get(name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if had:
            setattr(obj, name, saved)
        else:
            delattr(obj, name)


def _instrument(stack: contextlib.ExitStack, stages: _Stages, model, predictor, inference) -> None:
    from mmgcs import processor as processing  # the raw-input steps: the predictor's GenreProcessor

    transform_of = predictor.processor.image_transform
    stack.enter_context(_patched(processing, "load_image", stages.wrap("decode poster", processing.load_image)))
    stack.enter_context(_patched(predictor.processor, "image_transform", lambda train=False: stages.wrap(
        "resize + to tensor + normalize", transform_of(train))))
    stack.enter_context(_patched(processing, "tokenize", stages.wrap("tokenize", processing.tokenize)))
    if model.lexical is not None:
        stack.enter_context(_patched(model.lexical, "featurize", stages.wrap("lexical n-grams", model.lexical.featurize)))
    if predictor.fast is not None:
        stack.enter_context(_patched(predictor.fast, "encode_text", stages.wrap("text tower", predictor.fast.encode_text)))
        stack.enter_context(_patched(predictor.fast, "encode_image", stages.wrap("image tower", predictor.fast.encode_image)))
    else:
        stack.enter_context(_patched(model, "encode_text", stages.wrap("text tower", model.encode_text)))
        stack.enter_context(_patched(inference, "_encode_image", stages.wrap("image tower", inference._encode_image)))
    stack.enter_context(_patched(model, "forward", stages.wrap("fusion head (fused + 2 views)", model.forward)))
    stack.enter_context(_patched(predictor, "_results", stages.wrap("decisions + results", predictor._results)))


def profile(model, fast: bool, plots: list, posters: list, repeats: int, by_modality: bool) -> list[tuple]:
    """Rows (stage, calls per movie, median ms, share of the median call) for one movie at a time."""
    from mmgcs import inference

    predictor = inference.Predictor(model, fast=fast)
    for i in range(3):
        predictor.predict(plot=plots[i], poster=posters[i], by_modality=by_modality)  # warm-up (builds the fast path)
    stages = _Stages()
    totals = []
    with contextlib.ExitStack() as stack:
        _instrument(stack, stages, model, predictor, inference)
        for i in range(3, 3 + repeats):
            start = time.perf_counter()
            predictor.predict(plot=plots[i % len(plots)], poster=posters[i % len(posters)], by_modality=by_modality)
            totals.append((time.perf_counter() - start) * 1000)
            stages.end_call()
    total = statistics.median(totals)
    names = list(dict.fromkeys(n for call in stages.calls for n in call))
    rows, accounted = [], 0.0
    for name in names:
        ms = statistics.median(call.get(name, 0.0) for call in stages.calls)
        accounted += ms
        rows.append((name, f"{stages.counts[name] / repeats:g}", f"{ms:.2f}", f"{ms / total:.0%}"))
    rows.append(("Python glue (validate, batch dict, masks, views)", "", f"{total - accounted:.2f}",
                 f"{(total - accounted) / total:.0%}"))
    rows.append(("**total (median call)**", "1", f"**{total:.2f}**", "100%"))
    return rows


def exactness(model, dataset: str, batch_size: int = 32) -> str:
    """max |fast - eager| over every score (fused and each view) of the dataset's test split, and decision flips."""
    import torch

    from mmgcs.data import load_movies
    from mmgcs.inference import Predictor

    test = load_movies(dataset)["test"]
    eager, fast = Predictor(model), Predictor(model, fast=True)
    worst, flips, decisions = 0.0, 0, 0
    for start in range(0, len(test), batch_size):
        rows = test[start:start + batch_size]
        args = (rows["plot"], rows["poster"], rows["title"])
        pe, ve = eager.probabilities(*args, by_modality=True)
        pf, vf = fast.probabilities(*args, by_modality=True)
        for name in ve:
            a, b = ve[name][0], vf[name][0]
            worst = max(worst, (a - b).abs().max().item())
        de, df = eager.decisions(pe), fast.decisions(pf)
        flips += sum(len(set(x) ^ set(y)) for x, y in zip(de, df))
        decisions += pe.numel()
    kind = f"image {fast.fast.image_kind()}, text {fast.fast.text_kind()}"
    ok = "within" if worst <= 1e-4 else "BEYOND"
    return (f"exactness over {len(test)} test movies of {dataset} (fused + plot-only + poster-only scores), fast towers: "
            f"{kind}: max |Δ score| = {worst:.2e} ({ok} 1e-4); {flips} of {decisions} fused genre decisions "
            f"flipped; torch {torch.__version__}")


# Where a py-spy sample of the app server goes: the first rule matching a frame, from the leaf up (library frames
# belong to their caller). Earlier rules are more specific than later ones ("mmgcs/" is whatever predict glue is left).
SPY_STAGES = [
    ("text tower (ONNX Runtime)", ("mmgcs/fast_path.py", "encode_text")),
    ("image tower (TorchScript)", ("mmgcs/models/image_fast.py", "encode_image")),
    ("fusion head ×3 + probabilities", ("mmgcs/models/fusion.py", "mmgcs/models/classifier.py",
                                        "mmgcs/models/lexical.py:logits")),
    ("tokenize", ("mmgcs/models/preprocessing.py",)),
    ("lexical n-grams", ("mmgcs/models/lexical.py",)),
    ("poster decode (upload checks + PIL)", ("mmgcs/data/images.py", "mmgcs/uploads.py")),
    ("resize + to tensor + normalize", ("_images (",)),
    ("predict glue (validate, batch dict, views, results, json)", ("mmgcs/",)),
    ("app handler (app.py)", ("/app.py",)),
    ("Gradio / HTTP (queue, files, JSON, uvicorn, asyncio)", ("gradio", "uvicorn", "starlette", "fastapi", "anyio",
                                                             "httpx", "h11", "asyncio", "pydantic", "multipart",
                                                             "safehttpx")),
]


def spy_stages(raw_lines) -> tuple[Counter, int]:
    """CPU samples per stage of py-spy's raw (collapsed) stacks (`frame;frame;... count` lines), and their total.
    py-spy samples running threads only, so time a thread spends waiting (epoll, locks) is not counted."""
    counts, total = Counter(), 0
    for line in raw_lines:
        stack, _, n = line.rstrip().rpartition(" ")
        if not stack or not n.isdigit():
            continue
        total += int(n)
        stage = "other (threading, GC, ...)"
        for frame in reversed(stack.split(";")):
            hit = next((name for name, keys in SPY_STAGES if any(k in frame for k in keys)), None)
            if hit:
                stage = hit
                break
        counts[stage] += int(n)
    return counts, total
