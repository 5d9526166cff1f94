"""Image decoding and conversion: bytes -> one clean, fully loaded RGB `PIL.Image.Image`.

Everything here is local: no global PIL state is changed (`Image.MAX_IMAGE_PIXELS`,
`ImageFile.LOAD_TRUNCATED_IMAGES` are left as they are; truncated files are errors). A bad image raises
`SampleError` with a short reason; the caller adds the sample id.

Conversion rules (`to_rgb`):
  * "1", "L", "P" (opaque), "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV": PIL's colour conversion.
  * anything with alpha ("LA", "La", "PA", "RGBA", "RGBa", "P"/"L"/"RGB" with a `transparency` key):
    composited over a white background.
  * 16-bit greyscale ("I;16", "I;16L", "I;16B", "I;16N"): scaled to 8 bits by `value >> 8`
    (PIL's own convert would clip everything above 255 to white).
  * "I" (32-bit int): treated as 16-bit (`>> 8`) when every value lies in 0..65535 (how 16-bit PNGs and
    TIFFs usually arrive), else rescaled linearly from its min..max to 0..255.
  * "F" (float): values in [0, 1] are scaled by 255, values in [0, 255] are rounded, anything else is
    rescaled from min..max; NaN becomes 0.
EXIF orientation is applied; of a multi-frame file (GIF, TIFF, ...) only the first frame is used.

Size guard (`max_pixels`, --max-pixels): from the header, before any pixel is decoded, the image's w*h and,
when the caller gives `working_pixels` (e.g. `ImagePreprocessor.working_pixels`), the largest image its
preprocessing creates (a pad-to-square canvas, a resize of an extreme aspect ratio) must not exceed it.
Messages never quote the data (a not-an-image file is described by its size).
"""

from __future__ import annotations

import io
import re
import warnings
from typing import Callable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from layerfuse.pipeline.data.records import SampleError

__all__ = ["DEFAULT_MAX_PIXELS", "decode_image", "to_rgb", "expand_to_square"]

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own default limit (1024 * 1024 * 1024 // 4 // 3)

_WHITE = (255, 255, 255)
_ALPHA_MODES = {"LA", "La", "PA", "RGBA", "RGBa"}
_SIXTEEN_BIT_GREY = {"I;16", "I;16L", "I;16B", "I;16N"}


def _too_large(w: int, h: int, max_pixels: int) -> SampleError:
    return SampleError(
        f"image too large: {w}x{h} = {w * h} pixels > limit {max_pixels} "
        "(decompression-bomb guard; raise --max-pixels)"
    )


def _open_unchecked(data: bytes) -> Image.Image | None:
    """Identify `data` with PIL's format plugins without PIL's global decompression-bomb check.

    Only used when the caller's `max_pixels` is above PIL's global limit and PIL refused the image:
    `decode_image` then does the size check itself. Returns None when no plugin accepts the data.
    """
    Image.init()
    prefix = data[:16]
    for fmt in Image.ID:
        factory, accept = Image.OPEN[fmt]
        ok = not accept or accept(prefix)
        if not ok or isinstance(ok, str):
            continue
        try:
            return factory(io.BytesIO(data), "")
        except Exception:  # noqa: BLE001 - this plugin does not accept it; try the next one
            continue
    return None


def _too_large_to_preprocess(w: int, h: int, need: int, max_pixels: int) -> SampleError:
    return SampleError(
        f"image {w}x{h} needs {need} pixels while preprocessed (pad to square, resize) > limit {max_pixels} "
        "(decompression-bomb guard; raise --max-pixels)"
    )


def decode_image(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    working_pixels: Callable[[int, int], int] | None = None,
) -> Image.Image:
    """Decode encoded image bytes into a fully loaded RGB image.

    The header is read first and its size checked against `max_pixels` before any pixel data is
    decoded, and so is `working_pixels(w, h)` when given: the most pixels the caller's preprocessing
    will allocate for a w x h image (checked for both orientations, as EXIF rotation may swap them).
    EXIF orientation is applied; multi-frame files give their first frame; every mode is converted to
    RGB (see the module docstring; alpha is composited over white).

    Raises `SampleError` with a short reason: empty data, unknown format, truncated/corrupt data, or an
    image above `max_pixels` (PIL's own DecompressionBombWarning/Error is turned into the same error).
    """
    if not data:
        raise SampleError("empty file (0 bytes)")
    with warnings.catch_warnings():
        # Our own size check below is authoritative; PIL's warning (at its global limit) is an error only
        # when it also exceeds ours.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            # PIL's global limit refused it before we could look at the size ourselves.
            img = _open_unchecked(data)
            if img is None:
                raise SampleError(
                    "image too large for PIL's decompression-bomb guard (raise --max-pixels)"
                ) from None
        except UnidentifiedImageError:
            raise SampleError(f"not an image or unsupported format: {len(data)} bytes") from None
        except Exception as e:  # noqa: BLE001 - PIL raises many types for damaged headers
            raise SampleError(f"truncated or corrupt image data: {_describe(e)}") from None

        w, h = img.size
        if w <= 0 or h <= 0:
            raise SampleError(f"truncated or corrupt image data: invalid size {w}x{h}")
        if w * h > max_pixels:
            raise _too_large(w, h, max_pixels)
        if working_pixels is not None:
            need = max(working_pixels(w, h), working_pixels(h, w))
            if need > max_pixels:
                raise _too_large_to_preprocess(w, h, need, max_pixels)

        try:
            img.load()  # Image.open leaves a multi-frame file on its first frame; only that one is decoded
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise _too_large(w, h, max_pixels) from None
        except Exception as e:  # noqa: BLE001 - OSError (truncated), SyntaxError, zlib.error, ...
            raise SampleError(f"truncated or corrupt image data: {_describe(e)}") from None

    try:
        oriented = ImageOps.exif_transpose(img)
        if oriented is not None:
            img = oriented
    except Exception:  # noqa: BLE001 - broken EXIF: keep the image as stored rather than lose it
        pass

    try:
        return to_rgb(img)
    except SampleError:
        raise
    except Exception as e:  # noqa: BLE001
        raise SampleError(f"cannot convert image mode {img.mode!r} to RGB: {_describe(e)}") from None


_BYTES_REPR = re.compile(r"""b(?:'[^']*'|"[^"]*")""")


def _describe(e: BaseException) -> str:
    """An exception as "Type: message", with any bytes literal in the message (data quoted by a decoder) elided."""
    msg = _BYTES_REPR.sub("b'...'", str(e).strip())
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _composite_over_white(img: Image.Image) -> Image.Image:
    """Composite an image with alpha (or a transparency key) over a white background; returns RGB."""
    if img.mode == "La":  # premultiplied; PIL only converts it to LA directly
        img = img.convert("LA")
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, _WHITE + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _grey_u8_to_rgb(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8), mode="L").convert("RGB")


