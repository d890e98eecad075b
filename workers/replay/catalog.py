"""Deterministic, generated image catalog behind the offline SerpApi replay server.

Every label (any string) is a *class* with its own visual style: a dominant hue
plus a shape/texture family (stripes, circles, dots, checkerboard, ...).  Each
image of a class draws that style inside a randomly placed, scaled and rotated
"subject" region over a randomly tinted background, with colour jitter and
noise, all from a RNG seeded by ``sha256(slug | page | position)``: the same
(label, page, position) always gives byte-identical content, in any process.

A label's identity is its slug (``workers.names.slugify``): "Alaskan Malamute",
"alaskan  malamute" and "ALASKAN-MALAMUTE" are the same class.  The nine
default labels (``DEFAULT_LABELS``) have hand-picked styles (hues at least 30
degrees apart, each with its own pattern family); any other label gets a style
derived from ``sha256(slug)``.

A page holds ``per_page`` results (default 50, 1-based positions).  Layout of a
page with ``per_page >= 10`` (positions of the special kinds are drawn from a
RNG seeded by (slug, page), never position 1):

* ``truncated``       1: a real JPEG cut to half its length (header intact)
* ``html``            1: an HTML error page served as ``image/jpeg`` (.jpg)
* ``not_found``       1: the server answers 404
* ``duplicate``       1: byte-identical to an earlier valid image on the same
                         page (``dup_of`` = that position), different URL
* ``cross_duplicate`` 1 on page 0 only: the shared "photo unavailable"
                         placeholder JPEG, byte-identical in every class
* everything else is a distinct valid image of the class:
  round(20%) PNG, round(15%) WebP, the rest JPEG, of which 2 (``jpeg_exif``)
  carry an EXIF orientation tag (6 and 8) with the pixels stored rotated, so
  that ``ImageOps.exif_transpose`` shows the upright image.

With ``per_page=50`` that is 45 valid (29 JPEG incl. 2 EXIF, 9 PNG, 7 WebP) +
5 bad on page 0, and 46 valid (30 JPEG incl. 2 EXIF, 9 PNG, 7 WebP) + 4 bad on
later pages.  ``expected_counts`` returns these numbers for any page.

Image paths: ``/images/<slug>/<page>/<position>.<ext>`` (ext jpg, png or webp;
the HTML and 404 entries end in .jpg).  Thumbnails (always JPEG, longest side
150 px): ``/thumbs/<slug>/<page>/<position>.jpg``.
"""
from __future__ import annotations

import colorsys
import hashlib
import io
import math
import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from workers.names import slugify

__all__ = [
    "DEFAULT_LABELS",
    "FAMILIES",
    "KINDS",
    "BAD_KINDS",
    "Entry",
    "Style",
    "label_slug",
    "label_for_slug",
    "style_for",
    "page_entries",
    "entry_for_path",
    "entry_bytes",
    "thumbnail_for_path",
    "thumbnail_bytes",
    "expected_counts",
    "placeholder_bytes",
    "render_image",
]

DEFAULT_PER_PAGE = 50
MAX_PAGE = 99  # SerpApi's ijn range is 0..99

# kind -> (extension, content type) for the valid formats
_FORMATS = {
    "jpeg": ("jpg", "image/jpeg"),
    "png": ("png", "image/png"),
    "webp": ("webp", "image/webp"),
}
KINDS = (
    "jpeg", "jpeg_exif", "png", "webp",
    "truncated", "html", "not_found", "duplicate", "cross_duplicate",
)
VALID_KINDS = ("jpeg", "jpeg_exif", "png", "webp")
BAD_KINDS = ("truncated", "html", "not_found", "duplicate", "cross_duplicate")


# --------------------------------------------------------------------------- styles

FAMILIES = (
    "hstripes", "vstripes", "diagonal", "checker", "dots", "circles",
    "rings", "blobs", "triangles", "waves", "grid", "zigzag",
)


