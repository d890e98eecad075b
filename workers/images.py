"""Validate, normalise and hash one downloaded image body.

Plain Python (no Celery): :func:`normalise_image` takes the raw bytes of an
HTTP response and either returns a :class:`NormalisedImage` (an RGB JPEG plus
its content hash and perceptual hash) or raises :class:`ImageRejected` with a
machine-readable ``reason`` (one of :data:`REASONS`) and human ``detail``.
No other exception escapes for any input bytes.

Pipeline, in order:

1. ``empty``            -- zero-length body.
2. Magic-byte sniffing, before any decoder runs.  Only bodies whose leading
   bytes match a format on the allow-list (JPEG, PNG/APNG, GIF, WebP, BMP,
   TIFF, ICO, AVIF, and HEIF only when a HEIF plug-in is registered with
   Pillow) are handed to Pillow, and Pillow is restricted to that one format
   (``Image.open(..., formats=[...])``), so no other parser ever sees
   untrusted bytes.
     * ``html``          -- markup that looks like an HTML page (leading
       whitespace / byte-order marks skipped): ``<!doctype html``, ``<html``,
       ``<head``, ``<body``, ``<script``, ``<meta``, ``<div`` ...
     * ``svg``           -- ``<svg``, ``<!doctype svg``, or ``<?xml`` /
       comment prologue followed by an ``<svg`` element.
     * ``unsupported_format`` -- a recognised image format that we do not
       decode: HEIC/HEIF (unless a plug-in is registered), JPEG 2000,
       JPEG XL, PSD, EPS/PostScript, ICNS, QOI, DDS, XCF, BPG, JPEG XR; also
       AVIF when this Pillow build cannot decode it, and images whose pixel
       mode cannot be converted to RGB.
     * ``not_an_image``  -- anything else (random bytes, JSON, XML, PDF,
       video ...).
   ICO files are accepted (the largest embedded icon is used); most are
   smaller than ``min_side`` anyway and end up ``too_small``.
3. Header parse (``Image.open``) under a local ``warnings.catch_warnings``
   that turns Pillow's ``DecompressionBombWarning`` into an error.
     * ``decompression_bomb`` -- declared ``width * height > max_pixels``
       (checked from the header, before any pixel is decoded), or Pillow's
       own ``DecompressionBombWarning``/``DecompressionBombError``, or a PNG
       text chunk that decompresses beyond Pillow's limit.
     * ``too_small``     -- shorter side < ``min_side`` (the shorter side does
       not change under EXIF rotation, so this is decided from the header);
       also when downscaling a very elongated image would leave the stored
       image with a shorter side < ``min_side``.
4. Full decode of the first frame (animated GIF/WebP/APNG: first frame only).
   ``ImageFile.LOAD_TRUNCATED_IMAGES`` is never touched.  A still, opaque WebP
   is decoded by libwebp's plain decoder (pywebp) straight to RGB at the target
   size (libwebp's rescaler averages while it decodes: no full-size picture,
   ~40 % less CPU than Pillow's path through libwebp's animation decoder and a
   resize); everything else by Pillow.
     * ``truncated``     -- the data ends before the image does (Pillow's
       ``OSError("image file is truncated ...")`` / ``"Truncated File Read"``,
       or an ``EOFError``; a WebP shorter than its RIFF header declares).
     * ``decode_error``  -- any other failure to parse or decode a body whose
       magic bytes matched a supported format (corrupt header, bad
       compressed stream, ...).
5. Mode conversion to RGB: CMYK/YCbCr/1/L -> RGB, P with transparency ->
   RGBA, alpha (LA/RGBA/PA/La/RGBa) composited onto white, 16-bit and 32-bit
   greyscale (I;16*, I, F) scaled linearly to 8 bits by the depth the samples
   use (the largest value decides: <= 255 kept as it is, else 10, 12, 14 or 16
   bits -> 255; float images in 0..1 are multiplied by 255, anything outside
   0..65535 is min-max stretched) -- never clipped.
6. Downscale with area averaging (``RESAMPLE``, Pillow's BOX: what OpenCV's
   INTER_AREA does) so the longest side is <= ``max_side`` (never upscale).
   JPEGs are decoded DCT-scaled by the smallest M/8 that keeps them >= the
   target (libjpeg-turbo through simplejpeg; Pillow's ``draft()``, by a power
   of two, where simplejpeg declines), so they are never decoded at full size.
7. EXIF orientation applied (same mapping as ``ImageOps.exif_transpose``; it
   is applied to the already-downscaled image, which is equivalent and
   cheaper).  A corrupt EXIF block is logged and ignored (the image is kept
   unrotated) rather than rejecting an otherwise good picture.
8. Encoded as baseline JPEG, quality ``quality`` (90), ``optimize=False``,
   without EXIF, ICC, XMP or comments.  ``sha256`` is over these bytes;
   ``phash`` is ``imagehash.phash`` (64-bit, 16 hex digits) of the final image,
   computed from a 32x32 greyscale thumbnail (area-averaged).
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import threading
import warnings
from dataclasses import dataclass

import imagehash
import numpy as np
from PIL import Image

try:  # libwebp's plain decoder (pywebp's cffi binding): a still WebP straight to RGB at the target size
    from webp._webp import ffi as _webp_ffi, lib as _webp_lib
except ImportError:  # pragma: no cover - a declared dependency; Pillow decodes every WebP without it
    _webp_ffi = _webp_lib = None


try:  # libjpeg-turbo through simplejpeg: DCT scaling by any M/8 (Pillow's draft() has 1/2, 1/4, 1/8)
    import simplejpeg as _simplejpeg
except ImportError:  # pragma: no cover - a declared dependency; Pillow's draft() does it coarser without it
    _simplejpeg = None


def _webp_can_scale() -> bool:
    """pywebp declares only ``use_threads`` of libwebp's ``WebPDecoderOptions``;
    the rescaling fields before it (``use_scaling``, ``scaled_width``,
    ``scaled_height``: ints 7, 8 and 9 of the struct in decode.h, a layout
    libwebp's ABI has kept since 0.2) are written by position, and only when
    the compiled struct has exactly that layout."""
    try:
        return (_webp_ffi.offsetof("struct WebPDecoderOptions", "use_threads") == 40
                and _webp_ffi.sizeof("struct WebPDecoderOptions") == 76)
    except Exception:  # pywebp missing or built differently: decode at full size, resize afterwards
        return False


_WEBP_SCALING = _webp_can_scale()

log = logging.getLogger(__name__)

REASONS: tuple[str, ...] = (
    "empty",
    "html",
    "svg",
    "not_an_image",
    "unsupported_format",
    "decompression_bomb",
    "truncated",
    "decode_error",
    "too_small",
)


class ImageRejected(Exception):
    """The body is not stored. ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str):
        if reason not in REASONS:  # programming error, keep the contract honest
            raise ValueError(f"unknown reject reason {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self):  # picklable across Celery / multiprocessing
        return (type(self), (self.reason, self.detail))


@dataclass(frozen=True)
class NormalisedImage:
    data: bytes  # JPEG of the RGB image
    sha256: str  # hex sha256 of ``data``
    phash: str  # imagehash.phash hex string of the normalised image
    width: int
    height: int
    source_format: str  # Pillow format of the input, e.g. "JPEG", "PNG", "WEBP"
    source_width: int
    source_height: int


# ---------------------------------------------------------------------------
# Sniffing
# ---------------------------------------------------------------------------

_AVIF_BRANDS = {b"avif", b"avis"}
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1"}

# Recognised image formats we do not decode (magic prefix -> name).
_UNSUPPORTED_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000 codestream"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "JPEG XL"),
    (b"\xff\x0a", "JPEG XL codestream"),
    (b"8BPS", "Photoshop PSD"),
    (b"%!PS", "PostScript/EPS"),
    (b"\xc5\xd0\xd3\xc6", "EPS"),
    (b"icns", "ICNS"),
    (b"qoif", "QOI"),
    (b"DDS ", "DDS"),
    (b"gimp xcf", "GIMP XCF"),
    (b"BPG\xfb", "BPG"),
    (b"II\xbc", "JPEG XR"),
)