def _rescale(arr: np.ndarray) -> np.ndarray:
    """Linearly map arr's min..max onto 0..255 (a constant image becomes 0)."""
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    return np.round((arr.astype(np.float64) - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert a loaded image of any PIL mode to RGB, following the rules in the module docstring."""
    mode = img.mode
    if mode == "RGB":
        if "transparency" in img.info:
            return _composite_over_white(img)
        return img
    if mode in _ALPHA_MODES:
        return _composite_over_white(img)
    if mode in ("P", "L", "1") and "transparency" in img.info:
        return _composite_over_white(img)
    if mode in _SIXTEEN_BIT_GREY:
        arr = np.asarray(img).astype(np.uint16)
        return _grey_u8_to_rgb(arr >> 8)
    if mode == "I":
        arr = np.asarray(img)
        if arr.size and arr.min() >= 0 and arr.max() <= 65535:
            return _grey_u8_to_rgb((arr >> 8).astype(np.uint8))
        return _grey_u8_to_rgb(_rescale(arr) if arr.size else arr)
    if mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        if not arr.size:
            return _grey_u8_to_rgb(arr)
        lo, hi = arr.min(), arr.max()
        if lo >= 0.0 and hi <= 1.0:
            out = np.round(arr * 255.0)
        elif lo >= 0.0 and hi <= 255.0:
            out = np.round(arr)
        else:
            return _grey_u8_to_rgb(_rescale(arr))
        return _grey_u8_to_rgb(out.astype(np.uint8))
    if mode == "LAB":
        try:
            return img.convert("RGB")
        except ValueError:  # older Pillow: no direct LAB conversion, go through LittleCMS
            from PIL import ImageCms

            transform = ImageCms.buildTransform(
                ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB"
            )
            return ImageCms.applyTransform(img, transform)
    try:
        return img.convert("RGB")
    except ValueError as e:
        raise SampleError(f"unsupported image mode {mode!r}: {e}") from None


def expand_to_square(img: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """LLaVA's pad-to-square: paste `img` centred on a square canvas of side max(w, h) filled with `fill`.

    The result is RGB (a non-RGB input is converted first); a square input is returned unchanged.
    """
    if img.mode != "RGB":
        img = to_rgb(img)
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), tuple(int(c) for c in fill))
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas
