"""Run records, listing, and the pictures: curves, confusion matrix, comparison.

A run lives under `runs/<run>/` in the store:

    record.json      status (queued, training, trained, evaluated, failed + reason), timing, history
    metrics.json     per-epoch losses and accuracies, per-class accuracy, confusion matrix, ...
    model.pt         best checkpoint: weights, class names, spec, image size, normalisation
    model.pt2        torch.export program (loads with torch alone) + export.json beside it
    curves.png       loss and accuracy per epoch
    confusion.png    confusion matrix of the best epoch on the validation split
    checkpoint.pt    last epoch's full state while training (resume after a crash)
    evaluations/<dataset>.json, evaluations/<dataset>-confusion.png
"""
from __future__ import annotations

import io
import re
import time
from typing import Any

from workers.store import ObjectStore, retrying

RUN_STATES = ("queued", "training", "trained", "evaluated", "failed")
DONE_STATES = ("trained", "evaluated")
_RUN_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,200}[a-z0-9])?$")


def run_key(run: str, name: str) -> str:
    return f"runs/{run}/{name}"


def check_run(run: str) -> str:
    if not isinstance(run, str) or not _RUN_RE.match(run):
        raise ValueError(f"run {run!r} is not a valid run name (lower-case letters, digits and dashes; "
                         f"`atscale runs` lists them)")
    return run


def read_record(store: ObjectStore, run: str) -> dict | None:
    return store.get_json_or(run_key(run, "record.json"))


def update_record(store: ObjectStore, run: str, status: str | None = None, **fields) -> dict:
    """Read-modify-write of the run's record; a status change is timestamped and kept in `history`."""
    if status is not None and status not in RUN_STATES:
        raise ValueError(f"unknown run status {status!r}")
    rec = read_record(store, run) or {"run": run, "created_at": time.time(), "history": []}
    rec.update(fields)
    if status is not None:
        now = time.time()
        rec["status"] = status
        rec[{"queued": "queued_at", "training": "started_at", "trained": "finished_at", "evaluated": "evaluated_at",
             "failed": "failed_at"}[status]] = now
        entry = {"status": status, "at": now}
        if status == "failed":
            entry["reason"] = fields.get("reason")
        rec.setdefault("history", []).append(entry)
        if status != "failed" and "reason" not in fields:
            rec.pop("reason", None)  # an earlier failure's reason no longer applies
    rec["updated_at"] = time.time()
    retrying(store.put_json, run_key(run, "record.json"), rec)
    return rec


def mark_queued(store: ObjectStore, run: str, dataset: str, spec: dict) -> dict:
    """Call when a training task is sent (the worker marks it training, then trained or failed)."""
    return update_record(store, run, "queued", dataset=dataset, spec=spec)


def list_runs(store: ObjectStore, dataset: str | None = None) -> list[dict]:
    out = []
    for key in store.list("runs/"):
        parts = key.split("/")
        if len(parts) == 3 and parts[2] == "record.json":
            rec = store.get_json_or(key)
            if rec and (dataset is None or rec.get("dataset") == dataset):
                out.append(rec)
    return sorted(out, key=lambda r: r.get("started_at") or r.get("queued_at") or r.get("created_at") or 0)


def load_metrics(store: ObjectStore, run: str) -> dict | None:
    return store.get_json_or(run_key(run, "metrics.json"))


# -- pictures -------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    _plt().close(fig)
    return buf.getvalue()


def _integer_epochs(*axes) -> None:
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_curves(metrics: dict) -> bytes:
    plt = _plt()
    ep = list(range(1, len(metrics["train_loss"]) + 1))
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot(ep, metrics["train_loss"], marker=".", label="train loss")
    a.plot(ep, metrics["val_loss"], marker=".", label="val loss")
    a.set_xlabel("epoch"); a.legend(); a.set_title("loss")
    if metrics.get("train_accuracy"):
        b.plot(ep, metrics["train_accuracy"], marker=".", label="train accuracy", color="tab:blue", alpha=0.6)
    b.plot(ep, metrics["val_accuracy_per_epoch"], marker=".", label="val accuracy", color="tab:green")
    b.axhline(metrics["chance"], ls="--", color="grey", label="chance")
    if metrics.get("best_epoch"):
        b.axvline(metrics["best_epoch"], ls=":", color="tab:red", label="best epoch")
    b.set_ylim(0, 1.02); b.set_xlabel("epoch"); b.legend(loc="lower right"); b.set_title("accuracy")
    _integer_epochs(a, b)
    fig.suptitle(metrics["run"], fontsize=9)
    fig.tight_layout()
    return _png(fig)


