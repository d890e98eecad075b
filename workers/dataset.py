"""Finalize a dataset: merge the page shards, drop duplicates, assign a
deterministic train/validation split from the content hash, write the manifest
and the report."""
from __future__ import annotations

import time
from collections import Counter, defaultdict

from workers.store import ObjectStore, retrying


def manifest_key(dataset: str) -> str:
    return f"datasets/{dataset}/manifest.jsonl"


def report_key(dataset: str) -> str:
    return f"datasets/{dataset}/report.json"


def split_of(sha256: str, val_percent: int) -> str:
    """Deterministic split from the content hash: the same image is always on the same side."""
    return "val" if int(sha256[:8], 16) % 100 < val_percent else "train"


def read_shards(store: ObjectStore, dataset: str) -> list[dict]:
    rows: list[dict] = []
    for key in store.list(f"datasets/{dataset}/pages/"):
        if key.endswith(".jsonl"):
            rows.extend(retrying(store.get_jsonl, key))
    return rows


def build_manifest(rows: list[dict], val_percent: int = 20) -> tuple[list[dict], dict]:
    """Pure function: page rows in, (manifest rows, duplicate summary) out.

    - exact duplicates within a class: the first (lowest page, position) is kept;
    - an image stored under two or more classes is dropped from all of them.
    """
    stored = sorted((r for r in rows if r.get("status") == "stored"),
                    key=lambda r: (r["label"], r["ijn"], r["position"]))
    labels_by_hash: dict[str, set[str]] = defaultdict(set)
    for r in stored:
        labels_by_hash[r["sha256"]].add(r["label"])
    cross = {h: sorted(ls) for h, ls in labels_by_hash.items() if len(ls) > 1}

    manifest, seen = [], set()
    within = 0
    cross_rows = 0
    for r in stored:
        if r["sha256"] in cross:
            cross_rows += 1
            continue
        if (r["label"], r["sha256"]) in seen:
            within += 1
            continue
        seen.add((r["label"], r["sha256"]))
        manifest.append({"key": r["key"], "label": r["label"], "sha256": r["sha256"], "url": r["url"],
                         "width": r["width"], "height": r["height"], "phash": r.get("phash"),
                         "split": split_of(r["sha256"], val_percent)})
    summary = {"within_class": within, "cross_class": cross_rows,
               "cross_class_images": [{"sha256": h, "labels": ls} for h, ls in sorted(cross.items())]}
    return manifest, summary


def finalize(store: ObjectStore, dataset: str, *, labels: list[str], pages_expected: int,
             val_percent: int = 20, search_notes: dict | None = None, page_failures: list | None = None) -> dict:
    rows = read_shards(store, dataset)
    manifest, dups = build_manifest(rows, val_percent)
    retrying(store.put_jsonl, manifest_key(dataset), manifest)

    classes = Counter(m["label"] for m in manifest)
    split = {lb: dict(Counter(m["split"] for m in manifest if m["label"] == lb)) for lb in labels}
    rejected = Counter(r["reason"] for r in rows if r.get("status") == "rejected")
    rejected_by_class: dict[str, dict] = {}
    for lb in labels:
        c = Counter(r["reason"] for r in rows if r.get("status") == "rejected" and r["label"] == lb)
        rejected_by_class[lb] = dict(c)
    shards = [k for k in store.list(f"datasets/{dataset}/pages/") if k.endswith(".jsonl")]
    report = {
        "dataset": dataset,
        "created_at": time.time(),
        "classes": {lb: classes.get(lb, 0) for lb in labels},
        "split": split,
        "images": len(manifest),
        "results_seen": len(rows),
        "rejected": dict(sorted(rejected.items())),
        "rejected_by_class": rejected_by_class,
        "duplicates_removed": dups["within_class"] + dups["cross_class"],
        "duplicates": dups,
        "pages": {"expected": pages_expected, "with_shard": len(shards),
                  "failed": page_failures or []},
        "empty_classes": [lb for lb in labels if classes.get(lb, 0) == 0],
        "search_notes": search_notes or {},
        "val_percent": val_percent,
    }
    retrying(store.put_json, report_key(dataset), report)
    return report
