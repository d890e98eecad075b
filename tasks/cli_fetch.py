"""``atscale fetch``: the page-download code path on a plain URL list.

  atscale fetch --urls urls.txt --out DIR        every URL of the file (one a line, # comments)
  atscale fetch URL [URL ...] --out DIR          check one odd URL (or a few)

Prints one JSON line per URL on stdout (position, url, status "stored" or
"rejected", reason, sha256, width, height, path or detail) in completion order,
then one line ``{"summary": {...}}``; a short human summary goes to stderr.
Images are stored as ``DIR/images/<sha256>.jpg`` (``--out`` may also be
``s3://bucket/prefix``). The same checks as the pipeline apply: only
http/https, private/loopback/... addresses refused unless in
``ATSCALE_ALLOWED_NETWORKS`` (or ``--allowed-networks``), per-host connection
cap, bounded retries honouring Retry-After, full validation.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"


def register(subparsers) -> None:
    f = subparsers.add_parser(
        "fetch", help="download a URL list with the pipeline's download code path (JSON line per URL)",
        description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    f.add_argument("url", nargs="*", help="URLs to fetch (or use --urls)")
    f.add_argument("--urls", metavar="FILE", help="a file with one URL a line ('-' reads standard input)")
    f.add_argument("--out", required=True, help="folder (or s3://bucket/prefix) for the images")
    f.add_argument("--processes", type=_positive_int, help="worker processes (default: the number of cores)")
    f.add_argument("--threads", type=_positive_int, default=32, help="threads per process (default 32)")
    f.add_argument("--max-side", type=_positive_int, default=500, help="longest side of stored images (default 500)")
    f.add_argument("--min-side", type=_positive_int, default=32, help="shorter side below which images are rejected")
    f.add_argument("--per-host", type=_positive_int,
                   help="requests in flight to one host per process (default ATSCALE_PER_HOST_CONNECTIONS or 8)")
    f.add_argument("--user-agent", help="User-Agent header; name a contact (default ATSCALE_USER_AGENT)")
    f.add_argument("--allowed-networks", metavar="CIDRS",
                   help="networks allowed although private/loopback (default ATSCALE_ALLOWED_NETWORKS)")
    f.add_argument("--timeout", type=float, default=20.0, help="read timeout per request, seconds (default 20)")
    f.add_argument("--attempts", type=_positive_int, default=3, help="tries per URL for transient failures (default 3)")
    f.add_argument("--quiet", action="store_true", help="print only the summary line")
    f.set_defaults(fn=cmd_fetch)


def cmd_fetch(args) -> int:
    from workers.fetch_many import FetchOptions, UrlRunner, output_row, read_url_list, start_fork_server

    if args.urls or len(args.url) > 1:
        start_fork_server()  # its imports overlap with ours below
    from workers.fetch import ENV_ALLOWED_NETWORKS, parse_networks
    from workers.store import LocalStore, open_store

    if bool(args.url) == bool(args.urls):
        print("atscale fetch: give URLs or --urls FILE (one of the two)", file=sys.stderr)
        return 2
    allowed = args.allowed_networks
    # a bad CIDR fails here (ValueError -> exit 2), not in every worker
    if allowed is not None:
        parse_networks(allowed, source="--allowed-networks")
    else:
        parse_networks(os.environ.get(ENV_ALLOWED_NETWORKS))
    try:
        store = open_store(args.out)  # checks the URL and creates the folder
    except OSError as exc:
        print(f"atscale fetch: cannot use {args.out!r} as the output folder: {exc.strerror or exc}", file=sys.stderr)
        return 2
    store_root = store.url if isinstance(store, LocalStore) else None
    opts = FetchOptions(
        out=store.url if isinstance(store, LocalStore) else args.out,
        max_side=args.max_side, min_side=args.min_side,
        # ATSCALE_USER_AGENT read here, not through workers.settings: pydantic's import
        # would add 0.3 s to every fetch's start (None: the fetcher's default, with a contact)
        user_agent=args.user_agent or os.environ.get("ATSCALE_USER_AGENT") or None,
        allowed_networks=allowed, per_host=args.per_host,
        read_timeout=args.timeout, attempts=args.attempts,
    )

    handle = None
    if args.urls == "-":
        items = read_url_list(sys.stdin)
    elif args.urls:
        path = Path(args.urls)
        if not path.is_file():
            what = "is a folder, not a file" if path.is_dir() else "does not exist"
            print(f"atscale fetch: the URL list {args.urls!r} {what}", file=sys.stderr)
            return 2
        handle = path.open(encoding="utf-8", errors="replace")
        items = read_url_list(handle)  # (line number, URL), read lazily
    else:
        items = iter(enumerate(args.url, 1))

    processes = args.processes
    threads = args.threads
    if not args.urls:  # a few URLs on the command line: one process is plenty
        processes = processes or 1
        threads = min(threads, max(1, len(args.url)))
    runner = UrlRunner(items, opts, processes=processes or os.cpu_count(), threads=threads)
    out = sys.stdout
    try:
        for row in runner:
            if not args.quiet:
                out.write(json.dumps(output_row(row, store_root)) + "\n")
        out.write(json.dumps({"summary": runner.summary.to_dict()}) + "\n")
        out.flush()
    except RuntimeError as exc:
        print(f"atscale fetch: {exc}", file=sys.stderr)
        return 1
    finally:
        if handle is not None:
            handle.close()
    s = runner.summary
    rejected = ", ".join(f"{k} {v}" for k, v in s.rejected.items()) or "none"
    print(f"atscale fetch: {_count(s.urls, 'URL')}, {s.stored} stored, rejected: {rejected}; {s.seconds:.1f} s, "
          f"{s.images_per_s:.1f} images/s ({_count(s.processes, 'process', 'processes')} x "
          f"{_count(s.threads, 'thread')}); "
          f"peak RSS {s.peak_rss_mb.get('total')} MiB", file=sys.stderr)
    return 0
