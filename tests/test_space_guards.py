"""mmgcs.space_guards: the page's fields hand over raw values, a raw request is checked before Gradio reads it,
a batch job counts as its movies, and the body limit grows with what a valid request may hold."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from types import SimpleNamespace

import pytest

gr = pytest.importorskip("gradio")

from mmgcs.serving import Limits  # noqa: E402
from mmgcs.space_guards import guard_requests, job_weight, max_request_bytes, poster_input, text_input  # noqa: E402


def test_a_batch_job_counts_as_its_movies_against_the_per_client_caps():
    def job(api_name, data):
        return SimpleNamespace(fn=SimpleNamespace(api_name=api_name), data=SimpleNamespace(data=data))

    assert job_weight(job("predict", ["a plot", None, None, False]), 16) == 1
    assert job_weight(job("predict_batch", [[{"plot": "a"}] * 5]), 16) == 5
    assert job_weight(job("predict_batch", [[{"plot": "a"}] * 500]), 16) == 16  # refused before it runs
    assert job_weight(job("predict_batch", ["not a list"]), 16) == 1
    assert job_weight(SimpleNamespace(fn=SimpleNamespace(api_name="predict_batch"), data=None), 16) == 1


def test_the_body_limit_holds_an_inline_poster_and_a_full_batch():
    limits = Limits()
    assert max_request_bytes(limits) > limits.max_file_mb * 2**20 * 4 // 3  # a base64 poster at the file limit
    more = replace(limits, max_batch_movies=limits.max_batch_movies * 2)
    assert max_request_bytes(more) - max_request_bytes(limits) >= limits.max_plot_chars * limits.max_batch_movies


def test_the_fields_hand_over_the_raw_values():
    read = []
    with gr.Blocks():
        poster = poster_input(lambda payload: read.append(payload) or "undecoded")
        box = text_input()
    assert poster.preprocess("a payload") == "undecoded" and read == ["a payload"]
    assert box.preprocess(123) == 123 and box.preprocess(["a"]) == ["a"]  # Gradio's own would make them text


def test_a_raw_request_is_checked_before_gradio_reads_it():
    with gr.Blocks() as demo:
        inputs = [gr.Textbox(), gr.Image(type="filepath"), gr.Textbox(), gr.Checkbox()]  # plot, poster, title, explain
        gr.Button().click(lambda *a: None, inputs=inputs, api_name="predict")
    guard_requests(demo, Limits())
    fn = next(f for f in demo.fns.values() if f.api_name == "predict")
    with pytest.raises(gr.Error, match="the request sent 2"):
        asyncio.run(demo.preprocess_data(fn, ["a plot", None], None))
    with pytest.raises(gr.Error, match="`poster` must be a file"):
        asyncio.run(demo.preprocess_data(fn, ["a plot", "/etc/passwd", None], None))
    with pytest.raises(gr.Error) as e:  # Gradio's own refusal (a path it will not read) becomes a message
        asyncio.run(demo.preprocess_data(fn, ["a plot", {"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}},
                                              None, False], None))
    assert not e.value.print_exception and e.value.message
