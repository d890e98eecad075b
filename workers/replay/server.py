"""Offline SerpApi-compatible replay server (Google Images), backed by the generated catalog.

Endpoints (all GET; HEAD works for images, thumbnails and /healthz):

* ``/search.json`` and ``/search``: SerpApi's search API for ``engine=google_images``
  (refinement token ``uds``) and the legacy ``engine=google&tbm=isch`` (token ``chips``).
* ``/images/<slug>/<page>/<position>.<ext>``: catalog bytes (see ``catalog``).
* ``/thumbs/<slug>/<page>/<position>.jpg``: small JPEG previews.
* ``/healthz``: ``ok``.

Behaviour of ``/search``:

* ``api_key`` missing or empty -> 401 with SerpApi's exact body; if the server was
  created with ``api_key=...``, any other key is also rejected (401).
* engine other than ``google_images`` / ``google`` + ``tbm=isch`` -> 400.
* ``q`` missing or blank -> 400 ``{"error": "Missing query `q` parameter."}``.
* ``ijn`` not an integer in 0..99 -> 400.
* ``q`` containing ``zznoresults`` (any case), or ``ijn >= max_pages`` -> 200 with the
  "no results" body (``search_metadata.status == "Success"`` plus a top-level ``error``).
* otherwise 200 with ``images_results`` = the class's catalog page ``ijn``.  The class
  ("label") is the query with any ``imagesize:WxH`` operator removed, or, when a valid
  ``uds``/``chips`` token is given, the label encoded in the token.  Requests without a
  token also get ``suggested_searches`` (5 entries, one named ``dog`` unless the query
  contains ``nodogchip``).  An unreadable token is ignored (label from ``q``), as
  Google would; the request log records ``token_valid: False``.

Token formats (deterministic; see ``make_uds`` / ``make_chips`` / ``decode_token``):

* uds:   ``AOm0Wd`` + base64url(``<label>\\n<name>`` + 6-byte sha256 tag), no padding.
* chips: ``q:<query, lower case, quote_plus>,g_1:<name, quote_plus>:<base64 8-byte tag>%3D``
  (``%3D`` is the URL-encoded ``=`` padding, as in real chips; in ``serpapi_link`` the whole
  chips string is URL-encoded once more, so it reads ``...%253D``).

The ``api_key`` is never written to the request log, the echo, or any log line.
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import threading
import time
from collections import Counter
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote_plus, unquote, unquote_plus, urlencode, urlsplit

from workers.replay import catalog

__all__ = [
    "ReplayServer",
    "INVALID_KEY_ERROR",
    "MISSING_Q_ERROR",
    "NO_RESULTS_IMAGES",
    "NO_RESULTS_GOOGLE",
    "SUGGESTION_NAMES",
    "label_from_query",
    "make_uds",
    "make_chips",
    "decode_token",
]

log = logging.getLogger("workers.replay")

INVALID_KEY_ERROR = "Invalid API key. Your API key should be here: https://serpapi.com/manage-api-key"
MISSING_Q_ERROR = "Missing query `q` parameter."
NO_RESULTS_IMAGES = "Google Images hasn't returned any results for this query."
NO_RESULTS_GOOGLE = "Google hasn't returned any results for this query."
INVALID_IJN_ERROR = "Invalid `ijn` parameter. It should be an integer between 0 and 99."

# Names of suggested searches; "dog" is always one of the five unless the query says "nodogchip".
SUGGESTION_NAMES = (
    "dog", "puppy", "cute", "drawing", "black and white",
    "full grown", "white", "brown", "cartoon", "clipart",
)

_IMAGESIZE_RE = re.compile(r"\bimagesize:\s*\d+\s*x\s*\d+\b", re.IGNORECASE)
_UDS_PREFIX = "AOm0Wd"
_CHIPS_RE = re.compile(r"^q:(?P<q>.*),(?:g_1|online_chips):(?P<name>[^:,]*):(?P<tok>[^:,]+)$", re.DOTALL)
_LOG_MAX = 10_000
_NOT_ECHOED = {"api_key", "output", "no_cache", "async", "zero_trace", "json_restrictor"}
_SOURCES = (
    ("Pinterest", "www.pinterest.example"), ("Wikipedia", "en.wikipedia.example"),
    ("American Kennel Club", "www.akc.example"), ("Reddit", "www.reddit.example"),
    ("Dogtime", "dogtime.example"), ("Flickr", "www.flickr.example"),
    ("Instagram", "www.instagram.example"), ("Etsy", "www.etsy.example"),
    ("The Spruce Pets", "www.thesprucepets.example"), ("Petfinder", "www.petfinder.example"),
)
_TITLES = (
    "{label} - Wikipedia", "{label} Dog Breed Information", "{label} puppies for sale",
    "10 facts about the {label}", "My {label} at the park : r/dogs", "{label} | Pin on Dogs",
    "{label} Stock Photos and Images", "Meet Max, our {label}", "{label} Breed Guide: Temperament, Care",
    "{label} Pictures",
)


_DEFAULT_SLUGS = frozenset(catalog.label_slug(x) for x in catalog.DEFAULT_LABELS)

# --------------------------------------------------------------------------- labels & tokens

def label_from_query(q: str) -> str:
    """The label a query asks for: ``imagesize:WxH`` removed, whitespace collapsed."""
    return " ".join(_IMAGESIZE_RE.sub(" ", q or "").split())


def _label_key(label: str) -> str:
    return " ".join(label_from_query(label).lower().split())


def _tag(label: str, name: str, n: int) -> bytes:
    return hashlib.sha256(f"atscale-replay-token|{_label_key(label)}|{name}".encode("utf-8")).digest()[:n]


def make_uds(label: str, name: str) -> str:
    """The ``uds`` token of suggestion ``name`` for ``label`` (deterministic)."""
    label = label_from_query(label)
    raw = f"{label}\n{name}".encode("utf-8") + _tag(label, name, 6)
    return _UDS_PREFIX + base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def make_chips(query: str, name: str) -> str:
    """The legacy ``chips`` string, e.g. ``q:alaskan+malamute,g_1:dog:AbCdEfGhIjk%3D``."""
    tok = base64.b64encode(_tag(query, name, 8)).decode("ascii")  # 11 chars + "="
    qpart = quote_plus(" ".join(query.lower().split()), safe=":")
    return f"q:{qpart},g_1:{quote_plus(name)}:{tok.replace('=', '%3D')}"


def decode_token(token: str) -> tuple[str, str] | None:
    """``(label, name)`` encoded in a ``uds`` or ``chips`` token, or None if it is not ours/valid."""
    if not token:
        return None
    token = token.strip()
    m = _CHIPS_RE.match(token)
    if m:
        query = unquote_plus(m.group("q"))
        name = unquote_plus(m.group("name"))
        try:
            tag = base64.b64decode(unquote(m.group("tok")), validate=True)
        except (ValueError, TypeError):
            return None
        label = label_from_query(query)
        return (label, name) if tag == _tag(label, name, 8) else None
    if token.startswith(_UDS_PREFIX):
        body = token[len(_UDS_PREFIX):]
        try:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        except (ValueError, TypeError):
            return None
        payload, tag = raw[:-6], raw[-6:]
        try:
            label, name = payload.decode("utf-8").split("\n", 1)
        except (UnicodeDecodeError, ValueError):
            return None
        return (label, name) if tag == _tag(label, name, 6) else None
    return None


def _suggestion_names(label: str, query: str) -> list[str]:
    rng_order = sorted(SUGGESTION_NAMES[1:], key=lambda n: hashlib.sha256(f"{_label_key(label)}|{n}".encode()).hexdigest())
    if "nodogchip" in query.lower():
        return rng_order[:5]
    names = rng_order[:4]
    at = int(hashlib.sha256(_label_key(label).encode()).hexdigest(), 16) % 5
    names.insert(at, "dog")
    return names


# --------------------------------------------------------------------------- server

class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256  # listen backlog: many clients connect at once

    def handle_error(self, request, client_address) -> None:
        """A client that drops its connection is normal on the web: one line, no traceback."""
        import sys

        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionResetError, BrokenPipeError, TimeoutError)):
            log.debug("client %s dropped the connection: %s", client_address[0], exc)
            return
        super().handle_error(request, client_address)


class ReplayServer:
    """A SerpApi + image host stand-in on a background thread.

    >>> with ReplayServer(api_key="k") as srv:
    ...     requests.get(srv.url + "/search.json", params={...})
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, api_key: str | None = None,
                 image_delay: float = 0.0, per_page: int = catalog.DEFAULT_PER_PAGE, max_pages: int = 5):
        self.host = host
        self.port = port
        self._api_key = api_key
        self.image_delay = float(image_delay)
        self.per_page = int(per_page)
        self.max_pages = int(max_pages)
        self._lock = threading.Lock()
        self._faulted: set[str] = set()  # requests already answered with an injected 429
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.search_count = 0
        self.image_count = 0
        # one record per /search request: params (never the api_key), status, label, page, token_name, ...
        # (a plain list; only the newest _LOG_MAX records are kept)
        self.search_log: list[dict] = []
        self.path_hits: Counter[str] = Counter()

    def __repr__(self) -> str:  # never shows the key
        return f"ReplayServer(url={self.url if self._httpd else None!r}, per_page={self.per_page}, max_pages={self.max_pages})"

    # lifecycle ---------------------------------------------------------------
    def start(self) -> "ReplayServer":
        if self._httpd is not None:
            return self
        handler = type("ReplayHandler", (_Handler,), {"replay": self})
        self._httpd = _HTTPServer((self.host, self.port), handler)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"replay-server:{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> "ReplayServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        host = self.host if self.host not in ("", "0.0.0.0", "::") else "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    # counters ----------------------------------------------------------------
    def reset_counters(self) -> None:
        with self._lock:
            self.search_count = 0
            self.image_count = 0
            self.search_log.clear()
            self.path_hits.clear()

    def stats(self) -> dict:
        with self._lock:
            return {"search_count": self.search_count, "image_count": self.image_count,
                    "path_hits": dict(self.path_hits)}

    def _record_search(self, entry: dict) -> None:
        with self._lock:
            self.search_count += 1
            self.search_log.append(entry)
            if len(self.search_log) > _LOG_MAX:
                del self.search_log[: len(self.search_log) - _LOG_MAX]

    def _record_image(self, path: str) -> None:
        with self._lock:
            self.image_count += 1
            self.path_hits[path] += 1

    def _key_ok(self, key: str | None) -> bool:
        if not key:
            return False
        return self._api_key is None or key == self._api_key

    # search ------------------------------------------------------------------
    def search(self, params: dict[str, str]) -> tuple[int, dict, dict]:
        """Answer one search: (HTTP status, JSON body, log record).  ``params`` = first values."""
        started = time.monotonic()
        safe_params = {k: v for k, v in params.items() if k != "api_key"}
        record: dict = {"params": safe_params}

        def done(status: int, body: dict) -> tuple[int, dict, dict]:
            record["status"] = status
            return status, body, record

        if not self._key_ok(params.get("api_key")):
            return done(401, {"error": INVALID_KEY_ERROR})
        engine = params.get("engine") or "google"
        tbm = params.get("tbm", "")
        if engine == "google_images":
            legacy = False
        elif engine == "google" and tbm == "isch":
            legacy = True
        elif engine == "google":
            return done(400, {"error": "This replay server only answers image searches: use engine=google_images or engine=google with tbm=isch."})
        else:
            return done(400, {"error": f"Unsupported `{engine}` search engine."})
        q = params.get("q", "")
        if not q.strip():
            return done(400, {"error": MISSING_Q_ERROR})
        ijn_raw = params.get("ijn", "0") or "0"
        try:
            ijn = int(ijn_raw)
        except ValueError:
            ijn = -1
        if not 0 <= ijn <= catalog.MAX_PAGE:
            return done(400, {"error": INVALID_IJN_ERROR})

        fault = self._fault(q, safe_params)
        if fault is not None:
            status, body, extra = fault
            record.update(extra)
            return done(status, body)

        token = params.get("uds") or params.get("chips") or ""
        decoded = decode_token(token) if token else None
        label = decoded[0] if decoded else label_from_query(q)
        record.update(engine=engine, q=q, page=ijn, label=label, token_name=decoded[1] if decoded else None,
                      token_valid=(decoded is not None) if token else None)

        echo = {"engine": engine, "q": q, "google_domain": params.get("google_domain") or "google.com"}
        for k, v in params.items():
            if k not in _NOT_ECHOED and k not in echo and k not in ("ijn",):
                echo[k] = v
        echo.setdefault("device", "desktop")
        echo["ijn"] = str(ijn)
        meta = self._metadata(safe_params, echo, legacy)

        no_results = "zznoresults" in q.lower() or ijn >= self.max_pages
        if no_results:
            body = {
                "search_metadata": meta,
                "search_parameters": echo,
                "search_information": {"image_results_state": "Fully empty"},
                "error": NO_RESULTS_GOOGLE if legacy else NO_RESULTS_IMAGES,
            }
            meta["total_time_taken"] = round(time.monotonic() - started + 0.01, 2)
            record["results"] = 0
            return done(200, body)

        info = {"image_results_state": "Results for exact spelling"}
        if legacy:
            info["query_displayed"] = q
        body: dict = {"search_metadata": meta, "search_parameters": echo, "search_information": info}
        if decoded is None:
            body["suggested_searches"] = self._suggestions(label, q, echo, legacy)
        body["images_results"] = self._results(label, ijn, meta["id"], q, legacy)
        meta["total_time_taken"] = round(time.monotonic() - started + 0.01, 2)
        record["results"] = len(body["images_results"])
        return done(200, body)

    def _fault(self, q: str, safe_params: dict) -> tuple[int, dict, dict] | None:
        """Fault injection by query text, for tests and demos of the error paths:
        ``zz429once`` (each distinct request: one 429 with Retry-After: 1, then success),
        ``zz500`` (every request: 500), ``zz500page`` (page requests, i.e. with a token: 500),
        ``zzbadjson`` (page requests: 200 with a body that is not JSON),
        ``zzbadposition`` (page requests: a result whose ``position`` is not a number)."""
        ql = q.lower()
        is_page = bool(safe_params.get("uds") or safe_params.get("chips"))
        if "zz429once" in ql:
            key = json.dumps(sorted(safe_params.items()))
            with self._lock:
                first = key not in self._faulted
                self._faulted.add(key)
            if first:
                return 429, {"error": "Your searches are too frequent; retry shortly."}, {"headers": {"Retry-After": "1"}}
        if "zz500" in ql and ("zz500page" not in ql or is_page):
            return 500, {"error": "Internal server error (injected)."}, {}
        if "zzbadjson" in ql and is_page:
            return 200, {}, {"raw": b'{"images_results": [{"position": 1, "original": "http'}
        if "zzbadposition" in ql and is_page:
            return 200, {"images_results": [{"position": "first", "original": "http://127.0.0.1:9/x.jpg"}]}, {}
        return None

    def _metadata(self, safe_params: dict, echo: dict, legacy: bool) -> dict:
        digest = hashlib.sha256(json.dumps(sorted(safe_params.items())).encode()).hexdigest()
        sid, bucket = digest[:24], digest[24:40]
        now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        q = echo["q"]
        meta = {
            "id": sid,
            "status": "Success",
            "json_endpoint": f"{self.url}/searches/{bucket}/{sid}.json",
            "created_at": now,
            "processed_at": now,
        }
        domain = echo.get("google_domain", "google.com")
        if legacy:
            meta["google_url"] = (f"https://www.{domain}/search?" + urlencode(
                {"q": q, "oq": q, "tbm": "isch", "sourceid": "chrome", "ie": "UTF-8"}))
        else:
            gparams = {"q": q, "oq": q}
            for k in ("hl", "gl"):
                if k in echo:
                    gparams[k] = echo[k]
            gparams["udm"] = "2"
            meta["google_images_url"] = f"https://www.{domain}/search?" + urlencode(gparams)
        meta["raw_html_file"] = f"{self.url}/searches/{bucket}/{sid}.html"
        meta["total_time_taken"] = 0.0
        return meta

    def _suggestions(self, label: str, q: str, echo: dict, legacy: bool) -> list[dict]:
        slug = catalog.label_slug(label)
        base = {k: v for k, v in echo.items() if k not in ("ijn", "uds", "chips", "q")}
        out = []
        for i, name in enumerate(_suggestion_names(label, q)):
            thumb = f"{self.url}/thumbs/{slug}/0/{i + 1}.jpg"
            if legacy:
                chips = make_chips(q, name)
                link = f"https://www.google.com/search?" + urlencode({"q": q, "tbm": "isch"}) + f"&chips={chips}&hl=en-US&sa=X"
                sparams = dict(sorted({**base, "q": q, "chips": chips}.items()))
                out.append({"name": name, "link": link, "chips": chips,
                            "serpapi_link": f"{self.url}/search.json?" + urlencode(sparams), "thumbnail": thumb})
            else:
                uds = make_uds(label, name)
                q2 = " ".join(re.sub(r"[^\w\s:]", " ", f"{q} {name}".lower()).split())
                link = "https://www.google.com/search?" + urlencode({"q": q2, "uds": uds, "udm": "2", "sa": "X"})
                sparams = dict(sorted({**base, "q": q2, "uds": uds}.items()))
                out.append({"name": name, "link": link, "uds": uds, "q": q2,
                            "serpapi_link": f"{self.url}/search.json?" + urlencode(sparams), "thumbnail": thumb})
        return out

    def _results(self, label: str, page: int, sid: str, q: str, legacy: bool) -> list[dict]:
        entries = catalog.page_entries(label, page, self.per_page)
        slug = catalog.label_slug(label)
        display = catalog.label_for_slug(slug) if slug in _DEFAULT_SLUGS or not label else label
        out = []
        for e in entries:
            h = hashlib.sha256(f"{e.slug}|{e.page}|{e.position}".encode()).digest()
            source, domain = _SOURCES[h[0] % len(_SOURCES)]
            title = _TITLES[h[1] % len(_TITLES)].format(label=display)
            item = {
                "position": e.position,
                "thumbnail": f"{self.url}{e.thumbnail_path}",
            }
            if not legacy:
                rid = base64.urlsafe_b64encode(h[2:20]).decode("ascii").rstrip("=")
                item["related_content_id"] = rid
                item["serpapi_related_content_link"] = f"{self.url}/search.json?" + urlencode(
                    {"engine": "google_images_related_content", "q": q, "related_content_id": rid})
            item["source"] = source
            if not legacy:
                item["source_logo"] = f"{self.url}/thumbs/{e.slug}/{e.page}/{e.position}.jpg"
            item.update({
                "title": title,
                "link": f"https://{domain}/{e.slug}/{h[2:8].hex()}",
                "original": f"{self.url}{e.path}",
                "original_width": e.width,
                "original_height": e.height,
                "is_product": False,
            })
            out.append(item)
        return out


