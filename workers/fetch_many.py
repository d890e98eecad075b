"""Run the page-download code path over a plain URL list, on every core.

``atscale fetch --urls urls.txt --out DIR`` uses this module.  ``processes``
worker processes (``spawn`` context: nothing inherited from the parent) each run
``threads`` threads; every thread takes a few URLs at a time from a bounded
queue and runs :func:`workers.page.process_one` on each -- the very function the
Celery task ``atscale.download_page`` runs for every search result: safe fetch
with bounded retries, validation and normalisation, store under the content
hash, one manifest row.  Rows come back through a second queue and are yielded
in completion order, each with its line number (``position``).

Memory stays bounded whatever the number of URLs: the parent reads the list
lazily and at most ``2 * processes * threads`` URLs wait in the queue; nothing
keeps the rows.  Pillow releases the GIL in JPEG decoding and resizing but not
in PNG/WebP decoding or JPEG encoding, hence processes for the cores and
threads for the network waits within each.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import re
import resource
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Iterable, Iterator

log = logging.getLogger(__name__)

_CHUNK = 4  # URLs a thread takes from the queue at once
# Worker processes are forked from a fork server (a clean, single-threaded
# process started once) that has already imported these: a worker starts in
# milliseconds instead of importing Pillow, numpy, requests ... again.
_PRELOAD = ["workers.page", "workers.store", "workers.fetch_many"]


# Each worker also runs the caller's __main__ module again (multiprocessing's
# rule, as "__mp_main__"); for `atscale` that is tasks.cli, whose one heavy
# import is rich: preloaded too, so that re-run costs nothing.
_PRELOAD_FOR_MAIN = {"tasks.cli": ["rich.console"]}


def _context():
    ctx = mp.get_context("forkserver")
    main = getattr(sys.modules.get("__main__"), "__spec__", None)
    ctx.set_forkserver_preload(_PRELOAD + _PRELOAD_FOR_MAIN.get(getattr(main, "name", None), []))
    return ctx


def start_fork_server() -> None:
    """Start the fork server now, so that it imports Pillow, numpy, requests ...
    on another core while the caller is still busy with its own start-up (the
    command line calls this first thing).  Optional: the first worker process
    starts it anyway."""
    _context()
    from multiprocessing import forkserver

    forkserver.ensure_running()


@dataclass(frozen=True)
class FetchOptions:
    """Everything a worker process needs (plain values: sent to spawned processes)."""

    out: str  # a folder or s3://bucket/prefix (workers.store.open_store)
    image_prefix: str = "images"  # images are stored as <out>/<image_prefix>/<sha256>.jpg
    label: str = "urls"  # the label written into each row
    max_side: int = 500
    min_side: int = 32
    user_agent: str | None = None  # None: ATSCALE_USER_AGENT / the default
    allowed_networks: str | None = None  # None: ATSCALE_ALLOWED_NETWORKS
    per_host: int | None = None  # None: ATSCALE_PER_HOST_CONNECTIONS / 8
    connect_timeout: float = 5.0
    read_timeout: float = 20.0
    max_bytes: int = 20_000_000
    max_redirects: int = 3
    attempts: int = 3  # tries per URL, first included (transient failures only)
    max_retry_after: float = 30.0


@dataclass
class RunSummary:
    urls: int = 0
    stored: int = 0
    rejected: dict = field(default_factory=dict)
    seconds: float = 0.0
    images_per_s: float = 0.0
    urls_per_s: float = 0.0
    processes: int = 0
    threads: int = 0
    peak_rss_mb: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def read_url_list(lines: Iterable[str]) -> Iterator[tuple[int, str]]:
    """(line number, URL) for each line that is not blank or a ``#`` comment.

    A ``#`` after white space starts a comment too (``http://h/a.jpg  # the logo``):
    a URL holds no white space, and a ``#`` right after it is its fragment."""
    for number, line in enumerate(lines, 1):
        url = _TRAILING_COMMENT.split(line, 1)[0].strip()
        if url and not url.startswith("#"):
            yield number, url


_TRAILING_COMMENT = re.compile(r"\s#")


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def output_row(row: dict, store_root: str | None) -> dict:
    """The public JSON line of one URL."""
    out = {
        "position": row["position"],
        "url": row["url"],
        "status": row["status"],
        "reason": row.get("reason"),
        "sha256": row.get("sha256"),
        "width": row.get("width"),
        "height": row.get("height"),
    }
    if row["status"] == "stored":
        out["path"] = os.path.join(store_root, row["key"]) if store_root else row["key"]
        out["source_format"] = row.get("source_format")
    else:
        out["detail"] = row.get("detail")
    return out


# ---------------------------------------------------------------------------
# worker process
# ---------------------------------------------------------------------------


