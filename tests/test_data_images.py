"""mmgcs.data.images: every input kind, every colour mode to RGB, and refusals with clear messages."""

from __future__ import annotations

import io
import time

import numpy as np
import PIL.Image
import PIL.ImageFile
import pytest

from data_helpers import animated_gif, bomb_png, image_bytes
from mmgcs.data.images import MAX_IMAGE_PIXELS, InvalidImageError, load_image, prepare_poster


def test_every_input_kind_gives_the_same_rgb_image(tmp_path):
    data = image_bytes("PNG")  # lossless, so every route must give identical pixels
    path = tmp_path / "p.png"
    path.write_bytes(data)
    expected = np.asarray(PIL.Image.open(io.BytesIO(data)).convert("RGB"))
    inputs = [data, bytearray(data), str(path), path, {"bytes": data, "path": None}, {"bytes": None, "path": str(path)},
              PIL.Image.open(path), io.BytesIO(data), expected.copy()]
    for value in inputs:
        img = load_image(value)
        assert img.mode == "RGB" and img.size == (20, 30)
        assert np.array_equal(np.asarray(img), expected), type(value)


@pytest.mark.parametrize("fmt,mode", [("JPEG", "CMYK"), ("JPEG", "L"), ("PNG", "RGBA"), ("PNG", "LA"), ("PNG", "P"),
                                      ("PNG", "1"), ("PNG", "I;16"), ("WEBP", "RGB"), ("TIFF", "F")])
def test_modes_are_normalized_to_rgb(fmt, mode):
    data = image_bytes(fmt, mode)
    img = load_image(data)
    assert img.mode == "RGB" and img.size == (20, 30)
    prepared = prepare_poster(data)
    assert prepared.change and fmt in prepared.change and "to RGB" in prepared.change
    again = PIL.Image.open(io.BytesIO(prepared.data))
    assert again.mode == "RGB" and again.format == prepared.format


def test_transparent_pixels_become_white_not_black():
    img = PIL.Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    assert load_image(buf.getvalue()).getpixel((1, 1)) == (255, 255, 255)


def test_sixteen_bit_grayscale_is_rescaled_not_clipped():
    arr = (np.arange(600, dtype=np.uint16).reshape(20, 30) * 100)  # 0 .. 59,900
    buf = io.BytesIO()
    PIL.Image.fromarray(arr).save(buf, format="PNG")
    out = np.asarray(load_image(buf.getvalue()))
    assert out.min() == 0 and out.max() == 255 and len(np.unique(out)) > 100


def test_animated_poster_keeps_the_first_frame():
    data = animated_gif()
    img = load_image(data)
    assert img.mode == "RGB" and img.getpixel((5, 5)) == (255, 0, 0)
    prepared = prepare_poster(data)
    assert "animated" in prepared.change and "first frame" in prepared.change


def test_rgb_jpeg_keeps_its_original_bytes():
    data = image_bytes("JPEG")
    prepared = prepare_poster(data)
    assert prepared.data is data and prepared.change is None and prepared.format == "JPEG"


