"""What a request to the Space may send: each of /predict's and /predict_batch's values checked before the model
sees it, and their raw HTTP shape checked before Gradio touches a file or a URL in it.

Each bad input gets its own clear `gr.Error` (title "Cannot predict", no traceback): no server path or traceback
reaches the user. The limits come from the caller (`mmgcs.serving.Limits`), and so do the folders a poster path may
point into (`roots`: Gradio's upload cache and the app's examples folder).
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

import gradio as gr
import PIL.Image

from mmgcs.data.images import InvalidImageError, image_size, load_image
from mmgcs.uploads import UPLOAD_REMEDY, UploadedPoster, UploadError, check_size, decode_data_url, read_upload

MAX_TITLE_CHARS = 300  # the longest real titles are ~200 characters
EXPLAINED = "predict_explained"  # the event an explained /predict runs as (its own queue share, see space_guards)
BATCH = "predict_batch"
PREDICT_INPUTS = ("plot", "poster", "title")  # then `explain`, optional (a caller from before it sends three)
BATCH_KEYS = ("plot", "poster", "title")
FILE_DATA = {"_type": "gradio.FileData"}
POSTER_SHAPE = (
    '`poster` must be a file: {"path": <the path /gradio_api/upload returned>, "meta": {"_type": "gradio.FileData"}} '
    "(gradio_client.handle_file(path) sends this), or null"
)


def user_error(message: str) -> gr.Error:
    return gr.Error(message, title="Cannot predict", print_exception=False)


def _valid_text(text: Any, field: str) -> str:
    if not isinstance(text, str):
        raise user_error(f"`{field}` must be text, not {type(text).__name__}.")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate such as "\ud800": no tokenizer can read it
        raise user_error(
            f"The {field} has an invalid character at position {e.start} (an unpaired UTF-16 surrogate). "
            "Remove it or copy the text again."
        ) from None
    return text.strip()


def check_plot(plot: Any, max_chars: int) -> str | None:
    """The plot, stripped, or None when empty; refuses non-text, invalid characters and over-long plots."""
    if plot is None:
        return None
    plot = _valid_text(plot, "plot")
    if not plot:
        return None
    if len(plot) > max_chars:
        raise user_error(
            f"The plot is {len(plot):,} characters long; the limit is {max_chars:,}. Paste a summary "
            "of a paragraph or two, like the plots the model was trained on."
        )
    return plot


def check_title(title: Any) -> str | None:
    """The title, stripped, or None when empty; refuses non-text, invalid characters and over-long titles."""
    if title is None:
        return None
    title = _valid_text(title, "title")
    if len(title) > MAX_TITLE_CHARS:
        raise user_error(f"The title is {len(title):,} characters long; the limit is {MAX_TITLE_CHARS:,}.")
    return title or None


def check_explain(explain: Any) -> bool:
    """Whether to explain the prediction: true or false (null: false); anything else is refused."""
    if explain is None:
        return False
    if not isinstance(explain, bool):
        raise user_error(f"`explain` must be true or false, not {type(explain).__name__}.")
    return explain


def undecoded_upload(payload, roots: Sequence[str], max_bytes: int) -> UploadedPoster | None:
    """A `gr.Image` payload handed over undecoded, as bytes read safely from Gradio's upload folder.

    The payload comes from the client: its path is trusted only inside `roots`, as a regular file, read with a
    hard byte limit (`read_upload`); an inline `data:` URL is refused by its length before decoding. `gr.Image`
    would open the file with PIL itself and turn a non-image into an opaque "Error"; the app instead checks size
    and pixel count before decoding (`decode_poster`) and says what is wrong.
    """
    if payload is None:
        return None
    name = f"The poster {Path(payload.orig_name).name!r}" if getattr(payload, "orig_name", None) else "The poster"
    try:
        if payload.url and payload.url.startswith("data:"):
            return UploadedPoster(decode_data_url(payload.url, max_bytes), name)
        if payload.path:
            return UploadedPoster(read_upload(payload.path, roots, max_bytes), name)
    except UploadError as e:
        raise user_error(str(e)) from None
    # e.g. a bare URL Gradio did not fetch: a poster was sent, so it must not be silently dropped
    raise user_error(f"The poster could not be used: it has no file. {UPLOAD_REMEDY}")


def poster_bytes(poster: Any, roots: Sequence[str], max_bytes: int) -> UploadedPoster | None:
    """The poster's encoded bytes, or None when none was given. A path (from a caller in this process) is read
    under the same rules as an upload: inside `roots`, a regular file, at most `max_bytes`."""
    if poster is None or poster == "":
        return None
    try:
        if isinstance(poster, UploadedPoster):
            return poster
        if isinstance(poster, (bytes, bytearray)):
            check_size(len(poster), max_bytes)
            return UploadedPoster(bytes(poster), "The poster")
        if isinstance(poster, (str, os.PathLike)):
            return UploadedPoster(read_upload(poster, roots, max_bytes), f"The poster {Path(poster).name!r}")
    except UploadError as e:
        raise user_error(str(e)) from None
    raise user_error(f"`poster` must be an image file, not {type(poster).__name__}.")


def batch_poster(payload: Any, roots: Sequence[str], max_bytes: int) -> UploadedPoster | None:
    """A /predict_batch movie's poster: a file (its shape checked by `check_batch_request`) read as /predict reads
    its upload; an in-process caller may also give what /predict's `poster_bytes` takes."""
    if isinstance(payload, dict):
        file = SimpleNamespace(url=payload.get("url"), path=payload.get("path"), orig_name=payload.get("orig_name"))
        return undecoded_upload(file, roots, max_bytes)
    return poster_bytes(payload, roots, max_bytes)


