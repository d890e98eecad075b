"""Safe HTTP GET of one URL from the open web (plain Python, no Celery).

:class:`Fetcher` downloads one URL with urllib3 (a pool of kept-alive
connections per host; no ``requests`` layer on top: it cost as much CPU per
image as everything else in the HTTP path) and guards against server-side
request forgery:

* only ``http``/``https`` URLs, at most ``max_redirects`` redirect hops,
  followed by hand so that every hop gets exactly the checks of the first;
* before each hop the host is resolved with :func:`socket.getaddrinfo` and the
  hop is refused when *any* resolved address is refused by
  :func:`address_refusal` (private, loopback, link-local, multicast, reserved,
  unspecified, shared 100.64/10, IPv4-mapped forms of those, anything not
  globally routable) unless it lies inside an allow-listed network
  (``allowed_networks`` / env ``ATSCALE_ALLOWED_NETWORKS``);
* because DNS can change between that check and the connect (DNS
  rebinding), the socket's real peer address is checked again inside the
  connection's ``_new_conn()`` -- right after the TCP connect, before the TLS
  handshake or any request byte -- and the socket is closed when refused;
* the body is streamed and cut off at ``max_bytes`` (and refused at once when
  ``Content-Length`` says it is larger);
* environment proxies and ``.netrc`` are never read, and cookies are never
  stored, so nothing leaks between unrelated fetches; HTTPS is verified against
  certifi's CA bundle.

Politeness: at most ``per_host`` requests to one host (name and port) are in
flight at a time from one :class:`Fetcher` (threads beyond that wait for a
slot; env ``ATSCALE_PER_HOST_CONNECTIONS``, default 8), and every request
carries the configured User-Agent, which should name a contact.

No retries are made; the caller decides (:func:`workers.page.fetch_with_retries`).
A 429 or 503 answer's ``Retry-After`` (seconds or an HTTP date) is parsed into
``FetchError.retry_after`` for it.  Every failure is a
:class:`FetchError` whose ``reason`` is one of :data:`FETCH_REASONS`.
URLs in error details and log lines are redacted (no user-info, no query).
"""

from __future__ import annotations

import email.utils
import ipaddress
import logging
import os
import re
import socket
import threading
import time
from dataclasses import dataclass
from typing import Iterable, Union
from urllib.parse import urljoin, urlsplit

import certifi
import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import (
    ConnectTimeoutError,
    DecodeError,
    HTTPError,
    LocationParseError,
    LocationValueError,
    NameResolutionError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
    SSLError,
)

from workers.slots import HostSlots

log = logging.getLogger(__name__)

ENV_ALLOWED_NETWORKS = "ATSCALE_ALLOWED_NETWORKS"
ENV_PER_HOST = "ATSCALE_PER_HOST_CONNECTIONS"
DEFAULT_PER_HOST = 8
DEFAULT_USER_AGENT = "atscale/0.1 (image dataset builder; +https://github.com/atscale/atscale)"

FETCH_REASONS: tuple[str, ...] = (
    "bad_url",
    "bad_scheme",
    "blocked_address",
    "dns_error",
    "connect_error",
    "timeout",
    "http_error",
    "too_large",
    "too_many_redirects",
    "opted_out",
)

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})

# X-Robots-Tag directives by which a site says "not for AI training / not to be
# indexed"; an answer carrying one is not stored (img2dataset's default list too)
OPT_OUT_DIRECTIVES = frozenset({"noai", "noimageai", "noindex", "noimageindex"})
ROBOTS_AGENT = "atscale"  # "X-Robots-Tag: atscale: noai" speaks to us; other agents' lines do not