def test_truncated_jpeg_is_refused_even_when_pil_is_told_to_tolerate_it(monkeypatch):
    data = image_bytes("JPEG", size=(200, 300))
    cut = data[: int(len(data) * 0.6)]
    with pytest.raises(InvalidImageError, match="truncated"):
        load_image(cut)
    monkeypatch.setattr(PIL.ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as some libraries set it globally
    with pytest.raises(InvalidImageError, match="truncated"):
        load_image(cut)
    assert PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored for whoever set it


def test_corrupt_body_and_non_images_are_refused_with_the_remedy():
    png = bytearray(image_bytes("PNG", size=(64, 64)))
    start = png.index(b"IDAT") + 20
    png[start:start + 200] = b"\xff" * 200  # garbage inside the compressed pixel data
    cases = [(bytes(png), "corrupt"), (b"<html><body>404 Not Found</body></html>", "HTML"), (b"", "empty"), (b"GIF89a\x00\x00", "")]
    for bad, what in cases:
        with pytest.raises(InvalidImageError) as e:
            load_image(bad)
        assert what in str(e.value)
        assert "Provide" in str(e.value) or "Re-" in str(e.value)


def test_decompression_bomb_is_refused_fast_before_decoding():
    data = bomb_png(20000)
    start = time.perf_counter()
    with pytest.raises(InvalidImageError, match="decompression bomb|over the limit"):
        load_image(data)
    assert time.perf_counter() - start < 2.0  # the 400 MP image was never decoded
    with pytest.raises(InvalidImageError, match="Resize"):
        prepare_poster(data)


def test_pixel_limit_is_configurable_and_applies_to_pil_and_arrays():
    small = PIL.Image.new("RGB", (100, 100))
    assert load_image(small).size == (100, 100)
    with pytest.raises(InvalidImageError, match="10,000 pixels is over the limit of 5,000"):
        load_image(small, max_pixels=5000)
    with pytest.raises(InvalidImageError, match="over the limit"):
        load_image(np.zeros((100, 100, 3), np.uint8), max_pixels=5000)
    assert 20000 * 20000 > MAX_IMAGE_PIXELS >= 6000 * 6000


def test_missing_file_and_unsupported_types_name_the_problem(tmp_path):
    with pytest.raises(InvalidImageError, match="not found"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(InvalidImageError, match="neither 'bytes' nor 'path'"):
        load_image({"bytes": None, "path": None})
    with pytest.raises(InvalidImageError, match="Cannot read an image from a int"):
        load_image(42)
    with pytest.raises(InvalidImageError, match="shape"):
        load_image(np.zeros((2, 2, 7), np.uint8))


def test_invalid_image_error_is_a_value_error():
    assert issubclass(InvalidImageError, ValueError)


def test_concurrent_loads_stay_strict_and_restore_the_global_flag(monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    good = image_bytes("JPEG", size=(120, 180))
    cut = good[: len(good) // 2]
    monkeypatch.setattr(PIL.ImageFile, "LOAD_TRUNCATED_IMAGES", True)

    def outcome(data):
        try:
            load_image(data)
            return "ok"
        except InvalidImageError:
            return "refused"

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(outcome, [good, cut] * 40))
    assert results == ["ok", "refused"] * 40
    assert PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True


# ------------------------------------------------------------------------------------------------------------------
# Memory and content safety (issue 9)


def test_a_non_image_message_never_quotes_the_content():
    from mmgcs.data.images import InvalidImageError, load_image

    with pytest.raises(InvalidImageError) as err:
        load_image(b"root:x:0:0:SECRET-MARKER:/root:/bin/bash\n")
    assert "SECRET" not in str(err.value) and "root:" not in str(err.value)
    assert "not a recognised image" in str(err.value)


@pytest.mark.parametrize("size", [(1, 25), (21, 1), (1, 40_000)])
def test_a_thin_image_is_refused_before_decoding(size):
    import io

    from PIL import Image

    from mmgcs.data.images import InvalidImageError, image_size, load_image

    data = io.BytesIO()
    Image.new("L", size).save(data, format="PNG")
    with pytest.raises(InvalidImageError, match="too thin"):
        load_image(data.getvalue())
    assert image_size(data.getvalue()) == size  # the header alone, for the app's pixel budget


def test_a_huge_jpeg_is_decoded_at_a_reduced_scale_and_a_poster_exactly():
    import io

    import numpy as np
    from PIL import Image

    from mmgcs.data.images import DRAFT_MIN_SIDE, load_image

    def jpeg(w, h):
        data = io.BytesIO()
        Image.new("RGB", (w, h), (200, 40, 40)).save(data, format="JPEG")
        return data.getvalue()

    big = load_image(jpeg(4400, 6000))
    assert DRAFT_MIN_SIDE <= min(big.size) < 2 * DRAFT_MIN_SIDE
    assert abs(big.width / big.height - 4400 / 6000) < 0.01
    poster_bytes = jpeg(500, 750)
    poster = load_image(poster_bytes)
    assert poster.size == (500, 750)
    assert np.array_equal(np.asarray(poster), np.asarray(Image.open(io.BytesIO(poster_bytes)).convert("RGB")))


def test_a_ycbcr_tiff_is_named_unsupported_not_truncated():
    buf = io.BytesIO()
    PIL.Image.open(io.BytesIO(image_bytes("PNG"))).convert("YCbCr").save(buf, format="TIFF")  # uncompressed YCbCr
    data = buf.getvalue()
    with pytest.raises(InvalidImageError) as raised:
        load_image(data)
    message = str(raised.value)
    assert "unsupported image: a YCbCr TIFF, uncompressed" in message and "not truncated" in message
    assert "Re-save it as an RGB JPEG or PNG" in message
    with pytest.raises(InvalidImageError, match="truncated"):  # cut short, it is truncated after all
        load_image(data[: len(data) // 2])


@pytest.mark.parametrize("chunk", ["zTXt", "iCCP"])
def test_a_png_with_an_oversized_metadata_chunk_names_it(chunk):
    import PIL.PngImagePlugin

    img, buf = PIL.Image.open(io.BytesIO(image_bytes("PNG"))), io.BytesIO()
    big = 2 * PIL.PngImagePlugin.MAX_TEXT_CHUNK  # compresses to a few KB, decompresses over PIL's limit
    if chunk == "zTXt":
        info = PIL.PngImagePlugin.PngInfo()
        info.add_text("comment", "a" * big, zip=True)
        img.save(buf, format="PNG", pnginfo=info)
    else:
        img.save(buf, format="PNG", icc_profile=b"\0" * big)
    with pytest.raises(InvalidImageError) as raised:
        load_image(buf.getvalue())
    message = str(raised.value)
    assert "metadata (an iCCP colour profile or a zTXt/iTXt text chunk) is over the decoder's safety limit" in message
    assert "corrupt" not in message and "Re-save it without its metadata" in message
