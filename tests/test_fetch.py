"""Tests for workers.fetch.

NETWORK RULE: these tests only ever connect to 127.0.0.0/8.  Refusal of
private/public addresses is checked through the pure ``address_refusal``;
DNS failures are simulated by patching ``socket.getaddrinfo``.
"""

from __future__ import annotations

import ipaddress
import logging
import pickle
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest

from workers import fetch as fetch_mod
from workers.fetch import (
    FETCH_REASONS,
    FetchError,
    Fetcher,
    FetchResult,
    address_refusal,
    parse_networks,
)

# ---------------------------------------------------------------------------
# loopback test servers
# ---------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr):
        self.connections = 0
        self.paths: list[str] = []
        self.counter_lock = threading.Lock()
        self.stop = threading.Event()
        super().__init__(addr, _Handler)

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], ConnectionError):  # the client hung up on purpose: a body cut off
            return
        super().handle_error(request, client_address)

    def verify_request(self, request, client_address):  # called once per accepted TCP connection
        with self.counter_lock:
            self.connections += 1
        return True


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, *args):  # keep test output quiet
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None):
        self.send_response(status)
        headers = {"Content-Type": "image/jpeg", "Content-Length": str(len(body)), **(headers or {})}
        for k, v in headers.items():
            if v is not None:
                self.send_header(k, v)
        self.end_headers()
        if body:
            self.wfile.write(body)

    def do_GET(self):
        with self.server.counter_lock:
            self.server.paths.append(self.path)
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        path = parts.path
        if path.startswith("/img/"):
            n = path.rsplit("/", 1)[1]
            self._send(200, f"image-{n}-".encode() * 50)
        elif path == "/redirect":
            self._send(int(query.get("code", ["302"])[0]), b"", {"Location": query["to"][0]})
        elif path == "/redirect-utf8":  # the Location's raw bytes are UTF-8 (as servers send them)
            self._send(302, b"", {"Location": "/img/caf\u00e9".encode("utf-8").decode("latin-1")})
        elif path.startswith("/chain/"):
            n = int(path.rsplit("/", 1)[1])
            if n == 0:
                self._send(200, b"end of chain")
            else:
                self._send(302, b"moved", {"Location": f"/chain/{n - 1}"})
        elif path == "/404":
            self._send(404, b"not found", {"Content-Type": "text/html"})
        elif path == "/500":
            self._send(500, b"boom", {"Content-Type": "text/plain"})
        elif path == "/sized":
            self._send(200, b"x" * int(query["n"][0]))
        elif path == "/big-declared":
            # announces 5 MB, sends only a little and then waits: must be refused from the header
            self.send_response(200)
            self.send_header("Content-Length", "5000000")
            self.end_headers()
            self.wfile.write(b"x" * 1000)
            self.wfile.flush()
            self.server.stop.wait(2)
        elif path == "/big-chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for _ in range(int(query.get("chunks", ["50"])[0])):
                chunk = b"y" * 1000
                self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        elif path == "/big-close":
            # no Content-Length, no chunking: body delimited by closing the connection
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            self.wfile.write(b"z" * 50_000)
        elif path == "/slow":
            self.server.stop.wait(2)
            self._send(200, b"too late")
        elif path == "/slow-body":
            self.send_response(200)
            self.send_header("Content-Length", "2000")
            self.end_headers()
            self.wfile.write(b"a" * 1000)
            self.wfile.flush()
            self.server.stop.wait(2)
            self.wfile.write(b"a" * 1000)
        else:
            self._send(400, b"unknown path")


class LoopbackServer:
    def __init__(self, host: str):
        self.httpd = _Server((host, 0))
        self.host, self.port = self.httpd.server_address[:2]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"

    @property
    def connections(self) -> int:
        return self.httpd.connections

    @property
    def paths(self) -> list[str]:
        return list(self.httpd.paths)

    def close(self):
        self.httpd.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def srv1():
    server = LoopbackServer("127.0.0.1")
    yield server
    server.close()


@pytest.fixture
def srv2():
    server = LoopbackServer("127.0.0.2")
    yield server
    server.close()


