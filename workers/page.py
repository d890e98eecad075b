"""Download one result page: fetch each original in a bounded thread pool, validate
and normalise it, store it under its content hash, and write the page's manifest
shard. Every reject is counted under a named reason; one bad file never stops the page.

:func:`process_one` is the per-URL code path (fetch with bounded retries ->
normalise -> store -> manifest row).  The Celery task ``atscale.download_page``
runs it through :func:`download_page`; ``atscale fetch`` runs the very same
function over a plain URL list (:mod:`workers.fetch_many`).

Retries (:func:`fetch_with_retries`): timeouts, broken connections and HTTP
429/500/502/503/504 are retried at most ``attempts - 1`` times.  The wait is
exponential backoff with jitter, or the server's ``Retry-After`` (429/503) when
that is longer; a ``Retry-After`` beyond ``max_retry_after`` is not waited for
(the URL is rejected at once as ``http_error``, saying so).
"""
from __future__ import annotations

import logging
import os
import random
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from workers.fetch import FetchError, Fetcher, redact_url
from workers.images import ImageRejected, normalise_image
from workers.slots import Slots
from workers.store import ObjectStore, StoreError, retrying

log = logging.getLogger(__name__)

RETRY_STATUSES = (429, 500, 502, 503, 504)

# Decoding is CPU work: more of it at once than a process can run only holds
# more decoded pixels in memory (a 2000 px image is ~12 MB) and makes the
# download threads wait longer for the GIL.  Threads beyond this many wait for
# a slot after their download, holding only the compressed body.
ENV_DECODE_SLOTS = "ATSCALE_DECODE_SLOTS"


def _decode_slot_count() -> int:
    text = os.environ.get(ENV_DECODE_SLOTS, "").strip()
    try:
        return max(1, int(text)) if text else 2
    except ValueError:
        raise ValueError(f"{ENV_DECODE_SLOTS}: {text!r} is not a whole number") from None


_DECODE_SLOTS = Slots(_decode_slot_count())


@dataclass
class PageSpec:
    dataset: str
    label: str  # the class slug
    ijn: int
    max_side: int = 500
    min_side: int = 32
    image_prefix: str | None = None  # store images under "<prefix>/<sha256>.jpg" instead of the dataset layout

    def key_for(self, sha256: str) -> str:
        if self.image_prefix:
            return f"{self.image_prefix.rstrip('/')}/{sha256}.jpg"
        return image_key(self.dataset, self.label, sha256)


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 3  # tries in all, the first included
    base_delay: float = 0.25  # first backoff: base_delay..2*base_delay seconds
    max_delay: float = 10.0  # cap of one backoff wait
    max_retry_after: float = 30.0  # the longest Retry-After we wait for

    def backoff(self, attempt: int) -> float:
        """Exponential backoff with jitter before try ``attempt + 1`` (``attempt`` >= 1)."""
        return min(self.max_delay, self.base_delay * (2 ** (attempt - 1)) * (1.0 + random.random()))


DEFAULT_RETRY = RetryPolicy()


def image_key(dataset: str, label: str, sha256: str) -> str:
    return f"datasets/{dataset}/images/{label}/{sha256}.jpg"


def shard_key(dataset: str, label: str, ijn: int) -> str:
    return f"datasets/{dataset}/pages/{label}/{ijn}.jsonl"


def is_transient(exc: FetchError) -> bool:
    return exc.reason in ("timeout", "connect_error") or exc.status in RETRY_STATUSES


def fetch_with_retries(fetcher: Fetcher, url: str, policy: RetryPolicy = DEFAULT_RETRY, *, sleep=time.sleep):
    """GET with bounded retries for transient failures; honours Retry-After (see the module doc)."""
    for attempt in range(1, policy.attempts + 1):
        try:
            return fetcher.get(url)
        except FetchError as exc:
            if not is_transient(exc) or attempt == policy.attempts:
                raise
            wait = policy.backoff(attempt)
            if exc.retry_after is not None:
                if exc.retry_after > policy.max_retry_after:
                    raise FetchError(exc.reason, f"{exc.detail}; not retried: Retry-After is longer than "
                                                 f"{policy.max_retry_after:g} s", status=exc.status,
                                     retry_after=exc.retry_after) from None
                wait = max(wait, exc.retry_after)
            log.debug("retry %d/%d of %s in %.2f s (%s)", attempt, policy.attempts - 1, redact_url(url), wait,
                      exc.reason)
            sleep(wait)
    raise AssertionError("unreachable")


def process_one(store: ObjectStore, fetcher: Fetcher, spec: PageSpec, position: int, url: str,
                retry: RetryPolicy = DEFAULT_RETRY) -> dict:
    """Fetch, normalise and store one image. Returns its manifest row (never raises
    for a bad image or URL; StoreError propagates so the page is retried)."""
    row = {"label": spec.label, "ijn": spec.ijn, "position": position, "url": url}
    try:
        res = fetch_with_retries(fetcher, url, retry)
        with _DECODE_SLOTS:
            img = normalise_image(res.body, max_side=spec.max_side, min_side=spec.min_side)
    except (FetchError, ImageRejected) as exc:
        return {**row, "status": "rejected", "reason": exc.reason, "detail": str(exc.detail)[:200]}
    except Exception as exc:  # a bug must cost one URL, not the page: logged with its traceback, counted
        log.exception("unexpected error on %s", redact_url(url) if isinstance(url, str) else type(url).__name__)
        return {**row, "status": "rejected", "reason": "internal_error", "detail": f"{type(exc).__name__}: {exc}"[:200]}
    key = spec.key_for(img.sha256)
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