@dataclass(frozen=True)
class Style:
    hue: float          # degrees, 0..360: the class's dominant hue
    family: str         # one of FAMILIES
    sat: tuple[float, float]   # saturation range of the class colours
    val: tuple[float, float]   # value (brightness) range of the class colours


DEFAULT_LABELS: tuple[str, ...] = (
    "American Hairless Terrier",
    "Alaskan Malamute",
    "American Eskimo Dog",
    "Australian Shepherd",
    "Boston Terrier",
    "Boykin Spaniel",
    "Chesapeake Bay Retriever",
    "Catahoula Leopard Dog",
    "Toy Fox Terrier",
)

# Hand-picked: hues at least 30 degrees apart, and nine different pattern families.
_DEFAULT_STYLES: dict[str, Style] = {
    "toy-fox-terrier": Style(0.0, "triangles", (0.70, 0.95), (0.65, 0.95)),          # red
    "boykin-spaniel": Style(30.0, "diagonal", (0.70, 0.95), (0.40, 0.75)),           # chocolate/orange
    "american-eskimo-dog": Style(60.0, "dots", (0.60, 0.90), (0.80, 1.00)),          # cream/yellow
    "chesapeake-bay-retriever": Style(100.0, "blobs", (0.55, 0.90), (0.45, 0.85)),   # olive green
    "boston-terrier": Style(160.0, "vstripes", (0.60, 0.95), (0.45, 0.85)),          # teal
    "alaskan-malamute": Style(200.0, "hstripes", (0.55, 0.90), (0.60, 0.95)),        # steel blue
    "australian-shepherd": Style(240.0, "checker", (0.60, 0.90), (0.50, 0.90)),      # blue merle
    "catahoula-leopard-dog": Style(280.0, "rings", (0.55, 0.90), (0.50, 0.90)),      # purple
    "american-hairless-terrier": Style(320.0, "circles", (0.55, 0.90), (0.70, 1.00)),  # pink
}
_DEFAULT_BY_SLUG = {slugify(lbl): lbl for lbl in DEFAULT_LABELS}
assert set(_DEFAULT_BY_SLUG) == set(_DEFAULT_STYLES)


def label_slug(label: str) -> str:
    """The class identity of a label: its slug, or ``q-<sha8>`` when it has no ASCII letters/digits."""
    slug = slugify(" ".join(str(label).split()))
    if not slug:
        slug = "q-" + hashlib.sha256(str(label).strip().encode("utf-8")).hexdigest()[:12]
    return slug


def label_for_slug(slug: str) -> str:
    """Display name for a slug: the default label's spelling, else the slug as words."""
    if slug in _DEFAULT_BY_SLUG:
        return _DEFAULT_BY_SLUG[slug]
    return slug.replace("-", " ")


@lru_cache(maxsize=1024)
def _style_for_slug(slug: str) -> Style:
    if slug in _DEFAULT_STYLES:
        return _DEFAULT_STYLES[slug]
    h = hashlib.sha256(slug.encode("utf-8")).digest()
    hue = (int.from_bytes(h[0:2], "big") % 360) * 1.0
    family = FAMILIES[h[2] % len(FAMILIES)]
    s_lo = 0.50 + (h[3] % 30) / 100.0          # 0.50..0.79
    v_lo = 0.45 + (h[4] % 35) / 100.0          # 0.45..0.79
    return Style(hue, family, (s_lo, min(1.0, s_lo + 0.25)), (v_lo, min(1.0, v_lo + 0.25)))


def style_for(label: str) -> Style:
    return _style_for_slug(label_slug(label))


# --------------------------------------------------------------------------- seeding

def _seed(*parts: object) -> int:
    text = "|".join(str(p) for p in ("atscale-replay-v1",) + parts)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def _rng(*parts: object) -> np.random.Generator:
    return np.random.default_rng(_seed(*parts))


