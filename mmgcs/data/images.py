"""One safe way to turn a poster (path, bytes, PIL image, array or datasets Image dict) into an RGB image.

Every stream goes through `load_image`: the dataset builder, the model's `preprocess`, the Space. It refuses
decompression bombs, corrupt or truncated files, TIFF encodings the decoder cannot read and PNG metadata over
PIL's limits with `InvalidImageError`, whose message names the problem (each apart) and the remedy, and it normalizes every colour mode (CMYK, RGBA, LA, P, L, I;16, animated frames) to RGB.
"""

from __future__ import annotations

import io
import os
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageFile
import PIL.ImageOps
import PIL.PngImagePlugin

# 40 megapixels: a 6,000 x 6,600 scan still loads, while a 20,000 x 20,000 "poster" (400 MP, 1.2 GB decoded)
# is refused before any pixel is decoded. Real posters are far smaller (TMDb w500 is 500 x 750).
MAX_IMAGE_PIXELS = 40_000_000

# Largest encoded file we read at all; a poster is ~15 KB-2 MB.
MAX_IMAGE_BYTES = 50 * 1024 * 1024

# A very thin image is cheap to send but not to preprocess: resizing its short side to the tower's input size
# blows the long side up (a 1 x 40,000,000 PNG took +2.2 GB). Posters are 2:3; a 20:1 banner still loads.
MAX_ASPECT_RATIO = 20

# A JPEG much larger than any tower needs is decoded at a reduced scale (libjpeg's DCT scaling, `Image.draft`)
# down to no less than this short side: 4-8x less memory and time for a phone photo, and posters of usual sizes
# (TMDb w500 is 500 x 750) are decoded exactly as before.
DRAFT_MIN_SIDE = 1024

_WHITE = (255, 255, 255)


class InvalidImageError(ValueError):
    """The input is not a usable image; the message says why and what to do."""


@dataclass(frozen=True)
class PreparedPoster:
    """A validated poster ready to store: encoded bytes, and what (if anything) was changed to get them."""

    data: bytes
    width: int
    height: int
    format: str  # "JPEG" or "PNG" (of `data`)
    change: str | None  # None when the original bytes are kept unchanged


def poster_present(poster: Any) -> bool:
    """Whether a dataset cell holds a poster: anything but None, or a `datasets.Image` dict with bytes or a path.
    Says nothing of whether it decodes (that is `load_image`'s job, which names the problem)."""
    return poster is not None and (
        not isinstance(poster, dict) or poster.get("bytes") is not None or bool(poster.get("path"))
    )


def load_image(image: Any, max_pixels: int = MAX_IMAGE_PIXELS) -> PIL.Image.Image:
    """Return `image` as a fully decoded RGB `PIL.Image`.

    Accepts a `PIL.Image.Image`, a path (`str`/`os.PathLike`), raw bytes, a binary file object, a numpy array
    (H, W[, C]) of uint8, or a `datasets.Image` storage dict `{"bytes": ..., "path": ...}`.
    Raises `InvalidImageError` for missing files, non-images, corrupt/truncated data and images with more
    than `max_pixels` pixels.
    """
    img = _open(image, max_pixels, draft=True)
    return to_rgb(img)


def prepare_poster(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS, source: str = "poster") -> PreparedPoster:
    """Validate encoded poster bytes once (full decode) and return bytes fit to embed in a dataset.

    An RGB JPEG keeps its original bytes (lossless, cheap); anything else is
    converted to RGB and re-encoded: JPEG sources as JPEG (quality 95), other formats as PNG (lossless).
    """
    img = _open_bytes(data, max_pixels, source)
    fmt = (img.format or "").upper()
    frames = getattr(img, "n_frames", 1) or 1
    if fmt == "JPEG" and img.mode == "RGB":
        return PreparedPoster(data, img.width, img.height, "JPEG", None)
    what = f"{fmt or 'unknown format'} {img.mode}"
    if frames > 1:
        what += f", animated ({frames} frames; first frame kept)"
    rgb = to_rgb(img)
    out = io.BytesIO()
    if fmt == "JPEG":
        rgb.save(out, format="JPEG", quality=95)
        out_fmt = "JPEG"
    else:
        rgb.save(out, format="PNG", optimize=False)
        out_fmt = "PNG"
    return PreparedPoster(out.getvalue(), rgb.width, rgb.height, out_fmt, f"converted {what} to RGB {out_fmt}")


