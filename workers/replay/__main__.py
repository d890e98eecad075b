"""``python -m workers.replay [--host H] [--port P] [--api-key K] [--image-delay S] ...``

Starts the offline SerpApi replay server, prints exactly one line
``{"url": "http://HOST:PORT"}`` on stdout (flushed), then serves until SIGTERM or
SIGINT, and exits 0.  The API key may also come from ``ATSCALE_REPLAY_API_KEY``
(preferred over ``--api-key``, which is visible in the process list); it is never
printed.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading

from workers.replay.catalog import DEFAULT_PER_PAGE
from workers.replay.server import ReplayServer


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m workers.replay", description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0 = any free port (default)")
    ap.add_argument("--api-key", default=os.environ.get("ATSCALE_REPLAY_API_KEY") or None,
                    help="accept only this key (default: any non-empty key; env ATSCALE_REPLAY_API_KEY)")
    ap.add_argument("--image-delay", type=float, default=0.0, help="seconds to wait before answering /images/...")
    ap.add_argument("--per-page", type=int, default=DEFAULT_PER_PAGE)
    ap.add_argument("--max-pages", type=int, default=5)
    ap.add_argument("--verbose", action="store_true", help="log each request path (never the query string) to stderr")
    args = ap.parse_args(argv)

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")

    stop = threading.Event()

    def _on_signal(signum, frame):  # noqa: ARG001
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)

    server = ReplayServer(host=args.host, port=args.port, api_key=args.api_key, image_delay=args.image_delay,
                          per_page=args.per_page, max_pages=args.max_pages).start()
    try:
        sys.stdout.write(json.dumps({"url": server.url}) + "\n")
        sys.stdout.flush()
        while not stop.wait(0.5):
            pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
