"""Scale-out benchmark: the same collection on 1, 2, 3 ... download hosts.

    sudo .venv/bin/python bench/scale_out.py                 # 1, 2, 3 hosts (about 3 minutes)
    sudo .venv/bin/python bench/scale_out.py --hosts 4 --pages 6 --delay 0.3

Builds real hosts on this machine with network namespaces (tests/netns.py; needs
root): a hub with Redis, moto's S3 server and the replay search service, N download
hosts, a GPU host and an operator host, on a private bridge with no route anywhere
else. Every process reaches the others by its namespace address and is configured
only by the environment variables a user sets (README, "Scaling out").

The load is latency-bound, as real image hosts are: the replay service answers each
image after ``--delay`` seconds, and each download host runs one page task at a time
with ``--threads`` download threads, so that one host cannot saturate the CPU. The
replay service is asked for every image once before the first measurement (its first
rendering of an image costs CPU on the hub, which is not what is measured).

Download hosts are added one at a time while the cluster runs (a worker started with
the same variables); each count of hosts collects the same queries into a new dataset
without training. Printed for each: images stored, seconds of the download stage (the
page plan sent -> the last page stored, from the workers' own clocks in the result
backend), images/s, the whole run's seconds, pages per host; then the ratios over one
host and whether the targets hold (2 hosts >= 1.8x, 3 hosts >= 2.5x).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests import netns  # noqa: E402

TARGETS = {2: 1.8, 3: 2.5}
QUERIES = ["Alaskan Malamute", "Boston Terrier", "Boykin Spaniel", "Chesapeake Bay Retriever"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hosts", type=int, default=3, help="measure 1..HOSTS download hosts (default 3)")
    ap.add_argument("--pages", type=int, default=3, help="pages per query, 4 queries, 50 images a page (default 3)")
    ap.add_argument("--delay", type=float, default=0.4, help="seconds before each image is answered (default 0.4)")
    ap.add_argument("--threads", type=int, default=4, help="ATSCALE_DOWNLOAD_THREADS of each host (default 4)")
    ap.add_argument("--concurrency", type=int, default=1, help="page tasks at once per host (default 1)")
    ap.add_argument("--json", type=Path, help="also write the figures to this file")
    args = ap.parse_args(argv)
    if not 1 <= args.pages <= 5:
        ap.error("--pages must be 1..5 (the replay service serves 5 pages per query)")

    reason = netns.unavailable_reason()
    if reason:
        print(f"scale_out: cannot build hosts here: {reason}", file=sys.stderr)
        return 2

    t_start = time.time()
    with tempfile.TemporaryDirectory(prefix="atscale-scale-out-") as work:
        with netns.HostCluster(work, download_hosts=args.hosts, image_delay=args.delay,
                               download_threads=args.threads, concurrency=args.concurrency) as c:
            print(f"hosts on {c.lab.subnet}: " + ", ".join(f"{n} {h.addr}" for n, h in c.lab.hosts.items()))
            c.start_gpu_worker()
            c.start_download_worker("dl1")
            c.wait_workers(["download@dl1", "gpu0@gpu"])
            c.warm_replay(QUERIES, args.pages)
            print(f"load: {len(QUERIES)} queries x {args.pages} pages x 50 images, {args.delay} s per image, "
                  f"{args.threads} threads x {args.concurrency} page task(s) per host")
            runs = {}
            for n in range(1, args.hosts + 1):
                if n > 1:
                    c.wait_workers([c.start_download_worker(f"dl{n}")])
                r = runs[n] = c.measure(f"bench-{n}h", QUERIES, args.pages)
                print(f"{n} download host(s): {r['images']} images in {r['seconds']:6.1f} s = "
                      f"{r['images_per_s']:6.2f} images/s   (whole run {r['run_seconds']:.1f} s; pages per host "
                      f"{ {h: k for h, k in r['pages_by_host'].items() if k} })", flush=True)
            left = c.lab.leftovers
        remaining = left()
    ratios = {n: runs[n]["images_per_s"] / runs[1]["images_per_s"] for n in runs if n > 1}
    ok = True
    for n, ratio in ratios.items():
        target = TARGETS.get(n)
        verdict = "" if target is None else f"  target {target}x: {'met' if ratio >= target else 'MISSED'}"
        ok = ok and (target is None or ratio >= target)
        print(f"{n} hosts / 1 host: {ratio:.2f}x{verdict}")
    print(f"({time.time() - t_start:.0f} s in all; namespaces left behind: {remaining or 'none'})")
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "ratios": ratios, "targets": TARGETS}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