@pytest.fixture(autouse=True)
def _no_env_allow_list(monkeypatch):
    monkeypatch.delenv("ATSCALE_ALLOWED_NETWORKS", raising=False)


@pytest.fixture
def fetcher():
    f = Fetcher(allowed_networks="127.0.0.0/8", timeout=(2.0, 2.0))
    yield f
    f.close()


def fetch_error(fetcher: Fetcher, url: str) -> FetchError:
    with pytest.raises(FetchError) as info:
        fetcher.get(url)
    assert info.value.reason in FETCH_REASONS
    return info.value


# ---------------------------------------------------------------------------
# address policy (pure)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ip", "refused"),
    [
        ("10.0.0.1", True),
        ("172.16.0.1", True),
        ("172.31.255.254", True),
        ("192.168.1.1", True),
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("169.254.169.254", True),  # cloud metadata
        ("100.64.0.1", True),  # shared / carrier-grade NAT
        ("224.0.0.1", True),
        ("0.0.0.0", True),
        ("240.0.0.1", True),
        ("255.255.255.255", True),
        ("192.0.2.1", True),  # documentation
        ("::1", True),
        ("::", True),
        ("fe80::1", True),
        ("fe80::1%1", True),
        ("fc00::1", True),
        ("fd12:3456::1", True),
        ("ff02::1", True),
        ("::ffff:127.0.0.1", True),
        ("::ffff:10.0.0.1", True),
        ("::ffff:169.254.169.254", True),
        ("8.8.8.8", False),
        ("1.1.1.1", False),
        ("93.184.216.34", False),
        ("2606:4700::1", False),
        ("2001:4860:4860::8888", False),
        ("::ffff:8.8.8.8", False),
    ],
)
def test_address_refusal_table(ip, refused):
    why = address_refusal(ip)
    assert (why is not None) == refused, why
    if refused:
        assert isinstance(why, str) and why
    # also accepts ipaddress objects
    if "%" not in ip:
        assert address_refusal(ipaddress.ip_address(ip)) == why


def test_address_refusal_reasons_are_specific():
    assert "loopback" in address_refusal("127.0.0.1")
    assert "private" in address_refusal("10.0.0.1")
    assert "link-local" in address_refusal("169.254.169.254")
    assert "100.64.0.0/10" in address_refusal("100.64.0.1")
    assert "multicast" in address_refusal("224.0.0.1")
    assert "unspecified" in address_refusal("0.0.0.0")
    assert "reserved" in address_refusal("240.0.0.1")
    assert "loopback" in address_refusal("::ffff:127.0.0.1") and "127.0.0.1" in address_refusal("::ffff:127.0.0.1")
    assert address_refusal("not-an-ip") is not None


def test_address_refusal_allow_list():
    allowed = parse_networks("127.0.0.0/8, 10.1.0.0/16, fc00::/7")
    assert address_refusal("127.0.0.2", allowed) is None
    assert address_refusal("::ffff:127.0.0.1", allowed) is None  # judged as 127.0.0.1
    assert address_refusal("10.1.2.3", allowed) is None
    assert address_refusal("fd00::5", allowed) is None
    assert address_refusal("10.2.0.1", allowed) is not None
    assert address_refusal("192.168.1.1", allowed) is not None
    assert address_refusal("::1", allowed) is not None  # v6 loopback is not in 127/8
    assert address_refusal("8.8.8.8", allowed) is None