_WS = b" \t\r\n\f\x00"
_HTML_START = re.compile(
    r"<(?:!doctype\s+html|html|head|body|meta|title|script|noscript|link|style|div|span|iframe|"
    r"table|form|center|pre|img|br|p|a|h[1-6])(?=[\s>/])"
)
_SVG_START = re.compile(r"<(?:svg|!doctype\s+svg)(?=[\s>/])")
_SVG_ANY = re.compile(r"<svg(?=[\s>/])")
_HTML_ANY = re.compile(r"<(?:!doctype\s+html|html|head|body)(?=[\s>/])")


def _registered(fmt: str) -> bool:
    Image.init()  # idempotent; makes sure every bundled plug-in is registered
    return fmt in Image.OPEN


def _sniff_binary(body: bytes) -> tuple[str | None, str | None]:
    """Return (pillow_format, None) for an allowed format, (None, name) for a
    recognised unsupported one, (None, None) when no image magic matched."""
    head = body[:32]
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG", None
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG", None
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF", None
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP", None
    if head[:2] == b"BM" and len(body) >= 26:
        return "BMP", None
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF", None
    if head[:4] == b"\x00\x00\x01\x00" and len(body) >= 22:
        return "ICO", None
    if head[4:8] == b"ftyp":
        box_size = int.from_bytes(head[:4], "big")
        box_end = min(max(box_size, 16), 256, len(body))
        brands = {body[8:12]} | {body[i : i + 4] for i in range(16, box_end - 3, 4)}
        if brands & _AVIF_BRANDS:
            return ("AVIF", None) if _registered("AVIF") else (None, "AVIF (no AVIF decoder in this Pillow)")
        if brands & _HEIF_BRANDS:
            return ("HEIF", None) if _registered("HEIF") else (None, "HEIC/HEIF")
        return None, None  # MP4/MOV/3GP ... : not an image
    for magic, name in _UNSUPPORTED_MAGIC:
        if head.startswith(magic):
            return None, name
    return None, None