# --------------------------------------------------------------------------- rendering

_WORK = 160  # longest side of the working raster; the result is resized from it


def _hsv(h_deg: float, s: float, v: float) -> np.ndarray:
    r, g, b = colorsys.hsv_to_rgb((h_deg % 360.0) / 360.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))
    return np.array([r, g, b], dtype=np.float32)


def _pair(rng: np.random.Generator, lo: float, hi: float) -> tuple[float, float]:
    a, b = rng.uniform(lo, hi, size=2)
    return float(a), float(b)


def _cells(u: np.ndarray, v: np.ndarray, cell: float, rng: np.random.Generator, k: int = 7):
    """Jittered grid: offsets (in cell units) of each pixel from its cell's centre, and 3 free random numbers per cell (t[2:5])."""
    table = rng.random((5, k, k), dtype=np.float32)
    fu, fv = u / np.float32(cell), v / np.float32(cell)
    i, j = np.floor(fu), np.floor(fv)
    ii, jj = np.mod(i, k).astype(np.intp), np.mod(j, k).astype(np.intp)
    t = table[:, ii, jj]
    du = fu - (i + np.float32(0.5) + (t[0] - np.float32(0.5)) * np.float32(0.2))
    dv = fv - (j + np.float32(0.5) + (t[1] - np.float32(0.5)) * np.float32(0.2))
    return du, dv, t


def _soft(x: np.ndarray, edge: float, width: float) -> np.ndarray:
    return np.clip((x - edge) / width + 0.5, 0.0, 1.0)


def _pattern(family: str, u: np.ndarray, v: np.ndarray, rng: np.random.Generator,
             shape: tuple[int, int]) -> np.ndarray:
    """Mask in [0, 1] of the family's foreground, in rotated/scaled coordinates (u, v)."""
    tau = 2.0 * math.pi
    if family in ("hstripes", "vstripes", "diagonal"):
        period = rng.uniform(0.16, 0.28) if family != "diagonal" else rng.uniform(0.14, 0.22)
        coord = v if family == "hstripes" else u
        duty = rng.uniform(-0.2, 0.2) if family != "diagonal" else rng.uniform(0.35, 0.55)
        return _soft(np.sin(tau * coord / period + rng.uniform(0, tau)), duty, 0.35)
    if family == "checker":
        f = tau / rng.uniform(0.28, 0.42)
        return _soft(np.sin(f * u) * np.sin(f * v), 0.0, 0.15)
    if family == "dots":
        p = rng.uniform(0.20, 0.30)
        r = p * rng.uniform(0.25, 0.38)
        du = np.mod(u, p) - p / 2
        dv = np.mod(v + (np.floor(u / p) % 2) * p / 2, p) - p / 2
        return _soft(-(np.sqrt(du * du + dv * dv)), -r, 0.02)
    if family == "circles":
        cx, cy = _pair(rng, -0.3, 0.3)
        rr = np.sqrt((u - cx) ** 2 + (v - cy) ** 2)
        return _soft(np.sin(tau * rr / rng.uniform(0.14, 0.22) + rng.uniform(0, tau)), 0.0, 0.35)
    if family == "rings":
        # one ring per cell of a jittered grid (so the pattern covers any (u, v) range)
        du, dv, t = _cells(u, v, rng.uniform(0.5, 0.65), rng)
        r = t[2] * np.float32(0.1) + np.float32(0.25)        # radius, in cell units
        d = np.abs(np.sqrt(du * du + dv * dv) - r)
        return _soft(-d, -r * np.float32(0.22), 0.03) * (t[3] < 0.85)
    if family == "blobs":
        # soft radial-gradient blobs of random sizes and shapes, most cells have one
        du, dv, t = _cells(u, v, rng.uniform(0.75, 1.0), rng)
        rx = t[2] * np.float32(0.14) + np.float32(0.26)
        ry = t[3] * np.float32(0.14) + np.float32(0.26)
        d = np.sqrt((du / rx) ** 2 + (dv / ry) ** 2)
        return np.clip(1.4 * (1.0 - d * d), 0.0, 1.0) * (t[4] < 0.85)
    if family == "triangles":
        h, w = shape
        img = Image.new("L", (w, h), 0)
        draw = ImageDraw.Draw(img)
        n = int(rng.integers(16, 26))
        scale = max(w, h)
        for _ in range(n):
            cx, cy = rng.uniform(0, w), rng.uniform(0, h)
            size = scale * rng.uniform(0.09, 0.18)
            rot = rng.uniform(0, tau)
            pts = [(cx + size * math.cos(rot + k * tau / 3), cy + size * math.sin(rot + k * tau / 3)) for k in range(3)]
            draw.polygon(pts, fill=255)
        return np.asarray(img, dtype=np.float32) / 255.0
    if family == "waves":
        p = rng.uniform(0.16, 0.24)
        amp = rng.uniform(0.05, 0.12)
        p2 = rng.uniform(0.35, 0.6)
        return _soft(np.sin(tau * (v + amp * np.sin(tau * u / p2)) / p), 0.0, 0.35)
    if family == "grid":
        p = rng.uniform(0.20, 0.30)
        t = rng.uniform(0.012, 0.025)
        du = np.abs(np.mod(u, p) - p / 2)
        dv = np.abs(np.mod(v, p) - p / 2)
        return np.maximum(_soft(du, p / 2 - t, 0.01), _soft(dv, p / 2 - t, 0.01))
    if family == "zigzag":
        p = rng.uniform(0.18, 0.26)
        p2 = rng.uniform(0.16, 0.26)
        tri = np.abs(np.mod(u, p2) - p2 / 2) * rng.uniform(0.8, 1.5)
        return _soft(np.sin(tau * (v + tri) / p), 0.0, 0.35)
    raise ValueError(f"unknown pattern family {family!r}")