class _Handler(BaseHTTPRequestHandler):
    replay: ReplayServer  # set on the per-server subclass
    protocol_version = "HTTP/1.1"
    server_version = "atscale-replay/1.0"
    timeout = 60  # idle keep-alive connections are closed after this many seconds

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - stdlib signature
        # The request line carries the api_key: log only the path, never the query string.
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s %s", self.command, urlsplit(self.path).path)

    def log_request(self, code="-", size="-") -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s %s -> %s", self.command, urlsplit(self.path).path, code)

    def _send(self, status: int, body: bytes, content_type: str, head: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, status: int, obj: dict) -> None:
        body = json.dumps(obj, indent=2, ensure_ascii=False).encode("utf-8")
        self._send(status, body, "application/json; charset=utf-8")

    def _not_found(self, head: bool = False) -> None:
        self._send(404, b"<!DOCTYPE html><html><body><h1>404 Not Found</h1></body></html>\n",
                   "text/html; charset=utf-8", head)

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        self._dispatch(head=False)

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch(head=True)

    def _dispatch(self, head: bool) -> None:
        split = urlsplit(self.path)
        path = split.path
        try:
            if path in ("/search.json", "/search") and not head:
                qs = parse_qs(split.query, keep_blank_values=True)
                params = {k: v[0] for k, v in qs.items()}
                status, body, record = self.replay.search(params)
                record["path"] = path
                self.replay._record_search(record)
                if "raw" in record or "headers" in record:
                    raw = record.pop("raw", None) or json.dumps(body).encode()
                    self.send_response(status)
                    for k, v in record.pop("headers", {}).items():
                        self.send_header(k, v)
                    self.send_header("Content-Type", "application/json; charset=utf-8")
                    self.send_header("Content-Length", str(len(raw)))
                    self.end_headers()
                    self.wfile.write(raw)
                else:
                    self._json(status, body)
            elif path.startswith("/images/"):
                self.replay._record_image(path)
                if self.replay.image_delay > 0:
                    time.sleep(self.replay.image_delay)
                entry = catalog.entry_for_path(path, self.replay.per_page)
                if entry is None:
                    self._not_found(head)
                else:
                    self._send(entry.status, entry.data, entry.content_type, head)
            elif path.startswith("/thumbs/"):
                entry = catalog.thumbnail_for_path(path, self.replay.per_page)
                if entry is None:
                    self._not_found(head)
                else:
                    self._send(200, catalog.thumbnail_bytes(entry.slug, entry.page, entry.position, entry.per_page),
                               "image/jpeg", head)
            elif path == "/healthz":
                self._send(200, b"ok", "text/plain; charset=utf-8", head)
            else:
                self._not_found(head)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception:  # pragma: no cover - a bug here must not kill the connection silently
            log.exception("replay server error on %s", path)
            self.close_connection = True
            try:
                self._json(500, {"error": "Replay server internal error."})
            except OSError:
                pass
