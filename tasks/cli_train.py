"""Training sub-commands of `atscale`.

  atscale train DATASET [--spec FILE] [--local] [--force]   train (again) on an existing dataset
  atscale runs [--dataset D]                                 list runs (status, accuracy, timing)
  atscale runs show RUN                                      one run: record, epochs, per-class accuracy
  atscale compare DATASET [--out FILE.png]                   the runs on one dataset side by side
  atscale evaluate RUN [--dataset D]                         measure a run on a dataset's validation split
  atscale predict RUN IMAGE_OR_URL [--top N]                 the most likely classes of one image

`--json` prints machine-readable output instead of tables.
"""
from __future__ import annotations

import json
import time
from pathlib import Path


def register(subparsers) -> None:
    t = subparsers.add_parser("train", help="train (again) on an existing dataset, from a spec file",
                              description="Queue a training of DATASET on a running cluster's gpu queue, or with "
                                          "--local train here. The spec is checked (and the model built once on the "
                                          "CPU) before anything is queued.")
    t.add_argument("dataset")
    t.add_argument("--spec", metavar="FILE", help="training spec, JSON (README: Training spec); default: the defaults")
    t.add_argument("--local", action="store_true", help="train in this process instead of queueing on the cluster")
    t.add_argument("--force", action="store_true", help="train again even if this (dataset, spec) run is trained")
    t.add_argument("--json", action="store_true")
    t.set_defaults(fn=cmd_train)

    r = subparsers.add_parser("runs", help="list training runs; `runs show RUN` for one")
    r.add_argument("--dataset", help="only the runs on this dataset")
    r.add_argument("--json", action="store_true")
    r.set_defaults(fn=cmd_runs)
    rs = r.add_subparsers(dest="runs_cmd")
    show = rs.add_parser("show", help="one run: record, epochs, per-class accuracy, artifacts")
    show.add_argument("run")
    show.add_argument("--json", action="store_true")
    show.set_defaults(fn=cmd_run_show)

    c = subparsers.add_parser("compare", help="compare the runs on one dataset (table + PNG of their curves)")
    c.add_argument("dataset")
    c.add_argument("--out", metavar="FILE.png", help="also write the PNG here (it is always stored in the store)")
    c.add_argument("--json", action="store_true")
    c.set_defaults(fn=cmd_compare)

    e = subparsers.add_parser("evaluate", help="measure a run on a dataset's validation split")
    e.add_argument("run")
    e.add_argument("--dataset", help="default: the run's own dataset")
    e.add_argument("--queue", action="store_true", help="run it on the cluster's gpu queue instead of here")
    e.add_argument("--json", action="store_true")
    e.set_defaults(fn=cmd_evaluate)

    p = subparsers.add_parser("predict", help="the most likely classes of one image (a file or an http(s) URL)")
    p.add_argument("run")
    p.add_argument("image", metavar="IMAGE_OR_URL")
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_predict)


def _console():
    from tasks.cli import console

    return console


def _store():
    from workers.store import open_store

    return open_store()


def _cache_dir() -> str:
    from workers.settings import get_settings

    return get_settings().cache_dir


def _pct(v) -> str:
    return "" if v is None else f"{v:.1%}"


def _ago(ts) -> str:
    if not ts:
        return ""
    s = time.time() - ts
    return f"{s:.0f}s ago" if s < 120 else (f"{s / 60:.0f}m ago" if s < 7200 else f"{s / 3600:.1f}h ago")


