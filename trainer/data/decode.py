"""Raw image bytes -> upright RGB PIL image, or a DecodeError that names the file.

Readers hand over bytes (an ImageNet file or an HF dataset row); only the dataset
decodes. Every way an image can be bad is turned into one `DecodeError` here, so a
broken file is reported with its name instead of surfacing later as a bare PIL
error inside a transform or a worker process.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, ImageOps

from trainer.errors import DecodeError

try:  # optional (`pip install simplejpeg`): libjpeg-turbo without the PIL layers around it
    import simplejpeg as _simplejpeg
except ImportError:  # PIL decodes every JPEG; results are the same, only slower
    _simplejpeg = None

# NOTE: PIL's own default hard limit (2 * Image.MAX_IMAGE_PIXELS, ~13k x 13k). It is
# far above any ImageNet image yet stops a tiny header from claiming gigapixels.
# Image.open() also raises above 2 * Image.MAX_IMAGE_PIXELS (a global), so a larger
# max_pixels cannot loosen that; such images are still reported as decompression bombs.
# Between 1x and 2x Image.MAX_IMAGE_PIXELS, Image.open only warns, then this limit rules.
DEFAULT_MAX_PIXELS = 2 * 89_478_485

# Alpha is composited on white rather than dropped: the colour under transparent pixels
# is arbitrary (often black or encoder leftovers), while white is what a viewer shows.
_ALPHA_BACKGROUND = (255, 255, 255)
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
# PIL keeps 16-bit greyscale PNGs as I;16*/I; convert("RGB") clips them to 0..255
# (nearly all white), so they are scaled by 255/65535 = 1/257 instead.
_HIGH_BIT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})
_TRUNCATION_MESSAGES = ("image file is truncated", "Truncated File Read")
_NO_TRANSPOSE = (0, 1)  # EXIF orientation absent, or already upright
# PIL opens camera JPEGs carrying an MPF segment (extra frames, e.g. depth or gain
# maps) as "MPO"; the first frame is a plain JPEG, so it drafts and is named like one.
_JPEG_FORMATS = frozenset({"JPEG", "MPO"})


@dataclass(frozen=True)
class ImageInfo:
    """What `inspect_image` found out about one image."""

    name: str
    format: str | None  # what the bytes really are (JPEG, PNG, ...), whatever the name says
    mode: str | None  # source mode before conversion (RGB, L, CMYK, P, I;16, ...)
    size: tuple[int, int] | None  # (width, height) as stored, before EXIF rotation
    problem: str | None  # None if the image decodes; else the DecodeError reason
    conversions: tuple[str, ...]  # what decode_image does beyond decoding, in order


def decode_image(
    data: bytes,
    name: str,
    *,
    draft_size: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Decode one image file to an upright, fully loaded RGB image.

    Args:
        data: The raw bytes of the file.
        name: File path or row id, used only in error messages.
        draft_size: If set and the image is a JPEG whose shorter side is at least
            2 * draft_size, decode at a reduced DCT scale (1/2, 1/4 or 1/8) whose
            shorter side stays >= draft_size. Both sides shrink by the same factor, so
            relative crop geometry is unchanged.
        max_pixels: Largest width * height accepted, checked from the header before
            any pixel is decoded.

    Returns:
        An RGB image with EXIF orientation applied.

    Raises:
        DecodeError: For empty, non-image, truncated, corrupt or oversized data.
    """
    image = _identify(data, name)
    _check_pixels(image, name, max_pixels)
    if _wants_draft(image, draft_size):
        # JpegImageFile.draft picks the largest scale keeping each side >= the request,
        # so asking for (draft_size, draft_size) keeps the shorter side >= draft_size.
        image.draft(None, (draft_size, draft_size))
    return _finish(image, name, conversions=[])