def _sniff_text(body: bytes) -> str | None:
    """'html' / 'svg' / None for markup bodies."""
    head = body[:4096]
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        text = head.decode("utf-16", errors="replace")
    else:
        if head.startswith(b"\xef\xbb\xbf"):
            head = head[3:]
        text = head.decode("latin-1")
    text = text.lstrip("\ufeff \t\r\n\f\x00").lower()
    if not text.startswith("<"):
        return None
    if _SVG_START.match(text):
        return "svg"
    if _HTML_START.match(text):
        return "html"
    if text.startswith(("<?xml", "<!--", "<!doctype")):
        svg = _SVG_ANY.search(text)
        html = _HTML_ANY.search(text)
        if svg and (not html or svg.start() < html.start()):
            return "svg"
        if html:
            return "html"
    return None


# ---------------------------------------------------------------------------
# Decoding helpers
# ---------------------------------------------------------------------------

# warnings.catch_warnings() swaps the process-global filter list, which is not
# thread-safe; serialise our (short, header-only) use of it.
_WARNINGS_LOCK = threading.Lock()

# Downscaling filter: area averaging (Pillow's BOX over the exact fractional
# footprint of each output pixel), which is what OpenCV's INTER_AREA and
# img2dataset's default "area" downsampling do; about 3x cheaper than LANCZOS
# and free of ringing.  JPEGs arrive here already DCT-scaled (by M/8, or by
# draft()'s powers of two) to at most twice the target size, still WebPs at the
# target size (libwebp rescales while decoding).  Other images shrinking by 2x or more are first
# reduced by the whole factor (``Image.reduce``: the same box average, a
# specialised loop) and the fractional rest is resampled: a fifth cheaper.
RESAMPLE = Image.Resampling.BOX
RESAMPLE_GAP = 1.0

_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _describe(exc: BaseException) -> str:
    msg = str(exc).strip()
    msg = msg if len(msg) <= 300 else msg[:300] + "..."
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def _is_truncation(exc: BaseException) -> bool:
    if isinstance(exc, EOFError):
        return True
    return isinstance(exc, OSError) and "truncated" in str(exc).lower()


def _is_bomb(exc: BaseException) -> bool:
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return True
    # PNG text/ICC chunks: "Decompressed data too large for PngImagePlugin.MAX_TEXT_CHUNK"
    return isinstance(exc, ValueError) and "decompressed data too large" in str(exc).lower()


def _riff_cut_short(body: bytes) -> bool:
    """A RIFF file (WebP) shorter than the size its header declares."""
    return len(body) >= 12 and body[:4] == b"RIFF" and len(body) < int.from_bytes(body[4:8], "little") + 8