def render_image(slug: str, seed_parts: tuple, size: tuple[int, int]) -> Image.Image:
    """The upright RGB image of class ``slug`` for a seed, at ``size`` (width, height)."""
    style = _style_for_slug(slug)
    rng = _rng("img", slug, *seed_parts)
    w, h = size
    scale = _WORK / max(w, h)
    w0, h0 = max(8, round(w * scale)), max(8, round(h * scale))
    long0 = float(max(w0, h0))
    x = ((np.arange(w0, dtype=np.float32) + 0.5) / long0 * 2.0 - w0 / long0)[None, :].repeat(h0, 0)
    y = ((np.arange(h0, dtype=np.float32) + 0.5) / long0 * 2.0 - h0 / long0)[:, None].repeat(w0, 1)

    # pattern coordinates: random rotation, scale, offset (stripe families keep their orientation)
    fam = style.family
    if fam in ("hstripes", "vstripes", "waves", "zigzag"):
        theta = math.radians(rng.uniform(-12, 12))
    elif fam == "diagonal":
        theta = math.radians(45 + rng.uniform(-10, 10))
    else:
        theta = rng.uniform(0, 2 * math.pi)
    zoom = rng.uniform(0.8, 1.25)
    ox, oy = _pair(rng, -1, 1)
    c, s = math.cos(theta), math.sin(theta)
    u = (c * x + s * y) / zoom + ox
    v = (-s * x + c * y) / zoom + oy
    mask = _pattern(fam, u.astype(np.float32), v.astype(np.float32), rng, (h0, w0))

    # class colours: two tones of the class hue (jittered), pattern drawn between them
    jit = rng.uniform(-8, 8)
    fg = _hsv(style.hue + jit, rng.uniform(*style.sat), rng.uniform(*style.val))
    alt_v = rng.uniform(*style.val)
    alt_v = alt_v * rng.uniform(0.35, 0.6) if rng.random() < 0.5 else min(1.0, alt_v + 0.35)
    alt = _hsv(style.hue + jit + rng.uniform(-6, 6), rng.uniform(0.15, 0.45), alt_v)
    fg3 = _hsv(style.hue + jit + 12, 0.7, 0.8)
    grad = np.clip(0.5 + 0.5 * (x * rng.uniform(-1, 1) + y * rng.uniform(-1, 1)), 0, 1) * np.float32(0.3)

    # subject region: a soft ellipse at a random place and scale
    cx, cy = _pair(rng, -0.45, 0.45)
    rx, ry = rng.uniform(0.35, 1.1), rng.uniform(0.3, 0.9)
    rot = rng.uniform(0, math.pi)
    cr, sr = math.cos(rot), math.sin(rot)
    ex = (cr * (x - cx) + sr * (y - cy)) / rx
    ey = (-sr * (x - cx) + cr * (y - cy)) / ry
    region = _soft(-np.sqrt(ex * ex + ey * ey), -1.0, 0.08)
    # a second, smaller ellipse ("head") on the rim of the first, in a random direction
    ang = rng.uniform(0, 2 * math.pi)
    hx = cx + rx * 0.9 * math.cos(ang) * cr - ry * 0.9 * math.sin(ang) * sr
    hy = cy + rx * 0.9 * math.cos(ang) * sr + ry * 0.9 * math.sin(ang) * cr
    hr = rng.uniform(0.18, 0.42)
    head = _soft(-np.sqrt((x - hx) ** 2 + (y - hy) ** 2), -hr, 0.06)
    region = np.maximum(region, head)

    # background: random low-saturation tint with a gentle gradient
    bg1 = _hsv(rng.uniform(0, 360), rng.uniform(0.0, 0.22), rng.uniform(0.55, 0.97))
    bg2 = _hsv(rng.uniform(0, 360), rng.uniform(0.0, 0.22), rng.uniform(0.45, 0.95))
    bgrad = np.clip(0.5 + 0.6 * (x * rng.uniform(-1, 1) + y * rng.uniform(-1, 1)), 0, 1)
    noise_amp = np.float32(rng.uniform(0.04, 0.12))  # uniform noise, std 0.012..0.035

    # compose channel by channel (2-D arrays keep numpy's inner loops long and fast)
    arr = np.empty((h0, w0, 3), dtype=np.uint8)
    for ch in range(3):
        background = bg1[ch] + (bg2[ch] - bg1[ch]) * bgrad
        fg_field = fg[ch] + (fg3[ch] - fg[ch]) * grad
        subject = alt[ch] + (fg_field - alt[ch]) * mask
        img = background + (subject - background) * region
        img += (rng.random(size=(h0, w0), dtype=np.float32) - np.float32(0.5)) * noise_amp
        arr[..., ch] = np.clip(img * np.float32(255.0) + np.float32(0.5), 0, 255)
    out = Image.fromarray(arr, "RGB")
    if (w0, h0) != (w, h):
        out = out.resize((w, h), Image.Resampling.BILINEAR)
    return out


