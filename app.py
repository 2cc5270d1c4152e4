"""MMGCS Space: a movie's plot, poster, or both → its genres, and what each modality says on its own.

Run `python app.py` (a Hugging Face Space runs this file as is). Settings come from the environment:

- `MMGCS_MODEL`: a Hub model id or a folder saved by `save_pretrained` (default `runs/fusion/model`, where
  `accelerate launch training/train_fusion.py` puts its best model).
- `MMGCS_EXAMPLES`: a dataset built by `python -m mmgcs.data build` (folder or Hub id) whose test movies become
  the examples (default `data/movies`; no examples when it is absent — posters are never shipped with the app).
- `GRADIO_SERVER_NAME` / `GRADIO_SERVER_PORT`: the address (default 127.0.0.1:7860).
- Limits: `MMGCS_MAX_PLOT_CHARS`, `MMGCS_MAX_IMAGE_PIXELS`, `MMGCS_MAX_FILE_MB`, `MMGCS_CONCURRENCY`,
  `MMGCS_QUEUE_SIZE`, `MMGCS_MAX_BATCH`, `MMGCS_MAX_BATCH_MOVIES`, `MMGCS_MAX_DECODED_PIXELS`,
  `MMGCS_EXPLAIN_CONCURRENCY`, `MMGCS_MAX_JOBS_PER_SESSION`, `MMGCS_MAX_JOBS_PER_IP`, `MMGCS_MAX_UPLOAD_AGE_S`,
  `MMGCS_MAX_UPLOAD_FOLDER_MB`
  (defaults in `mmgcs.serving.Limits`); `MMGCS_PRECISION` (see `mmgcs.serving.choose_precision`).
- Uploads go to `GRADIO_TEMP_DIR`, or when unset to a folder of this process's own, removed at exit. Behind a
  reverse proxy, `FORWARDED_ALLOW_IPS` names it so that the per-client caps see each client's own address (set for
  a Hugging Face Space, see `mmgcs.quotas.trust_proxies`).

The serving logic (model loading, limits, precision, request batching) lives in `mmgcs.serving`; this file is
the page, the input checks and the wiring.

API (see the app's "Use via API" page): `/predict(plot, poster, title, explain) -> {"scores", "genres",
"by_modality"}` (every parameter optional; the title is read only by a model trained with it, see
`ModelConfig.text_template`; `explain=true` adds `"explanation"`, see `mmgcs.explain`),
`/predict_batch(movies) -> [one /predict answer per movie]` (up to `MMGCS_MAX_BATCH_MOVIES` movies a call, each
`{"plot", "poster", "title"}`; a movie that cannot be classified gets `{"index", "error"}`) and
`/model_info() -> {"labels", "thresholds", ...}`.
"""

from __future__ import annotations

import atexit
import html
import io
import logging
import os
import re
import shutil
import tempfile
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from mmgcs.runtime import configure_cpu_policy, refuse_imports, release_freed_memory, skip_triton_without_gpu
from mmgcs.uploads import own_upload_folder

# The Space must not phone home; set before gradio is imported (it reads this at import time), and so is the upload
# folder. Idle OpenMP workers sleep instead of spinning: set before anything loads torch (see mmgcs.runtime).
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
UPLOAD_FOLDER, OWN_UPLOAD_FOLDER = own_upload_folder()
configure_cpu_policy()
skip_triton_without_gpu()  # before torchvision loads: 125 MB the Space's CPU-only serving never uses

import datasets  # noqa: E402
import gradio as gr  # noqa: E402
import gradio.utils  # noqa: E402
import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
from starlette.middleware import Middleware  # noqa: E402

from mmgcs.data import load_movies  # noqa: E402
from mmgcs.data.images import InvalidImageError, image_size, load_image  # noqa: E402
from mmgcs.page_checks import PageInputError, checked_explanation, checked_genre, checked_result  # noqa: E402
from mmgcs.quotas import JobGuard, JobQuota, Reroute, client_address, trust_proxies  # noqa: E402
from mmgcs.serving import (  # noqa: E402
    BatchingPredictor,
    Limits,
    ModelNotFoundError,
    ServingConfigError,
    choose_precision,
    load_model,
    log_failure,
)
from mmgcs.uploads import (  # noqa: E402
    BodySizeLimit,
    PixelBudget,
    Thumbnails,
    UPLOAD_REMEDY,
    UploadedPoster,
    UploadError,
    UploadFolder,
    UploadGuard,
    check_size,
    clean_up_at_exit,
    decode_data_url,
    inline_image,
    read_upload,
)

log = logging.getLogger("mmgcs.app")

DEFAULT_MODEL = "runs/fusion/model"
DEFAULT_EXAMPLES = "data/movies"
N_EXAMPLES = 4
MAX_TITLE_CHARS = 300  # the longest real titles are ~200 characters
MODEL_FAILED = "The model failed on this input. Try again; if it keeps failing, try another poster or plot."
EXAMPLE_FOLDERS: list[str] = []  # where load_examples put the example posters
THUMBNAILS = Thumbnails()  # the posters explained lately, small: the page's heat map is drawn on these

try:
    LIMITS = Limits.from_env()
except ServingConfigError as e:
    raise SystemExit(str(e)) from None


# ---------------------------------------------------------------------------------------------------------------
# Input checks: each bad input gets its own clear gr.Error; no server path or traceback reaches the user.


