"""mmgcs.request_checks: each bad value of a Space request refused with its own message, before the model sees it."""

from __future__ import annotations

import io

import pytest

gr = pytest.importorskip("gradio")
from PIL import Image  # noqa: E402

from mmgcs.request_checks import (  # noqa: E402
    MAX_TITLE_CHARS,
    batch_movies,
    batch_poster,
    check_batch_request,
    check_explain,
    check_plot,
    check_predict_request,
    check_title,
    decode_poster,
    poster_bytes,
    poster_pixels,
)
from mmgcs.uploads import UploadedPoster  # noqa: E402

FILE = {"path": "x.png", "meta": {"_type": "gradio.FileData"}}


def png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 10, 10)).save(out, format="PNG")
    return out.getvalue()


def refused(call, *args) -> str:
    with pytest.raises(gr.Error) as e:
        call(*args)
    assert e.value.title == "Cannot predict" and not e.value.print_exception  # a message, never a traceback
    return e.value.message


def test_text_values_are_stripped_and_bounded():
    assert check_plot("  A heist.  ", 100) == "A heist."
    assert check_plot("   ", 100) is None and check_title("") is None and check_title(None) is None
    assert "the limit is 10" in refused(check_plot, "x" * 11, 10)
    assert "unpaired UTF-16 surrogate" in refused(check_plot, "bad \ud800 char", 100)
    assert "must be text, not int" in refused(check_plot, 123, 100)
    assert f"the limit is {MAX_TITLE_CHARS}" in refused(check_title, "t" * (MAX_TITLE_CHARS + 1))
    assert check_explain(None) is False and check_explain(True) is True
    assert "true or false, not str" in refused(check_explain, "yes")


def test_posters_are_read_within_their_folders_and_limits(tmp_path):
    inside, outside = tmp_path / "uploads", tmp_path / "elsewhere"
    inside.mkdir(), outside.mkdir()
    (inside / "p.png").write_bytes(png(30, 40))
    (outside / "p.png").write_bytes(png(30, 40))
    read = poster_bytes(str(inside / "p.png"), [str(inside)], 2**20)
    assert read.data == png(30, 40) and "'p.png'" in read.name
    assert poster_pixels(read) == 30 * 40 and decode_poster(read, 10_000).size == (30, 40)
    refused(poster_bytes, str(outside / "p.png"), [str(inside)], 2**20)  # not an upload of this app
    refused(poster_bytes, b"x" * 101, [], 100)  # over the size limit
    assert "not list" in refused(poster_bytes, [1], [], 100)
    assert poster_bytes(None, [], 100) is None and poster_bytes("", [], 100) is None
    assert "pixels" in refused(decode_poster, UploadedPoster(png(200, 200), "The poster"), 10_000)
    refused(poster_pixels, UploadedPoster(b"not an image", "The poster"))
    assert "it has no file" in refused(batch_poster, {"path": None, "url": None}, [str(inside)], 2**20)


def test_a_raw_predict_request_must_have_predicts_shape():
    assert check_predict_request(["a plot", None, None]) == ["a plot", None, None, False]  # explain defaults off
    assert "the request sent 2" in refused(check_predict_request, ["a plot", None])
    assert "`poster` must be a file" in refused(check_predict_request, ["a plot", "/etc/passwd", None])
    assert "neither a path nor a url" in refused(check_predict_request, [None, {"meta": FILE["meta"]}, None])
    assert "`title` must be text or null, not int" in refused(check_predict_request, ["p", None, 5])
    assert check_predict_request([None, FILE, "t", True])[3] is True


def test_a_batch_names_its_first_wrong_movie():
    assert batch_movies([{"plot": "a"}, {"poster": FILE}], 2) == [{"plot": "a"}, {"poster": FILE}]
    assert "at most 2 movies" in refused(batch_movies, [{}] * 3, 2)
    assert "a list of 1 to 2" in refused(batch_movies, [], 2)
    assert "movies[1] has unknown keys ['year']" in refused(batch_movies, [{}, {"year": 1999}], 2)
    assert "movies[0]: `poster` must be a file" in refused(check_batch_request, [[{"poster": "x.png"}]], 2)