# --------------------------------------------------------------------------- encoding

def _encode(img: Image.Image, fmt: str, rng: np.random.Generator, exif_orientation: int | None = None) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpeg":
        kwargs = {"quality": int(rng.integers(72, 93)), "optimize": False}
        if exif_orientation:
            exif = Image.Exif()
            exif[0x0112] = exif_orientation
            kwargs["exif"] = exif.tobytes()
        img.save(buf, "JPEG", **kwargs)
    elif fmt == "png":
        # palette PNG (like most web PNGs): small and fast to encode; mode "P" when decoded
        img.quantize(128, method=Image.Quantize.FASTOCTREE).save(buf, "PNG", compress_level=1)
    elif fmt == "webp":
        img.save(buf, "WEBP", quality=int(rng.integers(70, 90)), method=0)
    else:  # pragma: no cover
        raise ValueError(fmt)
    return buf.getvalue()


@lru_cache(maxsize=1)
def placeholder_bytes() -> bytes:
    """The shared "photo unavailable" JPEG (400x300), byte-identical for every class."""
    img = Image.new("RGB", (400, 300), (221, 221, 221))
    d = ImageDraw.Draw(img)
    d.rectangle((20, 20, 379, 279), outline=(170, 170, 170), width=6)
    d.polygon([(80, 230), (160, 120), (220, 200), (260, 160), (320, 230)], fill=(176, 176, 176))
    d.ellipse((270, 60, 320, 110), fill=(190, 190, 190))
    d.line((40, 40, 360, 260), fill=(200, 80, 80), width=8)
    d.line((360, 40, 40, 260), fill=(200, 80, 80), width=8)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return buf.getvalue()