def _undecoded_upload(payload) -> UploadedPoster | None:
    """`gr.Image` preprocessing that hands the upload over undecoded, as bytes read safely from Gradio's upload folder.

    The payload comes from the client: its path is trusted only inside the upload folder, as a regular file, read
    with a hard byte limit (`read_upload`); an inline `data:` URL is refused by its length before decoding.
    `gr.Image` would open the file with PIL itself and turn a non-image into an opaque "Error"; the app instead
    checks size and pixel count before decoding (`decode_poster`) and says what is wrong. (Set on the instance:
    a `gr.Image` subclass would make Gradio write an `app.pyi` stub next to this file.)
    """
    if payload is None:
        return None
    name = f"The poster {Path(payload.orig_name).name!r}" if getattr(payload, "orig_name", None) else "The poster"
    try:
        if payload.url and payload.url.startswith("data:"):
            return UploadedPoster(decode_data_url(payload.url, LIMITS.max_file_mb * 2**20), name)
        if payload.path:
            return UploadedPoster(read_upload(payload.path, upload_roots(), LIMITS.max_file_mb * 2**20), name)
    except UploadError as e:
        raise _user_error(str(e)) from None
    # e.g. a bare URL Gradio did not fetch: a poster was sent, so it must not be silently dropped
    raise _user_error(f"The poster could not be used: it has no file. {UPLOAD_REMEDY}")


def _raw_text(payload: Any) -> Any:
    """`gr.Textbox` preprocessing that keeps the JSON type (Gradio's own turns 123 or a list into text)."""
    return payload


def poster_input(**kwargs) -> gr.Image:
    image = gr.Image(type="filepath", **kwargs)
    image.preprocess = _undecoded_upload
    return image


def text_input(**kwargs) -> gr.Textbox:
    box = gr.Textbox(**kwargs)
    box.preprocess = _raw_text
    return box


def upload_roots() -> list[str]:
    """The only folders a poster path may point into: Gradio's upload cache (where every upload, URL download
    and example file is put) and this app's own examples folder."""
    return [gradio.utils.get_upload_folder(), *EXAMPLE_FOLDERS]


def _user_error(message: str) -> gr.Error:
    return gr.Error(message, title="Cannot predict", print_exception=False)


def _valid_text(text: Any, field: str) -> str:
    if not isinstance(text, str):
        raise _user_error(f"`{field}` must be text, not {type(text).__name__}.")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate such as "\ud800": no tokenizer can read it
        raise _user_error(
            f"The {field} has an invalid character at position {e.start} (an unpaired UTF-16 surrogate). "
            "Remove it or copy the text again."
        ) from None
    return text.strip()


def check_plot(plot: Any) -> str | None:
    """The plot, stripped, or None when empty; refuses non-text, invalid characters and over-long plots."""
    if plot is None:
        return None
    plot = _valid_text(plot, "plot")
    if not plot:
        return None
    if len(plot) > LIMITS.max_plot_chars:
        raise _user_error(
            f"The plot is {len(plot):,} characters long; the limit is {LIMITS.max_plot_chars:,}. Paste a summary "
            "of a paragraph or two, like the plots the model was trained on."
        )
    return plot


def check_title(title: Any) -> str | None:
    """The title, stripped, or None when empty; refuses non-text, invalid characters and over-long titles."""
    if title is None:
        return None
    title = _valid_text(title, "title")
    if len(title) > MAX_TITLE_CHARS:
        raise _user_error(f"The title is {len(title):,} characters long; the limit is {MAX_TITLE_CHARS:,}.")
    return title or None


def check_explain(explain: Any) -> bool:
    """Whether to explain the prediction: true or false (null: false); anything else is refused."""
    if explain is None:
        return False
    if not isinstance(explain, bool):
        raise _user_error(f"`explain` must be true or false, not {type(explain).__name__}.")
    return explain


def poster_bytes(poster: Any) -> UploadedPoster | None:
    """The poster's encoded bytes, or None when none was given. A path (from a caller in this process) is read
    under the same rules as an upload: inside the upload folder, a regular file, at most the size limit."""
    if poster is None or poster == "":
        return None
    max_bytes = LIMITS.max_file_mb * 2**20
    try:
        if isinstance(poster, UploadedPoster):
            return poster
        if isinstance(poster, (bytes, bytearray)):
            check_size(len(poster), max_bytes)
            return UploadedPoster(bytes(poster), "The poster")
        if isinstance(poster, (str, os.PathLike)):
            return UploadedPoster(read_upload(poster, upload_roots(), max_bytes), f"The poster {Path(poster).name!r}")
    except UploadError as e:
        raise _user_error(str(e)) from None
    raise _user_error(f"`poster` must be an image file, not {type(poster).__name__}.")


def poster_pixels(poster: UploadedPoster | None) -> int:
    """The pixels a poster decodes to, read from its header (what its request reserves of the Space's pixel budget)."""
    if poster is None:
        return 0
    try:
        width, height = image_size(poster.data, poster.name)
    except InvalidImageError as e:
        raise _user_error(str(e)) from None
    return width * height


def decode_poster(poster: UploadedPoster | None) -> PIL.Image.Image | None:
    """The decoded RGB poster; refuses undecodable, non-image and oversized images with what is wrong."""
    if poster is None:
        return None
    stream = io.BytesIO(poster.data)
    stream.name = poster.name  # load_image names the input by this in its messages
    try:
        return load_image(stream, max_pixels=LIMITS.max_image_pixels)
    except InvalidImageError as e:
        raise _user_error(str(e)) from None


def check_poster(poster: Any) -> PIL.Image.Image | None:
    """The decoded RGB poster, or None when none was given (`poster_bytes`, then `decode_poster`)."""
    return decode_poster(poster_bytes(poster))


# ---------------------------------------------------------------------------------------------------------------
# The model, loaded once when the Space starts.


