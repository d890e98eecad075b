"""`atscale fetch`: the page-download code path over a URL list, end to end over real
loopback HTTP, with real worker processes; and the benchmark's harness on a tiny corpus.

NETWORK RULE: only 127.0.0.0/8.  The "no request leaves" case allow-lists
127.0.0.1/32 and listens on 127.0.0.2, which must see no connection at all.
"""
from __future__ import annotations

import importlib.util
import io
import json
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from tests.test_fetch import RawListener
from PIL import Image

from tasks.cli import main as cli_main
from workers.fetch_many import FetchOptions, UrlRunner, read_url_list

ROOT = Path(__file__).resolve().parent.parent


def photo(size=(800, 600), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), "RGB").resize(size, Image.Resampling.BICUBIC)


def jpeg(img: Image.Image, orientation: int | None = None, **kw) -> bytes:
    buf = io.BytesIO()
    if orientation:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kw["exif"] = exif.tobytes()
    img.save(buf, "JPEG", quality=92, **kw)
    return buf.getvalue()


def rgba_png() -> bytes:
    img = Image.new("RGBA", (300, 200), (255, 0, 0, 0))  # fully transparent red: must end up white
    img.paste((0, 0, 255, 255), (100, 50, 200, 150))  # an opaque blue square
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


BODIES = {
    "/upright.jpg": (200, "image/jpeg", jpeg(photo(seed=1))),
    "/rotated.jpg": (200, "image/jpeg", jpeg(photo((800, 600), seed=2), orientation=6)),  # stored 300x400 upright
    "/page.jpg": (200, "image/jpeg", b"<!DOCTYPE html><html><body>Sorry, hotlinking not allowed</body></html>"),
    "/drawing.svg": (200, "image/svg+xml", b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>'),
    "/empty.jpg": (200, "image/jpeg", b""),
    "/cut.jpg": (200, "image/jpeg", jpeg(photo(seed=3))[:3000]),
    "/bomb.gif": None,  # filled below: a GIF header declaring 30000x30000 pixels
    "/tiny.png": None,
    "/missing.jpg": (404, "text/html", b"<html>not here</html>"),
    "/alpha.png": (200, "image/png", rgba_png()),
}


def _gif_header(w: int, h: int) -> bytes:
    """A 44-byte GIF whose screen and only frame declare w x h pixels (a decompression bomb)."""
    import struct

    return (b"GIF89a" + struct.pack("<HHBBB", w, h, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff" + b"\x2c"
            + struct.pack("<HHHHB", 0, 0, w, h, 0) + b"\x02\x02\x44\x01\x00\x3b")


BODIES["/bomb.gif"] = (200, "image/gif", _gif_header(30000, 30000))
_tiny = io.BytesIO()
photo((16, 16)).save(_tiny, "PNG")
BODIES["/tiny.png"] = (200, "image/png", _tiny.getvalue())


class Site:
    """The web, on 127.0.0.1: the bodies above, a redirect, and a request log."""

    def __init__(self):
        owner = self
        self.paths: list[str] = []

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                owner.paths.append(self.path)
                if self.path == "/moved":
                    status, ctype, body = 302, "text/plain", b""
                    extra = {"Location": "/alpha.png"}
                else:
                    status, ctype, body = BODIES.get(self.path, (404, "text/plain", b"no"))
                    extra = {}
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in extra.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class Listener(RawListener):
    """A bare TCP listener on another loopback address (counts connections), with a URL."""

    def __init__(self, host="127.0.0.2"):
        super().__init__(host)
        self.url = f"http://{host}:{self.port}"


@pytest.fixture(scope="module")
def site():
    s = Site()
    yield s
    s.close()


@pytest.fixture
def listener():
    lst = Listener()
    yield lst
    lst.close()


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv("ATSCALE_ALLOWED_NETWORKS", raising=False)
    monkeypatch.delenv("ATSCALE_PER_HOST_CONNECTIONS", raising=False)


def run_cli(args: list[str], capsys) -> tuple[int, list[dict], dict | None, str]:
    code = cli_main(args)
    out = capsys.readouterr()
    lines = [json.loads(line) for line in out.out.splitlines() if line.strip()]
    summary = lines[-1]["summary"] if lines and "summary" in lines[-1] else None
    rows = [r for r in lines if "summary" not in r]
    return code, rows, summary, out.err


EXPECTED = {  # path -> (status, reason)
    "/upright.jpg": ("stored", None),
    "/rotated.jpg": ("stored", None),
    "/alpha.png": ("stored", None),
    "/moved": ("stored", None),
    "/page.jpg": ("rejected", "html"),
    "/drawing.svg": ("rejected", "svg"),
    "/empty.jpg": ("rejected", "empty"),
    "/cut.jpg": ("rejected", "truncated"),
    "/bomb.gif": ("rejected", "decompression_bomb"),
    "/tiny.png": ("rejected", "too_small"),
    "/missing.jpg": ("rejected", "http_error"),
}


def test_fetch_url_list_stores_or_names_every_url(site, listener, tmp_path, capsys):
    urls = [site.url + p for p in EXPECTED]
    urls += [listener.url + "/secret.jpg", "ftp://127.0.0.1/x.jpg", "http://10.0.0.1/x.jpg", "not a url"]
    lines = ["# a comment, then a blank line", ""] + urls
    url_file = tmp_path / "urls.txt"
    url_file.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    code, rows, summary, err = run_cli(["fetch", "--urls", str(url_file), "--out", str(out), "--processes", "2",
                                        "--threads", "3", "--allowed-networks", "127.0.0.1/32"], capsys)
    assert code == 0, err
    by_url = {r["url"]: r for r in rows}
    assert len(rows) == len(urls) == len(by_url)
    assert sorted(r["position"] for r in rows) == list(range(3, 3 + len(urls)))  # line numbers
    for path, (status, reason) in EXPECTED.items():
        r = by_url[site.url + path]
        assert (r["status"], r["reason"]) == (status, reason), (path, r)
    assert by_url[listener.url + "/secret.jpg"]["reason"] == "blocked_address"
    assert by_url["ftp://127.0.0.1/x.jpg"]["reason"] == "bad_scheme"
    assert by_url["http://10.0.0.1/x.jpg"]["reason"] == "blocked_address"
    assert by_url["not a url"]["reason"] == "bad_url"
    assert listener.accepted == 0  # the refused address never saw a connection

    # the pixels stored: RGB JPEGs named by their hash, orientation applied, alpha on white
    stored = {p: by_url[site.url + p] for p, (s, _) in EXPECTED.items() if s == "stored"}
    for p, r in stored.items():
        file = Path(r["path"])
        assert file == out.resolve() / "images" / f"{r['sha256']}.jpg" and file.is_file()
        img = Image.open(file)
        assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (r["width"], r["height"]))
    assert (stored["/upright.jpg"]["width"], stored["/upright.jpg"]["height"]) == (500, 375)
    assert (stored["/rotated.jpg"]["width"], stored["/rotated.jpg"]["height"]) == (375, 500)  # EXIF 6: upright
    alpha = np.asarray(Image.open(stored["/alpha.png"]["path"]), dtype=np.int16)
    assert (np.abs(alpha[10, 10] - [255, 255, 255]) < 8).all()  # transparent -> white
    assert (np.abs(alpha[100, 150] - [0, 0, 255]) < 16).all()  # opaque blue stays blue
    assert stored["/moved"]["sha256"] == stored["/alpha.png"]["sha256"]  # redirect followed
    assert len(list((out / "images").iterdir())) == 3  # same picture twice: one file
    rejected = [by_url[u] for u in urls if by_url[u]["status"] == "rejected"]
    assert all(r["sha256"] is None and r["detail"] for r in rejected)

    assert summary["urls"] == len(urls) and summary["stored"] == 4
    assert summary["rejected"] == {"bad_scheme": 1, "bad_url": 1, "blocked_address": 2, "decompression_bomb": 1,
                                   "empty": 1, "html": 1, "http_error": 1, "svg": 1, "too_small": 1, "truncated": 1}
    assert summary["processes"] == 2 and summary["threads"] == 3
    assert len(summary["peak_rss_mb"]["workers"]) == 2 and all(w > 0 for w in summary["peak_rss_mb"]["workers"])
    assert "4 stored" in err


def test_fetch_one_odd_url_from_the_command_line(site, tmp_path):
    """The real console entry point, in its own process: how a user checks one URL."""
    exe = Path(sys.executable).parent / "atscale"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "tasks.cli"]
    proc = subprocess.run(cmd + ["fetch", site.url + "/page.jpg", "--out", str(tmp_path / "o"),
                                 "--allowed-networks", "127.0.0.1/32"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(x) for x in proc.stdout.splitlines()]
    assert len(lines) == 2
    assert lines[0]["url"] == site.url + "/page.jpg" and lines[0]["position"] == 1
    assert (lines[0]["status"], lines[0]["reason"]) == ("rejected", "html")
    assert lines[1]["summary"]["urls"] == 1 and lines[1]["summary"]["processes"] == 1


def test_loopback_is_refused_unless_allow_listed(site, tmp_path, capsys):
    before = len(site.paths)
    code, rows, summary, _ = run_cli(["fetch", site.url + "/upright.jpg", "--out", str(tmp_path)], capsys)
    assert code == 0 and rows[0]["reason"] == "blocked_address"
    assert "ATSCALE_ALLOWED_NETWORKS" in rows[0]["detail"]
    assert len(site.paths) == before  # not a single request reached the server


def test_usage_errors(tmp_path, capsys):
    assert cli_main(["fetch", "--out", str(tmp_path)]) == 2  # nothing to fetch
    assert cli_main(["fetch", "http://x/", "--urls", "f.txt", "--out", str(tmp_path)]) == 2  # both
    assert cli_main(["fetch", "--urls", str(tmp_path / "nope.txt"), "--out", str(tmp_path)]) == 2
    assert cli_main(["fetch", "http://x/", "--out", str(tmp_path), "--allowed-networks", "not-a-cidr"]) == 2
    with pytest.raises(SystemExit):
        cli_main(["fetch", "http://x/", "--out", str(tmp_path), "--threads", "0"])
    capsys.readouterr()


def test_read_url_list_is_lazy_and_numbers_lines():
    def endless():
        n = 0
        while True:
            n += 1
            yield "\n" if n % 3 == 0 else f"http://h/{n}\n"

    items = read_url_list(endless())
    first = [next(items) for _ in range(4)]
    assert first == [(1, "http://h/1"), (2, "http://h/2"), (4, "http://h/4"), (5, "http://h/5")]


def test_url_list_comments_whole_line_and_trailing():
    lines = ["# the logos\n", "http://h/a.jpg   # the big one\n", "http://h/b.jpg#frag\n", "  \t\n",
             "\thttp://h/c.jpg\t#tab\n", "   # indented comment\n"]
    assert list(read_url_list(lines)) == [(2, "http://h/a.jpg"), (3, "http://h/b.jpg#frag"), (5, "http://h/c.jpg")]


def test_runner_reads_the_list_as_it_goes(site, tmp_path):
    """Memory does not grow with the URL list: the runner pulls URLs only as fast as
    its bounded queue drains (here it is stopped after a few rows, with an endless list)."""
    pulled = [0]

    def endless():
        while True:
            pulled[0] += 1
            yield pulled[0], site.url + "/tiny.png"

    runner = UrlRunner(endless(), FetchOptions(out=str(tmp_path), allowed_networks="127.0.0.1/32"),
                       processes=1, threads=2)
    got = 0
    for row in runner:
        assert row["reason"] == "too_small"
        got += 1
        if got == 20:
            break
    assert pulled[0] < 200  # only the queue's bound (2 x threads / chunk) plus what is in flight


# ---------------------------------------------------------------------------
# the benchmark's harness, on a tiny corpus (the benchmark itself is run by hand)
# ---------------------------------------------------------------------------


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_download", ROOT / "bench" / "download.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_download"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_bench_harness_on_a_tiny_corpus(tmp_path, monkeypatch):
    bench = load_bench()
    monkeypatch.setenv("ATSCALE_BENCH_CACHE", str(tmp_path / "cache"))
    corpus = bench.build_corpus(12, seed=5)
    assert len(corpus) == 12
    for c in corpus:
        size = c.path.stat().st_size
        assert bench.MIN_BYTES <= size <= bench.MAX_BYTES
        with Image.open(c.path) as im:
            assert im.size == (c.width, c.height) and 315 <= max(im.size) <= 2000
    assert "12 images" in bench.describe(corpus)
    with bench.ImageServer(corpus[0].path.parent, 0.01, hosts=2) as server:
        urls = [server.url_for(i, c.name) for i, c in enumerate(corpus)]
        assert {u.split("/")[2].split(":")[0] for u in urls} == {"127.0.0.1", "127.0.0.2"}
        urls_file = tmp_path / "urls.txt"
        urls_file.write_text("\n".join(urls) + "\n")
        ours = bench.run_ours(urls_file, tmp_path / "ours", processes=1, threads=4)
        seq = bench.run_sequential(urls[:3], tmp_path / "seq")
        assert server.stats()["requests"] >= 12 + 3
    assert ours.images == 12 and ours.seconds > 0 and ours.peak_rss_mb > 0
    assert bench.check_output(tmp_path / "ours", 12)["files"] == 12
    assert bench.check_output(tmp_path / "ours", 12)["max_side_seen"] <= 500
    assert seq.images == 3
    cpu = bench.cpu_bound(corpus, processes=2)
    assert cpu.images == 12 and cpu.rate > 0 and cpu.extra["cpu_ms_per_image"] > 0


def test_a_worker_that_cannot_start_stops_the_run_with_its_reason(tmp_path):
    runner = UrlRunner(iter([(1, "http://127.0.0.1:9/x.jpg")]), FetchOptions(out="s3://"), processes=1, threads=1)
    with pytest.raises(RuntimeError, match="could not start: ValueError: .*names no bucket"):
        list(runner)


def test_cli_start_path_is_light_and_piped_tables_do_not_wrap_at_80():
    """`atscale fetch` never imports Celery or pydantic (half a second each at every
    start); `celery -A tasks` still finds the app; piped output is 160 columns wide."""
    import os

    code = (
        "import sys\n"
        "import tasks.cli, tasks.cli_fetch\n"
        "from tasks.cli import console\n"
        "light = not any(m in sys.modules for m in ('celery', 'pydantic', 'tasks.celery'))\n"
        "import tasks\n"
        "print(console.width, light, type(tasks.app).__name__, tasks.app.main)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.split() == ["160", "True", "Celery", "atscale"]


# ---------------------------------------------------------------------------
# the shared corpus of real odd files, over HTTP through the whole page code path
# ---------------------------------------------------------------------------


def test_every_shared_fixture_is_stored_or_named_over_http(tmp_path, capsys):
    """Each real file of ../shared/fixtures/images, served on 127.0.0.1 and fetched by
    `atscale fetch`: stored as an RGB JPEG or rejected with the reason its content
    calls for (tests/test_images.py's table), in worker processes that never die."""
    from functools import partial
    from http.server import SimpleHTTPRequestHandler

    from tests.test_images import EXPECTED_REASONS, FIXTURES, fixture_files

    files = fixture_files()
    if not files:
        pytest.skip(reason=f"shared fixture corpus {FIXTURES} not present on this machine")

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(FIXTURES)))
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{httpd.server_address[1]}/"
        url_file = tmp_path / "urls.txt"
        url_file.write_text("".join(base + p.name + "\n" for p in files))
        code, rows, summary, err = run_cli(["fetch", "--urls", str(url_file), "--out", str(tmp_path / "out"),
                                            "--processes", "2", "--threads", "4",
                                            "--allowed-networks", "127.0.0.1/32"], capsys)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert code == 0, err
    assert "Traceback" not in err
    by_name = {r["url"].rsplit("/", 1)[1]: r for r in rows}
    assert sorted(by_name) == sorted(p.name for p in files)
    for name, r in by_name.items():
        if name in EXPECTED_REASONS:
            assert r["status"] == "rejected" and r["reason"] in EXPECTED_REASONS[name], (name, r)
            assert r["detail"]
        else:
            assert r["status"] == "stored", (name, r)
            with Image.open(r["path"]) as img:
                assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (r["width"], r["height"])), name
    assert summary["stored"] == sum(r["status"] == "stored" for r in rows) > 0
    assert not {r["reason"] for r in rows} & {"internal_error", "store_error"}  # no bug, nothing lost on the way