# -- train ------------------------------------------------------------------------------------
def cmd_train(args) -> int:
    from workers.build import check_buildable
    from workers.names import checked_slug
    from workers.runs import DONE_STATES, mark_queued, read_record
    from workers.spec import load_spec, parse_spec
    from workers.train import read_manifest, run_name, train_run

    console = _console()
    dataset = checked_slug(args.dataset, "dataset")
    spec = load_spec(args.spec) if args.spec else parse_spec({})
    store = _store()
    classes = sorted({m["label"] for m in read_manifest(store, dataset)})
    if len(classes) < 2:
        raise ValueError(f"dataset {dataset!r} has {len(classes)} {'class' if len(classes) == 1 else 'classes'} with images; need at least 2")
    built = check_buildable(spec, len(classes), with_weights=args.local)
    run = run_name(dataset, spec)
    rec = read_record(store, run) or {}
    if rec.get("status") in DONE_STATES and not args.force:
        msg = {"run": run, "status": rec["status"], "val_accuracy": rec.get("val_accuracy"), "skipped": "trained"}
        if args.json:
            print(json.dumps(msg))
        else:
            console.print(f"run [bold]{run}[/] is already {rec['status']} (validation accuracy "
                          f"{_pct(rec.get('val_accuracy'))}); `atscale runs show {run}`; --force trains it again")
        return 0
    if not args.local:
        from tasks.celery import app
        from tasks.cli import check_broker
        from workers.settings import get_settings

        check_broker(get_settings().broker_url)  # before the record says "queued"
        mark_queued(store, run, dataset, spec.model_dump())
        res = app.send_task("atscale.retrain", args=[dataset, run, spec.model_dump()], kwargs={"force": args.force})
        if args.json:
            print(json.dumps({"run": run, "dataset": dataset, "task_id": res.id, "status": "queued"}))
        else:
            console.print(f"queued run [bold]{run}[/] ({spec.model_label}, {built['parameters']:,} parameters, "
                          f"{len(classes)} classes) on the gpu queue (task {res.id}); "
                          f"follow it with: atscale runs show {run}")
        return 0

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, disable=args.json) as prog:
        bar = prog.add_task(f"training {run}", total=spec.epochs)

        def progress(p: dict) -> None:
            prog.update(bar, completed=p["epoch"],
                        description=f"training {run}: val acc {p['val_accuracy']:.1%}")

        metrics = train_run(store, dataset, run, spec, cache_dir=_cache_dir(), progress=progress, force=args.force)
    if args.json:
        print(json.dumps({"run": run, "dataset": dataset, "status": "trained", "val_accuracy": metrics["val_accuracy"],
                          "best_epoch": metrics.get("best_epoch"), "epochs": metrics["epochs"]}))
    else:
        from tasks.report import print_metrics

        print_metrics(console, metrics)
        console.print(f"run: {store.url}/runs/{run}/")
    return 0


# -- runs -----------------------------------------------------------------------------------------
def cmd_runs(args) -> int:
    from rich.table import Table

    from workers.names import checked_slug
    from workers.runs import list_runs, load_metrics, summary

    store = _store()
    dataset = checked_slug(args.dataset, "dataset") if args.dataset else None
    rows = [summary(rec, load_metrics(store, rec["run"]) if rec.get("status") in ("trained", "evaluated") else None)
            for rec in list_runs(store, dataset)]
    if args.json:
        print(json.dumps(rows, indent=2, sort_keys=True))
        return 0
    t = Table(title=f"runs in {store.url}" + (f" on {dataset}" if dataset else ""))
    for col in ("run", "dataset", "model", "status", "epochs", "val accuracy", "seconds", "updated", "reason"):
        t.add_column(col)
    for r in rows:
        epochs = f"{r['epoch'] or 0}/{r['epochs'] or '?'}"
        t.add_row(r["run"], r["dataset"] or "", r["model"] or "", r["status"] or "", epochs, _pct(r["val_accuracy"]),
                  "" if r["seconds"] is None else f"{r['seconds']:.0f}", _ago(r["updated_at"]), r["reason"] or "")
    _console().print(t)
    return 0


def cmd_run_show(args) -> int:
    from rich.table import Table

    from workers.runs import check_run, load_metrics, read_record

    store = _store()
    run = check_run(args.run)
    rec = read_record(store, run)
    if rec is None:
        raise ValueError(f"no run named {run!r} in {store.url}; `atscale runs` lists them")
    metrics = load_metrics(store, run)
    artifacts = sorted(k.split("/", 2)[2] for k in store.list(f"runs/{run}/"))
    if args.json:
        print(json.dumps({"record": rec, "metrics": metrics, "artifacts": artifacts}, indent=2, sort_keys=True))
        return 0
    console = _console()
    console.print(f"run [bold]{run}[/] on dataset {rec.get('dataset')}: [bold]{rec.get('status')}[/]"
                  + (f" ([red]{rec['reason']}[/])" if rec.get("reason") else ""))
    for h in rec.get("history", []):
        console.print(f"  {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(h['at']))}  {h['status']}"
                      + (f": {h['reason']}" if h.get("reason") else ""))
    if rec.get("seconds") is not None:
        console.print(f"training took {rec['seconds']:.0f}s" + (f" after {rec['wait_seconds']:.0f}s in the queue"
                                                                  if rec.get("wait_seconds") is not None else "")
                      + f"; attempts: {rec.get('attempts', 1)}")
    if metrics:
        from tasks.report import print_metrics

        print_metrics(console, metrics)
        t = Table(title="per-class accuracy (best epoch, validation split)")
        t.add_column("class")
        t.add_column("accuracy", justify="right")
        t.add_column("train images", justify="right")
        for c, acc in (metrics.get("per_class_accuracy") or {}).items():
            t.add_row(c, _pct(acc), str((metrics.get("train_class_counts") or {}).get(c, "")))
        console.print(t)
    elif rec.get("epoch"):
        console.print(f"epoch {rec['epoch']}/{rec.get('epochs')}, best validation accuracy so far "
                      f"{_pct(rec.get('val_accuracy'))}")
    for ds, ev in (rec.get("evaluations") or {}).items():
        console.print(f"evaluated on {ds}: {_pct(ev['accuracy'])} of {ev['images']} validation images")
    console.print("artifacts: " + ", ".join(f"{store.url}/runs/{run}/{a}" for a in artifacts))
    return 0