def poster_pixels(poster: UploadedPoster | None) -> int:
    """The pixels a poster decodes to, read from its header (what its request reserves of the Space's pixel budget)."""
    if poster is None:
        return 0
    try:
        width, height = image_size(poster.data, poster.name)
    except InvalidImageError as e:
        raise user_error(str(e)) from None
    return width * height


def decode_poster(poster: UploadedPoster | None, max_pixels: int) -> PIL.Image.Image | None:
    """The decoded RGB poster; refuses undecodable, non-image and oversized images with what is wrong."""
    if poster is None:
        return None
    stream = io.BytesIO(poster.data)
    stream.name = poster.name  # load_image names the input by this in its messages
    try:
        return load_image(stream, max_pixels=max_pixels)
    except InvalidImageError as e:
        raise user_error(str(e)) from None


# ---------------------------------------------------------------------------------------------------------------
# Raw HTTP: a request's shape, checked before Gradio touches a file or a URL in it.


def check_predict_request(inputs: list) -> list:
    """What a raw HTTP call to /predict must send, checked before Gradio touches a file or a URL in it; returns the
    inputs with `explain` (false) added when left out."""
    if len(inputs) not in (len(PREDICT_INPUTS), len(PREDICT_INPUTS) + 1):
        raise user_error(
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
            raise user_error(f"{where}`{field}` must be text or null, not {type(value).__name__}.")
    poster = movie.get("poster")
    if poster is None:
        return
    # Without this meta key Gradio does not check that the path is an upload (see read_upload for the rest).
    if not isinstance(poster, dict) or poster.get("meta") != FILE_DATA:
        got = f"; got {type(poster).__name__}" + ("" if isinstance(poster, dict) else ".")
        raise user_error(where + POSTER_SHAPE + got)
    if not isinstance(poster.get("path") or poster.get("url"), str):
        raise user_error(where + POSTER_SHAPE + "; the file has neither a path nor a url.")


def check_batch_request(inputs: list, max_movies: int) -> list:
    """What a call to /predict_batch must send, checked before Gradio touches a file in it: one list of at most
    `max_movies` objects with plot, poster and title only, of /predict's types. A refusal names the movie by
    its index and refuses the whole call (a malformed request); a movie that is only unusable (an undecodable
    poster, an over-long plot) is answered by its own error instead (`predict_batch`)."""
    for i, movie in enumerate(batch_movies(inputs[0] if len(inputs) == 1 else None, max_movies)):
        check_movie_shape(movie, f"movies[{i}]: ")
    return inputs


def batch_movies(movies: Any, max_movies: int) -> list[dict]:
    """The movies of a /predict_batch call: a list of 1 to `max_movies` objects with no key but plot,
    poster and title (else a `gr.Error` naming the first wrong one by its index)."""
    limit = max_movies
    if not isinstance(movies, list) or not movies:
        raise user_error(f"/predict_batch takes one value, `movies`: a list of 1 to {limit} objects "
                         '{"plot", "poster", "title"} (each key optional).')
    if len(movies) > limit:
        raise user_error(f"/predict_batch takes at most {limit} movies a call; the request sent {len(movies)}. "
                         f"Send them in calls of {limit} or fewer.")
    for i, movie in enumerate(movies):
        if not isinstance(movie, dict):
            raise user_error(f'movies[{i}] must be an object {{"plot", "poster", "title"}}, not '
                             f"{type(movie).__name__}.")
        unknown = sorted(set(movie) - set(BATCH_KEYS))
        if unknown:
            raise user_error(f"movies[{i}] has unknown keys {unknown}: a movie has plot, poster and title (each "
                             "optional).")
    return movies