_PLACEHOLDER_SIZE = (400, 300)


# --------------------------------------------------------------------------- entries

@dataclass(frozen=True)
class Entry:
    """One search result of the catalog: where it is served and what it is."""

    slug: str
    label: str            # display name of the class
    page: int             # 0-based (SerpApi ``ijn``)
    position: int         # 1-based, as in ``images_results[].position``
    kind: str             # one of KINDS
    ext: str              # extension of the URL path: jpg, png, webp
    content_type: str     # what the server sends as Content-Type
    status: int           # HTTP status the server answers with (200 or 404)
    width: int            # advertised original_width (display size, after EXIF)
    height: int           # advertised original_height
    per_page: int = DEFAULT_PER_PAGE
    dup_of: int | None = None            # for kind "duplicate": the position it copies
    exif_orientation: int | None = None  # for kind "jpeg_exif"

    @property
    def path(self) -> str:
        return f"/images/{self.slug}/{self.page}/{self.position}.{self.ext}"

    @property
    def thumbnail_path(self) -> str:
        return f"/thumbs/{self.slug}/{self.page}/{self.position}.jpg"

    @property
    def data(self) -> bytes:
        """The body the server sends (generated lazily, cached)."""
        return entry_bytes(self.slug, self.page, self.position, self.per_page)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def is_valid_image(self) -> bool:
        """A distinct, decodable image of this class (what a downloader should keep)."""
        return self.kind in VALID_KINDS

    @property
    def decodable(self) -> bool:
        """The body is a complete image Pillow can load (valid kinds and both duplicate kinds)."""
        return self.kind in VALID_KINDS or self.kind in ("duplicate", "cross_duplicate")


_ASPECTS = (1.0, 4 / 3, 3 / 2, 16 / 9, 3 / 4, 2 / 3, 5 / 4)


def _size(rng: np.random.Generator, fmt: str) -> tuple[int, int]:
    longest = int(rng.integers(200, 901 if fmt != "png" else 601))
    aspect = _ASPECTS[int(rng.integers(0, len(_ASPECTS)))]
    if aspect >= 1:
        return longest, max(64, round(longest / aspect))
    return max(64, round(longest * aspect)), longest


