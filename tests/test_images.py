"""Tests for workers.images.normalise_image (inputs generated with Pillow)."""

from __future__ import annotations

import hashlib
import io
import pickle
import random
import struct
import threading
import time
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFile

from tests.conftest import SHARED_FIXTURES
from workers.images import REASONS, ImageRejected, NormalisedImage, normalise_image

FIXTURES = SHARED_FIXTURES / "images"


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def decode(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def rejected(body: bytes, **kw) -> ImageRejected:
    with pytest.raises(ImageRejected) as info:
        normalise_image(body, **kw)
    assert info.value.reason in REASONS
    assert info.value.detail
    return info.value


def px(img: Image.Image, x: float, y: float) -> tuple[int, ...]:
    """Pixel at a relative position (0..1)."""
    return img.getpixel((int(x * (img.width - 1)), int(y * (img.height - 1))))


def near(color, expected, tol=24) -> bool:
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(color, expected))


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def raw_png(width: int, height: int, bit_depth: int, color_type: int, rows: bytes | None) -> bytes:
    """A hand-made PNG (rows: raw scanlines without filter bytes; None -> tiny bogus IDAT)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    if rows is None:
        idat = zlib.compress(b"\x00" * 16)
    else:
        stride = len(rows) // height
        idat = zlib.compress(b"".join(b"\x00" + rows[i * stride : (i + 1) * stride] for i in range(height)))
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def bmp_header(width: int, height: int) -> bytes:
    """A 54-byte 24-bit BMP header declaring width x height and no pixel data."""
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + len(info), 0, 0, 14 + len(info)) + info


def gif_header(width: int, height: int) -> bytes:
    """A GIF whose logical screen and only frame declare width x height, with a 1-pixel LZW stream."""
    return (
        b"GIF89a"
        + struct.pack("<HHBBB", width, height, 0x80, 0, 0)
        + b"\x00\x00\x00\xff\xff\xff"
        + b"\x2c"
        + struct.pack("<HHHHB", 0, 0, width, height, 0)
        + b"\x02\x02\x44\x01\x00\x3b"
    )


def scene(size=(320, 240), seed=0) -> Image.Image:
    """A photo-like image with large structures (stable under re-encoding)."""
    rng = random.Random(seed)
    w, h = size
    x = np.linspace(0, 1, w)[None, :]
    y = np.linspace(0, 1, h)[:, None]
    channels = [200 * x + 30 * y, 180 * y + 20 + 0 * x, 120 * (1 - x) * (1 - y) + 60]
    base = np.stack([np.broadcast_to(c, (h, w)) for c in channels], axis=-1)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = rng.randrange(w - 40), rng.randrange(h - 40)
        draw.ellipse(
            (x0, y0, x0 + rng.randrange(20, max(21, w // 2)), y0 + rng.randrange(20, max(21, h // 2))),
            fill=tuple(rng.randrange(256) for _ in range(3)),
        )
    return img


def noise(size, mode="RGB", seed=1) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = Image.getmodebands(mode)
    shape = (size[1], size[0], channels) if channels > 1 else (size[1], size[0])
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


# ---------------------------------------------------------------------------
# happy path and output contract
# ---------------------------------------------------------------------------


def test_jpeg_roundtrip_contract():
    src = scene()
    body = encode(src, "JPEG", quality=95)
    out = normalise_image(body)
    assert isinstance(out, NormalisedImage)
    assert out.sha256 == hashlib.sha256(out.data).hexdigest()
    assert out.data[:3] == b"\xff\xd8\xff"
    img = decode(out.data)
    assert img.format == "JPEG" and img.mode == "RGB"
    assert (img.width, img.height) == (out.width, out.height) == (320, 240)
    assert (out.source_format, out.source_width, out.source_height) == ("JPEG", 320, 240)
    assert len(out.phash) == 16 and int(out.phash, 16) >= 0
    # pixels survive (JPEG q90 of a JPEG q95)
    diff = np.abs(np.asarray(img, dtype=np.int16) - np.asarray(decode(body), dtype=np.int16)).mean()
    assert diff < 4
    # deterministic
    again = normalise_image(body)
    assert again.sha256 == out.sha256 and again.phash == out.phash


def test_output_has_no_metadata():
    src = scene()
    exif = Image.Exif()
    exif[0x010F] = "CameraMaker"  # Make
    exif[0x0112] = 1
    body = encode(src, "JPEG", exif=exif.tobytes(), comment=b"hello", icc_profile=b"\x00" * 200)
    out = normalise_image(body)
    img = decode(out.data)
    assert len(img.getexif()) == 0
    for key in ("exif", "icc_profile", "comment", "xmp"):
        assert key not in img.info
    assert b"Exif\x00\x00" not in out.data and b"CameraMaker" not in out.data and b"hello" not in out.data


def test_quality_parameter_is_used():
    body = encode(scene(), "PNG")
    q90 = normalise_image(body)
    q50 = normalise_image(body, quality=50)
    assert len(q50.data) < len(q90.data)


@pytest.mark.parametrize(
    ("size", "expected"),
    [((1600, 900), (500, 281)), ((900, 1600), (281, 500)), ((2000, 2000), (500, 500)), ((501, 300), (500, 299))],
)
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_downscale_keeps_aspect(size, expected, fmt):
    body = encode(scene(size), fmt)
    out = normalise_image(body)
    assert (out.width, out.height) == expected
    assert decode(out.data).size == expected
    assert (out.source_width, out.source_height) == size


def test_jpeg_draft_downscale_matches_plain_resize():
    src = scene((2400, 1600), seed=3)
    out = normalise_image(encode(src, "JPEG", quality=95))
    assert (out.width, out.height) == (500, 333)
    reference = src.resize((500, 333), Image.Resampling.LANCZOS)
    diff = np.abs(np.asarray(decode(out.data), dtype=np.int16) - np.asarray(reference, dtype=np.int16)).mean()
    assert diff < 6


def test_max_side_parameter_and_no_upscale():
    body = encode(scene((300, 200)), "PNG")
    out = normalise_image(body, max_side=150)
    assert (out.width, out.height) == (150, 100)
    out = normalise_image(body, max_side=1000)
    assert (out.width, out.height) == (300, 200)


# ---------------------------------------------------------------------------
# EXIF orientation
# ---------------------------------------------------------------------------

RED, BLUE, GREEN, WHITE, BLACK = (255, 0, 0), (0, 0, 255), (0, 200, 0), (255, 255, 255), (0, 0, 0)


def oriented_jpeg(orientation: int, size=(96, 64)) -> bytes:
    """Stored pixels: left half red, right half blue, green block in the top-left corner."""
    w, h = size
    img = Image.new("RGB", size, BLUE)
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, 0, w // 2 - 1, h - 1), fill=RED)
    draw.rectangle((0, 0, w // 6, h // 6), fill=GREEN)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, "JPEG", quality=95, exif=exif.tobytes())


@pytest.mark.parametrize(
    ("orientation", "size", "checks"),
    [
        # 1: as stored
        (1, (96, 64), {(0.25, 0.75): RED, (0.75, 0.5): BLUE, (0.03, 0.03): GREEN}),
        # 3: rotate 180 -> red on the right, green bottom-right
        (3, (96, 64), {(0.75, 0.25): RED, (0.25, 0.5): BLUE, (0.97, 0.97): GREEN}),
        # 6: rotate 90 clockwise to display -> portrait, red top half, green top-right
        (6, (64, 96), {(0.25, 0.25): RED, (0.5, 0.75): BLUE, (0.97, 0.03): GREEN}),
        # 8: rotate 90 counter-clockwise to display -> red bottom half, green bottom-left
        (8, (64, 96), {(0.75, 0.75): RED, (0.5, 0.25): BLUE, (0.03, 0.97): GREEN}),
    ],
)
def test_exif_orientation_applied(orientation, size, checks):
    out = normalise_image(oriented_jpeg(orientation))
    img = decode(out.data)
    assert img.size == size == (out.width, out.height)
    for (x, y), colour in checks.items():
        assert near(px(img, x, y), colour, tol=40), (orientation, (x, y), px(img, x, y), colour)
    assert 0x0112 not in img.getexif()


def test_exif_orientation_with_downscale():
    out = normalise_image(oriented_jpeg(6, size=(1200, 800)))
    img = decode(out.data)
    assert img.size == (333, 500)
    assert near(px(img, 0.5, 0.25), RED, tol=40) and near(px(img, 0.5, 0.75), BLUE, tol=40)
    assert near(px(img, 0.97, 0.03), GREEN, tol=40)


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about the corrupt EXIF
def test_corrupt_exif_does_not_lose_the_image():
    body = encode(scene(), "JPEG", exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff\x00\x00")
    out = normalise_image(body)
    assert (out.width, out.height) == (320, 240)


# ---------------------------------------------------------------------------
# colour modes
# ---------------------------------------------------------------------------


def test_cmyk_jpeg_converted_to_rgb():
    img = Image.new("CMYK", (64, 64), (0, 255, 255, 0))  # pure red in CMYK
    ImageDraw.Draw(img).rectangle((32, 0, 63, 63), fill=(255, 255, 0, 0))  # blue
    out = normalise_image(encode(img, "JPEG", quality=95))
    res = decode(out.data)
    assert res.mode == "RGB"
    assert near(px(res, 0.2, 0.5), RED, tol=30) and near(px(res, 0.8, 0.5), BLUE, tol=30)


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_transparency_becomes_white(fmt):
    img = Image.new("P", (64, 64), 0)
    img.putpalette([0, 0, 0] + [255, 0, 0] + [0, 0, 0] * 254)
    ImageDraw.Draw(img).rectangle((32, 0, 63, 63), fill=1)
    body = encode(img, fmt, transparency=0)  # index 0 (black) is transparent
    out = normalise_image(body)
    res = decode(out.data)
    assert near(px(res, 0.2, 0.5), WHITE, tol=8), px(res, 0.2, 0.5)
    assert near(px(res, 0.8, 0.5), RED, tol=30)


def test_palette_without_transparency():
    img = Image.new("P", (64, 64), 0)
    img.putpalette([0, 0, 0] + [0, 0, 255] + [0, 0, 0] * 254)
    out = normalise_image(encode(img, "PNG"))
    assert near(px(decode(out.data), 0.5, 0.5), BLACK, tol=8)


def test_la_alpha_composited_on_white():
    grey = Image.new("L", (96, 64), 0)
    alpha = Image.new("L", (96, 64), 0)
    ImageDraw.Draw(alpha).rectangle((32, 0, 63, 63), fill=128)
    ImageDraw.Draw(alpha).rectangle((64, 0, 95, 63), fill=255)
    img = Image.merge("LA", (grey, alpha))
    res = decode(normalise_image(encode(img, "PNG")).data)
    assert near(px(res, 0.15, 0.5), WHITE, tol=6)
    assert near(px(res, 0.5, 0.5), (127, 127, 127), tol=8)
    assert near(px(res, 0.85, 0.5), BLACK, tol=6)


def test_rgba_alpha_composited_on_white_without_colour_bleed():
    # big enough to be downscaled: hidden blue under alpha 0 must not leak in
    img = Image.new("RGBA", (1000, 600), (0, 0, 255, 0))
    ImageDraw.Draw(img).rectangle((500, 0, 999, 599), fill=(255, 0, 0, 255))
    out = normalise_image(encode(img, "PNG"))
    res = decode(out.data)
    assert res.size == (500, 300)
    assert near(px(res, 0.1, 0.5), WHITE, tol=6)
    assert near(px(res, 0.48, 0.5), WHITE, tol=12)
    assert near(px(res, 0.9, 0.5), RED, tol=30)


def test_rgba_webp_and_half_alpha():
    img = Image.new("RGBA", (64, 64), (255, 0, 0, 128))
    res = decode(normalise_image(encode(img, "WEBP", lossless=True)).data)
    assert near(px(res, 0.5, 0.5), (255, 127, 127), tol=10)


def gradient16(width=256, height=64) -> np.ndarray:
    return np.tile(np.linspace(0, 65535, width).round().astype(np.uint16), (height, 1))


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16bit_grey_gradient_scaled_not_clipped(fmt):
    img = Image.fromarray(gradient16())
    assert img.mode == "I;16"
    body = encode(img, fmt)
    assert Image.open(io.BytesIO(body)).mode.startswith(("I;16", "I"))
    res = np.asarray(decode(normalise_image(body).data).convert("L"), dtype=np.int16)
    row = res[32]
    assert row[0] <= 8
    assert 250 <= row[-1] <= 255
    assert abs(int(row[128]) - 128) <= 8
    assert (res >= 250).mean() < 0.05  # not clipped to white
    assert np.all(np.diff(row[4:-4].astype(int)) >= -3)  # monotonic gradient


@pytest.mark.parametrize("bits", [10, 12])
def test_16bit_file_of_a_10_or_12_bit_sensor_is_scaled_by_its_depth(bits):
    top = 2**bits - 1  # what such a sensor's brightest pixel reads
    arr = np.tile(np.linspace(0, top, 256).round().astype(np.uint16), (64, 1))
    res = np.asarray(decode(normalise_image(encode(Image.fromarray(arr), "PNG")).data).convert("L"), dtype=np.int16)
    row = res[32]
    assert row[0] <= 8 and row[-1] >= 247  # its full range, not 0..4 (65535 -> 255 would store it black)
    assert abs(int(row[128]) - 128) <= 8


def test_32bit_int_and_float_grey():
    arr = gradient16().astype(np.int32)
    body = encode(Image.fromarray(arr, "I"), "TIFF")
    res = np.asarray(decode(normalise_image(body).data).convert("L"))
    assert res[32, 0] <= 8 and res[32, -1] >= 248 and abs(int(res[32, 128]) - 128) <= 8
    farr = np.tile(np.linspace(0.0, 1.0, 256, dtype=np.float32), (64, 1))
    body = encode(Image.fromarray(farr, "F"), "TIFF")
    res = np.asarray(decode(normalise_image(body).data).convert("L"))
    assert res[32, 0] <= 8 and res[32, -1] >= 248 and abs(int(res[32, 128]) - 128) <= 8


def test_16bit_rgba_png():
    w, h = 64, 48
    # left half: opaque red; right half: fully transparent green -> white
    pix = np.zeros((h, w, 4), dtype=">u2")
    pix[:, : w // 2] = (65535, 0, 0, 65535)
    pix[:, w // 2 :] = (0, 65535, 0, 0)
    body = raw_png(w, h, 16, 6, pix.tobytes())
    src = Image.open(io.BytesIO(body))
    assert src.mode == "RGBA"
    res = decode(normalise_image(body).data)
    assert near(px(res, 0.2, 0.5), RED, tol=30)
    assert near(px(res, 0.8, 0.5), WHITE, tol=8)


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [("1", "PNG"), ("L", "JPEG"), ("RGB", "BMP"), ("RGB", "TIFF"), ("RGBA", "TIFF"), ("CMYK", "TIFF"), ("L", "GIF")],
)
def test_modes_end_as_rgb(mode, fmt):
    img = scene((80, 60)).convert(mode)
    out = normalise_image(encode(img, fmt))
    res = decode(out.data)
    assert res.mode == "RGB" and res.size == (80, 60)


# ---------------------------------------------------------------------------
# animation
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animated_first_frame(fmt):
    frames = [Image.new("RGB", (64, 64), c) for c in (RED, GREEN, BLUE)]
    kw = {"lossless": True} if fmt == "WEBP" else {}
    body = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **kw)
    src = Image.open(io.BytesIO(body))
    assert getattr(src, "n_frames", 1) == 3
    res = decode(normalise_image(body).data)
    assert near(px(res, 0.5, 0.5), RED, tol=30)


# ---------------------------------------------------------------------------
# rejections
# ---------------------------------------------------------------------------


def test_empty():
    assert rejected(b"").reason == "empty"


@pytest.mark.parametrize(
    "body",
    [
        b"<!DOCTYPE html>\n<html><head><title>403</title></head><body>Forbidden</body></html>",
        b"<!doctype HTML><p>hi",
        b"\xef\xbb\xbf  \r\n<html lang='en'>",
        b"\n\n   <head><meta charset=utf-8>",
        b"<body>nothing</body>",
        b"<script>location='/'</script>",
        b"<!-- served by nginx -->\n<!DOCTYPE html><html></html>",
        "\ufeff<html><body>x</body></html>".encode("utf-16"),
    ],
)
def test_html(body):
    assert rejected(body).reason == "html"


@pytest.mark.parametrize(
    "body",
    [
        b'<?xml version="1.0" encoding="UTF-8"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
        b'<svg xmlns="http://www.w3.org/2000/svg"><rect width="5" height="5"/></svg>',
        b'  <?xml version="1.0"?><!DOCTYPE svg PUBLIC "-//W3C//DTD SVG 1.1//EN" "x"><svg></svg>',
        b"<!-- Generator: Adobe Illustrator -->\n<svg version='1.1'>",
        b"\xef\xbb\xbf<svg>",
    ],
)
def test_svg(body):
    assert rejected(body).reason == "svg"


@pytest.mark.parametrize(
    "body",
    [
        random.Random(7).randbytes(4096),
        b'{"error": "rate limited"}',
        b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj",
        b"plain text, not an image",
        b'<?xml version="1.0"?><Error><Code>AccessDenied</Code></Error>',
        b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom",  # MP4 video
        b"RIFF\x24\x00\x00\x00WAVEfmt ",
        b"\x00",
    ],
)
def test_not_an_image(body):
    assert rejected(body).reason == "not_an_image"


@pytest.mark.parametrize(
    "body",
    [
        b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64,
        b"\x00\x00\x00\x0cjP  \r\n\x87\n\x00\x00\x00\x14ftypjp2 " + b"\x00" * 64,
        b"\x00\x00\x00\x0cJXL \r\n\x87\n" + b"\x00" * 64,
        b"8BPS\x00\x01" + b"\x00" * 64,
    ],
)
def test_unsupported_format(body):
    assert rejected(body).reason == "unsupported_format"


@pytest.mark.parametrize(
    "body",
    [
        bmp_header(30000, 30000),  # 900 Mpx: Pillow's own DecompressionBombError
        bmp_header(9500, 9500),  # 90 Mpx: Pillow's DecompressionBombWarning
        bmp_header(7000, 7000),  # 49 Mpx: only our max_pixels (40 Mpx) catches it
        raw_png(30000, 30000, 8, 2, None),
        gif_header(30000, 30000),
    ],
)
def test_decompression_bomb_from_header(body):
    before = Image.MAX_IMAGE_PIXELS
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning may leak
        err = rejected(body)
    assert err.reason == "decompression_bomb", err.detail
    assert time.perf_counter() - t0 < 0.5
    assert len(body) < 200
    assert Image.MAX_IMAGE_PIXELS == before


def test_max_pixels_parameter():
    body = encode(scene((1200, 1000)), "PNG")
    assert rejected(body, max_pixels=1_000_000).reason == "decompression_bomb"
    assert normalise_image(body, max_pixels=1_200_000).width == 500


def test_too_small():
    err = rejected(encode(noise((8, 8)), "PNG"))
    assert err.reason == "too_small"
    assert rejected(encode(noise((31, 400)), "JPEG")).reason == "too_small"
    assert normalise_image(encode(noise((32, 32)), "PNG")).width == 32
    assert rejected(encode(noise((100, 100)), "PNG"), min_side=101).reason == "too_small"


def test_too_small_after_downscale_of_elongated_image():
    # 2000x40 would be stored as 500x10
    err = rejected(encode(noise((2000, 40)), "PNG"))
    assert err.reason == "too_small"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF"])
@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.9])
def test_truncated(fmt, fraction):
    body = encode(noise((256, 256), "RGB" if fmt != "GIF" else "L", seed=2), fmt)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    err = rejected(body[: int(len(body) * fraction)])
    assert err.reason == "truncated", err.detail
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_truncated_progressive_jpeg():
    body = encode(noise((256, 256), seed=4), "JPEG", progressive=True)
    assert rejected(body[: len(body) // 2]).reason == "truncated"


def test_corrupt_header_is_decode_error():
    body = bytearray(encode(scene(), "PNG"))
    body[12:16] = b"XXXX"  # IHDR chunk type destroyed
    assert rejected(bytes(body)).reason in ("decode_error", "not_an_image")


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about corrupt EXIF/TIFF tags
def test_no_other_exception_escapes_fuzz():
    rng = random.Random(1234)
    seeds = [
        encode(scene((96, 64)), "JPEG"),
        encode(scene((96, 64)), "JPEG", progressive=True),
        encode(scene((96, 64)), "PNG"),
        encode(scene((96, 64)).convert("P"), "GIF"),
        encode(scene((96, 64)), "WEBP"),
        encode(scene((96, 64)), "BMP"),
        encode(scene((96, 64)), "TIFF", compression="tiff_lzw"),
        oriented_jpeg(6),
    ]
    outcomes = {"stored": 0}
    for seed_body in seeds:
        for _ in range(25):
            body = bytearray(seed_body)
            op = rng.randrange(3)
            if op == 0:
                for _ in range(rng.randrange(1, 8)):
                    body[rng.randrange(len(body))] = rng.randrange(256)
            elif op == 1:
                body = body[: rng.randrange(1, len(body))]
            else:
                i = rng.randrange(8, len(body))
                body[i:i] = rng.randbytes(rng.randrange(1, 32))
            try:
                out = normalise_image(bytes(body))
            except ImageRejected as exc:
                assert exc.reason in REASONS
                outcomes[exc.reason] = outcomes.get(exc.reason, 0) + 1
            else:
                assert decode(out.data).mode == "RGB"
                outcomes["stored"] += 1
    assert sum(outcomes.values()) == 200


def test_rejected_exception_shape():
    err = rejected(b"<html>")
    assert isinstance(err, Exception) and err.reason == "html" and "HTML" in err.detail
    clone = pickle.loads(pickle.dumps(err))
    assert (clone.reason, clone.detail) == (err.reason, err.detail)
    assert set(REASONS) == {
        "empty",
        "html",
        "svg",
        "not_an_image",
        "unsupported_format",
        "decompression_bomb",
        "truncated",
        "decode_error",
        "too_small",
    }


# ---------------------------------------------------------------------------
# hashes
# ---------------------------------------------------------------------------


def hamming(a: str, b: str) -> int:
    return bin(int(a, 16) ^ int(b, 16)).count("1")


@pytest.mark.parametrize("seed", [3, 5, 11])
def test_phash_stable_across_reencoding_and_formats(seed):
    src = scene((400, 300), seed=seed)
    reference = normalise_image(encode(src, "PNG")).phash
    assert normalise_image(encode(src, "JPEG", quality=95)).phash == reference
    variants = [
        normalise_image(encode(src, "JPEG", quality=60)).phash,
        normalise_image(encode(src, "JPEG", quality=30)).phash,
        normalise_image(encode(src, "WEBP", quality=80)).phash,
        normalise_image(encode(src.resize((800, 600)), "JPEG", quality=80)).phash,
    ]
    # pHash bits are thresholded at the DCT median, so a coefficient sitting right
    # at the median may flip under heavy re-compression: allow <= 2 of 64 bits.
    assert all(hamming(v, reference) <= 2 for v in variants), (reference, variants)


def test_phash_differs_for_different_images():
    a = normalise_image(encode(scene(seed=1), "JPEG")).phash
    b = normalise_image(encode(scene(seed=2), "JPEG")).phash
    c = normalise_image(encode(noise((320, 240), seed=5), "JPEG")).phash
    assert hamming(a, b) > 10 and hamming(a, c) > 10 and hamming(b, c) > 10


def test_sha256_is_content_hash():
    a = normalise_image(encode(scene(seed=1), "PNG"))
    b = normalise_image(encode(scene(seed=2), "PNG"))
    assert a.sha256 == hashlib.sha256(a.data).hexdigest()
    assert b.sha256 == hashlib.sha256(b.data).hexdigest()
    assert a.sha256 != b.sha256


def test_thread_safe():
    bodies = [encode(scene((600, 400), seed=s), "JPEG") for s in range(6)]
    bodies += [bmp_header(30000, 30000), b"<html>", encode(noise((8, 8)), "PNG")]
    expected = []
    for body in bodies:
        try:
            expected.append(normalise_image(body).sha256)
        except ImageRejected as exc:
            expected.append(exc.reason)

    def work(body):
        try:
            return normalise_image(body).sha256
        except ImageRejected as exc:
            return exc.reason

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(work, bodies * 8))
    assert got == expected * 8
    assert threading.active_count() >= 1


# ---------------------------------------------------------------------------
# shared fixture corpus
# ---------------------------------------------------------------------------

EXPECTED_REASONS = {
    "empty_zero_bytes.jpg": {"empty"},
    "svg_not_decodable_by_pillow__anchor_horizontal.svg": {"svg"},
    "gif_decompression_bomb_huge_dims__decompression_bomb.gif": {"decompression_bomb"},
    "bmp_huge_dims_57bytes__l2rgb_read.bmp": {"decompression_bomb", "truncated"},
    "png_truncated__truncated_image.png": {"truncated"},
    "jpeg_truncated_progressive__truncated_jpeg.jpg": {"truncated"},
    "jpeg_truncated_tiny__skimage_truncated.jpg": {"truncated"},
    "png_corrupt_unidentifiable__broken.png": {"not_an_image", "decode_error"},
    # smaller than min_side (32)
    "ico_16x16__hopper.ico": {"too_small"},
    "png_palette_trns_1x1__tRNS_null_1x1.png": {"too_small"},
}
MUST_STORE = {
    "avif_rgb__hopper.avif",  # Pillow >= 11.2 decodes AVIF; the shared venv has Pillow 13
    "avif_rgba__transparency.avif",
    "jpeg_cmyk__pil_sample_cmyk.jpg",
    "png_16bit_rgba_apng__mode_16bit.png",
    "tiff_16bit_gray__16bit.cropped.tif",
    "webp_animated_42frames__iss634.webp",
    "gif_animated_31frames__chi.gif",
    "apng_animated_5frames__delay.png",
    "jpeg_progressive__app13-multiple.jpg",
}


def fixture_files() -> list[Path]:
    if not FIXTURES.is_dir():
        return []
    return sorted(p for p in FIXTURES.iterdir() if p.is_file())


requires_fixtures = pytest.mark.skipif(
    not FIXTURES.is_dir(), reason=f"shared fixture corpus {FIXTURES} not present on this machine"
)


@requires_fixtures
@pytest.mark.parametrize("path", fixture_files(), ids=lambda p: p.name)
def test_fixture_corpus(path: Path):
    body = path.read_bytes()
    try:
        out = normalise_image(body)
    except ImageRejected as exc:
        assert exc.reason in REASONS
        assert path.name in EXPECTED_REASONS, f"unexpected rejection {exc.reason}: {exc.detail}"
        assert exc.reason in EXPECTED_REASONS[path.name], exc.detail
        return
    assert path.name not in EXPECTED_REASONS, f"{path.name} should have been rejected"
    img = decode(out.data)
    assert img.format == "JPEG" and img.mode == "RGB"
    assert img.size == (out.width, out.height)
    assert max(img.size) <= 500 and min(img.size) >= 32
    assert out.sha256 == hashlib.sha256(out.data).hexdigest()


@requires_fixtures
def test_fixture_corpus_must_store():
    names = {p.name for p in fixture_files()}
    for name in sorted(MUST_STORE & names):
        out = normalise_image((FIXTURES / name).read_bytes())
        assert decode(out.data).mode == "RGB", name


@requires_fixtures
@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_fixture_exif_orientation_matches_baseline(orientation):
    baseline_path = FIXTURES / "jpeg_baseline_rgb__hopper.jpg"
    matches = sorted(FIXTURES.glob(f"jpeg_exif_orientation{orientation}__*.jpg"))
    if not baseline_path.exists() or not matches:
        pytest.skip(reason="orientation fixtures not present")
    baseline = decode(normalise_image(baseline_path.read_bytes()).data)
    out = normalise_image(matches[0].read_bytes())
    img = decode(out.data)
    assert img.size == baseline.size
    diff = np.abs(np.asarray(img, dtype=np.int16) - np.asarray(baseline, dtype=np.int16)).mean()
    assert diff < 12, diff
    # and it is really the rotation that makes it match
    unrotated = Image.open(matches[0])
    unrotated.load()
    raw_diff = np.abs(np.asarray(unrotated.convert("RGB"), dtype=np.int16) - np.asarray(baseline, dtype=np.int16))
    assert raw_diff.mean() > diff + 10


def test_phash_is_imagehash_phash_bit_for_bit():
    """workers.images computes imagehash's phash without scipy: the same 64 bits on
    noise and on smooth pictures; on a flat picture (all 63 AC coefficients are
    zero, so imagehash's bits are floating-point noise) ours is only the DC bit."""
    import imagehash

    from workers.images import phash_of_thumbnail

    rng = np.random.default_rng(7)
    thumbs = []
    for i in range(300):
        if i % 2:
            a = rng.integers(0, 256, (32, 32))
        else:
            a = np.clip(np.cumsum(rng.normal(0, 8, (32, 32)), axis=(i // 2) % 2) + 128, 0, 255)
        thumbs.append(Image.fromarray(a.astype(np.uint8), "L"))
    ours = [str(phash_of_thumbnail(t)) for t in thumbs]
    assert ours == [str(imagehash.phash(t)) for t in thumbs]
    assert len(set(ours)) == len(thumbs)  # and they tell pictures apart
    flats = {str(phash_of_thumbnail(Image.new("L", (32, 32), grey))) for grey in (1, 77, 128, 255)}
    assert flats == {"8000000000000000"}


def test_normalising_never_imports_scipy():
    """scipy (imagehash's DCT) costs a worker 0.4 s to import; the phash is computed without it."""
    import subprocess
    import sys

    code = (
        "import io, sys\n"
        "from PIL import Image\n"
        "from workers.images import normalise_image\n"
        "b = io.BytesIO(); Image.effect_noise((600, 400), 40).convert('RGB').save(b, 'JPEG')\n"
        "print(len(normalise_image(b.getvalue()).phash), 'scipy' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["16", "False"]


def test_still_webp_fast_path_gives_pillows_pixels(monkeypatch):
    """A still, opaque WebP is decoded by libwebp's plain decoder (pywebp): at
    its own size, the stored JPEG is byte for byte what the Pillow-only path
    stores, EXIF rotation included; shrunk while decoding (libwebp's rescaler),
    it is the same picture as Pillow's decode + BOX resize to within a level or
    two, the same size and orientation; a cut-off WebP is still truncated."""
    from workers import images

    rng = np.random.default_rng(3)
    base = Image.fromarray(rng.integers(0, 256, (90, 160, 3), dtype=np.uint8), "RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    small, large = base.resize((480, 270)), scene((1200, 700), seed=5)
    bodies = [encode(im, "WEBP", quality=80, **kw) for im in (small, large) for kw in ({}, {"exif": exif.tobytes()})]
    probe = Image.open(io.BytesIO(bodies[2]))
    assert images._decode_still_webp(bodies[2], probe.size, (500, 292)).size == (500, 292)  # the fast path is taken
    assert images._WEBP_SCALING
    fast = [normalise_image(b) for b in bodies]
    monkeypatch.setattr(images, "_webp_lib", None)
    slow = [normalise_image(b) for b in bodies]
    monkeypatch.undo()
    sizes = [(f.width, f.height) for f in fast]
    assert sizes == [(s.width, s.height) for s in slow] == [(480, 270), (270, 480), (500, 292), (292, 500)]
    assert [f.sha256 for f in fast[:2]] == [s.sha256 for s in slow[:2]]  # no resize: the very same pixels
    for f, s in zip(fast[2:], slow[2:]):
        a, b = (np.asarray(decode(x.data), dtype=np.int16) for x in (f, s))
        assert np.abs(a - b).mean() < 1.5, np.abs(a - b).mean()  # the same picture, the same way up
        assert bin(int(f.phash, 16) ^ int(s.phash, 16)).count("1") <= 4  # near duplicates of each other
    assert rejected(bodies[2][: len(bodies[2]) * 2 // 3]).reason == "truncated"
    assert images._still_webp_header(bodies[3]) == (1200, 700, 6)  # read without Pillow, EXIF chunk included
    # cut short with the RIFF and VP8 chunk sizes mended: the header is fine, the bitstream ends early
    cut = bytearray(bodies[2][: len(bodies[2]) * 2 // 3])
    cut[4:8], cut[16:20] = (len(cut) - 8).to_bytes(4, "little"), (len(cut) - 20).to_bytes(4, "little")
    assert images._still_webp_header(bytes(cut)) == (1200, 700, 1)
    assert images._decode_still_webp(bytes(cut), (1200, 700), (500, 292)) is None
    assert rejected(bytes(cut)).reason == "decode_error"  # libwebp refused it; Pillow opened it again and said why
    xmp = encode(large, "WEBP", quality=80, xmp=b'<x:xmpmeta><tiff:Orientation>6</tiff:Orientation></x:xmpmeta>')
    assert images._still_webp_header(xmp) is None  # XMP may carry an orientation: Pillow reads it

def test_jpeg_scaled_decode_matches_pillows_and_declines_what_it_should(monkeypatch):
    """A JPEG that shrinks is decoded at the smallest DCT scale M/8 >= the target
    (simplejpeg): the same size, orientation and picture as Pillow's draft() +
    BOX path to within a level; grey and progressive pictures too; CMYK goes to
    Pillow; a cut-off stream is still 'truncated' and a damaged one rejected or
    stored exactly as Pillow decides."""
    from workers import images

    exif = Image.Exif()
    exif[0x0112] = 8  # rotate 90 degrees counter-clockwise on display
    photo = scene((990, 700), seed=9)
    cases = {
        "rgb": encode(photo, "JPEG", quality=92),
        "rotated": encode(photo, "JPEG", quality=92, exif=exif.tobytes()),
        "progressive": encode(photo, "JPEG", quality=92, progressive=True),
        "grey": encode(photo.convert("L"), "JPEG", quality=92),
        "cmyk": encode(photo.convert("CMYK"), "JPEG", quality=92),
    }
    calls = []
    real = images._decode_jpeg_scaled
    monkeypatch.setattr(images, "_decode_jpeg_scaled", lambda *a: calls.append(real(*a)) or calls[-1])
    fast = {k: normalise_image(b) for k, b in cases.items()}
    # taken for everything but CMYK, at 5/8 (619x438: the smallest M/8 still >= 500x354)
    assert [c is not None and c.size for c in calls] == [(619, 438)] * 4 + [False]
    monkeypatch.setattr(images, "_simplejpeg", None)
    slow = {k: normalise_image(b) for k, b in cases.items()}
    for k in cases:
        assert (fast[k].width, fast[k].height) == (slow[k].width, slow[k].height) == (
            (354, 500) if k == "rotated" else (500, 354)), k
        a, b = (np.asarray(decode(x.data).convert("RGB"), dtype=np.int16) for x in (fast[k], slow[k]))
        assert np.abs(a - b).mean() < 1.5, (k, np.abs(a - b).mean())
        assert bin(int(fast[k].phash, 16) ^ int(slow[k].phash, 16)).count("1") <= 4, k
    monkeypatch.undo()
    body = cases["rgb"]
    assert rejected(body[: len(body) * 2 // 3]).reason == "truncated"
    assert rejected(cases["progressive"][: len(body) // 2]).reason == "truncated"
    damaged = bytearray(body)
    damaged[len(body) // 2: len(body) // 2 + 64] = bytes(64)  # zeros in the middle of the entropy-coded data
    with_simplejpeg = images.normalise_image(bytes(damaged))  # libjpeg warns: Pillow decides, and it keeps it
    monkeypatch.setattr(images, "_simplejpeg", None)
    assert images.normalise_image(bytes(damaged)).sha256 == with_simplejpeg.sha256