def _map_decode_exception(exc: Exception, stage: str, fmt: str) -> ImageRejected:
    if isinstance(exc, Image.UnidentifiedImageError):  # its message only names the BytesIO
        return ImageRejected("decode_error", f"{fmt} signature present but Pillow cannot parse the {stage}")
    if _is_bomb(exc):
        return ImageRejected("decompression_bomb", f"{fmt} {stage}: {_describe(exc)}")
    if _is_truncation(exc):
        return ImageRejected("truncated", f"{fmt} data ends early ({stage}): {_describe(exc)}")
    if isinstance(exc, MemoryError):
        return ImageRejected("decode_error", f"{fmt} {stage}: out of memory")
    return ImageRejected("decode_error", f"{fmt} {stage} failed: {_describe(exc)}")


def _open(body: bytes, fmt: str) -> Image.Image:
    with _WARNINGS_LOCK, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(body), formats=[fmt])


_SENSOR_DEPTHS = (10, 12, 14, 16)  # bits per sample that 16-bit containers really carry


def _scale_to_8bit(img: Image.Image) -> Image.Image:
    """I;16*, I, F greyscale -> L, linear scaling, never clipping to white.

    Integer samples are scaled by the depth they use: values up to 255 are kept as
    they are; otherwise by the smallest of 10, 12, 14 or 16 bits that holds the
    largest value (a 10- or 12-bit sensor's picture in a 16-bit file, values 0..1023,
    would otherwise be stored nearly black); float images in 0..1 are multiplied by
    255; anything else (signed, beyond 16 bits) is min-max stretched."""
    if img.mode.startswith("I;16"):
        arr = np.asarray(img).astype(np.uint32)  # handles the B/L/N variants
    else:
        arr = np.asarray(img, dtype=np.float64)
        finite = np.isfinite(arr)
        if not finite.all():
            arr = np.where(finite, arr, 0.0)
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if img.mode == "F" and lo >= 0.0 and hi <= 1.0:
        scaled = arr * 255.0
    elif lo >= 0.0 and hi <= 255.0:
        scaled = arr
    elif lo >= 0.0 and hi <= 65535.0:
        top = next(2**bits - 1 for bits in _SENSOR_DEPTHS if hi <= 2**bits - 1)
        scaled = arr * (255.0 / top)
    else:  # signed or > 16-bit data: stretch the actual range
        scaled = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr, dtype=np.float64)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")


def _to_working_mode(img: Image.Image) -> Image.Image:
    """Return an image in one of L, LA, RGB, RGBA."""
    mode = img.mode
    if mode in ("L", "RGB") and "transparency" in img.info:  # PNG tRNS: one transparent colour
        return img.convert(mode + "A")
    if mode in ("L", "LA", "RGB", "RGBA"):
        return img
    if mode == "1":
        return img.convert("L")
    if mode == "P":
        return img.convert("RGBA" if img.has_transparency_data else "RGB")
    if mode in ("PA", "RGBa"):
        return img.convert("RGBA")
    if mode == "La":
        return img.convert("LA")
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _scale_to_8bit(img)
    try:
        return img.convert("RGB")  # CMYK, YCbCr, RGBX, LAB, HSV ...
    except (ValueError, OSError) as exc:
        raise ImageRejected("unsupported_format", f"pixel mode {mode} cannot be converted to RGB: {_describe(exc)}")


