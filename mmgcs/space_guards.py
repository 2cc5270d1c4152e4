"""The Space's guards around Gradio: raw HTTP checked as the page checks it, with a message for every refusal.

- `poster_input` / `text_input`: the page's poster and text fields, whose preprocessing hands the app the raw value
  (the poster undecoded, read safely from the upload folder; text with its JSON type).
- `guard_requests`: /predict's and /predict_batch's raw inputs checked (`mmgcs.request_checks`) before Gradio
  touches a file or URL in them, and Gradio's own refusals turned into a message instead of `{"error": null}`.
- `guard_jobs`: the per-client job caps and the explained /predict's reroute (`mmgcs.quotas`), as middleware.
- `max_request_bytes`: the body-size limit (`mmgcs.uploads.BodySizeLimit`).

Gradio 6.31 internals used, and why no supported hook does the job (each is marked INTERNAL where it is used):
- `Component.preprocess` replaced on the instance: a `gr.Image` subclass is the documented way, but Gradio's
  component metaclass then writes an `.pyi` stub beside the subclass's source file; `preprocess=False` on the event
  would hand every input over as raw JSON, not just the poster's (and still after Gradio moved the file).
- `Blocks.preprocess_data` wrapped: the one step that sees an event's raw payload before Gradio moves a file into
  its cache or fetches a URL. The supported `validator=` of an event runs as its own event on *preprocessed*
  values (after the file handling this check must precede); ASGI middleware sees the body but cannot answer the
  queue's event stream with a per-event `gr.Error`.
- `Blocks._queue` (its `event_queue_per_concurrency_id` and `active_jobs`) read: Gradio has no public count of the
  jobs a session or address holds; `Blocks.fns` / `BlockFunction._id` map an `api_name` to the fn index the queue's
  join request names (the public `api_info` carries the names, not the indices).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import gradio as gr
from starlette.middleware import Middleware

from mmgcs.quotas import JobGuard, JobQuota, Reroute, client_address
from mmgcs.request_checks import (
    BATCH,
    EXPLAINED,
    MAX_TITLE_CHARS,
    PREDICT_INPUTS,
    check_batch_request,
    check_predict_request,
    user_error,
)
from mmgcs.serving import Limits

log = logging.getLogger("mmgcs.app")


def poster_input(read: Callable[[Any], Any], **kwargs) -> gr.Image:
    """A `gr.Image` whose preprocessing is `read(payload)` (the upload undecoded: `mmgcs.space.Space.read_upload`)
    instead of a PIL open of the file, which turns a non-image into an opaque "Error"."""
    image = gr.Image(type="filepath", **kwargs)
    image.preprocess = read  # INTERNAL (on the instance): a subclass would make Gradio write an .pyi stub
    return image


def _raw_text(payload: Any) -> Any:
    """`gr.Textbox` preprocessing that keeps the JSON type (Gradio's own turns 123 or a list into text)."""
    return payload


def text_input(**kwargs) -> gr.Textbox:
    box = gr.Textbox(**kwargs)
    box.preprocess = _raw_text  # INTERNAL (on the instance), as for poster_input
    return box


def guard_requests(demo: gr.Blocks, limits: Limits) -> None:
    """Check /predict's raw inputs first, and turn any other refusal of Gradio's own (a path outside the upload
    folder, a private URL, a malformed value) into a message instead of `{"error": null}`, logged as one line."""
    preprocess = demo.preprocess_data  # INTERNAL: the only step that sees the raw payload (see the module)

    async def checked_preprocess(block_fn, inputs, state, explicit_call=False):
        if block_fn.api_name in ("predict", EXPLAINED):
            inputs = check_predict_request(list(inputs))
        elif block_fn.api_name == BATCH:
            inputs = check_batch_request(list(inputs), limits.max_batch_movies)
        try:
            return await preprocess(block_fn, inputs, state, explicit_call)
        except gr.Error as e:
            if not e.print_exception:  # ours: already a message
                raise
            log.warning("refused a request to %s (%s)", block_fn.api_name or "an event", e.message)
            raise user_error(e.message) from None  # Gradio's own (e.g. a value not among a dropdown's choices)
        except Exception as e:
            log.warning("refused a request to %s (%s)", block_fn.api_name or "an event", type(e).__name__)
            raise user_error(
                "The request could not be used: a file must be one uploaded to this app (gradio_client.handle_file "
                "uploads it) or a public http(s) image URL, and each value must have the type /predict documents."
            ) from None

    demo.preprocess_data = checked_preprocess


def guard_jobs(demo: gr.Blocks, limits: Limits) -> Middleware:
    """The per-client job caps, checked when a job joins the queue, and the explained /predict sent to its twin."""
    ids = {fn.api_name: fn._id for fn in demo.fns.values()}  # INTERNAL: api_name -> the fn index a join names

    def open_jobs() -> list[tuple[str | None, str | None]]:
        """(session hash, client address) of each job in the queue, waiting or running (Gradio 6.31's `Queue`)."""
        queue = demo._queue  # INTERNAL: no public count of a client's jobs
        events = [e for q in list(queue.event_queue_per_concurrency_id.values()) for e in list(q.queue)]
        events += [e for job in list(queue.active_jobs) if job for e in job]
        return [(e.session_hash, client_address(e.request.scope) if e.request is not None else None)
                for e in events for _ in range(job_weight(e, limits.max_batch_movies))]

    def explained(data) -> bool:
        return isinstance(data, list) and len(data) == len(PREDICT_INPUTS) + 1 and data[-1] is True

    quota = JobQuota(limits.max_jobs_per_session, limits.max_jobs_per_ip, open_jobs)
    reroute = Reroute(ids["predict"], ids[EXPLAINED], "predict", EXPLAINED, (*PREDICT_INPUTS, "explain"), explained)
    unserved = [key for fn in demo.fns.values() if fn.fn is None for key in (fn._id, fn.api_name)]
    return Middleware(JobGuard, quota=quota, reroutes=[reroute], unserved=unserved)


def job_weight(event, max_movies: int) -> int:
    """What a job counts against the per-client caps: a /predict_batch call its movies (at most `max_movies`, the
    cap of a call: more is refused before it runs), any other call one. A client's share of the queue is counted
    in movies."""
    if getattr(event.fn, "api_name", None) != BATCH:
        return 1
    data = getattr(event.data, "data", None)
    movies = data[0] if isinstance(data, list) and data else None
    return min(max(len(movies), 1), max_movies) if isinstance(movies, list) else 1


def max_request_bytes(limits: Limits) -> int:
    """The largest body a valid request can have: an inline poster at the file limit (base64), the longest plots
    and titles of a full /predict_batch call with every character escaped, and room for the JSON around them. (A
    batch's posters are uploads, `gradio_client.handle_file`: inline ones fit only as far as this allows.)"""
    text = (limits.max_plot_chars + MAX_TITLE_CHARS) * 12 * limits.max_batch_movies
    return limits.max_file_mb * 2**20 * 4 // 3 + text + 2**16