def test_parse_networks():
    nets = parse_networks("127.0.0.0/8, ::1/128")
    assert nets == (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
    assert parse_networks(None) == ()
    assert parse_networks("") == ()
    assert parse_networks("  ") == ()
    assert len(parse_networks("10.0.0.0/8 192.168.0.0/16,\n172.16.0.0/12")) == 3
    assert parse_networks("127.0.0.1") == (ipaddress.ip_network("127.0.0.1/32"),)
    for bad in ("bogus", "10.0.0.0/33", "300.1.1.1/8", "127.0.0.0/8, nope/4"):
        with pytest.raises(ValueError) as info:
            parse_networks(bad)
        assert "CIDR" in str(info.value) and "ATSCALE_ALLOWED_NETWORKS" in str(info.value)


# ---------------------------------------------------------------------------
# basic fetching
# ---------------------------------------------------------------------------


def test_get_ok(srv1, fetcher):
    res = fetcher.get(srv1.url("/img/7"))
    assert isinstance(res, FetchResult)
    assert res.status == 200
    assert res.body == b"image-7-" * 50
    assert res.content_type == "image/jpeg"
    assert res.url == res.final_url == srv1.url("/img/7")
    assert res.redirects == 0
    assert srv1.paths == ["/img/7"]


def test_user_agent_sent(srv1):
    seen = {}

    class Probe(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            seen.update(self.headers)
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Probe)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        with Fetcher(allowed_networks="127.0.0.1/32", user_agent="probe/1.0") as f:
            assert f.get(f"http://127.0.0.1:{httpd.server_address[1]}/").body == b"ok"
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert seen["User-Agent"] == "probe/1.0"


def test_allowed_networks_from_env(srv1, monkeypatch):
    monkeypatch.setenv("ATSCALE_ALLOWED_NETWORKS", "127.0.0.1/32")
    with Fetcher() as f:
        assert f.get(srv1.url("/img/1")).status == 200
    monkeypatch.setenv("ATSCALE_ALLOWED_NETWORKS", "127.0.0.1/99")
    with pytest.raises(ValueError, match="ATSCALE_ALLOWED_NETWORKS"):
        Fetcher()


def test_loopback_refused_by_default(srv1):
    with Fetcher() as f:  # no env, no allow-list: loopback is refused
        err = fetch_error(f, srv1.url("/img/1"))
    assert err.reason == "blocked_address"
    assert srv1.connections == 0 and srv1.paths == []


# ---------------------------------------------------------------------------
# blocked addresses: nothing may reach the server
# ---------------------------------------------------------------------------


def test_blocked_address_no_connection(srv2):
    with Fetcher(allowed_networks="127.0.0.1/32", timeout=(1, 1)) as f:
        err = fetch_error(f, srv2.url("/img/1"))
    assert err.reason == "blocked_address"
    assert "127.0.0.2" in err.detail and "ATSCALE_ALLOWED_NETWORKS" in err.detail
    time.sleep(0.1)
    assert srv2.connections == 0
    assert srv2.paths == []


@pytest.mark.parametrize("host", ["[::1]", "[::ffff:127.0.0.2]", "0.0.0.0", "[::]"])
def test_blocked_literal_addresses(host):
    with Fetcher(allowed_networks="127.0.0.1/32", timeout=(1, 1)) as f:
        assert fetch_error(f, f"http://{host}:9/x").reason == "blocked_address"


def test_blocked_when_any_resolved_address_is_refused(srv1, monkeypatch):
    real = socket.getaddrinfo

    def fake(host, *args, **kwargs):
        if host == "mixed.test":
            return real("127.0.0.1", *args, **kwargs) + real("127.0.0.2", *args, **kwargs)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    with Fetcher(allowed_networks="127.0.0.1/32") as f:
        err = fetch_error(f, f"http://mixed.test:{srv1.port}/img/1")
    assert err.reason == "blocked_address" and "127.0.0.2" in err.detail and "mixed.test" in err.detail
    assert srv1.connections == 0


def test_redirect_to_blocked_address_refused_at_hop(srv1, srv2):
    with Fetcher(allowed_networks="127.0.0.1/32", timeout=(1, 1)) as f:
        err = fetch_error(f, srv1.url(f"/redirect?to={srv2.url('/img/1')}"))
    assert err.reason == "blocked_address" and "127.0.0.2" in err.detail
    assert srv1.paths == [f"/redirect?to={srv2.url('/img/1')}"]
    time.sleep(0.1)
    assert srv2.connections == 0 and srv2.paths == []


def test_dns_rebinding_caught_at_connect(srv2, monkeypatch):
    """The pre-check sees an allowed address, the connect lands on a refused
    one: the connected peer is checked before any request byte is sent."""
    real = socket.getaddrinfo
    calls = {"n": 0}

    def rebinding(host, *args, **kwargs):
        if host == "rebind.test":
            calls["n"] += 1
            target = "127.0.0.1" if calls["n"] == 1 else "127.0.0.2"
            return real(target, *args, **kwargs)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    with Fetcher(allowed_networks="127.0.0.1/32", timeout=(1, 1)) as f:
        err = fetch_error(f, f"http://rebind.test:{srv2.port}/img/1")
    assert err.reason == "blocked_address"
    assert "127.0.0.2" in err.detail and "peer" in err.detail
    assert calls["n"] >= 2  # pre-check + urllib3's own resolution
    time.sleep(0.2)
    assert srv2.connections == 1  # the TCP connect happened ...
    assert srv2.paths == []  # ... but not a single request was sent


class RawListener:
    """A bare TCP listener recording every byte any client sends."""

    def __init__(self, host: str):
        self.sock = socket.socket()
        self.sock.bind((host, 0))
        self.sock.listen(8)
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.received = b""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            self.accepted += 1
            conn.settimeout(0.5)
            with conn:
                try:
                    while chunk := conn.recv(4096):
                        self.received += chunk
                except OSError:
                    pass

    def close(self):
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_dns_rebinding_no_byte_sent(monkeypatch, scheme):
    """Same as above at the byte level, for plain HTTP and for HTTPS (the
    check runs before the TLS ClientHello)."""
    listener = RawListener("127.0.0.2")
    real = socket.getaddrinfo
    calls = {"n": 0}

    def rebinding(host, *args, **kwargs):
        if host == "rebind.test":
            calls["n"] += 1
            return real("127.0.0.1" if calls["n"] == 1 else "127.0.0.2", *args, **kwargs)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    try:
        with Fetcher(allowed_networks="127.0.0.1/32", timeout=(1, 1)) as f:
            err = fetch_error(f, f"{scheme}://rebind.test:{listener.port}/img/1")
        assert err.reason == "blocked_address"
        time.sleep(0.2)
    finally:
        listener.close()
    assert listener.accepted == 1
    assert listener.received == b""


# ---------------------------------------------------------------------------
# redirects
# ---------------------------------------------------------------------------


def test_redirect_within_allowed_range(srv1, srv2, fetcher):
    target = srv2.url("/img/3")
    res = fetcher.get(srv1.url(f"/redirect?to={target}"))
    assert res.status == 200 and res.body == b"image-3-" * 50
    assert res.redirects == 1
    assert res.final_url == target
    assert res.url == srv1.url(f"/redirect?to={target}")
    assert srv2.paths == ["/img/3"]


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_relative_redirect_codes(srv1, fetcher, code):
    res = fetcher.get(srv1.url(f"/redirect?code={code}&to=/img/9"))
    assert res.redirects == 1 and res.body == b"image-9-" * 50 and res.final_url == srv1.url("/img/9")


def test_redirect_chain_limits(srv1):
    with Fetcher(allowed_networks="127.0.0.0/8", max_redirects=3) as f:
        res = f.get(srv1.url("/chain/3"))
        assert res.redirects == 3 and res.body == b"end of chain"
        err = fetch_error(f, srv1.url("/chain/4"))
    assert err.reason == "too_many_redirects"
    assert "/chain/0" not in srv1.paths[-4:]  # the 5th URL was never requested
    with Fetcher(allowed_networks="127.0.0.0/8", max_redirects=0) as f:
        assert fetch_error(f, srv1.url("/chain/1")).reason == "too_many_redirects"


def test_redirect_location_sent_as_utf8_is_followed_percent_encoded(srv1, fetcher):
    res = fetcher.get(srv1.url("/redirect-utf8"))
    assert res.redirects == 1
    assert srv1.paths == ["/redirect-utf8", "/img/caf%C3%A9"]
    assert res.body == b"image-caf%C3%A9-" * 50


def test_connections_are_kept_alive_and_an_unread_body_is_not_reused(srv1, fetcher):
    for n in range(10):
        assert fetcher.get(srv1.url(f"/img/{n}")).body == f"image-{n}-".encode() * 50
    assert srv1.connections == 1  # ten GETs, one TCP connection
    assert fetch_error(fetcher, srv1.url("/404")).status == 404  # its body is never read ...
    assert fetcher.get(srv1.url("/img/10")).status == 200
    assert srv1.connections == 2  # ... so that connection was closed, not handed to the next GET


def test_redirect_to_bad_scheme(srv1, fetcher):
    assert fetch_error(fetcher, srv1.url("/redirect?to=file:///etc/passwd")).reason == "bad_scheme"
    assert fetch_error(fetcher, srv1.url("/redirect?to=ftp://127.0.0.1/x")).reason == "bad_scheme"


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------


def test_http_error_404(srv1, fetcher):
    err = fetch_error(fetcher, srv1.url("/404"))
    assert err.reason == "http_error" and err.status == 404 and "404" in err.detail
    err = fetch_error(fetcher, srv1.url("/500"))
    assert err.reason == "http_error" and err.status == 500


def test_too_large_with_content_length(srv1):
    with Fetcher(allowed_networks="127.0.0.0/8", max_bytes=10_000, timeout=(1, 1)) as f:
        assert f.get(srv1.url("/sized?n=10000")).body == b"x" * 10_000  # exactly the limit is fine
        err = fetch_error(f, srv1.url("/sized?n=10001"))
        assert err.reason == "too_large"
        t0 = time.perf_counter()
        err = fetch_error(f, srv1.url("/big-declared"))
        assert err.reason == "too_large" and "Content-Length" in err.detail
        assert time.perf_counter() - t0 < 0.9  # decided from the header, not after a read timeout


def test_too_large_chunked_and_close_delimited(srv1):
    with Fetcher(allowed_networks="127.0.0.0/8", max_bytes=20_000, timeout=(1, 1)) as f:
        assert len(f.get(srv1.url("/big-chunked?chunks=20")).body) == 20_000
        assert fetch_error(f, srv1.url("/big-chunked?chunks=50")).reason == "too_large"
        assert fetch_error(f, srv1.url("/big-close")).reason == "too_large"
    with Fetcher(allowed_networks="127.0.0.0/8", max_bytes=60_000, timeout=(1, 1)) as f:
        assert len(f.get(srv1.url("/big-close")).body) == 50_000


def test_read_timeout(srv1):
    with Fetcher(allowed_networks="127.0.0.0/8", timeout=(1, 0.5)) as f:
        t0 = time.perf_counter()
        err = fetch_error(f, srv1.url("/slow"))
        assert err.reason == "timeout"
        assert time.perf_counter() - t0 < 1.5
        t0 = time.perf_counter()
        err = fetch_error(f, srv1.url("/slow-body"))
        assert err.reason == "timeout"
        assert time.perf_counter() - t0 < 1.5


def test_connect_error_on_closed_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with Fetcher(allowed_networks="127.0.0.0/8", timeout=(1, 1)) as f:
        err = fetch_error(f, f"http://127.0.0.1:{port}/x")
    assert err.reason == "connect_error"


def test_dns_error(monkeypatch):
    real = socket.getaddrinfo

    def fake(host, *args, **kwargs):
        if host == "no-such-host.invalid":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    with Fetcher(allowed_networks="127.0.0.0/8") as f:
        err = fetch_error(f, "http://no-such-host.invalid/x.jpg")
    assert err.reason == "dns_error" and "no-such-host.invalid" in err.detail


@pytest.mark.parametrize(
    "url",
    ["ftp://127.0.0.1/x.jpg", "file:///etc/passwd", "data:image/png;base64,AAAA", "javascript:alert(1)", "gopher://127.0.0.1/"],
)
def test_bad_scheme(url, fetcher):
    assert fetch_error(fetcher, url).reason == "bad_scheme"


@pytest.mark.parametrize(
    "url",
    ["", "not a url", "example.com/x.jpg", "http://", "http:///x.jpg", "http://127.0.0.1:99999/x", " http://127.0.0.1/",
     "http://127.0.0.1/x\r\nHost: evil"],
)
def test_bad_url(url, fetcher):
    assert fetch_error(fetcher, url).reason == "bad_url"


def test_non_string_url(fetcher):
    with pytest.raises(FetchError) as info:
        fetcher.get(None)  # type: ignore[arg-type]
    assert info.value.reason == "bad_url"


def test_credentials_never_in_details_or_logs(srv1, fetcher, caplog):
    caplog.set_level(logging.DEBUG, logger="workers.fetch")
    secret_url = f"http://alice:s3cret@127.0.0.1:{srv1.port}/redirect?to=/404&token=t0ps3cret"
    err = fetch_error(fetcher, secret_url)
    assert err.reason == "http_error"
    for text in (err.detail, str(err), caplog.text):
        assert "s3cret" not in text and "t0ps3cret" not in text and "alice" not in text


def test_fetch_error_shape():
    err = FetchError("http_error", "HTTP 404 Not Found", status=404)
    clone = pickle.loads(pickle.dumps(err))
    assert (clone.reason, clone.detail, clone.status) == ("http_error", "HTTP 404 Not Found", 404)
    assert FetchError("timeout", "x").status is None
    with pytest.raises(ValueError):
        FetchError("nope", "x")
    assert set(FETCH_REASONS) == {
        "bad_url", "bad_scheme", "blocked_address", "dns_error", "connect_error",
        "timeout", "http_error", "too_large", "too_many_redirects", "opted_out",
    }


# ---------------------------------------------------------------------------
# concurrency
# ---------------------------------------------------------------------------


def test_concurrent_shared_fetcher(srv1, srv2):
    urls = [(srv1 if i % 2 else srv2).url(f"/img/{i}") for i in range(200)]
    with Fetcher(allowed_networks="127.0.0.0/8", pool_size=32, timeout=(2, 5)) as f:
        with ThreadPoolExecutor(32) as pool:
            results = list(pool.map(f.get, urls))
    for i, (url, res) in enumerate(zip(urls, results)):
        assert res.final_url == url and res.status == 200
        assert res.body == f"image-{i}-".encode() * 50
    assert len(srv1.paths) == len(srv2.paths) == 100
    # keep-alive pooling: far fewer TCP connections than requests
    assert srv1.connections + srv2.connections < 200


def test_close_is_idempotent():
    f = Fetcher(allowed_networks="127.0.0.0/8")
    f.close()
    f.close()
    with pytest.raises(RuntimeError):
        f.get("http://127.0.0.1/")


def test_fetch_module_has_no_celery():
    assert "celery" not in fetch_mod.__dict__


# ---------------------------------------------------------------------------
# politeness: Retry-After, bounded retries with backoff, per-host cap, User-Agent
# ---------------------------------------------------------------------------

from email.utils import formatdate  # noqa: E402

from workers.fetch import DEFAULT_USER_AGENT, HostSlots, parse_retry_after  # noqa: E402
from workers.page import RetryPolicy, fetch_with_retries  # noqa: E402


class ScriptServer:
    """Loopback server answering each path from its own script of (status, headers, body)
    (the last entry repeats); records the time of every request and the most
    requests it ever had in flight at once."""

    def __init__(self, host: str, scripts: dict[str, list], delay: float = 0.0):
        owner = self
        self.scripts = {p: list(s) for p, s in scripts.items()}
        self.hits: dict[str, list[float]] = {p: [] for p in scripts}
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                with owner.lock:
                    owner.in_flight += 1
                    owner.max_in_flight = max(owner.max_in_flight, owner.in_flight)
                    script = owner.scripts.get(self.path, [(404, {}, b"")])
                    owner.hits.setdefault(self.path, []).append(time.monotonic())
                    status, headers, body = script.pop(0) if len(script) > 1 else script[0]
                try:
                    if delay:
                        time.sleep(delay)
                    self.send_response(status)
                    for k, v in {"Content-Length": str(len(body)), **headers}.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(body)
                finally:
                    with owner.lock:
                        owner.in_flight -= 1

        self.httpd = _Server((host, 0))
        self.httpd.RequestHandlerClass = Handler
        self.host, self.port = self.httpd.server_address[:2]
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def script_server():
    servers = []

    def make(scripts, host="127.0.0.1", delay=0.0):
        servers.append(ScriptServer(host, scripts, delay))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def test_parse_retry_after():
    now = 1_700_000_000.0
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after(" 0 ") == 0.0
    assert parse_retry_after(formatdate(now + 30, usegmt=True), now=now) == pytest.approx(30, abs=1)
    assert parse_retry_after(formatdate(now - 30, usegmt=True), now=now) == 0.0  # a date in the past: at once
    for bad in (None, "", "soon", "-5", "1.5", "Wed, 99 Foo 2015 07:28:00 GMT"):
        assert parse_retry_after(bad) is None, bad


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_is_honoured(script_server, status):
    srv = script_server({"/img": [(status, {"Retry-After": "1"}, b"busy"), (200, {}, b"the image")]})
    with Fetcher(allowed_networks="127.0.0.0/8") as f:
        err = fetch_error(f, srv.url("/img"))  # one plain GET: the error carries the wait
        assert (err.status, err.retry_after) == (status, 1.0) and "Retry-After 1 s" in err.detail
        srv.scripts["/img"] = [(status, {"Retry-After": "1"}, b"busy"), (200, {}, b"the image")]
        srv.hits["/img"].clear()
        res = fetch_with_retries(f, srv.url("/img"), RetryPolicy(attempts=3, base_delay=0.01))
    assert res.body == b"the image"
    first, second = srv.hits["/img"]
    assert second - first >= 1.0  # waited what the server asked, not the 10-20 ms backoff


def test_retry_after_too_long_is_not_waited_for(script_server):
    srv = script_server({"/img": [(503, {"Retry-After": "3600"}, b"down for maintenance")]})
    with Fetcher(allowed_networks="127.0.0.0/8") as f:
        with pytest.raises(FetchError) as info:
            fetch_with_retries(f, srv.url("/img"), RetryPolicy(attempts=3, max_retry_after=30))
    assert info.value.reason == "http_error" and info.value.status == 503
    assert info.value.retry_after == 3600 and "not retried" in info.value.detail
    assert len(srv.hits["/img"]) == 1


def test_transient_errors_retried_a_bounded_number_of_times(script_server):
    srv = script_server({"/5xx": [(502, {}, b"bad gateway")], "/404": [(404, {}, b"gone")],
                         "/flaky": [(500, {}, b""), (503, {}, b""), (200, {}, b"finally")]})
    policy = RetryPolicy(attempts=3, base_delay=0.05)
    with Fetcher(allowed_networks="127.0.0.0/8") as f:
        with pytest.raises(FetchError) as info:
            fetch_with_retries(f, srv.url("/5xx"), policy)
        assert info.value.status == 502
        with pytest.raises(FetchError):
            fetch_with_retries(f, srv.url("/404"), policy)
        assert fetch_with_retries(f, srv.url("/flaky"), policy).body == b"finally"
    assert len(srv.hits["/5xx"]) == 3  # bounded: three tries in all
    assert len(srv.hits["/404"]) == 1  # a permanent error is not retried
    t = srv.hits["/5xx"]
    assert t[1] - t[0] >= 0.05 and t[2] - t[1] >= 0.1  # exponential: base, then twice base (or more)


def test_backoff_is_exponential_with_jitter_and_capped():
    policy = RetryPolicy(base_delay=0.5, max_delay=3.0)
    waits = {a: [policy.backoff(a) for _ in range(200)] for a in (1, 2, 3, 6)}
    assert all(0.5 <= w <= 1.0 for w in waits[1]) and all(1.0 <= w <= 2.0 for w in waits[2])
    assert all(2.0 <= w <= 3.0 for w in waits[3]) and all(w == 3.0 for w in waits[6])
    assert len({round(w, 6) for w in waits[1]}) > 100  # jittered: not one fixed value


def test_per_host_concurrency_cap(script_server):
    body = b"x" * 1000
    a = script_server({f"/img/{i}": [(200, {}, body)] for i in range(8)}, host="127.0.0.1", delay=0.3)
    b = script_server({f"/img/{i}": [(200, {}, body)] for i in range(8)}, host="127.0.0.3", delay=0.3)
    urls = [srv.url(f"/img/{i}") for i in range(8) for srv in (a, b)]
    with Fetcher(allowed_networks="127.0.0.0/8", per_host=2) as f:
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(f.get, urls))
        assert f._host_slots.active_keys() == 0  # no per-host state left behind
    assert all(r.body == body for r in results)
    assert a.max_in_flight == 2 and b.max_in_flight == 2  # 16 threads, yet two at a time per host


