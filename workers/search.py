"""SerpApi Google Images client.

One call per query resolves the refinement token (the `suggested_searches` entry
whose `name` matches, as `uds` in the current `engine=google_images` API or `chips`
in the legacy `engine=google&tbm=isch` form); then one call per result page
(`ijn` = 0, 1, ...). Identical requests are answered from a response cache in the
object store (SerpApi charges per search) unless `no_cache` is set.

The API key comes only from the worker's environment; it is never part of a
cache key, a log line, an error message or a return value.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import requests

from workers.store import NotFound, ObjectStore, StoreError

log = logging.getLogger(__name__)

ENGINES = ("google_images", "google")  # "google" means the legacy engine=google&tbm=isch
NO_RESULTS_MARK = "hasn't returned any results"


class SearchError(Exception):
    """A search that failed, with a message a user can act on.

    reason: invalid_key | forbidden | rate_limited | out_of_searches | server_error |
            no_results | bad_request | bad_response | unreachable
    """

    def __init__(self, reason: str, message: str, status: int | None = None, retryable: bool = False,
                 retry_after: float | None = None):
        # all in args, so that Celery can rebuild it from a JSON result (cls(*args))
        super().__init__(reason, message, status, retryable, retry_after)
        self.reason = reason
        self.message = message
        self.status = status
        self.retryable = retryable
        self.retry_after = retry_after

    def __str__(self) -> str:
        return self.message

    def to_dict(self) -> dict:
        return {"reason": self.reason, "message": self.message, "status": self.status}


@dataclass
class TokenResult:
    """What resolving one query produced."""

    query: str
    label: str
    token_param: str | None  # "uds" or "chips", None when searching unfiltered
    token: str | None
    note: str | None = None  # e.g. why the search runs unfiltered
    suggestions: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ImageResult:
    position: int
    original: str
    title: str = ""
    source: str = ""
    width: int | None = None
    height: int | None = None


def query_text(query: str, size: str | None) -> str:
    """The text sent as `q`: the clean query plus Google's `imagesize:WxH` operator."""
    return f"{query} imagesize:{size}" if size else query


def _retry_after(resp: requests.Response) -> float | None:
    value = resp.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