def opt_out_directive(values: Iterable[str], agent: str = ROBOTS_AGENT,
                      disallowed: frozenset[str] = OPT_OUT_DIRECTIVES) -> str | None:
    """The first disallowed directive in ``X-Robots-Tag`` header values, or None.

    A value is a comma-separated list of directives, optionally led by a user agent
    (``googlebot: noindex``); only lines for every agent or for ``agent`` count."""
    for value in values:
        text = value.strip().lower()
        head, sep, rest = text.partition(":")
        name = head.strip()
        if sep and name and " " not in name and "," not in name:  # "googlebot: noindex"
            if name != agent:
                continue  # addressed to another crawler
            text = rest
        for directive in text.split(","):
            if directive.strip() in disallowed:
                return directive.strip()
    return None
_CHUNK = 256 * 1024


class FetchError(Exception):
    """A URL could not (or must not) be fetched. ``reason`` is one of :data:`FETCH_REASONS`."""

    def __init__(self, reason: str, detail: str, *, status: int | None = None, retry_after: float | None = None):
        if reason not in FETCH_REASONS:
            raise ValueError(f"unknown fetch error reason {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.status = status
        self.retry_after = retry_after  # seconds the server asked us to wait (429/503 Retry-After)

    def __reduce__(self):  # picklable (Celery results, multiprocessing)
        return (_rebuild_fetch_error, (self.reason, self.detail, self.status, self.retry_after))


def _rebuild_fetch_error(reason: str, detail: str, status: int | None, retry_after: float | None = None) -> FetchError:
    return FetchError(reason, detail, status=status, retry_after=retry_after)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date.

    ``None`` when absent or unparsable; never negative (a date in the past is 0).
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if text.isdigit():
        return float(min(int(text), 10**9))
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None or when.tzinfo is None:  # RFC 9110 dates are GMT; a zone-less one is not trusted
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


@dataclass
class FetchResult:
    url: str  # the URL asked for
    final_url: str  # the URL the body came from (after redirects)
    status: int
    content_type: str  # the Content-Type header, "" when absent
    body: bytes
    redirects: int  # number of redirect hops followed


# ---------------------------------------------------------------------------
# Address policy (pure functions)
# ---------------------------------------------------------------------------

_SPLIT = re.compile(r"[\s,;]+")


def parse_networks(text: str | None, source: str = ENV_ALLOWED_NETWORKS) -> tuple[Network, ...]:
    """Parse comma/space separated CIDRs (``"127.0.0.0/8, ::1/128"``).

    A bare address means a single host (/32 or /128).  Host bits are allowed
    and masked off (``10.1.2.3/8`` -> ``10.0.0.0/8``).  Raises
    :class:`ValueError` naming the offending entry and where it came from (``source``).
    """
    if text is None:
        return ()
    networks: list[Network] = []
    for token in _SPLIT.split(text.strip()):
        if not token:
            continue
        try:
            networks.append(ipaddress.ip_network(token, strict=False))
        except ValueError:
            raise ValueError(f"{source}: {token!r} is not a network in CIDR notation "
                             f"(expected e.g. '127.0.0.0/8, ::1/128')") from None
    return tuple(networks)


_SHARED_V4 = ipaddress.IPv4Network("100.64.0.0/10")


def _as_address(ip: str | Address) -> Address:
    if isinstance(ip, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return ip
    return ipaddress.ip_address(str(ip).strip().strip("[]"))


def _in_allowed(addr: Address, allowed: Iterable[Network]) -> bool:
    return any(addr.version == net.version and addr in net for net in allowed)


def address_refusal(ip: str | Address, allowed: Iterable[Network] = ()) -> str | None:
    """``None`` when ``ip`` may be contacted, else a short reason text.

    Refused: private, loopback, link-local, multicast, reserved, unspecified,
    shared address space (100.64.0.0/10) and anything else that is not
    globally routable; IPv4-mapped IPv6 addresses (``::ffff:a.b.c.d``) are
    judged as the IPv4 address they carry.  An address inside one of
    ``allowed`` is always accepted.  An unparsable ``ip`` is refused.
    """
    try:
        addr = _as_address(ip)
    except ValueError:
        return f"{ip!r} is not an IP address"
    allowed = tuple(allowed)
    judged: Address = addr
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.scope_id:
            addr = ipaddress.IPv6Address(str(addr).split("%", 1)[0])
            judged = addr
        if addr.ipv4_mapped is not None:
            judged = addr.ipv4_mapped
    if _in_allowed(addr, allowed) or _in_allowed(judged, allowed):
        return None
    mapped = f" (IPv4-mapped {judged})" if judged is not addr else ""
    checks = (
        (judged.is_unspecified, "an unspecified address"),
        (judged.is_loopback, "a loopback address"),
        (judged.is_link_local, "a link-local address"),
        (judged.is_multicast, "a multicast address"),
        (isinstance(judged, ipaddress.IPv4Address) and judged in _SHARED_V4, "in the shared address space 100.64.0.0/10"),
        (judged.is_reserved, "a reserved address"),
        (judged.is_private, "a private address"),
        (getattr(judged, "is_site_local", False), "a site-local address"),
        (not judged.is_global, "not a globally routable address"),
    )
    for hit, text in checks:
        if hit:
            return f"{text}{mapped}"
    return None


def _allow_hint(ip: str) -> str:
    try:
        addr = _as_address(ip)
        cidr = f"{addr}/{addr.max_prefixlen}"
    except ValueError:
        cidr = "<network>/<prefix>"
    return f"to allow it, add a network containing it to {ENV_ALLOWED_NETWORKS} (e.g. {ENV_ALLOWED_NETWORKS}={cidr})"


# ---------------------------------------------------------------------------
# urllib3 plumbing: check the connected peer before anything is sent
# ---------------------------------------------------------------------------


class _BlockedPeer(Exception):
    """Raised from inside urllib3; deliberately NOT an OSError so that urllib3 neither
    wraps nor retries it."""

    def __init__(self, address: str, why: str):
        super().__init__(f"{address} is {why}")
        self.address = address
        self.why = why


class _PeerCheckMixin:
    _atscale_allowed: tuple[Network, ...] = ()

    def _new_conn(self):  # type: ignore[override]
        sock = super()._new_conn()  # type: ignore[misc]
        try:
            peer = sock.getpeername()[0]
        except OSError as exc:
            sock.close()
            raise NewConnectionError(self, f"cannot read the peer address: {exc}") from exc
        why = address_refusal(peer, self._atscale_allowed)
        if why is not None:
            sock.close()
            raise _BlockedPeer(peer, why)
        return sock


def _make_pool_manager(allowed: tuple[Network, ...], pool_size: int) -> urllib3.PoolManager:
    """A PoolManager whose every new connection checks its peer address."""
    conn_http = type("GuardedHTTPConnection", (_PeerCheckMixin, HTTPConnection), {"_atscale_allowed": allowed})
    conn_https = type("GuardedHTTPSConnection", (_PeerCheckMixin, HTTPSConnection), {"_atscale_allowed": allowed})
    pool_http = type("GuardedHTTPConnectionPool", (HTTPConnectionPool,), {"ConnectionCls": conn_http})
    pool_https = type("GuardedHTTPSConnectionPool", (HTTPSConnectionPool,), {"ConnectionCls": conn_https})
    manager = urllib3.PoolManager(num_pools=max(10, pool_size), maxsize=pool_size, block=False, retries=False,
                                  cert_reqs="CERT_REQUIRED", ca_certs=certifi.where())
    manager.pool_classes_by_scheme = {"http": pool_http, "https": pool_https}
    return manager


def _redirect_target(location: str, current: str) -> str:
    """The absolute URL a ``Location`` header points to.  http.client decodes
    header bytes as Latin-1; servers send UTF-8, so re-decode (as browsers and
    requests do).  Characters a URL may not hold are percent-encoded by urllib3
    when the request is sent."""
    try:
        location = location.encode("latin-1").decode("utf-8")
    except UnicodeError:
        pass
    return urljoin(current, location.strip())


# ---------------------------------------------------------------------------
# Fetcher
# ---------------------------------------------------------------------------


def redact_url(url: str) -> str:
    """scheme://host[:port]/path -- no user-info, query or fragment (safe to log)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        port = f":{parts.port}" if parts.port else ""
        path = parts.path or ""
        if len(path) > 200:
            path = path[:200] + "..."
        query = "?..." if parts.query else ""
        return f"{parts.scheme}://{host}{port}{path}{query}"
    except ValueError:
        return "<unparsable url>"


class Fetcher:
    """Thread-safe downloader; share one instance across a pool of threads."""

    def __init__(
        self,
        *,
        timeout: tuple[float, float] = (5.0, 20.0),
        max_bytes: int = 20_000_000,
        max_redirects: int = 3,
        user_agent: str = DEFAULT_USER_AGENT,
        allowed_networks: str | Iterable[Network] | None = None,
        pool_size: int = 64,
        total_timeout: float | None = 120.0,
        per_host: int | None = None,
    ):
        if allowed_networks is None:
            allowed_networks = os.environ.get(ENV_ALLOWED_NETWORKS)
        if allowed_networks is None or isinstance(allowed_networks, str):
            self.allowed_networks: tuple[Network, ...] = parse_networks(allowed_networks)
        else:
            self.allowed_networks = tuple(
                n if isinstance(n, (ipaddress.IPv4Network, ipaddress.IPv6Network)) else ipaddress.ip_network(n, strict=False)
                for n in allowed_networks
            )
        self.timeout = (float(timeout[0]), float(timeout[1]))
        self.max_bytes = int(max_bytes)
        self.max_redirects = int(max_redirects)
        self.user_agent = user_agent
        self.total_timeout = total_timeout
        if per_host is None:
            env = os.environ.get(ENV_PER_HOST, "").strip()
            try:
                per_host = int(env) if env else DEFAULT_PER_HOST
            except ValueError:
                raise ValueError(f"{ENV_PER_HOST}: {env!r} is not a whole number") from None
        if per_host < 1:
            raise ValueError(f"per_host must be at least 1, got {per_host}")
        self.per_host = int(per_host)
        self._host_slots = HostSlots(self.per_host)
        self._closed = False
        self._lock = threading.Lock()

        self._pool = _make_pool_manager(self.allowed_networks, pool_size)
        self._timeout = urllib3.Timeout(connect=self.timeout[0], read=self.timeout[1])
        self.headers = {
            "User-Agent": user_agent,
            "Accept": "image/avif,image/webp,image/apng,image/*;q=0.9,*/*;q=0.5",
            "Accept-Encoding": "identity",
            "Connection": "keep-alive",
        }

    # -- public -----------------------------------------------------------

    def get(self, url: str) -> FetchResult:
        if self._closed:
            raise RuntimeError("Fetcher is closed")
        if not isinstance(url, str):
            raise FetchError("bad_url", f"URL must be a string, got {type(url).__name__}")
        started = time.monotonic()
        current = url
        redirects = 0
        while True:
            host_key = self._check_url(current)
            asked = time.monotonic()
            with self._host_slots.hold(host_key):
                started += time.monotonic() - asked  # waiting for a slot is not download time
                result = self._hop(url, current, redirects, started)
            if isinstance(result, FetchResult):
                return result
            current = result
            redirects += 1

    def _hop(self, url: str, current: str, redirects: int, started: float) -> "FetchResult | str":
        """One request (holding a slot of its host): the FetchResult, or the next hop's URL."""
        response = self._request(current)
        consumed = False
        try:
            status = response.status
            location = response.headers.get("location")
            if status in _REDIRECT_STATUSES and location:
                next_url = _redirect_target(location, current)
                if redirects >= self.max_redirects:
                    raise FetchError(
                        "too_many_redirects",
                        f"more than {self.max_redirects} redirects (last hop {redact_url(current)} -> "
                        f"{redact_url(next_url)})",
                    )
                log.debug("redirect %s %s -> %s", status, redact_url(current), redact_url(next_url))
                return next_url
            if not 200 <= status < 300:
                retry_after = None
                if status in (429, 503):
                    retry_after = parse_retry_after(response.headers.get("retry-after"))
                wait = f", Retry-After {retry_after:g} s" if retry_after is not None else ""
                raise FetchError(
                    "http_error",
                    f"HTTP {status} {response.reason or ''} from {redact_url(current)}{wait}".replace("  ", " "),
                    status=status,
                    retry_after=retry_after,
                )
            directive = opt_out_directive(response.headers.getlist("x-robots-tag"))
            if directive is not None:
                raise FetchError("opted_out", f"{redact_url(current)} answered X-Robots-Tag: {directive} "
                                              f"(the site opts this image out of datasets)", status=status)
            body = self._read_body(response, current, started)
            consumed = True
            return FetchResult(
                url=url,
                final_url=current,
                status=status,
                content_type=response.headers.get("content-type", ""),
                body=body,
                redirects=redirects,
            )
        finally:
            if not consumed:  # an unread body: the connection cannot be reused
                response.close()
            response.release_conn()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._pool.clear()

    def __enter__(self) -> "Fetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- steps ------------------------------------------------------------

    def _check_url(self, url: str) -> str:
        """Refuse a URL that must not be fetched; return its host key (``host:port``)."""
        if any(ch in url for ch in "\r\n\t\x00") or url != url.strip():
            raise FetchError("bad_url", "URL contains whitespace or control characters")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise FetchError("bad_url", f"cannot parse URL {redact_url(url)}: {exc}") from None
        scheme = parts.scheme.lower()
        if not scheme:
            raise FetchError("bad_url", "URL has no scheme (expected http:// or https://)")
        if scheme not in ("http", "https"):
            raise FetchError("bad_scheme", f"scheme {scheme!r} is not allowed (only http and https)")
        host = parts.hostname
        if not host:
            raise FetchError("bad_url", f"URL has no host: {redact_url(url)}")
        port = port or (443 if scheme == "https" else 80)
        self._check_host(host, port)
        return f"{host.lower()}:{port}"

    def _check_host(self, host: str, port: int) -> None:
        try:
            literal = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None:
            addresses = [str(literal)]
        else:
            try:
                host.encode("idna")
            except UnicodeError as exc:
                raise FetchError("bad_url", f"invalid host name {host!r}: {exc}") from None
            try:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except socket.gaierror as exc:
                raise FetchError("dns_error", f"cannot resolve {host!r}: {exc.strerror or exc}") from None
            except (UnicodeError, OSError) as exc:
                raise FetchError("dns_error", f"cannot resolve {host!r}: {exc}") from None
            addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
            if not addresses:
                raise FetchError("dns_error", f"{host!r} resolved to no address")
        for address in addresses:
            why = address_refusal(address, self.allowed_networks)
            if why is not None:
                origin = "" if literal is not None else f" (resolved from {host!r})"
                raise FetchError("blocked_address", f"{address}{origin} is {why}; {_allow_hint(address)}")

    def _request(self, url: str) -> urllib3.BaseHTTPResponse:
        safe = redact_url(url)
        try:
            return self._pool.urlopen("GET", url, headers=self.headers, redirect=False, retries=False,
                                      preload_content=False, timeout=self._timeout)
        except _BlockedPeer as exc:
            raise FetchError(
                "blocked_address",
                f"connected peer {exc.address} for {safe} is {exc.why}; {_allow_hint(exc.address)}",
            ) from None
        except SSLError as exc:
            raise FetchError("connect_error", f"TLS error with {safe}: {_root_message(exc)}") from None
        except (LocationParseError, LocationValueError) as exc:
            raise FetchError("bad_url", f"invalid URL {safe}: {_root_message(exc)}") from None
        except (NewConnectionError, ConnectTimeoutError, ReadTimeoutError, ProtocolError, OSError) as exc:
            raise _connection_error(exc, safe, self.timeout) from None
        except HTTPError as exc:
            raise FetchError("connect_error", f"request to {safe} failed: {_root_message(exc)}") from None
        except (UnicodeError, ValueError) as exc:
            raise FetchError("bad_url", f"invalid URL {safe}: {exc}") from None

    def _read_body(self, response: urllib3.BaseHTTPResponse, url: str, started: float) -> bytes:
        safe = redact_url(url)
        declared = response.headers.get("content-length")
        if declared is not None:
            try:
                length = int(declared.split(",")[0].strip())
            except ValueError:
                length = None
            if length is not None and length > self.max_bytes:
                raise FetchError(
                    "too_large", f"{safe} declares Content-Length {length} > limit of {self.max_bytes} bytes"
                )
        chunks: list[bytes] = []
        total = 0
        try:
            for chunk in response.stream(_CHUNK):
                total += len(chunk)
                if total > self.max_bytes:
                    raise FetchError("too_large", f"body of {safe} exceeds the limit of {self.max_bytes} bytes")
                chunks.append(chunk)
                if self.total_timeout is not None and time.monotonic() - started > self.total_timeout:
                    raise FetchError("timeout", f"download of {safe} took longer than {self.total_timeout} s")
        except FetchError:
            raise
        except (ReadTimeoutError, socket.timeout, TimeoutError):
            raise FetchError("timeout", f"reading the body of {safe} stalled for {self.timeout[1]} s") from None
        except (ProtocolError, DecodeError, HTTPError, OSError) as exc:
            if _has_cause(exc, ReadTimeoutError, socket.timeout, TimeoutError):
                raise FetchError("timeout", f"reading the body of {safe} stalled for {self.timeout[1]} s") from None
            raise FetchError("connect_error", f"connection broken while reading {safe}: {_root_message(exc)}") from None
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)


# ---------------------------------------------------------------------------
# exception helpers
# ---------------------------------------------------------------------------


def _causes(exc: BaseException) -> Iterable[BaseException]:
    seen: set[int] = set()
    stack = [exc]
    while stack:
        cur = stack.pop()
        if cur is None or id(cur) in seen:
            continue
        seen.add(id(cur))
        yield cur
        stack.extend([cur.__cause__, cur.__context__])
        stack.extend(a for a in getattr(cur, "args", ()) if isinstance(a, BaseException))
        reason = getattr(cur, "reason", None)
        if isinstance(reason, BaseException):
            stack.append(reason)


def _has_cause(exc: BaseException, *types: type) -> bool:
    return any(isinstance(c, types) for c in _causes(exc))


def _root_message(exc: BaseException) -> str:
    innermost = exc
    for cur in _causes(exc):
        innermost = cur
    text = str(innermost) or type(innermost).__name__
    # urllib3 messages embed "HTTPConnection(host=..., port=...)" object reprs
    text = re.sub(r"<urllib3\.connection\.[A-Za-z]+ object at 0x[0-9a-f]+>: ", "", text)
    return text[:300]


def _connection_error(exc: BaseException, safe: str, timeout: tuple[float, float], while_reading: bool = False) -> FetchError:
    if _has_cause(exc, ReadTimeoutError):
        return FetchError("timeout", f"reading from {safe} stalled for {timeout[1]} s")
    if _has_cause(exc, NameResolutionError, socket.gaierror):
        return FetchError("dns_error", f"cannot resolve the host of {safe}: {_root_message(exc)}")
    # NewConnectionError subclasses ConnectTimeoutError in urllib3 2.x: test it first
    if _has_cause(exc, ConnectTimeoutError) and not _has_cause(exc, NewConnectionError):
        return FetchError("timeout", f"connect to {safe} timed out after {timeout[0]} s")
    what = "connection broken while reading" if while_reading else "cannot connect to"
    return FetchError("connect_error", f"{what} {safe}: {_root_message(exc)}")