@dataclass
class Space:
    """The served model and what the page and the API say about it (made once, by `open_space`)."""

    model: Any
    predictor: Any  # a BatchingPredictor: concurrent requests batched into one model call
    precision: str
    pixel_budget: PixelBudget  # decoded poster pixels that all requests may hold at once
    labels: list[str]
    thresholds: dict[str, float]  # per-genre when tuned, else the global one
    reads_plot: bool
    reads_poster: bool
    # A model trained on e.g. "{title}. {plot}" reads the title with the plot; any other shows it only on the page.
    reads_title: bool


def open_space(source: str, limits: Limits, *, exit_if_missing: bool) -> Space:
    """Load the model and its batching predictor. A bad setting stops the app with its remedy (`SystemExit`: the
    message, without a traceback, in the Space's logs), and so does a missing model when `exit_if_missing`."""
    try:
        model = load_model(source)
    except ModelNotFoundError as e:
        if exit_if_missing:
            raise SystemExit(f"app.py: {e}") from None
        raise
    try:
        precision = choose_precision(model.device.type, tuned=model.config.tuned_precision)
    except ServingConfigError as e:
        raise SystemExit(str(e)) from None
    labels = list(model.config.labels)
    reads_plot = getattr(model, "text_tower", None) is not None
    return Space(
        model=model,
        # The Space loaded this model only to serve it: the eager text weights go once ONNX Runtime serves them.
        predictor=BatchingPredictor(model, limits.max_batch, precision, release_eager_text=True),
        precision=precision,
        pixel_budget=PixelBudget(limits.max_decoded_pixels),
        labels=labels,
        thresholds=dict(zip(labels, model.decision_thresholds())),
        reads_plot=reads_plot,
        reads_poster=getattr(model, "image_tower", None) is not None,
        reads_title=reads_plot and "{title}" in getattr(model.config, "text_template", "{plot}"),
    )


def predict(plot: str | None = None, poster: str | None = None, title: str | None = None,
            explain: bool = False) -> dict:
    """Predict a movie's genres from its plot, its poster, or both (give at least one).

    Args:
        plot: the movie's plot or synopsis, in English (see /model_info for the length limit)
        poster: the poster image file, JPEG, PNG, WebP or GIF (see /model_info for the size and pixel limits)
        title: the movie's title (optional); read with the plot by a model trained with titles (/model_info
            "reads_title"), else ignored
        explain: true to add "explanation" (slower: about a second more on CPU): for each predicted genre, the plot
            words and word pairs that pushed it up and down with their contributions to the logit (exact for the
            lexical branch, not the neural text tower), the plot's and the poster's share of the decision, and a
            7x7 poster occlusion map (see mmgcs.explain)
    Returns:
        {"scores": {genre: probability}, "genres": [predicted genres, per-genre thresholds applied], "by_modality":
        {"text": scores from the plot alone, "image": from the poster alone, "fused": from both}, and with explain
        "explanation": {"text", "genres": {genre: {"lexical": {"up", "down"}, "plot_share", "occlusion", ...}}}}
    """
    explain = check_explain(explain)
    plot_text, encoded, title_text, notes = movie_inputs(plot, poster_bytes(poster), title)
    try:
        # The decoded poster is held until its answer is ready: the budget bounds what all requests hold at once.
        with SPACE.pixel_budget.reserve(poster_pixels(encoded)):
            image = decode_poster(encoded)
            if explain and image is not None:
                THUMBNAILS.put(encoded.data, image)
            result = _run_model(plot_text, image, title_text, explain)
    except UploadError as e:
        raise _user_error(str(e)) from None
    if notes:
        result = {**result, "notes": notes}
    return result


def movie_inputs(plot: Any, encoded: UploadedPoster | None, title: Any) -> tuple:
    """(plot, encoded poster, title, notes) of one movie, checked; what the model does not read is dropped with a
    note; a `gr.Error` when nothing is left to classify."""
    plot_text, title_text = check_plot(plot), check_title(title)
    notes = []
    if plot_text is not None and not SPACE.reads_plot:
        plot_text, notes = None, notes + ["This model reads posters only; the plot was ignored."]
    if encoded is not None and not SPACE.reads_poster:
        encoded, notes = None, notes + ["This model reads plots only; the poster was ignored."]
    if plot_text is None and encoded is None:
        wanted = " and/or ".join(w for w, ok in (("a plot", SPACE.reads_plot), ("a poster", SPACE.reads_poster)) if ok)
        raise _user_error(f"Nothing to classify: give {wanted}.")
    return plot_text, encoded, title_text, notes


def _run_model(plot: str | None, image: PIL.Image.Image | None, title: str | None, explain: bool = False) -> dict:
    try:
        # the default call as before explanations existed (anything standing in for the predictor still fits)
        return SPACE.predictor(plot, image, title, explain=True) if explain else SPACE.predictor(plot, image, title)
    except Exception as e:
        log_failure(log, "prediction failed", e)  # the details stay in the server log
        raise gr.Error(
            MODEL_FAILED,
            title="Prediction failed",
            print_exception=False,
        ) from None


# ---------------------------------------------------------------------------------------------------------------
# Several movies a call (/predict_batch): each checked and answered as /predict would, through the same batcher.

BATCH = "predict_batch"
BATCH_KEYS = ("plot", "poster", "title")