def test_per_host_default_and_env(monkeypatch):
    monkeypatch.delenv("ATSCALE_PER_HOST_CONNECTIONS", raising=False)
    with Fetcher() as f:
        assert f.per_host == 8
    monkeypatch.setenv("ATSCALE_PER_HOST_CONNECTIONS", "3")
    with Fetcher() as f:
        assert f.per_host == 3
    monkeypatch.setenv("ATSCALE_PER_HOST_CONNECTIONS", "many")
    with pytest.raises(ValueError, match="ATSCALE_PER_HOST_CONNECTIONS"):
        Fetcher()
    with pytest.raises(ValueError):
        HostSlots(0)


def test_host_slots_wait_and_forget():
    slots = HostSlots(1)
    order = []

    def second():
        with slots.hold("h:80"):
            order.append("second")

    with slots.hold("h:80"):
        t = threading.Thread(target=second)
        t.start()
        t.join(0.2)
        assert order == [] and slots.active_keys() == 1  # the second holder waits for the slot
        order.append("first")
    t.join(2)
    assert order == ["first", "second"] and slots.active_keys() == 0


def test_default_user_agent_names_a_contact(srv1):
    assert "+https://" in DEFAULT_USER_AGENT
    ua = "atscale-test/1.0 (+mailto:datasets@example.org)"
    with Fetcher(allowed_networks="127.0.0.0/8", user_agent=ua) as f:
        res = f.get(srv1.url("/img/1"))
    assert res.status == 200 and f.headers["User-Agent"] == ua


