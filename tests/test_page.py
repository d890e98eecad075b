"""One page downloaded from the replay catalog over real HTTP: every result stored or
rejected under a named reason, exactly as the catalog says."""
import io

import pytest
from PIL import Image

from workers.fetch import Fetcher
from workers.page import PageSpec, download_page, shard_key
from workers.replay import ReplayServer, expected_counts, page_entries
from workers.store import LocalStore


@pytest.fixture(scope="module")
def replay():
    with ReplayServer() as server:
        yield server


def test_page_stores_valid_images_and_names_every_reject(replay, tmp_path):
    store = LocalStore(tmp_path)
    entries = page_entries("Alaskan Malamute", 0)
    results = [(e.position, replay.url + e.path) for e in entries]
    with Fetcher(allowed_networks="127.0.0.0/8") as fetcher:
        summary = download_page(store, fetcher, PageSpec("d", "alaskan-malamute", 0, max_side=300), results, threads=16)
    exp = expected_counts("Alaskan Malamute", 0)
    assert summary["results"] == 50
    assert summary["rejected"] == {"http_error": exp["not_found"], "html": exp["html"], "truncated": exp["truncated"]}
    assert summary["stored"] == 50 - sum(summary["rejected"].values())
    rows = store.get_jsonl(shard_key("d", "alaskan-malamute", 0))
    assert [r["position"] for r in rows] == list(range(1, 51))
    stored = [r for r in rows if r["status"] == "stored"]
    # duplicates are stored once (same content hash, same key)
    assert len({r["key"] for r in stored}) == len(stored) - exp["duplicate"]
    by_pos = {e.position: e for e in entries}
    for r in stored:
        im = Image.open(io.BytesIO(store.get_bytes(r["key"])))
        assert im.mode == "RGB" and im.format == "JPEG" and max(im.size) <= 300
        assert (im.width, im.height) == (r["width"], r["height"])
        src = by_pos[r["position"]]
        if src.exif_orientation in (6, 8):  # pixels stored rotated; EXIF applied gives the upright shape
            assert (im.width > im.height) == (src.width > src.height)
    for r in rows:
        if r["status"] == "rejected":
            assert by_pos[r["position"]].kind in ("not_found", "html", "truncated")


def test_blocked_address_is_a_named_reject_not_a_crash(replay, tmp_path):
    store = LocalStore(tmp_path)
    results = [(1, replay.url + page_entries("Pug", 0)[0].path)]
    with Fetcher(allowed_networks="") as fetcher:  # loopback not allow-listed
        summary = download_page(store, fetcher, PageSpec("d", "pug", 0), results)
    assert summary == {"label": "pug", "ijn": 0, "results": 1, "stored": 0, "rejected": {"blocked_address": 1}}
    assert store.list("datasets/d/images/") == []
