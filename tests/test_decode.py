"""Tests for trainer.data.decode: every bad-input kind is built here as real image bytes."""

from __future__ import annotations

import io
import random
import struct
import zlib

import numpy as np
import pytest
from PIL import ExifTags, Image, ImageFile

from trainer.data.decode import DEFAULT_MAX_PIXELS, DecodeError, decode_image, decode_image_array, inspect_image

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def encode(image: Image.Image, format_: str, **params: object) -> bytes:
    """Saves `image` to bytes in `format_`."""
    buffer = io.BytesIO()
    image.save(buffer, format_, **params)
    return buffer.getvalue()


def photo(size: tuple[int, int]) -> Image.Image:
    """A photo-like RGB image: smooth gradients plus mild noise, so JPEG cost is realistic."""
    gradient = Image.linear_gradient("L")
    across = gradient.transpose(Image.Transpose.ROTATE_90)
    noise = Image.effect_noise(size, 24)
    return Image.merge("RGB", (gradient.resize(size), noise, across.resize(size)))


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    """One PNG chunk: length, type, payload, CRC."""
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_header(width: int, height: int) -> bytes:
    """A ~60-byte PNG that claims width x height but holds one row of pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    idat = zlib.compress(bytes(1 + 3 * 8))  # PIL stops reading the header at IDAT
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat)


def assert_close(actual: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 8) -> None:
    """JPEG is lossy, so colours are compared within a tolerance."""
    assert all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True)), (actual, expected)


def oriented_jpeg(orientation: int) -> bytes:
    """A 64x32 blue JPEG with a red top-left corner and EXIF orientation set."""
    image = Image.new("RGB", (64, 32), BLUE)
    image.paste(RED, (0, 0, 16, 16))
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    return encode(image, "JPEG", quality=95, exif=exif.tobytes())


@pytest.fixture(scope="module")
def rgb_jpeg() -> bytes:
    return encode(photo((500, 375)), "JPEG", quality=90)


def test_rgb_jpeg_is_returned_fully_loaded(rgb_jpeg: bytes) -> None:
    image = decode_image(rgb_jpeg, "n01/a.JPEG")
    assert (image.mode, image.size) == ("RGB", (500, 375))
    assert image.tile == []  # decoded now, not lazily on first use in a transform
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_empty_file() -> None:
    with pytest.raises(DecodeError) as caught:
        decode_image(b"", "n01/empty.JPEG")
    assert (caught.value.name, caught.value.reason) == ("n01/empty.JPEG", "empty file")
    assert str(caught.value) == "n01/empty.JPEG: empty file"
    assert isinstance(caught.value, ValueError)


def test_random_bytes_named_jpeg_is_not_an_image() -> None:
    data = random.Random(0).randbytes(4096)
    with pytest.raises(DecodeError, match=r"^x\.JPEG: not an image") as caught:
        decode_image(data, "x.JPEG")
    assert caught.value.reason.startswith("not an image (starts with b'")


@pytest.mark.parametrize("decode", [decode_image, decode_image_array], ids=["image", "array"])
@pytest.mark.parametrize("format_", ["JPEG", "PNG"])
def test_truncated_image_fails_in_decode(format_: str, decode) -> None:
    data = encode(photo((300, 200)), format_)
    with pytest.raises(DecodeError) as caught:
        decode(data[: len(data) // 2], "cut.img")
    assert caught.value.reason == f"truncated {format_}"


@pytest.mark.parametrize("format_", ["JPEG", "PNG"])
def test_no_pil_exception_escapes_at_any_cut(format_: str) -> None:
    data = encode(photo((64, 48)), format_)
    for end in range(0, len(data) - 16, 37):
        with pytest.raises(DecodeError):
            decode_image(data[:end], f"cut_{end}")


def test_corrupt_png_chunk_is_a_decode_error() -> None:
    data = bytearray(encode(photo((64, 48)), "PNG"))
    start = data.index(b"IDAT") + 20
    data[start : start + 64] = bytes(64)  # zeros break the zlib stream, not the length
    with pytest.raises(DecodeError, match="PNG"):
        decode_image(bytes(data), "broken.png")


def test_png_named_jpeg_decodes_by_content() -> None:
    image = decode_image(encode(Image.new("RGB", (8, 8), GREEN), "PNG"), "n02105855_2933.JPEG")
    assert image.getpixel((0, 0)) == GREEN


def test_cmyk_jpeg_gives_correct_rgb() -> None:
    # PIL writes CMYK JPEGs with an Adobe marker and inverted values, as Photoshop does.
    cmyk = Image.new("CMYK", (32, 16), (0, 255, 255, 0))  # red
    cmyk.paste((255, 0, 0, 0), (16, 0, 32, 16))  # cyan
    image = decode_image(encode(cmyk, "JPEG", quality=95), "cmyk.JPEG")
    assert image.mode == "RGB"
    assert_close(image.getpixel((4, 8)), RED)
    assert_close(image.getpixel((28, 8)), (0, 255, 255))


def test_grayscale_becomes_rgb() -> None:
    image = decode_image(encode(Image.new("L", (16, 16), 77), "JPEG"), "gray.JPEG")
    assert image.mode == "RGB"
    assert_close(image.getpixel((8, 8)), (77, 77, 77), tolerance=1)


def test_palette_with_transparency_is_composited_on_white() -> None:
    palette = Image.new("P", (2, 1), 0)
    palette.putpalette([*RED, *GREEN])
    palette.putpixel((1, 0), 1)
    image = decode_image(encode(palette, "PNG", transparency=0), "p.png")
    assert (image.mode, image.getpixel((0, 0)), image.getpixel((1, 0))) == ("RGB", WHITE, GREEN)


@pytest.mark.parametrize(
    ("mode", "colour", "expected"),
    [
        ("RGBA", (255, 0, 0, 128), (255, 127, 127)),  # half-transparent red over white
        ("LA", (0, 0), WHITE),  # fully transparent black: white, not black
        ("LA", (40, 255), (40, 40, 40)),  # opaque: the grey itself
    ],
)
def test_alpha_is_composited_on_white(mode: str, colour: tuple[int, ...], expected: tuple[int, ...]) -> None:
    image = decode_image(encode(Image.new(mode, (4, 4), colour), "PNG"), "a.png")
    assert image.mode == "RGB"
    assert_close(image.getpixel((0, 0)), expected, tolerance=1)


def test_16_bit_png_is_scaled_not_clipped() -> None:
    values = np.array([[0, 257 * 100, 257 * 50 + 200, 65535]], dtype=np.uint16)
    data = encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"  # the mode this test is about
    image = decode_image(data, "deep.png")
    assert [image.getpixel((x, 0)) for x in range(4)] == [(0, 0, 0), (100, 100, 100), (51, 51, 51), (255, 255, 255)]


@pytest.mark.parametrize(
    ("orientation", "red_corner"),
    [(6, (31 - 4, 4)), (8, (4, 63 - 4)), (3, (63 - 4, 31 - 4)), (1, (4, 4))],
)
def test_exif_orientation_is_applied(orientation: int, red_corner: tuple[int, int]) -> None:
    image = decode_image(oriented_jpeg(orientation), "turned.JPEG")
    # 6 means "rotate 90 clockwise to view": the stored top-left ends at the top right.
    assert image.size == ((64, 32) if orientation in (1, 3) else (32, 64))
    assert_close(image.getpixel(red_corner), RED, tolerance=24)
    assert_close(image.getpixel((image.width // 2, image.height // 2)), BLUE, tolerance=24)


def test_bomb_is_rejected_from_header_before_decoding() -> None:
    # The header alone claims 25M pixels; decoding it would report truncation instead.
    with pytest.raises(DecodeError) as caught:
        decode_image(png_header(5000, 5000), "bomb.png", max_pixels=1_000_000)
    assert caught.value.reason == "decompression bomb (25000000 pixels > limit 1000000)"


def test_bomb_beyond_pil_hard_limit_is_a_decode_error() -> None:
    with pytest.raises(DecodeError) as caught:
        decode_image(png_header(100_000, 100_000), "huge.png")
    assert caught.value.reason.startswith("decompression bomb (")


def test_real_image_over_low_limit_is_a_bomb(rgb_jpeg: bytes) -> None:
    with pytest.raises(DecodeError, match=r"187500 pixels > limit 100000"):
        decode_image(rgb_jpeg, "big.JPEG", max_pixels=100_000)
    assert DEFAULT_MAX_PIXELS >= 100_000_000


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((2000, 1500), (500, 375)),  # 1500 // 224 = 6 -> scale 1/4
        ((1500, 2000), (375, 500)),  # portrait: the shorter side is the width
        ((600, 448), (300, 224)),  # exactly 2x: 1/2 lands on draft_size itself
        ((600, 447), (600, 447)),  # 1/2 would give 223.5 < 224: untouched
        ((500, 375), (500, 375)),  # small: untouched
    ],
)
def test_draft_shrinks_large_jpeg_but_never_below_draft_size(size: tuple[int, int], expected: tuple[int, int]) -> None:
    image = decode_image(encode(photo(size), "JPEG"), "d.JPEG", draft_size=224)
    assert (image.mode, image.size) == ("RGB", expected)
    assert min(image.size) >= 224


def test_draft_leaves_non_jpeg_untouched() -> None:
    image = decode_image(encode(Image.new("RGB", (2000, 1500)), "PNG"), "d.png", draft_size=224)
    assert image.size == (2000, 1500)


def test_draft_keeps_colour_of_cmyk_jpeg() -> None:
    data = encode(Image.new("CMYK", (1000, 1000), (0, 255, 255, 0)), "JPEG")
    image = decode_image(data, "cmyk.JPEG", draft_size=224)
    assert image.size == (250, 250)
    assert_close(image.getpixel((100, 100)), RED)


def mpo(size: tuple[int, int]) -> bytes:
    """A camera-style multi-picture JPEG, which PIL reports as format "MPO"."""
    frame = Image.new("RGB", size, RED)
    return encode(frame, "MPO", save_all=True, append_images=[frame])


def test_draft_treats_mpo_as_jpeg() -> None:
    image = decode_image(mpo((1000, 800)), "camera.JPEG", draft_size=224)
    assert (image.mode, image.size) == ("RGB", (500, 400))  # 800 // 224 = 3 -> 1/2
    assert_close(image.getpixel((10, 10)), RED)


INSPECT_CASES = {
    "ok.JPEG": (lambda: encode(Image.new("RGB", (8, 8)), "JPEG"), None, ()),
    "empty.JPEG": (lambda: b"", "empty file", ()),
    "cut.JPEG": (lambda: encode(photo((64, 48)), "JPEG")[:1200], "truncated JPEG", ()),
    "cut_header.JPEG": (lambda: encode(photo((64, 48)), "JPEG")[:300], "truncated header", ()),
    "n02105855_2933.JPEG": (lambda: encode(Image.new("RGB", (8, 8)), "PNG"), None, ("format PNG named .JPEG",)),
    "camera.JPEG": (lambda: mpo((8, 8)), None, ()),
    "cmyk.JPEG": (lambda: encode(Image.new("CMYK", (8, 8)), "JPEG"), None, ("CMYK->RGB",)),
    "gray.JPEG": (lambda: encode(Image.new("L", (8, 8)), "JPEG"), None, ("L->RGB",)),
    "p.png": (lambda: encode(Image.new("P", (8, 8)), "PNG", transparency=0), None, ("palette+alpha->RGB",)),
    "rgba.png": (lambda: encode(Image.new("RGBA", (8, 8)), "PNG"), None, ("RGBA->RGB",)),
    "deep.png": (lambda: encode(Image.fromarray(np.zeros((8, 8), np.uint16)), "PNG"), None, ("16-bit->8-bit",)),
    "turned.JPEG": (lambda: oriented_jpeg(6), None, ("EXIF rotation",)),
    "bomb.png": (lambda: png_header(5000, 5000), "decompression bomb (25000000 pixels > limit 1000000)", ()),
}


@pytest.mark.parametrize("name", INSPECT_CASES)
def test_inspect_reports_problem_and_conversions(name: str) -> None:
    make, problem, conversions = INSPECT_CASES[name]
    data = make()
    info = inspect_image(data, name, max_pixels=1_000_000)
    assert (info.name, info.problem, info.conversions) == (name, problem, conversions)
    if problem is None:
        decode_image(data, name)  # inspect's verdict matches decode's


def test_inspect_reports_source_format_mode_and_size() -> None:
    info = inspect_image(encode(Image.new("CMYK", (40, 30)), "JPEG"), "c.JPEG")
    assert (info.format, info.mode, info.size) == ("JPEG", "CMYK", (40, 30))
    info = inspect_image(random.Random(1).randbytes(100), "x.JPEG")
    assert (info.format, info.mode, info.size) == (None, None, None)
    assert info.problem is not None and info.problem.startswith("not an image")


# --- decode_image_array: the tensor pipeline's decoder -------------------------------------


def array_cases() -> list[tuple[str, bytes]]:
    """One file per decoder branch: simplejpeg's (RGB, progressive, grey) and PIL's (the rest)."""
    rgb = photo((120, 90))
    return [
        ("rgb.JPEG", encode(rgb, "JPEG", quality=90)),
        ("progressive.JPEG", encode(rgb, "JPEG", quality=90, progressive=True)),
        ("gray.JPEG", encode(rgb.convert("L"), "JPEG")),
        ("cmyk.JPEG", encode(rgb.convert("CMYK"), "JPEG", quality=95)),
        ("rgba.png", encode(rgb.convert("RGBA"), "PNG")),
        ("turned.JPEG", oriented_jpeg(6)),
    ]


@pytest.mark.parametrize("simplejpeg", [True, False], ids=["simplejpeg", "pil-only"])
def test_array_decode_equals_pil_decode_pixel_for_pixel(simplejpeg: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    import trainer.data.decode as decode

    if simplejpeg and decode._simplejpeg is None:
        pytest.skip("simplejpeg is not installed")
    if not simplejpeg:
        monkeypatch.setattr(decode, "_simplejpeg", None)
    for name, data in array_cases():
        array = decode.decode_image_array(data, name)
        assert array.dtype == np.uint8 and array.flags.writeable, name
        np.testing.assert_array_equal(array, np.asarray(decode_image(data, name)), err_msg=name)


def test_array_decode_drafts_like_decode_image(rgb_jpeg: bytes) -> None:
    array = decode_image_array(rgb_jpeg, "big.JPEG", draft_size=160)  # 375 >= 2 * 160: half scale
    assert array.shape == (188, 250, 3)
    np.testing.assert_array_equal(array, np.asarray(decode_image(rgb_jpeg, "big.JPEG", draft_size=160)))