def test_fetch_error_with_retry_after_pickles():
    err = FetchError("http_error", "HTTP 429", status=429, retry_after=7.0)
    back = pickle.loads(pickle.dumps(err))
    assert (back.reason, back.status, back.retry_after) == ("http_error", 429, 7.0)


# ---------------------------------------------------------------------------
# X-Robots-Tag: a site's opt-out is honoured
# ---------------------------------------------------------------------------

from workers.fetch import opt_out_directive  # noqa: E402


def test_opt_out_directives_read_like_crawlers_do():
    assert opt_out_directive(["noai"]) == "noai"
    assert opt_out_directive(["noarchive, NoImageIndex"]) == "noimageindex"
    assert opt_out_directive(["atscale: noimageai"]) == "noimageai"  # addressed to us
    assert opt_out_directive(["googlebot: noindex"]) is None  # addressed to another crawler
    assert opt_out_directive(["noarchive", "nofollow"]) is None
    assert opt_out_directive(["unavailable_after: 25 Jun 2030 15:00:00 GMT"]) is None
    assert opt_out_directive([]) is None


def test_an_opted_out_image_is_rejected_and_not_retried(script_server):
    srv = script_server({
        "/noai.jpg": [(200, {"X-Robots-Tag": "noai"}, b"\xff\xd8\xff the pixels")],
        "/other-bot.jpg": [(200, {"X-Robots-Tag": "otherbot: noindex"}, b"\xff\xd8\xff the pixels")],
    })
    with Fetcher(allowed_networks="127.0.0.0/8") as f:
        err = fetch_error(f, srv.url("/noai.jpg"))
        assert err.reason == "opted_out" and "X-Robots-Tag: noai" in err.detail
        with pytest.raises(FetchError):
            fetch_with_retries(f, srv.url("/noai.jpg"), RetryPolicy(attempts=3, base_delay=0.01))
        assert f.get(srv.url("/other-bot.jpg")).body == b"\xff\xd8\xff the pixels"
    assert len(srv.hits["/noai.jpg"]) == 2  # one GET each time: an opt-out is final, not transient
