"""Readable printing of a dataset report, a run's metrics and dataset statuses (rich)."""
from __future__ import annotations

import time

from rich.console import Console
from rich.table import Table


def print_report(console: Console, report: dict) -> None:
    t = Table(title=f"dataset {report['dataset']}: {report['images']} images")
    t.add_column("class")
    t.add_column("stored", justify="right")
    t.add_column("train", justify="right")
    t.add_column("val", justify="right")
    t.add_column("rejected", justify="right")
    for label, n in report["classes"].items():
        split = report.get("split", {}).get(label, {})
        rej = sum(report.get("rejected_by_class", {}).get(label, {}).values())
        t.add_row(label, str(n), str(split.get("train", 0)), str(split.get("val", 0)), str(rej))
    console.print(t)
    rejected = ", ".join(f"{k} {v}" for k, v in report["rejected"].items()) or "none"
    console.print(f"rejected by reason: {rejected}")
    d = report.get("duplicates", {})
    console.print(f"duplicates removed: {report['duplicates_removed']} "
                  f"({d.get('within_class', 0)} exact and {d.get('near_within_class', 0)} near within a class, "
                  f"{d.get('cross_class', 0)} exact and {d.get('near_cross_class', 0)} near across classes, "
                  f"{d.get('junk', 0)} junk: one picture under {d.get('junk_min_classes', 4)}+ classes)")
    for label, note in report.get("search_notes", {}).items():
        console.print(f"[yellow]search note[/] {label}: {note}")
    for f in report.get("pages", {}).get("failed", []):
        console.print(f"[red]page failed[/] {f['label']} page {f['ijn']}: {f['message']}")


def print_metrics(console: Console, m: dict) -> None:
    t = Table(title=f"run {m['run']}: {m['model']} on {m['device']}, "
                    f"{m['train_images']} train / {m['val_images']} val images")
    for col in ("epoch", "train loss", "val loss", "val accuracy", "seconds"):
        t.add_column(col, justify="right")
    for e, sec in zip(m["per_epoch"], m["epoch_seconds"]):
        t.add_row(str(e["epoch"]), f"{e['train_loss']:.4f}", f"{e['val_loss']:.4f}", f"{e['val_accuracy']:.1%}",
                  f"{sec:.1f}")
    console.print(t)
    console.print(f"validation accuracy (best epoch {m.get('best_epoch')}): [bold]{m['val_accuracy']:.1%}[/] "
                  f"on {m['val_images']} held-out images; chance is {m['chance']:.1%} "
                  f"({m['val_accuracy'] / m['chance']:.1f}x chance)")


def print_statuses(console: Console, statuses: list[dict]) -> None:
    t = Table(title="datasets")
    for col in ("dataset", "state", "pages", "run", "updated", "reason"):
        t.add_column(col)
    for s in statuses:
        age = time.time() - s.get("updated_at", time.time())
        t.add_row(s["dataset"], s["state"], f"{s.get('pages_done', '?')}/{s.get('pages_total', '?')}",
                  s.get("run") or "", f"{age:.0f}s ago", s.get("reason") or "")
    console.print(t)
