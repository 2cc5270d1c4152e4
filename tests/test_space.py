"""mmgcs.space: the Space's handlers over a stand-in predictor: what the model does not read is dropped with a
note, a batch answers each movie in its place (its own error for one that fails), and /model_info shows no server
path."""

from __future__ import annotations

import io
from concurrent.futures import Future
from types import SimpleNamespace

import pytest

gr = pytest.importorskip("gradio")
from PIL import Image  # noqa: E402

from mmgcs.serving import Limits  # noqa: E402
from mmgcs.space import MODEL_FAILED, Space, warm_up  # noqa: E402
from mmgcs.uploads import PixelBudget  # noqa: E402

LABELS = ["Comedy", "Drama"]


class Predictor:
    """Answers a plot containing "ghost" with a failure, any other movie with what it was given."""

    def __init__(self):
        self.calls = []

    def __call__(self, plot, image, title=None, explain=False):
        self.calls.append((plot, image, title))
        return {"scores": {"Comedy": 0.9, "Drama": 0.1}, "genres": ["Comedy"], "plot": plot}

    def submit_movies(self, items):
        futures = []
        for plot, image, title in items:
            future = Future()
            if plot and "ghost" in plot:
                future.set_exception(RuntimeError("/secret/path exploded"))
            else:
                future.set_result({"scores": {"Comedy": 0.5, "Drama": 0.5}, "genres": [], "plot": plot,
                                   "size": image.size if image else None})
            futures.append(future)
        return futures


def space(reads_plot=True, reads_poster=True) -> Space:
    config = SimpleNamespace(text_backbone="/home/me/models/minilm", image_backbone="timm/efficientnet_b0",
                             fusion="gated")
    return Space(model=SimpleNamespace(config=config, device=SimpleNamespace(type="cpu")), predictor=Predictor(),
                 precision="fp32", pixel_budget=PixelBudget(10**6), labels=LABELS,
                 thresholds={"Comedy": 0.5, "Drama": 0.5}, reads_plot=reads_plot, reads_poster=reads_poster,
                 reads_title=False, limits=Limits(max_plot_chars=100))


def png(width=30, height=40) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height)).save(out, format="PNG")
    return out.getvalue()


def test_what_the_model_does_not_read_is_dropped_with_a_note():
    served = space(reads_poster=False)
    answer = served.predict(plot="  A comedy.  ", poster=png())
    assert answer["plot"] == "A comedy." and served.predictor.calls == [("A comedy.", None, None)]
    assert answer["notes"] == ["This model reads plots only; the poster was ignored."]
    with pytest.raises(gr.Error, match="Nothing to classify: give a plot."):
        served.predict(poster=png())
    with pytest.raises(gr.Error, match="the limit is 100"):
        served.predict(plot="x" * 101)


def test_a_batch_answers_each_movie_in_its_place():
    served = space()
    answers = served.predict_batch([{"plot": "A ghost."}, {"poster": png(30, 40)}, {"title": "no movie"},
                                    {"plot": "A comedy."}])
    assert answers[0] == {"index": 0, "error": MODEL_FAILED}  # no detail of the failure
    assert answers[1]["size"] == (30, 40)
    assert answers[2] == {"index": 2, "error": "Nothing to classify: give a plot and/or a poster."}
    assert answers[3]["plot"] == "A comedy."
    assert served.pixel_budget.in_use == 0  # every poster's pixels given back
    with pytest.raises(gr.Error, match="at most 16 movies"):
        served.predict_batch([{"plot": "a"}] * 17)


def test_model_info_shows_no_server_path_and_the_warm_up_predicts_once():
    served = space()
    info = served.model_info()
    assert info["text_backbone"] == "minilm" and info["image_backbone"] == "timm/efficientnet_b0"
    assert info["labels"] == LABELS and info["limits"]["max_plot_chars"] == 100
    warm_up(served)
    (plot, image, _), = served.predictor.calls
    assert plot == "A warm-up plot." and image.size == (64, 96)