@lru_cache(maxsize=2048)
def _layout(slug: str, page: int, per_page: int) -> tuple[Entry, ...]:
    if page < 0 or per_page < 1:
        raise ValueError("page must be >= 0 and per_page >= 1")
    rng = _rng("layout", slug, page, per_page)
    label = label_for_slug(slug)
    positions = list(range(1, per_page + 1))
    special: dict[int, str] = {}
    dup_of: int | None = None
    if per_page >= 10:
        kinds = ["truncated", "html", "not_found"] + (["cross_duplicate"] if page == 0 else [])
        picked = rng.choice(np.arange(2, per_page + 1), size=len(kinds), replace=False)
        special = {int(p): k for p, k in zip(picked, kinds)}
        # the within-class duplicate sits in the second half and copies an earlier valid image
        later = [p for p in range(per_page // 2 + 1, per_page + 1) if p not in special]
        dpos = int(rng.choice(later))
        earlier = [p for p in range(1, dpos) if p not in special]
        dup_of = int(rng.choice(earlier))
        special[dpos] = "duplicate"
    valid = [p for p in positions if p not in special]
    n_png = round(0.20 * len(valid))
    n_webp = round(0.15 * len(valid))
    order = [int(p) for p in rng.permutation(valid)]
    fmt_of = {p: "png" for p in order[:n_png]}
    fmt_of.update({p: "webp" for p in order[n_png:n_png + n_webp]})
    jpegs = sorted(order[n_png + n_webp:])
    fmt_of.update({p: "jpeg" for p in jpegs})
    exif_of: dict[int, int] = {}
    if len(jpegs) >= 6:
        for p, orient in zip(sorted(int(x) for x in rng.choice(jpegs, size=2, replace=False)), (6, 8)):
            exif_of[p] = orient

    entries: dict[int, Entry] = {}
    for p in positions:
        prng = _rng("entry", slug, page, p)
        if p in fmt_of:
            fmt = fmt_of[p]
            w, h = _size(prng, fmt)
            ext, ctype = _FORMATS[fmt]
            kind = "jpeg_exif" if p in exif_of else fmt
            entries[p] = Entry(slug, label, page, p, kind, ext, ctype, 200, w, h, per_page,
                               exif_orientation=exif_of.get(p))
    for p, kind in special.items():
        prng = _rng("entry", slug, page, p)
        if kind == "duplicate":
            src = entries[dup_of]
            entries[p] = Entry(slug, label, page, p, kind, src.ext, src.content_type, 200, src.width, src.height,
                               per_page, dup_of=dup_of)
        elif kind == "cross_duplicate":
            entries[p] = Entry(slug, label, page, p, kind, "jpg", "image/jpeg", 200, *_PLACEHOLDER_SIZE, per_page)
        elif kind == "not_found":
            w, h = _size(prng, "jpeg")
            entries[p] = Entry(slug, label, page, p, kind, "jpg", "text/html; charset=utf-8", 404, w, h, per_page)
        else:  # truncated, html: both claim to be JPEG
            w, h = _size(prng, "jpeg")
            entries[p] = Entry(slug, label, page, p, kind, "jpg", "image/jpeg", 200, w, h, per_page)
    return tuple(entries[p] for p in positions)


def page_entries(label: str, page: int, per_page: int = DEFAULT_PER_PAGE) -> list[Entry]:
    """The ``per_page`` results of ``label``'s catalog page ``page`` (0-based), by position."""
    return list(_layout(label_slug(label), int(page), int(per_page)))


_PATH_RE = re.compile(r"^/(images|thumbs)/([a-z0-9][a-z0-9-]{0,95})/(\d{1,3})/(\d{1,4})\.(jpg|png|webp)$")


def _parse_path(path: str, per_page: int) -> tuple[str, Entry] | None:
    m = _PATH_RE.match(path.split("?", 1)[0])
    if not m:
        return None
    what, slug, page, pos, ext = m.group(1), m.group(2), int(m.group(3)), int(m.group(4)), m.group(5)
    if page > MAX_PAGE or not 1 <= pos <= per_page:
        return None
    entry = _layout(slug, page, per_page)[pos - 1]
    if what == "images" and ext != entry.ext:
        return None
    if what == "thumbs" and ext != "jpg":
        return None
    return what, entry


def entry_for_path(path: str, per_page: int = DEFAULT_PER_PAGE) -> Entry | None:
    """The entry served at ``/images/<slug>/<page>/<position>.<ext>``, or None."""
    parsed = _parse_path(path, per_page)
    if parsed is None or parsed[0] != "images":
        return None
    return parsed[1]


def thumbnail_for_path(path: str, per_page: int = DEFAULT_PER_PAGE) -> Entry | None:
    """The entry whose thumbnail is ``/thumbs/<slug>/<page>/<position>.jpg``, or None."""
    parsed = _parse_path(path, per_page)
    if parsed is None or parsed[0] != "thumbs":
        return None
    return parsed[1]


def _html_body(entry: Entry, status_line: str, message: str) -> bytes:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{status_line}</title></head>\n<body><h1>{status_line}</h1>\n"
        f"<p>{message}</p>\n<p>Request: {entry.path}</p>\n"
        "<hr><address>nginx</address></body></html>\n"
    ).encode("utf-8")


@lru_cache(maxsize=2560)  # 9 classes x 5 pages x 50 fit (~60 MB)
def entry_bytes(slug: str, page: int, position: int, per_page: int = DEFAULT_PER_PAGE) -> bytes:
    """The body served for an entry; byte-identical for the same arguments in any process."""
    entry = _layout(slug, page, per_page)[position - 1]
    kind = entry.kind
    if kind == "duplicate":
        return entry_bytes(slug, page, entry.dup_of, per_page)
    if kind == "cross_duplicate":
        return placeholder_bytes()
    if kind == "not_found":
        return _html_body(entry, "404 Not Found", "The requested image was not found on this server.")
    if kind == "html":
        return _html_body(entry, "403 Forbidden", "Hotlinking of images is not allowed. Please visit our site.")
    enc_rng = _rng("encode", slug, page, position)
    img = render_image(slug, (page, position), (entry.width, entry.height))
    if kind == "truncated":
        full = _encode(img, "jpeg", enc_rng)
        return full[: len(full) // 2]
    if kind == "jpeg_exif":
        # stored pixels are rotated; the EXIF tag tells viewers how to rotate them back
        stored = img.transpose(Image.Transpose.ROTATE_90 if entry.exif_orientation == 6 else Image.Transpose.ROTATE_270)
        return _encode(stored, "jpeg", enc_rng, exif_orientation=entry.exif_orientation)
    return _encode(img, kind, enc_rng)


@lru_cache(maxsize=1024)
def thumbnail_bytes(slug: str, page: int, position: int, per_page: int = DEFAULT_PER_PAGE) -> bytes:
    """A small upright JPEG preview (longest side 150) of an entry, like Google's thumbnails."""
    entry = _layout(slug, page, per_page)[position - 1]
    if entry.kind == "duplicate":
        return thumbnail_bytes(slug, page, entry.dup_of, per_page)
    if entry.kind == "cross_duplicate":
        img = Image.open(io.BytesIO(placeholder_bytes())).convert("RGB")
    else:
        img = render_image(slug, (page, position), (entry.width, entry.height))
    img.thumbnail((150, 150), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=75)
    return buf.getvalue()


def expected_counts(label: str, page: int, per_page: int = DEFAULT_PER_PAGE) -> dict[str, int]:
    """What a downloader sees on one catalog page.

    Keys: ``total``; one key per kind in KINDS (``jpeg`` excludes ``jpeg_exif``);
    ``jpeg_all`` (jpeg + jpeg_exif); ``valid`` / ``store`` (distinct decodable
    images of the class: what a downloader that drops broken files, within-class
    exact duplicates and cross-class duplicates should keep); ``decodable``
    (bodies Pillow can fully load, duplicates included); ``rejected``
    (total - store); ``http_ok`` (answers with status 200).
    """
    entries = page_entries(label, page, per_page)
    counts = {k: 0 for k in KINDS}
    for e in entries:
        counts[e.kind] += 1
    valid = sum(counts[k] for k in VALID_KINDS)
    counts.update(
        total=len(entries),
        jpeg_all=counts["jpeg"] + counts["jpeg_exif"],
        valid=valid,
        store=valid,
        decodable=valid + counts["duplicate"] + counts["cross_duplicate"],
        rejected=len(entries) - valid,
        http_ok=sum(1 for e in entries if e.status == 200),
    )
    return counts
