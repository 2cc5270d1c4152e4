"""The Space's served model and its API handlers: /predict, /predict_batch and /model_info over one batching
predictor, each input checked (`mmgcs.request_checks`) and each decoded poster held within the pixel budget.

`app.py` opens one `Space` when it starts and wires these handlers to its page; their docstrings are what the
app's "Use via API" page shows.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
import gradio.utils
import PIL.Image

from mmgcs.request_checks import (
    batch_movies,
    batch_poster,
    check_explain,
    check_plot,
    check_title,
    decode_poster,
    poster_bytes,
    poster_pixels,
    undecoded_upload,
    user_error,
)
from mmgcs.serving import (
    BatchingPredictor,
    Limits,
    ModelNotFoundError,
    ServingConfigError,
    choose_precision,
    load_model,
    log_failure,
)
from mmgcs.uploads import PixelBudget, Thumbnails, UploadedPoster, UploadError

log = logging.getLogger("mmgcs.app")

MODEL_FAILED = "The model failed on this input. Try again; if it keeps failing, try another poster or plot."


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
    limits: Limits = field(default_factory=Limits)
    example_folders: list[str] = field(default_factory=list)  # where load_examples put the example posters
    thumbnails: Thumbnails = field(default_factory=Thumbnails)  # the posters explained lately, small (the heat map)

    def upload_roots(self) -> list[str]:
        """The only folders a poster path may point into: Gradio's upload cache (where every upload, URL download
        and example file is put) and this app's own examples folder."""
        # gradio.utils.get_upload_folder: where Gradio's own upload route and delete_cache put and clear them
        return [gradio.utils.get_upload_folder(), *self.example_folders]

    def read_upload(self, payload) -> UploadedPoster | None:
        """The poster `gr.Image` was sent, undecoded (its preprocessing: see `mmgcs.space_guards.poster_input`)."""
        return undecoded_upload(payload, self.upload_roots(), self.limits.max_file_mb * 2**20)

    def _batch_poster(self, payload: Any) -> UploadedPoster | None:
        return batch_poster(payload, self.upload_roots(), self.limits.max_file_mb * 2**20)

    def decode(self, poster: UploadedPoster | None) -> PIL.Image.Image | None:
        return decode_poster(poster, self.limits.max_image_pixels)

    def predict(self, plot: str | None = None, poster: str | None = None, title: str | None = None,
                explain: bool = False) -> dict:
        """Predict a movie's genres from its plot, its poster, or both (give at least one).

        Args:
            plot: the movie's plot or synopsis, in English (see /model_info for the length limit)
            poster: the poster image file, JPEG, PNG, WebP or GIF (see /model_info for the size and pixel limits)
            title: the movie's title (optional); read with the plot by a model trained with titles (/model_info
                "reads_title"), else ignored
            explain: true to add "explanation" (slower: about a second more on CPU): for each predicted genre, the
                plot words and word pairs that pushed it up and down with their contributions to the logit (exact for
                the lexical branch, not the neural text tower), the plot's and the poster's share of the decision,
                and a 7x7 poster occlusion map (see mmgcs.explain)
        Returns:
            {"scores": {genre: probability}, "genres": [predicted genres, per-genre thresholds applied],
            "by_modality": {"text": scores from the plot alone, "image": from the poster alone, "fused": from both},
            and with explain "explanation": {"text", "genres": {genre: {"lexical": {"up", "down"}, "plot_share",
            "occlusion", ...}}}}
        """
        explain = check_explain(explain)
        encoded = poster_bytes(poster, self.upload_roots(), self.limits.max_file_mb * 2**20)
        plot_text, encoded, title_text, notes = self.movie_inputs(plot, encoded, title)
        try:
            # The decoded poster is held until its answer is ready: the budget bounds what all requests hold at once.
            with self.pixel_budget.reserve(poster_pixels(encoded)):
                image = self.decode(encoded)
                if explain and image is not None:
                    self.thumbnails.put(encoded.data, image)
                result = self._run_model(plot_text, image, title_text, explain)
        except UploadError as e:
            raise user_error(str(e)) from None
        if notes:
            result = {**result, "notes": notes}
        return result

    def movie_inputs(self, plot: Any, encoded: UploadedPoster | None, title: Any) -> tuple:
        """(plot, encoded poster, title, notes) of one movie, checked; what the model does not read is dropped with
        a note; a `gr.Error` when nothing is left to classify."""
        plot_text, title_text = check_plot(plot, self.limits.max_plot_chars), check_title(title)
        notes = []
        if plot_text is not None and not self.reads_plot:
            plot_text, notes = None, notes + ["This model reads posters only; the plot was ignored."]
        if encoded is not None and not self.reads_poster:
            encoded, notes = None, notes + ["This model reads plots only; the poster was ignored."]
        if plot_text is None and encoded is None:
            wanted = " and/or ".join(w for w, ok in (("a plot", self.reads_plot), ("a poster", self.reads_poster))
                                     if ok)
            raise user_error(f"Nothing to classify: give {wanted}.")
        return plot_text, encoded, title_text, notes

    def _run_model(self, plot: str | None, image: PIL.Image.Image | None, title: str | None,
                   explain: bool = False) -> dict:
        try:
            # the default call as before explanations existed (anything standing in for the predictor still fits)
            return self.predictor(plot, image, title, explain=True) if explain else self.predictor(plot, image, title)
        except Exception as e:
            log_failure(log, "prediction failed", e)  # the details stay in the server log
            raise gr.Error(MODEL_FAILED, title="Prediction failed", print_exception=False) from None

    def predict_batch(self, movies: list[dict]) -> list[dict]:
        """Predict the genres of several movies in one call, each as /predict would (the same checks, model and
        answer).

        Args:
            movies: a list of at most /model_info limits.max_batch_movies movies, each {"plot": text, "poster": an
                image file (gradio_client.handle_file(path)), "title": text}, every key optional (give a plot, a
                poster or both)
        Returns:
            one answer per movie, in order: what /predict answers for it, or {"index": its position, "error": why}
            for a movie that cannot be classified (the others are answered all the same)
        """
        # a call over HTTP was checked whole before Gradio read it (check_batch_request)
        movies = batch_movies(movies, self.limits.max_batch_movies)
        answers: list = [None] * len(movies)
        sent, group = [], []  # (index, future, notes) given to the model; (index, item, release, notes) not yet
        try:
            for i, movie in enumerate(movies):
                try:
                    plot, encoded, title, notes = self.movie_inputs(
                        movie.get("plot"), self._batch_poster(movie.get("poster")), movie.get("title"))
                    pixels = poster_pixels(encoded)
                    if group and self.pixel_budget.in_use + pixels > self.pixel_budget.max_pixels:
                        sent += self._send(group)  # this call's own posters must not wait for each other's budget
                        group = []
                    group.append((i, *self._decoded(plot, encoded, title, pixels), notes))
                except gr.Error as e:
                    answers[i] = {"index": i, "error": e.message}
            sent += self._send(group)
            group = []
        finally:
            for _, _, release, _ in group:  # an unexpected failure: what this call holds of the budget goes back
                release()
        return self._answers(answers, sent)

    @staticmethod
    def _answers(answers: list, sent: list) -> list[dict]:
        """Each sent movie's answer in its place (a model failure: that movie's error, without details)."""
        for i, future, notes in sent:
            try:
                result = future.result()
            except Exception as e:
                log_failure(log, "prediction failed", e)  # the details stay in the server log
                answers[i] = {"index": i, "error": MODEL_FAILED}
            else:
                answers[i] = {**result, "notes": notes} if notes else result
        return answers

    def _decoded(self, plot: str | None, encoded: UploadedPoster | None, title: str | None, pixels: int) -> tuple:
        """(the model's item, the call that gives its pixels back): the poster decoded within the pixel budget, held
        until the model has answered for it (as /predict holds it)."""
        held = ExitStack()
        try:
            held.enter_context(self.pixel_budget.reserve(pixels))
            image = self.decode(encoded)
        except UploadError as e:
            held.close()
            raise user_error(str(e)) from None
        except BaseException:
            held.close()
            raise
        return (plot, image, title), held.close

    def _send(self, group: list) -> list:
        """The decoded movies to the batcher as one group; each gives its pixels back once answered."""
        if not group:
            return []
        futures = self.predictor.submit_movies([item for _, item, _, _ in group])
        for (_, _, release, _), future in zip(group, futures):
            future.add_done_callback(lambda _, release=release: release())
        return [(i, future, notes) for (i, _, _, notes), future in zip(group, futures)]

    def model_info(self) -> dict:
        """The model's genres, per-genre decision thresholds, backbones, precision and this app's input limits.

        Returns:
            {"labels": [...], "thresholds": {genre: threshold}, "reads_plot": bool, "reads_poster": bool, ...}
        """
        cfg = self.model.config
        return {
            "labels": self.labels,
            "thresholds": self.thresholds,
            "reads_plot": self.reads_plot,
            "reads_poster": self.reads_poster,
            "reads_title": self.reads_title,
            "text_backbone": _backbone_name(cfg.text_backbone) if self.reads_plot else None,
            "image_backbone": _backbone_name(cfg.image_backbone) if self.reads_poster else None,
            "fusion": cfg.fusion,
            "device": self.model.device.type,
            "precision": self.precision,
            "limits": asdict(self.limits),
        }


def _backbone_name(name: str) -> str:
    """A backbone's Hub id as is; a local folder by its last part only (no server paths on the page or API)."""
    if name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1 or Path(name).is_dir():
        return Path(name).name
    return name


def open_space(source: str, limits: Limits, *, exit_if_missing: bool, example_folders: list[str] | None = None
               ) -> Space:
    """Load the model and its batching predictor. A bad setting stops the app with its remedy (`SystemExit`: the
    message, without a traceback, in the Space's logs), and so does a missing model when `exit_if_missing`.
    `example_folders`: the app's examples folders (a poster path may point there too), filled as they are made."""
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
        limits=limits,
        example_folders=example_folders if example_folders is not None else [],
    )


def warm_up(space: Space) -> None:
    """One prediction before serving, so the first user does not pay for lazy initialisation."""
    try:
        space.predictor(
            "A warm-up plot." if space.reads_plot else None,
            PIL.Image.new("RGB", (64, 96)) if space.reads_poster else None,
        )
    except Exception:
        log.warning("warm-up prediction failed", exc_info=True)