# -- compare -----------------------------------------------------------------------------------------
def cmd_compare(args) -> int:
    from rich.table import Table

    from workers.names import checked_slug
    from workers.runs import compare, comparison_key

    store = _store()
    dataset = checked_slug(args.dataset, "dataset")
    rows, png = compare(store, dataset)
    if args.out:
        Path(args.out).expanduser().write_bytes(png)
    if args.json:
        print(json.dumps({"dataset": dataset, "runs": rows, "png": f"{store.url}/{comparison_key(dataset, 'png')}",
                          "out": args.out}, indent=2, sort_keys=True))
        return 0
    console = _console()
    if not rows:
        console.print(f"no runs with metrics on dataset {dataset!r} in {store.url}")
        return 1
    t = Table(title=f"runs on {dataset}, best first")
    for col in ("run", "model", "optimizer", "size", "epochs", "best epoch", "val accuracy", "final val loss",
                "images/s", "seconds", "device", "status"):
        t.add_column(col)
    for r in sorted(rows, key=lambda r: -(r["val_accuracy"] or 0)):
        t.add_row(r["run"], str(r["model"]), str(r["optimizer"] or ""), str(r["image_size"] or ""), str(r["epochs"]),
                  str(r["best_epoch"] or ""), _pct(r["val_accuracy"]),
                  "" if r["final_val_loss"] is None else f"{r['final_val_loss']:.4f}",
                  "" if r["images_per_second"] is None else f"{r['images_per_second']:.0f}",
                  "" if r["seconds"] is None else f"{r['seconds']:.0f}", str(r["device"] or ""), str(r["status"]))
    console.print(t)
    console.print(f"curves: {store.url}/{comparison_key(dataset, 'png')}" + (f" and {args.out}" if args.out else ""))
    return 0


# -- evaluate, predict ---------------------------------------------------------------------------------
def cmd_evaluate(args) -> int:
    from rich.table import Table

    from workers.runs import check_run

    run = check_run(args.run)
    if args.queue:
        from tasks.celery import app

        res = app.send_task("atscale.evaluate", args=[run, args.dataset])
        if args.json:
            print(json.dumps({"run": run, "task_id": res.id}))
        else:
            _console().print(f"queued evaluation of {run} (task {res.id}); see it with: atscale runs show {run}")
        return 0
    from workers.predict import evaluate_run

    result = evaluate_run(_store(), run, args.dataset, cache_dir=_cache_dir())
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
        return 0
    console = _console()
    t = Table(title=f"{run} on {result['dataset']}: {result['images']} validation images")
    t.add_column("class")
    t.add_column("accuracy", justify="right")
    for c, acc in result["per_class_accuracy"].items():
        t.add_row(c, _pct(acc))
    console.print(t)
    console.print(f"accuracy [bold]{result['accuracy']:.1%}[/] (chance {result['chance']:.1%}), loss "
                  f"{result['loss']:.4f}" + (f"; {result['left_out_images']} images of other classes left out "
                                             f"({', '.join(result['left_out_labels'])})"
                                             if result["left_out_images"] else ""))
    return 0


def cmd_predict(args) -> int:
    from rich.table import Table

    from workers.predict import load_run, predict_bytes

    if args.top < 1:
        raise ValueError("--top must be at least 1")
    from workers.fetch import FetchError
    from workers.images import ImageRejected

    rm = load_run(_store(), args.run)
    source = args.image
    if source.startswith(("http://", "https://")):
        from workers.fetch import Fetcher
        from workers.settings import get_settings

        s = get_settings()
        try:  # the downloader's safe GET: http(s) only, private addresses refused unless allow-listed
            with Fetcher(user_agent=s.user_agent, allowed_networks=s.allowed_networks or None) as f:
                body = f.get(source).body
        except FetchError as exc:
            raise ValueError(f"cannot fetch the image: {exc}") from None
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise ValueError(f"no such image file {source!r} (give a file or an http(s) URL)")
        body = path.read_bytes()
    try:
        top = predict_bytes(rm, body, top=args.top)
    except ImageRejected as exc:
        raise ValueError(f"not a usable image: {exc}") from None
    if args.json:
        print(json.dumps({"run": rm.run, "image": source, "top": top}))
        return 0
    t = Table(title=f"{rm.run}: {source}")
    t.add_column("class")
    t.add_column("probability", justify="right")
    for row in top:
        t.add_row(row["class"], f"{row['probability']:.1%}")
    _console().print(t)
    return 0