def predict_batch(movies: list[dict]) -> list[dict]:
    """Predict the genres of several movies in one call, each as /predict would (the same checks, model and answer).

    Args:
        movies: a list of at most /model_info limits.max_batch_movies movies, each {"plot": text, "poster": an image
            file (gradio_client.handle_file(path)), "title": text}, every key optional (give a plot, a poster or both)
    Returns:
        one answer per movie, in order: what /predict answers for it, or {"index": its position, "error": why} for a
        movie that cannot be classified (the others are answered all the same)
    """
    movies = batch_movies(movies)  # a call over HTTP was checked whole before Gradio read it (check_batch_request)
    answers: list = [None] * len(movies)
    sent, group = [], []  # (index, future, notes) given to the model; (index, item, release, notes) not yet
    try:
        for i, movie in enumerate(movies):
            try:
                plot, encoded, title, notes = movie_inputs(movie.get("plot"), batch_poster(movie.get("poster")),
                                                           movie.get("title"))
                pixels = poster_pixels(encoded)
                if group and SPACE.pixel_budget.in_use + pixels > SPACE.pixel_budget.max_pixels:
                    sent += _send(group)  # this call's own posters must not wait for each other's budget
                    group = []
                group.append((i, *_decoded(plot, encoded, title, pixels), notes))
            except gr.Error as e:
                answers[i] = {"index": i, "error": e.message}
        sent += _send(group)
        group = []
    finally:
        for _, _, release, _ in group:  # an unexpected failure: what this call holds of the budget goes back
            release()
    for i, future, notes in sent:
        try:
            result = future.result()
        except Exception as e:
            log_failure(log, "prediction failed", e)  # the details stay in the server log
            answers[i] = {"index": i, "error": MODEL_FAILED}
        else:
            answers[i] = {**result, "notes": notes} if notes else result
    return answers


def _decoded(plot: str | None, encoded: UploadedPoster | None, title: str | None, pixels: int) -> tuple:
    """(the model's item, the call that gives its pixels back): the poster decoded within the pixel budget, held
    until the model has answered for it (as /predict holds it)."""
    held = ExitStack()
    try:
        held.enter_context(SPACE.pixel_budget.reserve(pixels))
        image = decode_poster(encoded)
    except UploadError as e:
        held.close()
        raise _user_error(str(e)) from None
    except BaseException:
        held.close()
        raise
    return (plot, image, title), held.close


def _send(group: list) -> list:
    """The decoded movies to the batcher as one group; each gives its pixels back once answered."""
    if not group:
        return []
    futures = SPACE.predictor.submit_movies([item for _, item, _, _ in group])
    for (_, _, release, _), future in zip(group, futures):
        future.add_done_callback(lambda _, release=release: release())
    return [(i, future, notes) for (i, _, _, notes), future in zip(group, futures)]


def batch_poster(payload: Any) -> UploadedPoster | None:
    """A /predict_batch movie's poster: a file (its shape checked by `check_batch_request`) read as /predict reads
    its upload; an in-process caller may also give what /predict's `poster_bytes` takes."""
    if isinstance(payload, dict):
        return _undecoded_upload(SimpleNamespace(
            url=payload.get("url"), path=payload.get("path"), orig_name=payload.get("orig_name")))
    return poster_bytes(payload)


def _backbone_name(name: str) -> str:
    """A backbone's Hub id as is; a local folder by its last part only (no server paths on the page or API)."""
    if name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1 or Path(name).is_dir():
        return Path(name).name
    return name


def model_info() -> dict:
    """The model's genres, per-genre decision thresholds, backbones, precision and this app's input limits.

    Returns:
        {"labels": [...], "thresholds": {genre: threshold}, "reads_plot": bool, "reads_poster": bool, ...}
    """
    cfg = SPACE.model.config
    return {
        "labels": SPACE.labels,
        "thresholds": SPACE.thresholds,
        "reads_plot": SPACE.reads_plot,
        "reads_poster": SPACE.reads_poster,
        "reads_title": SPACE.reads_title,
        "text_backbone": _backbone_name(cfg.text_backbone) if SPACE.reads_plot else None,
        "image_backbone": _backbone_name(cfg.image_backbone) if SPACE.reads_poster else None,
        "fusion": cfg.fusion,
        "device": SPACE.model.device.type,
        "precision": SPACE.precision,
        "limits": asdict(LIMITS),
    }


def warm_up(space: Space) -> None:
    """One prediction before serving, so the first user does not pay for lazy initialisation."""
    try:
        space.predictor(
            "A warm-up plot." if space.reads_plot else None,
            PIL.Image.new("RGB", (64, 96)) if space.reads_poster else None,
        )
    except Exception:
        log.warning("warm-up prediction failed", exc_info=True)


# ---------------------------------------------------------------------------------------------------------------
# Rendering the /predict result for people.

COLUMNS = ["Genre", "Plot only", "Poster only", "Both", "Threshold", "Predicted"]


def _md_text(text: str) -> str:
    """User text shown literally inside Markdown (no markup, no HTML)."""
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|~>])", r"\\\1", html.escape(text))


def _pct(p: float | None) -> str:
    return "—" if p is None else f"{p:.0%}"


def _page_input(check, *args):
    """What a page handler was sent, through its check (`mmgcs.page_checks`); None, logged as one line, when it
    does not have /predict's shape (raw HTTP can send these handlers anything)."""
    try:
        return check(*args)
    except PageInputError as e:
        log.warning("a page handler was sent a malformed result (%s)", e)
        return None