def _limit_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives each busy thread its own malloc arena (up to 8 per core), and
    every arena keeps its high-water mark of decoded-image buffers: capping them
    halves a worker's resident memory at no measurable cost in speed.  Done before
    the threads start; left alone when MALLOC_ARENA_MAX is set or libc is not glibc."""
    if os.environ.get("MALLOC_ARENA_MAX") or not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        # the process's own symbols (libc among them); ctypes.util.find_library
        # would run `ldconfig -p` in a subprocess, in every worker, for the same answer
        libc = ctypes.CDLL(None)
        libc.mallopt(-8, arenas)  # M_ARENA_MAX
    except (OSError, AttributeError) as exc:  # musl or another libc: nothing to tune
        log.debug("malloc arenas not limited: %s", exc)


def _worker_main(opts: FetchOptions, threads: int, tasks, results, worker_id: int) -> None:
    logging.basicConfig(level=logging.WARNING, format=f"fetch worker {worker_id}: %(levelname)s %(message)s")
    _limit_malloc_arenas()
    try:
        from workers.fetch import Fetcher
        from workers.page import PageSpec, RetryPolicy, process_one
        from workers.store import StoreError, open_store

        store = open_store(opts.out)
        spec = PageSpec(dataset="fetch", label=opts.label, ijn=0, max_side=opts.max_side, min_side=opts.min_side,
                        image_prefix=opts.image_prefix)
        retry = RetryPolicy(attempts=opts.attempts, max_retry_after=opts.max_retry_after)
        kwargs = {}
        if opts.user_agent:
            kwargs["user_agent"] = opts.user_agent
        fetcher = Fetcher(timeout=(opts.connect_timeout, opts.read_timeout), max_bytes=opts.max_bytes,
                          max_redirects=opts.max_redirects, allowed_networks=opts.allowed_networks,
                          per_host=opts.per_host, pool_size=threads, **kwargs)
    except Exception as exc:  # reported to the parent, which stops the run with this message
        results.put(("failed", worker_id, f"{type(exc).__name__}: {exc}"))
        return

    def one(position: int, url: str) -> dict:
        try:
            return process_one(store, fetcher, spec, position, url, retry)
        except StoreError as exc:
            return {"label": spec.label, "ijn": 0, "position": position, "url": url, "status": "rejected",
                    "reason": "store_error", "detail": str(exc)[:200]}

    def loop() -> None:
        while True:
            chunk = tasks.get()
            if chunk is None:
                return
            results.put(("rows", [one(position, url) for position, url in chunk]))

    pool = [threading.Thread(target=loop, name=f"fetch-{worker_id}-{i}", daemon=True) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    fetcher.close()
    results.put(("done", worker_id, peak_rss_mb()))


# ---------------------------------------------------------------------------
# parent
# ---------------------------------------------------------------------------


class UrlRunner:
    """Iterate to get one row per URL (completion order); ``summary`` afterwards."""

    def __init__(self, urls: Iterable[tuple[int, str]], opts: FetchOptions, *, processes: int | None = None,
                 threads: int = 32):
        self.urls = urls
        self.opts = opts
        self.processes = max(1, int(processes or os.cpu_count() or 1))
        self.threads = max(1, int(threads))
        self.summary = RunSummary(processes=self.processes, threads=self.threads)

    def __iter__(self) -> Iterator[dict]:
        started = time.monotonic()
        total_threads = self.processes * self.threads
        ctx = _context()
        tasks = ctx.Queue(maxsize=max(2, 2 * total_threads // _CHUNK))
        results = ctx.Queue()
        procs = [ctx.Process(target=_worker_main, args=(self.opts, self.threads, tasks, results, i),
                             name=f"atscale-fetch-{i}", daemon=True) for i in range(self.processes)]
        for p in procs:
            p.start()
        stop = threading.Event()
        sent = [0]
        feed_error: list[BaseException] = []

        def feed() -> None:
            try:
                chunk: list[tuple[int, str]] = []
                for item in self.urls:
                    chunk.append(item)
                    if len(chunk) == _CHUNK:
                        if not _put(tasks, chunk, stop):
                            return
                        sent[0] += len(chunk)
                        chunk = []
                if chunk and _put(tasks, chunk, stop):
                    sent[0] += len(chunk)
            except BaseException as exc:  # an unreadable URL file: reported by the parent below
                feed_error.append(exc)
            finally:
                for _ in range(total_threads):
                    if not _put(tasks, None, stop):
                        return

        feeder = threading.Thread(target=feed, name="atscale-fetch-feeder", daemon=True)
        feeder.start()
        done: dict[int, float] = {}
        counts: Counter = Counter()
        received = 0
        try:
            while len(done) < self.processes:
                try:
                    msg = results.get(timeout=1.0)
                except queue.Empty:
                    dead = [p for i, p in enumerate(procs) if i not in done and not p.is_alive()]
                    if dead:
                        raise RuntimeError(f"fetch worker {dead[0].name} died (exit code {dead[0].exitcode}); "
                                           f"{received} of the {sent[0]} URLs handed out had finished")
                    continue
                kind = msg[0]
                if kind == "rows":
                    for row in msg[1]:
                        received += 1
                        counts[row["reason"] if row["status"] == "rejected" else "stored"] += 1
                        yield row
                elif kind == "done":
                    done[msg[1]] = msg[2]
                elif kind == "failed":
                    raise RuntimeError(f"fetch worker {msg[1]} could not start: {msg[2]}")
            if feed_error:
                raise feed_error[0]
        finally:
            stop.set()
            if len(done) < self.processes:  # stopped early (error, caller stopped, Ctrl-C): no more work wanted
                for p in procs:
                    if p.is_alive():
                        p.terminate()
            for p in procs:
                p.join(timeout=5)
                if p.is_alive():
                    p.kill()
                    p.join(timeout=5)
            feeder.join(timeout=5)
            tasks.cancel_join_thread()
            results.cancel_join_thread()
            elapsed = time.monotonic() - started
            s = self.summary
            s.urls = received
            s.stored = counts.pop("stored", 0)
            s.rejected = dict(sorted(counts.items()))
            s.seconds = round(elapsed, 3)
            s.images_per_s = round(s.stored / elapsed, 2) if elapsed > 0 else 0.0
            s.urls_per_s = round(received / elapsed, 2) if elapsed > 0 else 0.0
            workers = [done.get(i) for i in range(self.processes)]
            s.peak_rss_mb = {"parent": peak_rss_mb(), "workers": workers,
                             "total": round(peak_rss_mb() + sum(w or 0 for w in workers), 1)}


def _put(q, item, stop: threading.Event) -> bool:
    """Put with a bounded wait so that a stopped run never hangs the feeder."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.5)
            return True
        except queue.Full:
            continue
    return False