class SerpApiClient:
    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        *,
        engine: str = "google_images",
        store: ObjectStore | None = None,
        timeout: float = 30.0,
        max_attempts: int = 4,
        max_wait: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, not {engine!r}")
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        self.engine = engine
        self.store = store
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.max_wait = max_wait
        self.sleep = sleep
        self.session = requests.Session()
        self.calls = 0  # requests actually sent (cache hits excluded)

    def __repr__(self) -> str:  # never show the key
        return f"SerpApiClient({self.base_url!r}, engine={self.engine!r})"

    # -- low level --------------------------------------------------------------
    def _params(self, q: str, *, google_domain: str, ijn: int | None = None, token_param: str | None = None,
                token: str | None = None) -> dict[str, str]:
        params = {"engine": self.engine, "q": q, "google_domain": google_domain}
        if self.engine == "google":
            params["tbm"] = "isch"
        if ijn is not None:
            params["ijn"] = str(ijn)
        if token_param and token:
            params[token_param] = token
        return params

    def cache_key(self, params: dict[str, str]) -> str:
        canon = json.dumps({"base": self.base_url, **params}, sort_keys=True)
        return "serpapi-cache/" + hashlib.sha256(canon.encode()).hexdigest() + ".json"

    def search(self, params: dict[str, str], *, no_cache: bool = False) -> dict[str, Any]:
        """One SerpApi search (params without api_key), with cache and bounded retries.
        Returns the JSON body of a successful search; raises SearchError otherwise."""
        if "api_key" in params:
            raise ValueError("api_key must not be passed in params; it comes from the environment")
        key = self.cache_key(params)
        if self.store is not None and not no_cache:
            try:
                return self.store.get_json(key)
            except NotFound:
                pass
            except (StoreError, ValueError) as exc:
                log.warning("search cache unreadable (%s); asking SerpApi", exc)
        body = self._search_with_retries(params, no_cache=no_cache)
        if self.store is not None:
            try:
                self.store.put_json(key, body)
            except StoreError as exc:
                log.warning("could not cache search response: %s", exc)
        return body

    def _search_with_retries(self, params: dict[str, str], *, no_cache: bool) -> dict[str, Any]:
        no_results_seen = 0
        for attempt in range(1, self.max_attempts + 1):
            try:
                return self._search_once(params, no_cache=no_cache)
            except SearchError as exc:
                if exc.reason == "no_results":
                    # SerpApi answers this intermittently for valid queries: retry once.
                    no_results_seen += 1
                    if no_results_seen >= 2 or attempt == self.max_attempts:
                        raise
                    self.sleep(min(1.0, self.max_wait))
                    no_cache = True
                    continue
                if not exc.retryable or attempt == self.max_attempts:
                    raise
                wait = exc.retry_after if exc.retry_after is not None else min(
                    self.max_wait, (2 ** (attempt - 1)) * (1 + random.random()))
                if wait > self.max_wait:
                    raise
                log.info("SerpApi %s (attempt %d/%d); retrying in %.1fs", exc.reason, attempt, self.max_attempts, wait)
                self.sleep(wait)
        raise AssertionError("unreachable")

    def _search_once(self, params: dict[str, str], *, no_cache: bool) -> dict[str, Any]:
        if not self._api_key:
            raise SearchError("invalid_key", "No SerpApi key: set SERPAPI_API_KEY in the worker's environment "
                                             "(or SERPAPI_BASE_URL to the offline replay service).")
        send = dict(params, api_key=self._api_key)
        if no_cache:
            send["no_cache"] = "true"
        url = self.base_url + "/search.json"
        self.calls += 1
        try:
            resp = self.session.get(url, params=send, timeout=self.timeout)
        except requests.Timeout:
            raise SearchError("unreachable", f"SerpApi at {self.base_url} did not answer within {self.timeout:.0f}s",
                              retryable=True) from None
        except requests.RequestException as exc:
            raise SearchError("unreachable", f"cannot reach SerpApi at {self.base_url} ({type(exc).__name__})",
                              retryable=True) from None
        try:
            body = resp.json()
        except ValueError:
            body = None
        message = body.get("error") if isinstance(body, dict) else None
        status = resp.status_code
        if status == 401:
            raise SearchError("invalid_key", f"SerpApi refused the API key (HTTP 401): {message or 'invalid key'}. "
                                             "Check SERPAPI_API_KEY on the workers.", status=status)
        if status == 403:
            raise SearchError("forbidden", f"SerpApi refused the account (HTTP 403): {message}", status=status)
        if status == 429:
            text = message or "too many requests"
            out = any(w in text.lower() for w in ("run out", "credit", "out of searches"))
            raise SearchError("out_of_searches" if out else "rate_limited",
                              f"SerpApi says (HTTP 429): {text}", status=status,
                              retryable=not out, retry_after=_retry_after(resp))
        if status >= 500:
            raise SearchError("server_error", f"SerpApi failed (HTTP {status}): {message or resp.reason}",
                              status=status, retryable=True, retry_after=_retry_after(resp))
        if status >= 400:
            raise SearchError("bad_request", f"SerpApi rejected the search (HTTP {status}): {message}", status=status)
        if not isinstance(body, dict):
            raise SearchError("bad_response", f"SerpApi answered HTTP {status} with a body that is not JSON "
                                              f"({resp.text[:80]!r}...)", status=status, retryable=True)
        if message:
            if NO_RESULTS_MARK in message:
                raise SearchError("no_results", message, status=status)
            raise SearchError("bad_request", f"SerpApi: {message}", status=status)
        return body

    # -- the two calls the pipeline makes -----------------------------------------
    def resolve_token(self, query: str, chips_name: str, *, size: str | None = "500x500",
                      google_domain: str = "google.com", no_cache: bool = False,
                      on_missing: str = "unfiltered") -> TokenResult:
        params = self._params(query_text(query, size), google_domain=google_domain)
        body = self.search(params, no_cache=no_cache)
        suggestions = body.get("suggested_searches") or []
        names = [str(s.get("name", "")) for s in suggestions if isinstance(s, dict)]
        for s in suggestions:
            if not isinstance(s, dict) or str(s.get("name", "")).strip().lower() != chips_name.strip().lower():
                continue
            for param in ("uds", "chips"):
                if s.get(param):
                    return TokenResult(query, query, param, str(s[param]), suggestions=names)
        note = (f"no suggested search named {chips_name!r} for {query!r} "
                f"(offered: {', '.join(names[:10]) or 'none'})")
        if on_missing == "fail":
            raise SearchError("no_token", note + "; on_missing_chip='fail' stops here")
        if on_missing == "skip":
            return TokenResult(query, query, None, None, note=note + "; class skipped", suggestions=names)
        return TokenResult(query, query, None, None, note=note + "; searched unfiltered", suggestions=names)

    def page(self, query: str, ijn: int, *, token_param: str | None, token: str | None,
             size: str | None = "500x500", google_domain: str = "google.com",
             no_cache: bool = False) -> list[ImageResult]:
        params = self._params(query_text(query, size), google_domain=google_domain, ijn=ijn,
                              token_param=token_param, token=token)
        body = self.search(params, no_cache=no_cache)
        out = []
        for item in body.get("images_results") or []:
            if not isinstance(item, dict) or not isinstance(item.get("original"), str):
                continue
            out.append(ImageResult(
                position=int(item.get("position") or len(out) + 1),
                original=item["original"],
                title=str(item.get("title") or ""),
                source=str(item.get("source") or ""),
                width=item.get("original_width") if isinstance(item.get("original_width"), int) else None,
                height=item.get("original_height") if isinstance(item.get("original_height"), int) else None,
            ))
        return out