def to_rgb(img: PIL.Image.Image) -> PIL.Image.Image:
    """Convert a decoded image of any mode to RGB: first frame, EXIF orientation applied, alpha on white."""
    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)
    try:
        img = PIL.ImageOps.exif_transpose(img) or img
    except Exception:  # a broken EXIF block should not cost us the picture
        pass
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = PIL.Image.new("RGB", rgba.size, _WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if mode.startswith("I") or mode == "F":
        # 16/32-bit or float grayscale: rescale to 8 bit instead of clipping everything above 255 to white
        img = _scale_to_l(img)
    return img.convert("RGB")


def _open(image: Any, max_pixels: int, draft: bool = False) -> PIL.Image.Image:
    if isinstance(image, PIL.Image.Image):
        _check_pixels(image.size, max_pixels, "image")
        return _ensure_loaded(image, "image")
    if isinstance(image, dict):
        if image.get("bytes") is not None:
            return _open_bytes(image["bytes"], max_pixels, image.get("path") or "image bytes", draft)
        if image.get("path"):
            return _open_path(image["path"], max_pixels, draft)
        raise InvalidImageError(
            "The image dict has neither 'bytes' nor 'path'. Pass {'bytes': <encoded image>} or {'path': <file>}."
        )
    if isinstance(image, (bytes, bytearray, memoryview)):
        return _open_bytes(bytes(image), max_pixels, "image bytes", draft)
    if isinstance(image, (str, os.PathLike)):
        return _open_path(image, max_pixels, draft)
    if hasattr(image, "read"):
        return _open_bytes(image.read(MAX_IMAGE_BYTES + 1), max_pixels, getattr(image, "name", "image stream"), draft)
    if type(image).__module__ == "numpy" and hasattr(image, "shape"):
        return _from_array(image, max_pixels)
    raise InvalidImageError(
        f"Cannot read an image from a {type(image).__name__}. "
        "Pass a PIL image, a file path, encoded bytes, a numpy array or a datasets Image dict."
    )


def _open_path(path: str | os.PathLike, max_pixels: int, draft: bool = False) -> PIL.Image.Image:
    p = Path(path)
    if not p.is_file():  # also refuses FIFOs and devices, whose reads may never end
        raise InvalidImageError(f"Image file not found: {str(p)!r}. Check the path (poster_file is relative to the source folder).")
    with p.open("rb") as f:
        data = f.read(MAX_IMAGE_BYTES + 1)  # bounded whatever stat() said (/proc files report 0 bytes)
    if len(data) > MAX_IMAGE_BYTES:
        raise InvalidImageError(
            f"{str(p)!r} is over the {MAX_IMAGE_BYTES // 2**20} MB limit for a poster. "
            "Resize it (a poster needs well under 1,000 px a side)."
        )
    return _open_bytes(data, max_pixels, str(p), draft)


def _open_bytes(data: bytes, max_pixels: int, name: str, draft: bool = False) -> PIL.Image.Image:
    if not data:
        raise InvalidImageError(f"{name}: the image is empty (0 bytes). Provide a JPEG/PNG/WebP/GIF file.")
    if len(data) > MAX_IMAGE_BYTES:
        raise InvalidImageError(
            f"{name}: {len(data) / 2**20:.0f} MB is over the {MAX_IMAGE_BYTES // 2**20} MB limit for a poster. "
            "Resize it (a poster needs well under 1,000 px a side)."
        )
    try:
        with warnings.catch_warnings():
            # our own, tighter bound is checked below; PIL's warning would only be noise
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
            img = PIL.Image.open(io.BytesIO(data))
    except PIL.Image.DecompressionBombError as e:
        raise InvalidImageError(
            f"{name}: refused as a possible decompression bomb ({e}). Resize the image below "
            f"{max_pixels:,} pixels."
        ) from None
    except PIL.UnidentifiedImageError:
        # The kind of content, never the content itself: a message can reach a client or a published report.
        hint = " (it looks like HTML/text, e.g. an error page)" if data.lstrip()[:1] in (b"<", b"{") else ""
        raise InvalidImageError(
            f"{name}: not a recognised image{hint} ({len(data):,} bytes). Provide a JPEG, PNG, WebP or GIF file."
        ) from None
    except Exception as e:  # PIL raises assorted errors on garbage headers
        if _METADATA_TOO_LARGE in str(e):
            raise _metadata_too_large(name) from None
        reason = "truncated" if "truncat" in str(e).lower() else "corrupt (unreadable header)"
        raise InvalidImageError(
            f"{name}: the image data is {reason} ({type(e).__name__}). Re-download or re-export the file."
        ) from None
    _check_pixels(img.size, max_pixels, name)
    if draft and img.format == "JPEG" and min(img.size) >= 2 * DRAFT_MIN_SIDE:
        scale = min(img.size) // DRAFT_MIN_SIDE  # draft keeps at least the requested size
        img.draft(img.mode, (img.width // scale, img.height // scale))
    return _ensure_loaded(img, name, len(data))


def image_size(data: bytes, name: str = "The poster") -> tuple[int, int]:
    """(width, height) from the header alone, nothing decoded: what a request must reserve before decoding."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
            with PIL.Image.open(io.BytesIO(data)) as img:
                return img.size
    except PIL.Image.DecompressionBombError:
        raise InvalidImageError(f"{name}: refused as a possible decompression bomb. Resize the image.") from None
    except Exception:
        # the full decode names the exact problem (empty, not an image, corrupt header)
        return _open_bytes(data, MAX_IMAGE_PIXELS, name).size


def _ensure_loaded(img: PIL.Image.Image, name: str, size: int | None = None) -> PIL.Image.Image:
    """Decode every pixel now, so truncated or corrupt data fails here and not deep inside a DataLoader. `size`:
    the encoded bytes' length, which tells a complete TIFF the decoder cannot read from a truncated one."""
    try:
        with _strict_truncation():
            img.load()
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)
    except PIL.Image.DecompressionBombError as e:
        raise InvalidImageError(f"{name}: refused as a possible decompression bomb ({e}). Resize the image.") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        if _METADATA_TOO_LARGE in str(e):  # a text chunk after the pixels, read at the end of the decode
            raise _metadata_too_large(name) from None
        unsupported = _unsupported_tiff(img, size)
        if unsupported:
            raise InvalidImageError(
                f"{name}: unsupported image: {unsupported}, which the image decoder cannot read (the file is "
                "complete, not truncated). Re-save it as an RGB JPEG or PNG."
            ) from None
        reason = "truncated" if "truncat" in str(e).lower() else "corrupt"
        raise InvalidImageError(
            f"{name}: the image data is {reason} ({type(e).__name__}). Re-download or re-export the file."
        ) from None
    return img


# What PIL's PNG reader says of a text or colour-profile chunk over its decompression limits (MAX_TEXT_CHUNK, a
# single chunk; MAX_TEXT_MEMORY, all of them).
_METADATA_TOO_LARGE = "MAX_TEXT_"

# TIFF tag numbers and the names of their values, for naming what a TIFF uses.
_TIFF_PHOTOMETRIC, _TIFF_COMPRESSION = 262, 259
_TIFF_DATA = ((273, 279), (324, 325))  # (StripOffsets, StripByteCounts), (TileOffsets, TileByteCounts)
_TIFF_COLOURS = {0: "grayscale", 1: "grayscale", 2: "RGB", 3: "palette", 4: "mask", 5: "CMYK", 6: "YCbCr",
                 8: "CIELab", 9: "ICCLab", 10: "ITULab", 32844: "LogL", 32845: "LogLuv"}
_TIFF_COMPRESSIONS = {1: "uncompressed", 5: "LZW-compressed", 6: "old-style-JPEG-compressed", 7: "JPEG-compressed",
                      8: "Deflate-compressed", 32773: "PackBits-compressed", 32946: "Deflate-compressed"}


def _metadata_too_large(name: str) -> InvalidImageError:
    return InvalidImageError(
        f"{name}: the image's metadata (an iCCP colour profile or a zTXt/iTXt text chunk) is over the decoder's "
        f"safety limit ({PIL.PngImagePlugin.MAX_TEXT_CHUNK // 2**20} MB a chunk, "
        f"{PIL.PngImagePlugin.MAX_TEXT_MEMORY // 2**20} MB in all), so the image is refused unread. Re-save it "
        "without its metadata, e.g. as an RGB JPEG or PNG."
    )


def _unsupported_tiff(img: PIL.Image.Image, size: int | None) -> str | None:
    """What a TIFF that failed to decode uses ("a YCbCr TIFF, uncompressed"), when its header places all its
    pixel data inside the `size` bytes there are: then the failure is the decoder's, not a truncated file."""
    tags = getattr(img, "tag_v2", None)
    if img.format != "TIFF" or tags is None or size is None:
        return None
    for offsets_tag, counts_tag in _TIFF_DATA:
        offsets, counts = tags.get(offsets_tag), tags.get(counts_tag)
        if offsets and counts:
            if max(o + c for o, c in zip(offsets, counts)) > size:
                return None  # the data runs past the end: truncated after all
            photometric, compression = tags.get(_TIFF_PHOTOMETRIC), tags.get(_TIFF_COMPRESSION, 1)
            colour = _TIFF_COLOURS.get(photometric, f"photometric-{photometric}")
            return f"a {colour} TIFF, {_TIFF_COMPRESSIONS.get(compression, f'compression {compression}')}"
    return None


_strict_lock = threading.Lock()
_strict_depth = 0
_saved_tolerance = False


@contextmanager
def _strict_truncation():
    """Other libraries may set PIL's global LOAD_TRUNCATED_IMAGES; a poster must be complete. Counted, so that
    concurrent loads in threads keep the flag off until the last one ends, then restore the caller's value."""
    global _strict_depth, _saved_tolerance
    with _strict_lock:
        if _strict_depth == 0:
            _saved_tolerance = PIL.ImageFile.LOAD_TRUNCATED_IMAGES
            PIL.ImageFile.LOAD_TRUNCATED_IMAGES = False
        _strict_depth += 1
    try:
        yield
    finally:
        with _strict_lock:
            _strict_depth -= 1
            if _strict_depth == 0:
                PIL.ImageFile.LOAD_TRUNCATED_IMAGES = _saved_tolerance


def _check_pixels(size: tuple[int, int], max_pixels: int, name: str) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise InvalidImageError(f"{name}: the image has no pixels ({w}x{h}). Provide a real image.")
    if w * h > max_pixels:
        raise InvalidImageError(
            f"{name}: {w}x{h} = {w * h:,} pixels is over the limit of {max_pixels:,} "
            "(refused to protect memory; it may be a decompression bomb). Resize the image (a poster needs "
            "well under 1,000 px a side)."
        )
    if max(w, h) > MAX_ASPECT_RATIO * min(w, h):
        raise InvalidImageError(
            f"{name}: {w}x{h} is over {MAX_ASPECT_RATIO}:1, too thin to be a poster (refused to protect memory). "
            "Crop it to the poster."
        )


def _scale_to_l(img: PIL.Image.Image) -> PIL.Image.Image:
    a = np.asarray(img, dtype=np.float64)
    a = np.nan_to_num(a)
    lo, hi = float(a.min(initial=0.0)), float(a.max(initial=0.0))
    if hi > 255 or lo < 0:
        lo = min(lo, 0.0)
        a = (a - lo) * (255.0 / ((hi - lo) or 1.0))
    return PIL.Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def _from_array(arr: Any, max_pixels: int) -> PIL.Image.Image:
    a = np.asarray(arr)
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (1, 3, 4)):
        raise InvalidImageError(
            f"A numpy image must have shape (H, W), (H, W, 3) or (H, W, 4); got {a.shape}."
        )
    _check_pixels((a.shape[1], a.shape[0]), max_pixels, "array image")
    if a.dtype != np.uint8:
        if np.issubdtype(a.dtype, np.floating) and a.size and float(np.nanmax(a)) <= 1.0:
            a = a * 255.0
        a = np.clip(np.nan_to_num(a), 0, 255).astype(np.uint8)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    return PIL.Image.fromarray(a)
