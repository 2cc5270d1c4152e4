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

The serving logic (model loading, limits, precision, request batching) lives in `mmgcs.serving`, the API's
handlers in `mmgcs.space`, the input checks in `mmgcs.request_checks`, the raw-HTTP guards around Gradio in
`mmgcs.space_guards` and the drawing of an answer in `mmgcs.render`; this file is the page and its wiring.

API (see the app's "Use via API" page): `/predict(plot, poster, title, explain) -> {"scores", "genres",
"by_modality"}` (every parameter optional; the title is read only by a model trained with it, see
`ModelConfig.text_template`; `explain=true` adds `"explanation"`, see `mmgcs.explain`),
`/predict_batch(movies) -> [one /predict answer per movie]` (up to `MMGCS_MAX_BATCH_MOVIES` movies a call, each
`{"plot", "poster", "title"}`; a movie that cannot be classified gets `{"index", "error"}`) and
`/model_info() -> {"labels", "thresholds", ...}`.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import shutil
import tempfile
from pathlib import Path

from mmgcs.runtime import configure_cpu_policy, refuse_imports, skip_triton_without_gpu
from mmgcs.uploads import own_upload_folder

# The Space must not phone home; set before gradio is imported (it reads this at import time), and so is the upload
# folder. Idle OpenMP workers sleep instead of spinning: set before anything loads torch (see mmgcs.runtime).
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# Gradio's queue rebuilds a pandas summary of its last 10,000 events after every event, for its /monitoring page
# (unused here): measured 2 ms of CPU an event on a new server and 9 ms once it holds 10,000, a cost that grew as a
# soak went on. Once every 1,000 events keeps that page's figures. Read when the queue is made (demo.queue).
os.environ.setdefault("GRADIO_ANALYTICS_CACHE_FREQUENCY", "1000")
UPLOAD_FOLDER, OWN_UPLOAD_FOLDER = own_upload_folder()
configure_cpu_policy()
skip_triton_without_gpu()  # before torchvision loads: 125 MB the Space's CPU-only serving never uses

import gradio as gr  # noqa: E402
from starlette.middleware import Middleware  # noqa: E402

from mmgcs import render as rendering  # noqa: E402
from mmgcs.data.images import InvalidImageError, load_image  # noqa: E402
from mmgcs.data.inputs import read_dataset  # noqa: E402
from mmgcs.quotas import trust_proxies  # noqa: E402
from mmgcs.render import COLUMNS  # noqa: E402
from mmgcs.request_checks import BATCH, EXPLAINED, MAX_TITLE_CHARS  # noqa: E402
from mmgcs.serving import Limits, ServingConfigError  # noqa: E402
from mmgcs.space import Space, open_space, warm_up  # noqa: E402
from mmgcs.space_guards import guard_jobs, guard_requests, max_request_bytes, poster_input, text_input  # noqa: E402
from mmgcs.uploads import BodySizeLimit, UploadFolder, UploadGuard, clean_up_at_exit, inline_image  # noqa: E402

log = logging.getLogger("mmgcs.app")

DEFAULT_MODEL = "runs/fusion/model"
DEFAULT_EXAMPLES = "data/movies"
N_EXAMPLES = 4
EXAMPLE_FOLDERS: list[str] = []  # where load_examples put the example posters (a poster path may point there)

try:
    LIMITS = Limits.from_env()
except ServingConfigError as e:
    raise SystemExit(str(e)) from None


# ---------------------------------------------------------------------------------------------------------------
# The page's own handlers: the served Space's, with the inputs the page wires to them.


def render(result: dict | None, title: str | None):
    """The /predict JSON → (verdict Markdown, Label scores, per-modality table); see `mmgcs.render`."""
    return rendering.render(result, title, SPACE)


def explanation_view(result: dict | None, genre: str | None, poster):
    """(genre dropdown, highlighted plot, poster heat map) for `genre`; see `mmgcs.render`."""
    return rendering.explanation_view(result, genre, poster, SPACE)


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
        movies = read_dataset(source, "test", labelled=True)  # the tools' reader (mmgcs.data.inputs)
    except Exception as e:
        log.warning("no examples: could not load the dataset %s (%s: %s)", source, type(e).__name__, e)
        return []
    folder = Path(tempfile.mkdtemp(prefix="mmgcs-examples-"))
    EXAMPLE_FOLDERS.append(str(folder))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    chosen, seen = [], set()
    for movie in itertools.islice(movies, 300):
        if len(chosen) >= n:
            break
        genres = set(movie.genres)
        if not movie.plot or not movie.poster or genres <= seen:
            continue  # prefer movies that add a genre not shown yet
        try:
            poster = load_image(movie.poster)
        except InvalidImageError:
            continue
        file = folder / f"{movie.id}.jpg"
        poster.save(file, format="JPEG", quality=90)
        chosen.append([movie.title or "", movie.plot, str(file)])
        seen |= genres
    return chosen


# ---------------------------------------------------------------------------------------------------------------
# The page.

DESCRIPTION = """\
# MMGCS — movie genres from a plot and a poster
Give a movie's **plot**, its **poster**, or both, and the model predicts its genres (several at once).
The table shows the scores from the plot alone, the poster alone and both together, so you can see which input
drove each genre."""


def _about(space: Space) -> str:
    info = space.model_info()
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
        space.read_upload, label="Poster", sources=["upload", "clipboard"], height=360, visible=space.reads_poster,
        elem_id="poster",
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
        # Sent inline, no file written per call. INTERNAL (on the instance, as mmgcs.space_guards' fields do): a
        # gr.Image output always saves its image into the cache (its base64 output is for webcam streaming only).
        heat.postprocess = inline_image
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
        gr.Markdown(_about(space))

        outputs = [verdict, top, table, raw, words, heat]
        # Clear the last answer first, so that a refused input never leaves another movie's genres on screen.
        submit.click(
            lambda: ("", None, None, None, None, None), outputs=outputs, api_visibility="private", queue=False
        ).then(
            space.predict,
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
            space.predict, inputs=[plot, poster, title, explain], outputs=raw, api_name=EXPLAINED,
            api_visibility="private", concurrency_limit=LIMITS.explain_concurrency, concurrency_id="explain",
        )
        demo.load(lambda: True, outputs=explain, api_visibility="private", queue=False)
        clear.add([title, plot, poster, verdict, top, table, raw, words, heat])
        # Its movies join the same micro-batches as /predict's (one model, one batcher), in the same slots.
        gr.api(space.predict_batch, api_name=BATCH, concurrency_limit=LIMITS.concurrency, concurrency_id="model")
        gr.api(space.model_info, api_name="model_info", concurrency_limit=None)
    # api_open=False: an event of the queue cannot be run directly (POST /run/<name>), around the queue's limits.
    demo.queue(default_concurrency_limit=LIMITS.concurrency, max_size=LIMITS.queue_size, api_open=False)
    guard_requests(demo, LIMITS)
    return demo


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
            Middleware(BodySizeLimit, max_bytes=max_request_bytes(LIMITS)),
            Middleware(UploadGuard, folder=UploadFolder(UPLOAD_FOLDER, LIMITS.max_upload_folder_mb * 2**20)),
            guard_jobs(demo, LIMITS),
        ]},
    )
    # Stopped (Ctrl-C or SIGTERM): no model call may still run while the interpreter exits (a native thread pool
    # torn down under a running call aborts the process), so what waits is cancelled and the running call finishes.
    SPACE.predictor.close(timeout=60, cancel_pending=True)


# Loaded once, when the Space starts; `demo` at module level, where Spaces and `gradio app.py` look for it.
SPACE = open_space(
    os.environ.get("MMGCS_MODEL", "").strip() or DEFAULT_MODEL, LIMITS, exit_if_missing=__name__ == "__main__",
    example_folders=EXAMPLE_FOLDERS,
)
# The API's handlers (their docstrings are the "Use via API" page), served by the Space's one batching predictor.
predict, predict_batch, model_info = SPACE.predict, SPACE.predict_batch, SPACE.model_info
demo = build_demo(SPACE, load_examples(os.environ.get("MMGCS_EXAMPLES", DEFAULT_EXAMPLES).strip()))

if __name__ == "__main__":
    main()