def _flatten_to_rgb(img: Image.Image) -> Image.Image:
    """L/LA/RGB/RGBA -> RGB, alpha composited onto white."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "L":
        return img.convert("RGB")
    if mode == "LA":
        bg = Image.new("L", img.size, 255)
        bg.paste(img.getchannel("L"), mask=img.getchannel("A"))
        return bg.convert("RGB")
    if mode == "RGBA":
        bg = Image.new("RGB", img.size, (255, 255, 255))
        bg.paste(img, mask=img.getchannel("A"))
        return bg
    return img.convert("RGB")


def _riff_chunk(body: bytes, fourcc: bytes) -> bytes | None:
    """The payload of the first ``fourcc`` chunk of a RIFF file (None: none)."""
    offset = 12
    while offset + 8 <= len(body):
        size = int.from_bytes(body[offset + 4:offset + 8], "little")
        if body[offset:offset + 4] == fourcc:
            return body[offset + 8:offset + 8 + size]
        offset += 8 + size + (size & 1)
    return None


def _still_webp_header(body: bytes) -> tuple[int, int, int] | None:
    """(width, height, EXIF orientation) of a still, opaque WebP, read by
    libwebp's ``WebPGetFeatures`` and from the EXIF chunk.

    Pillow's ``Image.open`` of a WebP builds libwebp's animation decoder, which
    allocates two zeroed full-size RGBA canvases (~0.9 ms for a 1000 px
    picture) that this path never uses.  ``None`` -- Pillow opens it, with its
    own answers and errors -- for anything else: alpha, animation, an XMP
    chunk (Pillow also reads an orientation from XMP), a header libwebp does
    not accept, a file shorter than its RIFF header says, pywebp missing.
    """
    if _webp_lib is None or _riff_cut_short(body):
        return None
    features = _webp_ffi.new("WebPBitstreamFeatures *")
    if _webp_lib.WebPGetFeatures(body, len(body), features) != _webp_lib.VP8_STATUS_OK:
        return None
    if features.has_alpha or features.has_animation or _riff_chunk(body, b"XMP ") is not None:
        return None
    exif = _riff_chunk(body, b"EXIF")
    return features.width, features.height, _exif_orientation(exif) if exif else 1


def _decode_still_webp(body: bytes, full: tuple[int, int], size: tuple[int, int]) -> Image.Image | None:
    """Decode a still, opaque WebP of ``full`` size with libwebp's plain
    decoder, straight to RGB at ``size`` (the target size).

    Pillow decodes every WebP through libwebp's animation decoder onto an RGBA
    canvas at full size: a quarter slower for the same pixels, and then the
    picture still has to be resized.  libwebp's own rescaler shrinks the
    picture while it decodes (area averaging of the decoded planes, row by
    row): no full-size RGB picture is ever made, a fifth less CPU again.
    ``None`` (Pillow decodes it, with its own error for a bad file) when
    pywebp is missing or libwebp refuses the file.
    """
    if _webp_lib is None:
        return None
    config = _webp_ffi.new("WebPDecoderConfig *")
    if not _webp_lib.WebPInitDecoderConfig(config):
        return None
    width, height = size if _WEBP_SCALING else full
    if (width, height) != full:
        options = _webp_ffi.cast("int *", _webp_ffi.addressof(config, "options"))
        options[7], options[8], options[9] = 1, width, height  # use_scaling, scaled_width, scaled_height
    pixels = np.empty((height, width, 3), dtype=np.uint8)
    output = config.output
    output.colorspace = _webp_lib.MODE_RGB
    output.u.RGBA.rgba = _webp_ffi.cast("uint8_t *", _webp_ffi.from_buffer(pixels))
    output.u.RGBA.size = pixels.size
    output.u.RGBA.stride = width * 3
    output.is_external_memory = 1
    status = _webp_lib.WebPDecode(body, len(body), config)  # cffi releases the GIL for the call
    _webp_lib.WebPFreeDecBuffer(_webp_ffi.addressof(config, "output"))
    if status != _webp_lib.VP8_STATUS_OK:
        return None
    return Image.fromarray(pixels, "RGB")


def _decode_jpeg_scaled(body: bytes, img: Image.Image, size: tuple[int, int]) -> Image.Image | None:
    """Decode a JPEG that is to shrink at the smallest DCT scale M/8 whose
    result is still at least ``size``.

    Pillow's ``draft()`` scales by 1/2, 1/4 or 1/8 only: a 990 px picture that
    is to become 500 px is decoded at full size and then averaged down by two;
    libjpeg-turbo decodes it at 5/8 (619 px) directly -- the inverse DCT,
    upsampling and colour conversion of 60 % fewer pixels, a tenth less CPU
    per JPEG, the same area-averaged result to within a level.  ``None``
    (Pillow decodes it) for CMYK / YCCK pictures, a missing simplejpeg, and
    anything libjpeg-turbo so much as warns about (a cut-off or corrupt
    stream): Pillow then decodes or rejects it with the right reason.
    """
    if _simplejpeg is None or img.mode not in ("RGB", "L"):
        return None
    try:  # the GIL is released while libjpeg-turbo decodes
        pixels = _simplejpeg.decode_jpeg(body, "RGB", min_width=size[0], min_height=size[1], strict=True)
    except (ValueError, RuntimeError):
        return None
    if pixels.ndim != 3 or pixels.shape[1] < size[0] or pixels.shape[0] < size[1]:
        return None  # a stream whose own header disagrees with the one Pillow read
    return Image.fromarray(pixels, "RGB")


def _orientation(img: Image.Image) -> int:
    try:
        value = img.getexif().get(0x0112, 1)
    except Exception as exc:  # corrupt EXIF must not cost us the picture
        log.debug("ignoring unreadable EXIF (%s)", _describe(exc))
        return 1
    return value if isinstance(value, int) else 1


def _exif_orientation(exif: bytes) -> int:
    """The orientation tag of a raw EXIF block (with or without its "Exif\\0\\0" prefix)."""
    tags = Image.Exif()
    try:
        tags.load(exif)
        value = tags.get(0x0112, 1)
    except Exception as exc:  # corrupt EXIF must not cost us the picture
        log.debug("ignoring unreadable EXIF (%s)", _describe(exc))
        return 1
    return value if isinstance(value, int) else 1


def _target_size(w: int, h: int, max_side: int) -> tuple[int, int]:
    longest = max(w, h)
    if longest <= max_side:
        return w, h
    s = max_side / longest
    if w >= h:
        return max_side, max(1, round(h * s))
    return max(1, round(w * s)), max_side


def _dct_rows(size: int = 32, keep: int = 8) -> np.ndarray:
    """The first ``keep`` rows of the unnormalised DCT-II matrix of ``size`` points:
    ``2 cos(pi k (2n + 1) / 2N)``, exactly what ``scipy.fftpack.dct`` computes."""
    k = np.arange(keep)[:, None]
    n = np.arange(size)[None, :]
    return 2.0 * np.cos(np.pi * k * (2 * n + 1) / (2 * size))


_PHASH_DCT = _dct_rows()


def phash_of_thumbnail(thumb: Image.Image) -> imagehash.ImageHash:
    """``imagehash.phash`` of a 32x32 greyscale image, bit for bit.

    imagehash runs two full 32-point DCTs with scipy (whose import alone costs a
    worker process 0.4 s) and keeps the top-left 8x8 coefficients; those 64 are
    two small matrix products.  Bits: coefficient > median of the 64.

    One deliberate difference: coefficients are rounded to 1e-6 first, so that
    those which are mathematically equal (a flat or striped picture has many
    zeros) compare as equal; imagehash compares their floating-point noise, which
    makes such pictures' hashes arbitrary.
    """
    pixels = np.asarray(thumb, dtype=np.float64)
    low = np.round(_PHASH_DCT @ pixels @ _PHASH_DCT.T, 6)
    return imagehash.ImageHash(low > np.median(low))


def _phash(img: Image.Image) -> str:
    # imagehash.phash shrinks to 32x32 greyscale itself (LANCZOS); averaging the
    # pixels down (box) first gives it the same low frequencies at a fraction of
    # the cost: whole-factor reduce() to >= 64 px, then BOX to 32x32
    grey = img.convert("L")
    factor = min(grey.size) // 64
    if factor > 1:
        grey = grey.reduce(factor)
    return str(phash_of_thumbnail(grey.resize((32, 32), Image.Resampling.BOX)))


# ---------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------


def normalise_image(
    body: bytes,
    *,
    max_side: int = 500,
    min_side: int = 32,
    max_pixels: int = 40_000_000,
    quality: int = 90,
) -> NormalisedImage:
    """Validate ``body`` and return it as a normalised RGB JPEG.

    Raises :class:`ImageRejected` (and nothing else) when the body cannot or
    must not be stored.
    """
    if body is None:
        raise ImageRejected("empty", "no body (None)")
    try:
        if not isinstance(body, bytes):
            body = bytes(body)  # bytearray / memoryview
        return _normalise(body, max_side, min_side, max_pixels, quality)
    except ImageRejected:
        raise
    except Exception as exc:  # boundary: anything unexpected is a decode failure
        log.warning("unexpected error while normalising an image: %s", _describe(exc), exc_info=True)
        raise ImageRejected("decode_error", f"unexpected {_describe(exc)}") from None


def _normalise(body: bytes, max_side: int, min_side: int, max_pixels: int, quality: int) -> NormalisedImage:
    if not body:
        raise ImageRejected("empty", "the body is empty (0 bytes)")

    fmt, unsupported = _sniff_binary(body)
    if fmt is None:
        if unsupported is not None:
            raise ImageRejected("unsupported_format", f"{unsupported} images are not supported")
        kind = _sniff_text(body)
        if kind == "html":
            raise ImageRejected("html", "the body is an HTML page, not an image")
        if kind == "svg":
            raise ImageRejected("svg", "the body is an SVG (vector) image, which is not decoded")
        raise ImageRejected("not_an_image", f"no known image signature in the first bytes ({body[:8].hex()})")

    if fmt == "WEBP":  # a still, opaque WebP (most of them): libwebp alone, from header to pixels
        header = _still_webp_header(body)
        if header is not None:
            sw, sh, orientation = header
            tw, th = _checked_target(fmt, sw, sh, max_side, min_side, max_pixels)
            pixels = _decode_still_webp(body, (sw, sh), (tw, th))
            if pixels is not None:
                return _finish(pixels, orientation, (tw, th), quality, fmt, (sw, sh))
            # libwebp refused the data: Pillow opens it again and says why

    # --- header -----------------------------------------------------------
    try:
        img = _open(body, fmt)
    except Exception as exc:
        if fmt == "WEBP" and _riff_cut_short(body):  # libwebp only says "could not create decoder object"
            raise ImageRejected("truncated", f"WEBP data ends early: the RIFF header declares "
                                             f"{int.from_bytes(body[4:8], 'little') + 8} bytes, "
                                             f"{len(body)} arrived") from None
        raise _map_decode_exception(exc, "header", fmt) from None

    with img:
        source_format = img.format or fmt
        sw, sh = img.size
        tw, th = _checked_target(source_format, sw, sh, max_side, min_side, max_pixels)

        # --- pixels -------------------------------------------------------
        try:
            pixels = None
            if source_format == "JPEG" and (tw, th) != (sw, sh):
                pixels = _decode_jpeg_scaled(body, img, (tw, th))
            if pixels is None:
                if source_format in ("JPEG", "MPO") and (tw, th) != (sw, sh):
                    img.draft("RGB", (tw, th))  # DCT scaling by 1/2, 1/4, 1/8; result stays >= (tw, th)
                img.load()
                pixels = img
        except Exception as exc:
            raise _map_decode_exception(exc, "decode", source_format) from None

        # Encode while ``img`` is still open: ``pixels`` may be ``img`` itself.
        return _finish(pixels, _orientation(img), (tw, th), quality, source_format, (sw, sh))


def _checked_target(source_format: str, sw: int, sh: int, max_side: int, min_side: int,
                    max_pixels: int) -> tuple[int, int]:
    """The size to store a ``sw`` x ``sh`` picture at, or the reason it is refused
    (from the header alone, before any pixel is decoded)."""
    if sw <= 0 or sh <= 0:
        raise ImageRejected("decode_error", f"{source_format} declares an empty size {sw}x{sh}")
    if sw * sh > max_pixels:
        raise ImageRejected(
            "decompression_bomb",
            f"{source_format} declares {sw}x{sh} = {sw * sh} pixels, more than the limit of {max_pixels}",
        )
    if min(sw, sh) < min_side:
        raise ImageRejected("too_small", f"{sw}x{sh}: shorter side is below {min_side} px")
    tw, th = _target_size(sw, sh, max_side)
    if min(tw, th) < min_side:
        raise ImageRejected(
            "too_small",
            f"{sw}x{sh} downscaled to {tw}x{th} would have a shorter side below {min_side} px",
        )
    return tw, th


def _finish(pixels: Image.Image, orientation: int, target: tuple[int, int], quality: int, source_format: str,
            source_size: tuple[int, int]) -> NormalisedImage:
    """Mode, size, orientation, JPEG bytes and hashes of decoded ``pixels``."""
    work = _to_working_mode(pixels)
    if work.size != target:
        work = work.resize(target, RESAMPLE, reducing_gap=RESAMPLE_GAP)
    rgb = _flatten_to_rgb(work)
    method = _TRANSPOSE.get(orientation)
    if method is not None:
        rgb = rgb.transpose(method)
    rgb.info.clear()  # no EXIF, ICC, XMP or comment in the output
    buf = io.BytesIO()
    rgb.save(buf, "JPEG", quality=quality, optimize=False)
    data = buf.getvalue()
    return NormalisedImage(
        data=data,
        sha256=hashlib.sha256(data).hexdigest(),
        phash=_phash(rgb),
        width=rgb.width,
        height=rgb.height,
        source_format=source_format,
        source_width=source_size[0],
        source_height=source_size[1],
    )