def plot_confusion(classes: list[str], confusion: list[list[int]], title: str) -> bytes:
    plt = _plt()
    n = len(classes)
    side = max(4.0, min(16.0, 1.0 + 0.55 * n))
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    im = ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(n), labels=classes, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), labels=classes, fontsize=8)
    ax.set_xlabel("predicted"); ax.set_ylabel("true")
    peak = max((max(r) for r in confusion), default=0) or 1
    for i in range(n):
        for j in range(n):
            v = confusion[i][j]
            if v:
                ax.text(j, i, str(v), ha="center", va="center", fontsize=7,
                        color="white" if v > peak / 2 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _png(fig)


# -- comparison -------------------------------------------------------------------------------------
def compare_rows(store: ObjectStore, dataset: str) -> list[dict]:
    """One row per run on `dataset` that has metrics (finished, or still training)."""
    rows = []
    for rec in list_runs(store, dataset):
        m = load_metrics(store, rec["run"]) or {}
        if not m and not rec.get("epoch"):
            continue
        spec = rec.get("spec") or {}
        rows.append({
            "run": rec["run"], "status": rec.get("status"), "model": m.get("model") or _model_label(spec),
            "epochs": m.get("epochs", rec.get("epoch")), "best_epoch": m.get("best_epoch"),
            "val_accuracy": m.get("val_accuracy", rec.get("val_accuracy")),
            "final_val_loss": (m.get("val_loss") or [None])[-1], "train_images": m.get("train_images"),
            "val_images": m.get("val_images"), "seconds": m.get("seconds"), "device": m.get("device"),
            "images_per_second": m.get("train_images_per_second"),
            "optimizer": (spec.get("optimizer") or {}).get("name"), "image_size": spec.get("image_size"),
            "metrics": m,
        })
    return rows


def _model_label(spec: dict) -> str | None:
    model = spec.get("model")
    return model if isinstance(model, str) else (f"layers[{len(model)}]" if isinstance(model, list) else None)


def plot_comparison(dataset: str, rows: list[dict]) -> bytes:
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for r in rows:
        m = r["metrics"]
        if not m.get("val_accuracy_per_epoch"):
            continue
        ep = list(range(1, len(m["val_accuracy_per_epoch"]) + 1))
        label = f"{r['model']} {r['run'][-8:]} ({(r['val_accuracy'] or 0):.0%})"
        line, = a.plot(ep, m["val_accuracy_per_epoch"], marker=".", label=label)
        b.plot(ep, m["val_loss"], marker=".", color=line.get_color(), label=f"{label} val")
        b.plot(ep, m["train_loss"], ls="--", color=line.get_color(), alpha=0.5)
    if rows and rows[0]["metrics"].get("chance"):
        a.axhline(rows[0]["metrics"]["chance"], ls="--", color="grey", label="chance")
    a.set_ylim(0, 1.02); a.set_xlabel("epoch"); a.set_title("validation accuracy")
    if rows:
        a.legend(fontsize=7)
    b.set_xlabel("epoch"); b.set_title("loss (solid: validation, dashed: training)")
    _integer_epochs(a, b)
    fig.suptitle(f"runs on dataset {dataset}", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def comparison_key(dataset: str, ext: str) -> str:
    return f"comparisons/{dataset}.{ext}"


def compare(store: ObjectStore, dataset: str) -> tuple[list[dict], bytes]:
    """Rows (without the full metrics) and the PNG; both are also written to the store."""
    rows = compare_rows(store, dataset)
    png = plot_comparison(dataset, rows)
    table = [{k: v for k, v in r.items() if k != "metrics"} for r in rows]
    retrying(store.put_bytes, comparison_key(dataset, "png"), png, "image/png")
    retrying(store.put_json, comparison_key(dataset, "json"), {"dataset": dataset, "runs": table, "at": time.time()})
    return table, png


def summary(rec: dict[str, Any], metrics: dict | None) -> dict:
    """What `atscale runs` shows for one run."""
    m = metrics or {}
    started, finished = rec.get("started_at"), rec.get("finished_at")
    return {
        "run": rec.get("run"), "dataset": rec.get("dataset"), "status": rec.get("status"),
        "model": m.get("model") or _model_label(rec.get("spec") or {}),
        "epoch": rec.get("epoch"), "epochs": rec.get("epochs") or (rec.get("spec") or {}).get("epochs"),
        "val_accuracy": m.get("val_accuracy", rec.get("val_accuracy")),
        "seconds": rec.get("seconds") or (round(finished - started, 1) if started and finished else None),
        "reason": rec.get("reason"), "updated_at": rec.get("updated_at"),
    }
