"""Download one result page: fetch each original in a bounded thread pool, validate
and normalise it, store it under its content hash, and write the page's manifest
shard. Every reject is counted under a named reason; one bad file never stops the page.
"""
from __future__ import annotations

import logging
import random
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from workers.fetch import FetchError, Fetcher
from workers.images import ImageRejected, normalise_image
from workers.store import ObjectStore, StoreError, retrying

log = logging.getLogger(__name__)

RETRY_STATUSES = (429, 500, 502, 503, 504)


@dataclass
class PageSpec:
    dataset: str
    label: str  # the class slug
    ijn: int
    max_side: int = 500
    min_side: int = 32


def image_key(dataset: str, label: str, sha256: str) -> str:
    return f"datasets/{dataset}/images/{label}/{sha256}.jpg"


def shard_key(dataset: str, label: str, ijn: int) -> str:
    return f"datasets/{dataset}/pages/{label}/{ijn}.jsonl"


def fetch_with_retries(fetcher: Fetcher, url: str, attempts: int = 3, max_wait: float = 10.0):
    """GET with bounded retries for transient failures (timeouts, 429/5xx with Retry-After)."""
    for attempt in range(1, attempts + 1):
        try:
            return fetcher.get(url)
        except FetchError as exc:
            status = getattr(exc, "status", None)
            transient = exc.reason in ("timeout", "connect_error") or status in RETRY_STATUSES
            if not transient or attempt == attempts:
                raise
            wait = getattr(exc, "retry_after", None)
            if wait is None:
                wait = 0.25 * (2 ** (attempt - 1)) * (1 + random.random())
            time.sleep(min(wait, max_wait))
    raise AssertionError("unreachable")


def process_one(store: ObjectStore, fetcher: Fetcher, spec: PageSpec, position: int, url: str) -> dict:
    """Fetch, normalise and store one image. Returns its manifest row (never raises
    for a bad image; StoreError propagates so the page is retried)."""
    row = {"label": spec.label, "ijn": spec.ijn, "position": position, "url": url}
    try:
        res = fetch_with_retries(fetcher, url)
        img = normalise_image(res.body, max_side=spec.max_side, min_side=spec.min_side)
    except FetchError as exc:
        return {**row, "status": "rejected", "reason": exc.reason, "detail": str(exc.detail)[:200]}
    except ImageRejected as exc:
        return {**row, "status": "rejected", "reason": exc.reason, "detail": str(exc.detail)[:200]}
    key = image_key(spec.dataset, spec.label, img.sha256)
    retrying(store.put_bytes, key, img.data, "image/jpeg")
    return {**row, "status": "stored", "key": key, "sha256": img.sha256, "phash": img.phash,
            "width": img.width, "height": img.height, "source_format": img.source_format}


def download_page(store: ObjectStore, fetcher: Fetcher, spec: PageSpec, results: list[tuple[int, str]],
                  threads: int = 32) -> dict:
    """Download every (position, url) of one page; write the shard; return a small summary."""
    rows: list[dict] = []
    if results:
        with ThreadPoolExecutor(max_workers=max(1, min(threads, len(results)))) as pool:
            futures = [pool.submit(process_one, store, fetcher, spec, pos, url) for pos, url in results]
            for fut in futures:
                rows.append(fut.result())  # StoreError escapes: the page task retries
    rows.sort(key=lambda r: r["position"])
    retrying(store.put_jsonl, shard_key(spec.dataset, spec.label, spec.ijn), rows)
    rejected = Counter(r["reason"] for r in rows if r["status"] == "rejected")
    stored = sum(1 for r in rows if r["status"] == "stored")
    log.info("page %s/%s: %d stored, %d rejected %s", spec.label, spec.ijn, stored, sum(rejected.values()),
             dict(rejected))
    return {"label": spec.label, "ijn": spec.ijn, "results": len(results), "stored": stored,
            "rejected": dict(rejected)}


__all__ = ["PageSpec", "download_page", "image_key", "shard_key", "StoreError"]