def decode_image_array(
    data: bytes,
    name: str,
    *,
    draft_size: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """`decode_image`, as an (height, width, 3) uint8 array: the input of tensor transforms.

    Same checks, draft and errors as `decode_image`. A full-scale baseline or progressive
    JPEG in YCbCr or greyscale with no EXIF rotation (nearly all of ImageNet) is decoded
    by simplejpeg when it is installed: the same libjpeg-turbo with the same settings, so
    the pixels are identical to PIL's (checked in tests), decoded about 1.3x faster.
    Anything else, and any file simplejpeg refuses, takes the PIL path, which names the
    problem if there is one.
    """
    image = _identify(data, name)
    _check_pixels(image, name, max_pixels)
    drafted = _wants_draft(image, draft_size)
    # NOTE: the EXIF of a JPEG is in its header, so orientation is known before decoding.
    if _simplejpeg is not None and not drafted and image.format == "JPEG" and image.mode in ("RGB", "L"):
        if image.getexif().get(ExifTags.Base.Orientation, 1) in _NO_TRANSPOSE:
            try:
                return _simplejpeg.decode_jpeg(data, "RGB")
            except ValueError:  # strict mode: truncated data, or any libjpeg warning
                pass
    if drafted:
        image.draft(None, (draft_size, draft_size))
    # NOTE: np.array copies into a writable array; np.asarray's would be read-only.
    return np.array(_finish(image, name, conversions=[]))


def inspect_image(data: bytes, name: str, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Fully decode one image and report its format, problem and needed conversions.

    Used by `check-data`; unlike `decode_image` it never raises for a bad image.

    Args:
        data: The raw bytes of the file.
        name: File path or row id; its extension is compared with the real format.
        max_pixels: Largest width * height accepted, as in `decode_image`.

    Returns:
        An ImageInfo whose `problem` is None when `decode_image` would succeed.
    """
    try:
        image = _identify(data, name)
    except DecodeError as error:
        return ImageInfo(name, None, None, None, error.reason, ())
    format_, mode, size = image.format, image.mode, image.size
    conversions: list[str] = []
    extension = os.path.splitext(name)[1]
    named_format = Image.registered_extensions().get(extension.lower())
    same = named_format == format_ or (_is_jpeg(named_format) and _is_jpeg(format_))
    if named_format is not None and not same:
        conversions.append(f"format {format_} named {extension}")
    problem = None
    try:
        _check_pixels(image, name, max_pixels)
        _finish(image, name, conversions)
    except DecodeError as error:
        problem = error.reason
    return ImageInfo(name, format_, mode, size, problem, tuple(conversions))


def _identify(data: bytes, name: str) -> Image.Image:
    """Open `data` lazily: reads the header only, decodes no pixels."""
    if not data:
        raise DecodeError(name, "empty file")
    try:
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        # Only reached above PIL's global hard limit, which Image.open enforces itself.
        raise DecodeError(name, f"decompression bomb ({error})") from error
    except Image.UnidentifiedImageError as error:
        # The leading bytes tell an HTML error page or a cut-off header apart.
        raise DecodeError(name, f"not an image (starts with {data[:16]!r})") from error
    except Exception as error:  # PIL plugins raise many types on corrupt headers
        raise DecodeError(name, _reason(error, "header")) from error


def _check_pixels(image: Image.Image, name: str, max_pixels: int) -> None:
    """Reject an oversized image from its header, before memory is allocated for it."""
    pixels = image.width * image.height
    if pixels > max_pixels:
        raise DecodeError(name, f"decompression bomb ({pixels} pixels > limit {max_pixels})")


def _finish(image: Image.Image, name: str, conversions: list[str]) -> Image.Image:
    """Decode all pixels, rotate upright and convert to RGB, noting each step."""
    format_ = image.format  # exif_transpose returns an image without a format
    try:
        # NOTE: a full load here, rather than lazily in a transform, is what makes a
        # truncated file fail with its name (ImageFile.LOAD_TRUNCATED_IMAGES stays False).
        image.load()
        # Read after load: a PNG's eXIf chunk may follow the pixel data.
        if image.getexif().get(ExifTags.Base.Orientation, 1) not in _NO_TRANSPOSE:
            conversions.append("EXIF rotation")
            image = ImageOps.exif_transpose(image)
        return _to_rgb(image, conversions)
    except DecodeError:
        raise
    except Exception as error:  # PIL decoders raise OSError, SyntaxError, ValueError, ...
        raise DecodeError(name, _reason(error, str(format_))) from error


def _reason(error: Exception, what: str) -> str:
    """Short reason for a PIL error; truncation gets a fixed wording to count by."""
    message = str(error)
    if any(text in message for text in _TRUNCATION_MESSAGES):
        return f"truncated {what}"
    return f"corrupt {what} ({type(error).__name__}: {message})"


def _to_rgb(image: Image.Image, conversions: list[str]) -> Image.Image:
    """Convert any PIL mode to RGB; the common RGB case returns the image untouched."""
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image  # the hot path: convert("RGB") would copy for nothing
    if mode in _HIGH_BIT_MODES:
        conversions.append("16-bit->8-bit")
        # I-mode point() takes only scale + offset; +0.5 rounds instead of truncating.
        return image.convert("I").point(lambda value: value * (1 / 257) + 0.5).convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in image.info:
        conversions.append("palette+alpha->RGB" if mode == "P" else f"{mode}->RGB")
        rgba = image.convert("RGBA")  # also resolves a palette's or tRNS transparency
        background = Image.new("RGB", image.size, _ALPHA_BACKGROUND)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    # CMYK (incl. Adobe-inverted, already undone by the JPEG decoder), L, 1, P, ...
    conversions.append(f"{mode}->RGB")
    return image.convert("RGB")


def _wants_draft(image: Image.Image, draft_size: int | None) -> bool:
    """A JPEG at least twice draft_size on its shorter side decodes at a reduced scale."""
    return bool(draft_size) and _is_jpeg(image.format) and min(image.size) >= 2 * draft_size


def _is_jpeg(format_: str | None) -> bool:
    """True for plain JPEG and for MPO, whose first frame is a JPEG."""
    return format_ in _JPEG_FORMATS