def render(result: dict | None, title: str | None):
    """The /predict JSON → (verdict Markdown, Label scores, per-modality table)."""
    result = _page_input(checked_result, result, SPACE.labels)
    if not result:
        return "", None, None
    title = title if isinstance(title, str) and len(title) <= MAX_TITLE_CHARS else None
    scores: dict = result["scores"]
    genres: list = result["genres"]
    by_mod: dict = result.get("by_modality") or {}
    text, image = by_mod.get("text"), by_mod.get("image")
    fused = by_mod.get("fused") or scores
    lines = [f"### {_md_text(title.strip())}"] if title and title.strip() else []
    if genres:
        lines.append("**Predicted genres:** " + ", ".join(genres))
    else:
        best = max(scores, key=scores.get)
        lines.append(f"**No genre passed its threshold.** The closest is {best} ({_pct(scores[best])}).")
    used = "the plot and the poster" if text and image else "the plot only" if text else "the poster only"
    lines.append(f"From {used}. The table shows what each input says on its own.")
    lines += [f"*{_md_text(n)}*" for n in result.get("notes", [])]
    order = sorted(fused, key=fused.get, reverse=True)
    rows = [
        [
            g,
            _pct(text.get(g) if text else None),
            _pct(image.get(g) if image else None),
            _pct(fused.get(g)),
            _pct(SPACE.thresholds.get(g)),
            "✓" if g in genres else "",
        ]
        for g in order
    ]
    return "\n\n".join(lines), scores, gr.Dataframe(value=rows, headers=COLUMNS)


def highlighted(text: str | None, words: list) -> list[tuple[str, float | None]] | None:
    """The plot as HighlightedText segments: each scored word with its share of the genre's lexical logit, scaled
    to [-1, 1] (positive: pushed the genre up), the text between words unscored."""
    if not text:
        return None
    top = max((abs(score) for _, _, score in words), default=0.0) or 1.0
    segments, at = [], 0
    for start, end, score in sorted(words):
        if start > at:
            segments.append((text[at:start], None))
        segments.append((text[start:end], round(score / top, 3)))
        at = end
    if at < len(text):
        segments.append((text[at:], None))
    return segments


def heat_map(poster: PIL.Image.Image | None, grid: list | None) -> PIL.Image.Image | None:
    """The poster with its occlusion map blended over it: red where a region raised the genre's score, purple where
    it lowered it (HighlightedText's colours), more opaque the stronger (the model sees the poster squashed to a square, so the grid spans it)."""
    if poster is None or not grid:
        return None
    values = np.asarray(grid, dtype=np.float32)
    scaled = values / (float(np.abs(values).max()) or 1.0)
    rgba = np.zeros(values.shape + (4,), dtype=np.uint8)
    rgba[..., :3] = np.where(scaled[..., None] > 0, np.array([239, 68, 60]), np.array([128, 90, 213]))
    rgba[..., 3] = (np.abs(scaled) * 170).astype(np.uint8)
    overlay = PIL.Image.fromarray(rgba, "RGBA").resize(poster.size, PIL.Image.Resampling.BILINEAR)
    return PIL.Image.alpha_composite(poster.convert("RGBA"), overlay).convert("RGB")


def explanation_view(result: dict | None, genre: str | None, poster: UploadedPoster | None):
    """(genre dropdown, highlighted plot, poster heat map) for `genre` (default: the first explained one). The heat
    map is drawn on the poster's thumbnail, kept when it was explained (decoded again only when it is not)."""
    explanation = _page_input(checked_explanation, result, SPACE.labels, LIMITS.max_plot_chars + MAX_TITLE_CHARS + 2)
    if not explanation or not explanation["genres"]:
        return gr.Dropdown(choices=[], value=None), None, None
    genres = list(explanation["genres"])
    genre = checked_genre(genre, genres)
    entry = explanation["genres"][genre]
    image = poster_thumbnail(poster) if entry["occlusion"] else None
    return (gr.Dropdown(choices=genres, value=genre), highlighted(explanation["text"], entry["words"]),
            heat_map(image, entry["occlusion"]))


def poster_thumbnail(poster: UploadedPoster | None) -> PIL.Image.Image | None:
    """The poster's thumbnail: kept from its explained prediction, else decoded within the pixel budget."""
    if poster is None:
        return None
    thumbnail = THUMBNAILS.get(poster.data)
    if thumbnail is None:
        with SPACE.pixel_budget.reserve(poster_pixels(poster)):
            thumbnail = THUMBNAILS.put(poster.data, decode_poster(poster))
        release_freed_memory()  # the full poster's pages
    return thumbnail


# ---------------------------------------------------------------------------------------------------------------
# Examples: real movies from the user's own dataset (posters are never committed with the app).


def load_examples(source: str, n: int = N_EXAMPLES) -> list[list]:
    """[title, plot, poster file] for up to `n` test movies with a plot and a poster, covering varied genres.

    The posters are copied to a temporary folder (removed at exit). Returns [] when the dataset is absent.
    """
    if not source:
        return []
    explicit = "MMGCS_EXAMPLES" in os.environ
    if not Path(source).exists() and not explicit:
        log.info("no examples: no dataset at %s (build one with `python -m mmgcs.data build`)", source)
        return []
    try:
        splits = load_movies(source)
        split = splits["test"] if "test" in splits else next(iter(splits.values()))
        genre_names = split.features["genres"].feature.names
        split = split.cast_column("poster", datasets.Image(decode=False))
    except Exception as e:
        log.warning("no examples: could not load the dataset %s (%s: %s)", source, type(e).__name__, e)
        return []
    folder = Path(tempfile.mkdtemp(prefix="mmgcs-examples-"))
    EXAMPLE_FOLDERS.append(str(folder))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    chosen, seen = [], set()
    for row in split.select(range(min(len(split), 300))):
        if len(chosen) >= n:
            break
        genres = {genre_names[i] for i in row["genres"]}
        if not row.get("plot") or not row.get("poster") or genres <= seen:
            continue  # prefer movies that add a genre not shown yet
        try:
            poster = load_image(row["poster"])
        except InvalidImageError:
            continue
        file = folder / f"{row['id']}.jpg"
        poster.save(file, format="JPEG", quality=90)
        chosen.append([row.get("title") or "", row["plot"], str(file)])
        seen |= genres
    return chosen


# ---------------------------------------------------------------------------------------------------------------
# The page.

DESCRIPTION = """\
# MMGCS — movie genres from a plot and a poster
Give a movie's **plot**, its **poster**, or both, and the model predicts its genres (several at once).
The table shows the scores from the plot alone, the poster alone and both together, so you can see which input
drove each genre."""


def _about() -> str:
    info = model_info()
    parts = []
    if info["reads_plot"]:
        parts.append(f"plot encoder `{info['text_backbone']}`")
    if info["reads_poster"]:
        parts.append(f"poster encoder `{info['image_backbone']}`")
    return (
        f"**Model:** {' + '.join(parts)}, `{info['fusion']}` fusion, {len(info['labels'])} genres "
        f"({info['device']}, {'bfloat16' if info['precision'] == 'bf16' else 'float32'}). "
        f"**Limits:** plot ≤ {LIMITS.max_plot_chars:,} characters; poster ≤ {LIMITS.max_file_mb} MB and "
        f"≤ {LIMITS.max_image_pixels / 1e6:g} megapixels. Use it from code: see *Use via API* at the bottom.\n\n"
        "Movie data and posters from [TMDb](https://www.themoviedb.org/). This product uses the TMDb API but is "
        "not endorsed or certified by TMDb."
    )


def _inputs(space: Space) -> tuple[gr.Textbox, gr.Textbox, gr.Image]:
    """The title, plot and poster fields (those the model does not read are hidden)."""
    title = text_input(
        label="Title (optional)",
        max_lines=1,
        max_length=MAX_TITLE_CHARS,
        info="The model reads it with the plot." if space.reads_title else "Shown with the result.",
        elem_id="title",
    )
    tokens = space.model.config.max_text_length
    plot = text_input(
        label="Plot",
        lines=6,
        max_length=LIMITS.max_plot_chars,
        placeholder="A young farm boy joins a rebellion to rescue a princess from an evil empire...",
        info=f"The model reads the first {tokens} tokens (about {tokens * 3 // 4} words); the rest of a longer "
        "plot is ignored.",
        visible=space.reads_plot,
        elem_id="plot",
    )
    poster = poster_input(
        label="Poster", sources=["upload", "clipboard"], height=360, visible=space.reads_poster, elem_id="poster"
    )
    return title, plot, poster


def _explanation_outputs() -> tuple[gr.Dropdown, gr.HighlightedText, gr.Image]:
    """The genre to explain, the plot with its words highlighted and the poster with its heat map."""
    with gr.Accordion("Why these genres", open=True):
        genre = gr.Dropdown(label="Explain the genre", choices=[], interactive=True, elem_id="explain-genre")
        words = gr.HighlightedText(
            label="Plot words (red pushed the genre up, purple down; the lexical branch's part of the score)",
            show_legend=False, elem_id="explain-words",
        )
        heat = gr.Image(label="Poster regions (red raised the genre's score, purple lowered it)", type="pil",
                        interactive=False, height=360, elem_id="explain-poster")
        heat.postprocess = inline_image  # sent inline: no file written per call
    return genre, words, heat


def _outputs() -> tuple[gr.Markdown, gr.Label, gr.Dataframe, gr.JSON]:
    """The verdict, the top genres, the per-modality table and the raw /predict answer."""
    verdict = gr.Markdown(elem_id="verdict")
    top = gr.Label(label="Top genres", num_top_classes=5, elem_id="top-genres")
    table = gr.Dataframe(
        headers=COLUMNS,
        label="What each input says",
        interactive=False,
        wrap=True,
        column_widths=["25%", "15%", "16%", "12%", "16%", "16%"],
        max_height=900,
        elem_id="by-modality",
    )
    with gr.Accordion("API response (JSON)", open=False):
        raw = gr.JSON(label="/predict", elem_id="raw")
    return verdict, top, table, raw


