"""The `atscale` command line.

  atscale demo                 everything on this machine, offline: embedded Redis, replay
                               search, workers, collect_breeds, training, report
  atscale collect [...]        queue collect_breeds on a running cluster (validated here first)
  atscale status [DATASET]     dataset states (--json for machines)
  atscale replay               run the offline SerpApi-compatible replay service
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console


def _console() -> Console:
    """rich wraps tables at 80 columns when the output is not a terminal (a pipe,
    a log file): make those 160 wide unless COLUMNS says otherwise."""
    if sys.stdout.isatty() or os.environ.get("COLUMNS"):
        return Console()
    return Console(width=160)


console = _console()

# modules that add sub-commands of their own, each with `register(subparsers)`
COMMAND_MODULES: tuple[str, ...] = ("tasks.cli_fetch", "tasks.cli_train")


def _store():
    from workers.store import open_store

    return open_store()


def cmd_status(args) -> int:
    from workers.names import checked_slug
    from workers.status import pages_done, read_status

    store = _store()
    if args.dataset:
        names = [checked_slug(args.dataset, "dataset")]
    else:
        names = sorted({k.split("/")[1] for k in store.list("datasets/") if k.endswith("/status.json")})
    out = []
    for name in names:
        st = read_status(store, name)
        if st is None:
            console.print(f"[red]no dataset named {name!r} in {store.url}[/]")
            return 1
        st["pages_done"] = pages_done(store, name)
        st.pop("history", None) if not args.dataset else None
        out.append(st)
    if args.json:
        print(json.dumps(out if not args.dataset else out[0], indent=2, sort_keys=True))
    else:
        from tasks.report import print_statuses

        print_statuses(console, out)
    return 0


def check_broker(url: str) -> None:
    """Fail in words, at once, when the broker cannot be reached."""
    import redis

    try:
        redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3).ping()
    except redis.RedisError as exc:
        raise ConnectionError(f"cannot reach Redis at {redact(url)} (CELERY_BROKER_URL): {exc}") from None


def redact(url: str) -> str:
    from urllib.parse import urlsplit

    p = urlsplit(url)
    return url.replace(p.password, "***") if p.password else url


def cmd_collect(args) -> int:
    from tasks.request import parse_request
    from workers.settings import get_settings

    kwargs = {k: v for k, v in {"queries": args.queries, "chips_name": args.chips_name, "pages": args.pages,
                                "dataset": args.dataset, "no_cache": args.no_cache or None, "size": args.size,
                                "engine": args.engine, "on_missing_chip": args.on_missing_chip,
                                "val_percent": args.val_percent, "google_domain": args.google_domain,
                                "train": False if args.no_train else None}.items() if v is not None}
    if args.spec:
        from workers.spec import load_spec

        kwargs["spec"] = load_spec(args.spec).model_dump(mode="json")
    req = parse_request(kwargs)  # ValueError: printed by main(), exit 2
    check_broker(get_settings().broker_url)
    from tasks.celery import app

    res = app.send_task("collect_breeds", kwargs=kwargs)
    console.print(f"queued collect_breeds for dataset [bold]{req.dataset}[/] (task {res.id}); "
                  f"follow it with: atscale status {req.dataset}")
    return 0


def cmd_replay(args) -> int:
    from workers.replay.__main__ import main as replay_main

    return replay_main(["--host", args.host, "--port", str(args.port)])


def with_loopback(networks: str | None) -> str:
    """The user's allow-list plus loopback, where the demo's replay catalog is served."""
    return f"{networks}, 127.0.0.0/8" if networks and networks.strip() else "127.0.0.0/8"


def cmd_demo(args) -> int:
    import signal

    from workers.fetch import ENV_ALLOWED_NETWORKS, parse_networks

    parse_networks(os.environ.get(ENV_ALLOWED_NETWORKS))  # a bad CIDR stops here, before anything starts

    from tasks.embedded import Cluster
    from tasks.request import parse_request

    kwargs: dict = {"pages": args.pages, "spec": {"epochs": args.epochs}}
    if args.queries:
        kwargs["queries"] = args.queries
    if args.dataset is not None:
        kwargs["dataset"] = args.dataset
    req = parse_request(kwargs)  # checked before anything starts
    if len(req.queries) < 2:
        raise ValueError("the demo trains a classifier, which needs at least two classes: give two or more --queries")
    dataset = req.dataset
    if "CELERY_BROKER_URL" in os.environ:
        check_broker(os.environ["CELERY_BROKER_URL"])
        console.print(f"using the Redis named by CELERY_BROKER_URL ({redact(os.environ['CELERY_BROKER_URL'])}); "
                      "unset it for an embedded one")

    def on_term(signum, frame):
        raise Terminated  # unwinds the Cluster context: everything started here is stopped

    signal.signal(signal.SIGTERM, on_term)

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="atscale-demo-"))
    env = dict(os.environ)
    env.setdefault("ATSCALE_STORE", str(Path("atscale-data").resolve()))
    env.setdefault("ATSCALE_CACHE_DIR", str(workdir / "cache"))
    with Cluster(workdir, env) as cluster:
        try:
            if "CELERY_BROKER_URL" not in os.environ:
                url = cluster.start_redis()
                console.print(f"started embedded Redis at {url}")
            if "SERPAPI_BASE_URL" not in os.environ:
                url = cluster.start_replay(api_key="replay-demo-key", image_delay=args.image_delay)
                # the replay catalog is served from loopback: allow-list it for the downloader
                cluster.env["ATSCALE_ALLOWED_NETWORKS"] = with_loopback(cluster.env.get("ATSCALE_ALLOWED_NETWORKS"))
                console.print(f"started the offline SerpApi replay service at {url}")
            os.environ.update({k: v for k, v in cluster.env.items() if k.startswith(("CELERY_", "ATSCALE_"))})
            from workers.settings import get_settings

            get_settings.cache_clear()
            cluster.start_worker("download", "search,download", concurrency=2)
            cluster.start_worker("gpu", "gpu", concurrency=1, pool="threads")
            from tasks.celery import app

            cluster.wait_workers(["download", "gpu"], timeout=120)
            console.print(f"workers up (logs in {workdir})")
            res = app.send_task("collect_breeds", kwargs=kwargs)
            return follow(dataset, timeout=args.timeout, entry=res)
        except KeyboardInterrupt:
            console.print("stopping the workers, then Redis and the replay service "
                          "(an unfinished training resumes from its last epoch when the demo runs again)")
            raise


def follow(dataset: str, timeout: float, entry=None) -> int:
    """Show progress until the dataset is done or failed, then print report and metrics."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from tasks.report import print_metrics, print_report
    from workers.status import pages_done, read_status

    store = _store()
    end = time.time() + timeout
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as prog:
        pages = prog.add_task("pages downloaded", total=None)
        epochs = prog.add_task("training epochs", total=None, visible=False)
        while time.time() < end:
            st = read_status(store, dataset) or {}
            if not st and entry is not None and entry.state == "FAILURE":
                console.print(f"[red]collect_breeds failed: {entry.result}[/]")
                return 1
            prog.update(pages, completed=pages_done(store, dataset), total=st.get("pages_total"))
            if st.get("run"):
                rec = store.get_json_or(f"runs/{st['run']}/record.json") or {}
                prog.update(epochs, visible=True, completed=rec.get("epoch", 0), total=rec.get("epochs"))
            if st.get("state") in ("done", "partial", "failed"):
                break
            time.sleep(1.0)
    st = read_status(store, dataset) or {}
    report = store.get_json_or(f"datasets/{dataset}/report.json")
    if report:
        print_report(console, report)
    if st.get("state") == "failed":
        console.print(f"[red]dataset {dataset} failed: {st.get('reason')}[/]")
        return 1
    if st.get("state") not in ("done", "partial"):
        console.print(f"[red]dataset {dataset} still {st.get('state')} after {timeout:.0f}s[/]")
        return 1
    metrics = store.get_json_or(f"runs/{st['run']}/metrics.json")
    if metrics:
        print_metrics(console, metrics)
    console.print(f"dataset: {store.url}/datasets/{dataset}/  run: {store.url}/runs/{st.get('run')}/")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="atscale", description="Image search -> labelled dataset -> classifier")
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", help="run the whole pipeline offline on this machine")
    d.add_argument("--queries", nargs="+", help="classes (default: the nine American breeds)")
    d.add_argument("--pages", type=int, default=2)
    d.add_argument("--epochs", type=int, default=8)
    d.add_argument("--dataset")
    d.add_argument("--image-delay", type=float, default=0.0, help="replay latency per image, seconds")
    d.add_argument("--workdir", help="where logs go (default: a new temporary folder)")
    d.add_argument("--timeout", type=float, default=1800)
    d.set_defaults(fn=cmd_demo)

    c = sub.add_parser("collect", help="queue collect_breeds on a running cluster")
    c.add_argument("--queries", nargs="+")
    c.add_argument("--chips-name")
    c.add_argument("--pages", type=int)
    c.add_argument("--dataset")
    c.add_argument("--spec", help="training spec JSON file")
    c.add_argument("--size", help="e.g. 500x500")
    c.add_argument("--google-domain")
    c.add_argument("--engine", choices=["google_images", "google"])
    c.add_argument("--on-missing-chip", choices=["unfiltered", "skip", "fail"])
    c.add_argument("--val-percent", type=int)
    c.add_argument("--no-train", action="store_true", help="collect only")
    c.add_argument("--no-cache", action="store_true")
    c.set_defaults(fn=cmd_collect)

    s = sub.add_parser("status", help="dataset states")
    s.add_argument("dataset", nargs="?")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_status)

    r = sub.add_parser("replay", help="run the offline SerpApi replay service")
    r.add_argument("--host", default="127.0.0.1")
    r.add_argument("--port", type=int, default=8765)
    r.set_defaults(fn=cmd_replay)

    import importlib

    for name in COMMAND_MODULES:  # each adds its own sub-commands: register(subparsers)
        importlib.import_module(name).register(sub)
    return p


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C would be so that the same clean-up runs."""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args) or 0
    except ValueError as exc:
        console.print(f"[red]{exc}[/]")
        return 2
    except Terminated:
        return 143  # 128 + SIGTERM, as a shell reports it
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # the CLI's boundary: a sentence, not a stack trace (ATSCALE_DEBUG=1 shows it)
        if os.environ.get("ATSCALE_DEBUG"):
            raise
        console.print(f"[red]atscale {args.cmd}: {type(exc).__name__}: {exc}[/]")
        return 1


if __name__ == "__main__":
    sys.exit(main())
