"""Duplicates by content hash and by perceptual hash, on real images made with Pillow
and normalised by the real pipeline code (normalise_image): what is kept, what is
dropped, and under which name the report counts it."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from workers.dataset import JUNK_MIN_CLASSES, NEAR_DISTANCE, _phash_int, build_manifest, finalize, near_pairs
from workers.images import normalise_image
from workers.store import LocalStore


def picture(seed: int, size=(480, 360)) -> Image.Image:
    """A distinct photo-like picture: smooth colour field plus shapes."""
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), "RGB").resize(size, Image.Resampling.BICUBIC)
    d = ImageDraw.Draw(base)
    for _ in range(6):
        x, y = int(rng.integers(0, size[0] - 60)), int(rng.integers(0, size[1] - 60))
        w, h = int(rng.integers(20, 120)), int(rng.integers(20, 120))
        d.ellipse((x, y, x + w, y + h), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return base


def encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


POSITIONS: dict[tuple[str, int], int] = {}


def stored_row(label: str, body: bytes, ijn: int = 0) -> dict:
    """The manifest row process_one writes for a stored image, from the real normaliser."""
    img = normalise_image(body)
    pos = POSITIONS[(label, ijn)] = POSITIONS.get((label, ijn), 0) + 1
    return {"label": label, "ijn": ijn, "position": pos, "url": f"http://h/{label}/{ijn}/{pos}",
            "status": "stored", "key": f"datasets/d/images/{label}/{img.sha256}.jpg", "sha256": img.sha256,
            "phash": img.phash, "width": img.width, "height": img.height}


@pytest.fixture(autouse=True)
def _fresh_positions():
    POSITIONS.clear()


def hamming(a: str, b: str) -> int:
    return (int(a, 16) ^ int(b, 16)).bit_count()


def test_reencoded_and_resized_copies_are_near_not_exact():
    src = picture(1)
    rows = [stored_row("a", encode(src, "PNG")), stored_row("a", encode(src, quality=55)),
            stored_row("a", encode(src.resize((400, 300)), "WEBP", quality=70))]
    assert len({r["sha256"] for r in rows}) == 3  # three different files ...
    assert all(hamming(rows[0]["phash"], r["phash"]) <= NEAR_DISTANCE for r in rows)  # ... one picture


def test_near_duplicates_within_a_class_keep_the_first():
    src, other = picture(1), picture(2)
    rows = [stored_row("a", encode(src, quality=95)), stored_row("a", encode(other)),
            stored_row("a", encode(src.resize((400, 300)), quality=60), ijn=1),
            stored_row("a", encode(src, "PNG"), ijn=1)]
    manifest, dups = build_manifest(rows)
    assert [m["sha256"] for m in manifest] == [rows[0]["sha256"], rows[1]["sha256"]]
    assert dups["near_within_class"] == 2 and dups["within_class"] == 0
    assert {d["kept"] for d in dups["near_within_class_images"]} == {rows[0]["sha256"]}
    assert dups["near_cross_class"] == 0 and dups["junk"] == 0 and dups["cross_class"] == 0


def test_near_duplicates_across_classes_are_dropped_from_both_and_reported():
    shared = picture(3)
    rows = [stored_row("a", encode(shared, quality=92)), stored_row("a", encode(picture(4))),
            stored_row("b", encode(shared.resize((360, 270)), "PNG")), stored_row("b", encode(picture(5)))]
    manifest, dups = build_manifest(rows)
    assert sorted(m["sha256"] for m in manifest) == sorted([rows[1]["sha256"], rows[3]["sha256"]])
    assert dups["near_cross_class"] == 2
    assert [d["labels"] for d in dups["near_cross_class_images"]] == [["a", "b"], ["a", "b"]]
    assert {d["sha256"] for d in dups["near_cross_class_images"]} == {rows[0]["sha256"], rows[2]["sha256"]}


def placeholder() -> Image.Image:
    img = Image.new("RGB", (400, 300), (221, 221, 221))
    d = ImageDraw.Draw(img)
    d.rectangle((20, 20, 379, 279), outline=(170, 170, 170), width=6)
    d.line((40, 40, 360, 260), fill=(200, 80, 80), width=8)
    d.line((360, 40, 40, 260), fill=(200, 80, 80), width=8)
    return img


def test_placeholder_in_many_classes_is_junk_not_a_duplicate():
    ph = encode(placeholder(), quality=85)
    labels = [f"c{i}" for i in range(JUNK_MIN_CLASSES)]
    rows = [stored_row(lb, ph) for lb in labels]
    rows.append(stored_row("c0", ph, ijn=1))  # twice in one class
    rows += [stored_row(lb, encode(picture(10 + i))) for i, lb in enumerate(labels)]
    manifest, dups = build_manifest(rows)
    assert dups["junk"] == JUNK_MIN_CLASSES + 1
    assert dups["cross_class"] == 0 and dups["cross_class_images"] == []
    assert dups["within_class"] == 0 and dups["near_cross_class"] == 0
    assert dups["junk_images"] == [{"sha256": rows[0]["sha256"], "labels": labels}]
    assert sorted(m["label"] for m in manifest) == sorted(labels)  # only the real pictures remain


def test_junk_counts_re_encoded_copies_of_the_same_picture():
    logo = picture(99)
    labels = [f"c{i}" for i in range(JUNK_MIN_CLASSES - 1)]
    rows = [stored_row(lb, encode(logo, quality=90)) for lb in labels]  # exact copies: 3 classes
    rows.append(stored_row("other", encode(logo.resize((400, 300)), "PNG")))  # + a re-encoded copy: 4 classes
    rows += [stored_row(lb, encode(picture(40 + i))) for i, lb in enumerate(labels + ["other"])]
    manifest, dups = build_manifest(rows)
    assert dups["junk"] == JUNK_MIN_CLASSES and dups["cross_class"] == 0 and dups["near_cross_class"] == 0
    assert sorted(m["label"] for m in manifest) == sorted(labels + ["other"])


def test_exact_duplicate_in_fewer_classes_than_the_junk_threshold_stays_cross_class():
    body = encode(picture(20))
    rows = [stored_row("a", body), stored_row("b", body), stored_row("c", body), stored_row("a", encode(picture(21)))]
    manifest, dups = build_manifest(rows)
    assert JUNK_MIN_CLASSES > 3
    assert dups["cross_class"] == 3 and dups["junk"] == 0
    assert dups["cross_class_images"] == [{"sha256": rows[0]["sha256"], "labels": ["a", "b", "c"]}]
    assert [m["sha256"] for m in manifest] == [rows[3]["sha256"]]


def test_distinct_pictures_are_all_kept():
    rows = [stored_row(lb, encode(picture(100 + 10 * k + i))) for k, lb in enumerate("abc") for i in range(10)]
    manifest, dups = build_manifest(rows)
    assert len(manifest) == 30
    assert all(dups[k] == 0 for k in ("within_class", "cross_class", "near_within_class", "near_cross_class", "junk"))


def test_flat_images_are_never_called_alike():
    red, blue = encode(Image.new("RGB", (200, 200), (255, 0, 0))), encode(Image.new("RGB", (200, 200), (0, 0, 255)))
    rows = [stored_row("a", red), stored_row("a", blue), stored_row("b", encode(Image.new("RGB", (200, 200), (0, 90, 0))))]
    assert len({r["phash"] for r in rows}) == 1  # pHash of any flat image: one value
    manifest, dups = build_manifest(rows)
    assert len(manifest) == 3 and dups["near_within_class"] == 0 and dups["near_cross_class"] == 0
    assert _phash_int("8000000000000000") is None and _phash_int("0000000000000000") is None
    assert _phash_int(None) is None and _phash_int("xyz") is None and _phash_int("c3a5f0f00f0fa5c3") is not None


def test_near_pairs_matches_brute_force():
    rng = np.random.default_rng(7)
    base = [int(x) for x in rng.integers(0, 2**63, 300, dtype=np.int64)]
    hashes: list[int | None] = []
    for h in base:
        hashes.append(h)
        if rng.random() < 0.3:  # a copy with a few flipped bits
            flips = rng.choice(64, size=int(rng.integers(0, 7)), replace=False)
            hashes.append(h ^ sum(1 << int(b) for b in flips))
    hashes.insert(5, None)
    expected = sorted((i, j) for i in range(len(hashes)) for j in range(i + 1, len(hashes))
                      if hashes[i] is not None and hashes[j] is not None and (hashes[i] ^ hashes[j]).bit_count() <= 4)
    assert sorted(near_pairs(hashes, 4)) == expected
    assert expected  # the test means something


def test_finalize_report_carries_the_new_counts(tmp_path):
    store = LocalStore(tmp_path)
    src = picture(30)
    rows = [stored_row("a", encode(src)), stored_row("a", encode(src, "PNG")), stored_row("b", encode(picture(31)))]
    store.put_jsonl("datasets/d/pages/a/0.jsonl", rows[:2])
    store.put_jsonl("datasets/d/pages/b/0.jsonl", rows[2:])
    report = finalize(store, "d", labels=["a", "b"], pages_expected=2)
    assert report["classes"] == {"a": 1, "b": 1}
    assert report["duplicates"]["near_within_class"] == 1
    assert len(store.get_jsonl("datasets/d/manifest.jsonl")) == 2