def build_demo(space: Space, examples: list[list]) -> gr.Blocks:
    """The page and its API endpoints (/predict, /predict_batch, /model_info) for the model `space` serves."""
    # Uploads older than max_upload_age_s are deleted (checked 6 times in that span), and all of them at exit.
    age = LIMITS.max_upload_age_s
    with gr.Blocks(title="MMGCS — movie genre classifier", delete_cache=(max(1, age // 6), age)) as demo:
        gr.Markdown(DESCRIPTION)
        with gr.Row(equal_height=False):
            with gr.Column(scale=1):
                title, plot, poster = _inputs(space)
                # Off in the API's defaults (a plain /predict stays as fast); ticked for people when the page loads.
                explain = gr.Checkbox(label="Explain (highlight the words and poster regions behind each genre)",
                                      value=False, elem_id="explain")
                with gr.Row():
                    clear = gr.ClearButton(value="Clear")
                    submit = gr.Button("Predict genres", variant="primary", elem_id="predict")
            with gr.Column(scale=1):
                verdict, top, table, raw = _outputs()
                genre, words, heat = _explanation_outputs()
        if examples:
            gr.Examples(examples, inputs=[title, plot, poster], label="Examples from your dataset's test split")
        gr.Markdown(_about())

        outputs = [verdict, top, table, raw, words, heat]
        # Clear the last answer first, so that a refused input never leaves another movie's genres on screen.
        submit.click(
            lambda: ("", None, None, None, None, None), outputs=outputs, api_visibility="private", queue=False
        ).then(
            predict,
            inputs=[plot, poster, title, explain],
            outputs=raw,
            api_name="predict",
            concurrency_limit=LIMITS.concurrency,
            concurrency_id="model",
        ).success(render, inputs=[raw, title], outputs=[verdict, top, table], api_visibility="private", queue=False
        ).then(explanation_view, inputs=[raw, genre, poster], outputs=[genre, words, heat], api_visibility="private",
               concurrency_limit=2, concurrency_id="explanation-view")
        genre.input(explanation_view, inputs=[raw, genre, poster], outputs=[genre, words, heat],
                    api_visibility="private", concurrency_limit=2, concurrency_id="explanation-view")
        # An explained /predict joins this twin instead (see guard_jobs): its own queue share and worker.
        gr.Button(visible=False).click(
            predict, inputs=[plot, poster, title, explain], outputs=raw, api_name=EXPLAINED, api_visibility="private",
            concurrency_limit=LIMITS.explain_concurrency, concurrency_id="explain",
        )
        demo.load(lambda: True, outputs=explain, api_visibility="private", queue=False)
        clear.add([title, plot, poster, verdict, top, table, raw, words, heat])
        # Its movies join the same micro-batches as /predict's (one model, one batcher), in the same slots.
        gr.api(predict_batch, api_name=BATCH, concurrency_limit=LIMITS.concurrency, concurrency_id="model")
        gr.api(model_info, api_name="model_info", concurrency_limit=None)
    # api_open=False: an event of the queue cannot be run directly (POST /run/<name>), around the queue's limits.
    demo.queue(default_concurrency_limit=LIMITS.concurrency, max_size=LIMITS.queue_size, api_open=False)
    guard_requests(demo)
    return demo


# ---------------------------------------------------------------------------------------------------------------
# Raw HTTP: the same checks as the page, and a message for every refusal.

PREDICT_INPUTS = ("plot", "poster", "title")  # then `explain`, optional (a caller from before it sends three)
EXPLAINED = "predict_explained"  # the event an explained /predict runs as
FILE_DATA = {"_type": "gradio.FileData"}
POSTER_SHAPE = (
    '`poster` must be a file: {"path": <the path /gradio_api/upload returned>, "meta": {"_type": "gradio.FileData"}} '
    "(gradio_client.handle_file(path) sends this), or null"
)


def check_predict_request(inputs: list) -> list:
    """What a raw HTTP call to /predict must send, checked before Gradio touches a file or a URL in it; returns the
    inputs with `explain` (false) added when left out."""
    if len(inputs) not in (len(PREDICT_INPUTS), len(PREDICT_INPUTS) + 1):
        raise _user_error(
            f"/predict takes {len(PREDICT_INPUTS)} values in order ({', '.join(PREDICT_INPUTS)}; null for one left "
            f"out) and optionally a fourth, explain (true or false); the request sent {len(inputs)}."
        )
    plot, poster, title, explain = (*inputs, False)[:4]
    check_explain(explain)
    inputs = [plot, poster, title, explain]
    check_movie_shape({"plot": plot, "poster": poster, "title": title})
    return inputs


def check_movie_shape(movie: dict, where: str = "") -> None:
    """A movie's raw values have the types /predict documents (`where`: how a message names the movie)."""
    for field in ("plot", "title"):
        value = movie.get(field)
        if value is not None and not isinstance(value, str):
            raise _user_error(f"{where}`{field}` must be text or null, not {type(value).__name__}.")
    poster = movie.get("poster")
    if poster is None:
        return
    # Without this meta key Gradio does not check that the path is an upload (see read_upload for the rest).
    if not isinstance(poster, dict) or poster.get("meta") != FILE_DATA:
        got = f"; got {type(poster).__name__}" + ("" if isinstance(poster, dict) else ".")
        raise _user_error(where + POSTER_SHAPE + got)
    if not isinstance(poster.get("path") or poster.get("url"), str):
        raise _user_error(where + POSTER_SHAPE + "; the file has neither a path nor a url.")


def check_batch_request(inputs: list) -> list:
    """What a call to /predict_batch must send, checked before Gradio touches a file in it: one list of at most
    `max_batch_movies` objects with plot, poster and title only, of /predict's types. A refusal names the movie by
    its index and refuses the whole call (a malformed request); a movie that is only unusable (an undecodable
    poster, an over-long plot) is answered by its own error instead (`predict_batch`)."""
    for i, movie in enumerate(batch_movies(inputs[0] if len(inputs) == 1 else None)):
        check_movie_shape(movie, f"movies[{i}]: ")
    return inputs


def batch_movies(movies: Any) -> list[dict]:
    """The movies of a /predict_batch call: a list of 1 to `max_batch_movies` objects with no key but plot,
    poster and title (else a `gr.Error` naming the first wrong one by its index)."""
    limit = LIMITS.max_batch_movies
    if not isinstance(movies, list) or not movies:
        raise _user_error(f"/predict_batch takes one value, `movies`: a list of 1 to {limit} objects "
                          '{"plot", "poster", "title"} (each key optional).')
    if len(movies) > limit:
        raise _user_error(f"/predict_batch takes at most {limit} movies a call; the request sent {len(movies)}. "
                          f"Send them in calls of {limit} or fewer.")
    for i, movie in enumerate(movies):
        if not isinstance(movie, dict):
            raise _user_error(f'movies[{i}] must be an object {{"plot", "poster", "title"}}, not '
                              f"{type(movie).__name__}.")
        unknown = sorted(set(movie) - set(BATCH_KEYS))
        if unknown:
            raise _user_error(f"movies[{i}] has unknown keys {unknown}: a movie has plot, poster and title (each "
                              "optional).")
    return movies


def guard_requests(demo: gr.Blocks) -> None:
    """Check /predict's raw inputs first, and turn any other refusal of Gradio's own (a path outside the upload
    folder, a private URL, a malformed value) into a message instead of `{"error": null}`, logged as one line."""
    preprocess = demo.preprocess_data

    async def checked_preprocess(block_fn, inputs, state, explicit_call=False):
        if block_fn.api_name in ("predict", EXPLAINED):
            inputs = check_predict_request(list(inputs))
        elif block_fn.api_name == BATCH:
            inputs = check_batch_request(list(inputs))
        try:
            return await preprocess(block_fn, inputs, state, explicit_call)
        except gr.Error as e:
            if not e.print_exception:  # ours: already a message
                raise
            log.warning("refused a request to %s (%s)", block_fn.api_name or "an event", e.message)
            raise _user_error(e.message) from None  # Gradio's own (e.g. a value not among a dropdown's choices)
        except Exception as e:
            log.warning("refused a request to %s (%s)", block_fn.api_name or "an event", type(e).__name__)
            raise _user_error(
                "The request could not be used: a file must be one uploaded to this app (gradio_client.handle_file "
                "uploads it) or a public http(s) image URL, and each value must have the type /predict documents."
            ) from None

    demo.preprocess_data = checked_preprocess


def guard_jobs(demo: gr.Blocks) -> Middleware:
    """The per-client job caps, checked when a job joins the queue, and the explained /predict sent to its twin."""
    ids = {fn.api_name: fn._id for fn in demo.fns.values()}

    def open_jobs() -> list[tuple[str | None, str | None]]:
        """(session hash, client address) of each job in the queue, waiting or running (Gradio 6.31's `Queue`)."""
        queue = demo._queue
        events = [e for q in list(queue.event_queue_per_concurrency_id.values()) for e in list(q.queue)]
        events += [e for job in list(queue.active_jobs) if job for e in job]
        return [(e.session_hash, client_address(e.request.scope) if e.request is not None else None)
                for e in events for _ in range(job_weight(e))]

    def explained(data) -> bool:
        return isinstance(data, list) and len(data) == len(PREDICT_INPUTS) + 1 and data[-1] is True

    quota = JobQuota(LIMITS.max_jobs_per_session, LIMITS.max_jobs_per_ip, open_jobs)
    reroute = Reroute(ids["predict"], ids[EXPLAINED], "predict", EXPLAINED, (*PREDICT_INPUTS, "explain"), explained)
    unserved = [key for fn in demo.fns.values() if fn.fn is None for key in (fn._id, fn.api_name)]
    return Middleware(JobGuard, quota=quota, reroutes=[reroute], unserved=unserved)


def job_weight(event) -> int:
    """What a job counts against the per-client caps: a /predict_batch call its movies (at most the cap of a call:
    more is refused before it runs), any other call one. A client's share of the queue is counted in movies."""
    if getattr(event.fn, "api_name", None) != BATCH:
        return 1
    data = getattr(event.data, "data", None)
    movies = data[0] if isinstance(data, list) and data else None
    return min(max(len(movies), 1), LIMITS.max_batch_movies) if isinstance(movies, list) else 1


def max_request_bytes() -> int:
    """The largest body a valid request can have: an inline poster at the file limit (base64), the longest plots
    and titles of a full /predict_batch call with every character escaped, and room for the JSON around them. (A
    batch's posters are uploads, `gradio_client.handle_file`: inline ones fit only as far as this allows.)"""
    text = (LIMITS.max_plot_chars + MAX_TITLE_CHARS) * 12 * LIMITS.max_batch_movies
    return LIMITS.max_file_mb * 2**20 * 4 // 3 + text + 2**16


def main() -> None:
    """Serve the page (what a Space runs): warm the model up, then launch with the body-size limit."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # Gradio imports matplotlib and pyplot (25 MB) at a process's first event, to switch matplotlib's backend around
    # every call; this page draws no plots, and without matplotlib Gradio skips the switch. (Here, not at import:
    # a process that imports the app, e.g. a notebook, keeps its matplotlib.)
    refuse_imports("matplotlib")
    trust_proxies()
    clean_up_at_exit(UPLOAD_FOLDER, OWN_UPLOAD_FOLDER)
    warm_up(SPACE)
    # GRADIO_SERVER_NAME / GRADIO_SERVER_PORT are read by launch(); show_error stays off so that unexpected
    # exceptions reach users as a generic message, never as a traceback.
    demo.launch(
        max_file_size=LIMITS.max_file_mb * 2**20,
        show_error=False,
        app_kwargs={"middleware": [
            Middleware(BodySizeLimit, max_bytes=max_request_bytes()),
            Middleware(UploadGuard, folder=UploadFolder(UPLOAD_FOLDER, LIMITS.max_upload_folder_mb * 2**20)),
            guard_jobs(demo),
        ]},
    )
    # Stopped (Ctrl-C or SIGTERM): no model call may still run while the interpreter exits (a native thread pool
    # torn down under a running call aborts the process), so what waits is cancelled and the running call finishes.
    SPACE.predictor.close(timeout=60, cancel_pending=True)


# Loaded once, when the Space starts; `demo` at module level, where Spaces and `gradio app.py` look for it.
SPACE = open_space(
    os.environ.get("MMGCS_MODEL", "").strip() or DEFAULT_MODEL, LIMITS, exit_if_missing=__name__ == "__main__"
)
demo = build_demo(SPACE, load_examples(os.environ.get("MMGCS_EXAMPLES", DEFAULT_EXAMPLES).strip()))

if __name__ == "__main__":
    main()
