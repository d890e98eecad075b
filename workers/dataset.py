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


NEAR_DISTANCE = 4  # phash bits that may differ between two copies of one picture (resized, re-encoded)
JUNK_MIN_CLASSES = 4  # a picture found under this many classes or more is a placeholder, not a duplicate
MIN_PHASH_BITS = 2  # a perceptual hash with this few bits set is a flat image's: not compared


def _phash_int(value) -> int | None:
    """The 64-bit perceptual hash, or None when absent, malformed or uninformative.

    pHash sets the bits of the 8x8 lowest DCT coefficients that lie above their
    median, so a picture with any detail sets close to 32 of them; a flat
    (single-colour) image sets at most one (``8000000000000000`` for any
    colour, all zeros for black).  Such a hash says nothing about content and
    is never used to call two images alike.
    """
    if not isinstance(value, str) or len(value) != 16:
        return None
    try:
        h = int(value, 16)
    except ValueError:
        return None
    return None if h.bit_count() <= MIN_PHASH_BITS else h


def near_pairs(hashes: list[int | None], max_distance: int = NEAR_DISTANCE) -> list[tuple[int, int]]:
    """Index pairs (i < j) whose hashes differ in at most ``max_distance`` bits.

    Vectorised in tiles (numpy popcount of XORs): well under a second for
    10,000 images, some seconds for 100,000; memory bounded by the tile size.
    """
    import numpy as np

    idx = np.array([i for i, h in enumerate(hashes) if h is not None], dtype=np.int64)
    if len(idx) < 2:
        return []
    vals = np.array([hashes[i] for i in idx], dtype=np.uint64)
    pairs: list[tuple[int, int]] = []
    block = 2048  # tiles of block x block distances (32 MB)
    for r0 in range(0, len(vals), block):
        rows_v = vals[r0:r0 + block]
        for c0 in range(r0, len(vals), block):
            dist = np.bitwise_count(rows_v[:, None] ^ vals[None, c0:c0 + block])
            rr, cc = np.nonzero(dist <= max_distance)
            for r, c in zip((rr + r0).tolist(), (cc + c0).tolist()):
                if c > r:
                    pairs.append((int(idx[r]), int(idx[c])))
    return pairs


def build_manifest(rows: list[dict], val_percent: int = 20, *, near_distance: int = NEAR_DISTANCE,
                   junk_min_classes: int = JUNK_MIN_CLASSES) -> tuple[list[dict], dict]:
    """Pure function: page rows in, (manifest rows, duplicate summary) out.

    Each stored row is judged once, in this order (rows sorted by class, page, position):

    - ``junk``: the same picture (same content hash, or a perceptual hash within
      ``near_distance`` bits) is found under ``junk_min_classes`` classes or more:
      a "photo unavailable" placeholder or a site logo; dropped everywhere;
    - ``cross_class``: the same content hash under two or more classes: dropped
      from all of them (we cannot tell which label is right);
    - ``within_class``: the same content hash again in one class: the first kept;
    - ``near_cross_class``: a perceptual near duplicate of an image of another
      class: both dropped;
    - ``near_within_class``: a perceptual near duplicate of an image already kept
      in the same class (resized, re-encoded or re-compressed copy): the first kept.

    Rows without a usable ``phash`` only take part in the exact (content hash) checks.
    """
    stored = sorted((r for r in rows if r.get("status") == "stored"),
                    key=lambda r: (r["label"], r["ijn"], r["position"]))
    labels_by_hash: dict[str, set[str]] = defaultdict(set)
    for r in stored:
        labels_by_hash[r["sha256"]].add(r["label"])
    cross = {h: sorted(ls) for h, ls in labels_by_hash.items() if len(ls) > 1}

    # perceptual neighbours, on one row per (class, content hash)
    firsts: dict[tuple[str, str], int] = {}
    for i, r in enumerate(stored):
        firsts.setdefault((r["label"], r["sha256"]), i)
    reps = sorted(firsts.values())
    rep_hashes = [_phash_int(stored[i].get("phash")) for i in reps]
    neighbours: dict[int, set[int]] = defaultdict(set)  # stored index -> near stored indexes (other content)
    for a, b in near_pairs(rep_hashes, near_distance):
        ia, ib = reps[a], reps[b]
        if stored[ia]["sha256"] != stored[ib]["sha256"]:
            neighbours[ia].add(ib)
            neighbours[ib].add(ia)

    def rep_of(i: int) -> int:
        r = stored[i]
        return firsts[(r["label"], r["sha256"])]

    # classes in which each picture (its own hash plus its near neighbours) turns up
    junk_groups: dict[str, set[str]] = {}
    junk_rows: set[int] = set()
    for i in reps:
        classes = set(labels_by_hash[stored[i]["sha256"]])
        classes.update(stored[j]["label"] for j in neighbours.get(i, ()))
        if len(classes) >= junk_min_classes:
            junk_rows.add(i)
            junk_groups.setdefault(stored[i]["sha256"], classes)

    manifest: list[dict] = []
    seen: set[tuple[str, str]] = set()
    kept_by_label: dict[str, set[int]] = defaultdict(set)
    counts = {"within_class": 0, "cross_class": 0, "near_within_class": 0, "near_cross_class": 0, "junk": 0}
    near_cross: dict[str, set[str]] = defaultdict(set)
    near_within: list[dict] = []
    for i, r in enumerate(stored):
        rep = rep_of(i)
        near = neighbours.get(rep, set())
        if rep in junk_rows:
            counts["junk"] += 1
            continue
        if r["sha256"] in cross:
            counts["cross_class"] += 1
            continue
        if (r["label"], r["sha256"]) in seen:
            counts["within_class"] += 1
            continue
        seen.add((r["label"], r["sha256"]))
        others = {stored[j]["label"] for j in near if stored[j]["label"] != r["label"]}
        if others:
            counts["near_cross_class"] += 1
            near_cross[r["sha256"]].update(others | {r["label"]})
            continue
        twin = next((j for j in sorted(near) if j in kept_by_label[r["label"]]), None)
        if twin is not None:
            counts["near_within_class"] += 1
            near_within.append({"sha256": r["sha256"], "kept": stored[twin]["sha256"], "label": r["label"]})
            continue
        kept_by_label[r["label"]].add(rep)
        manifest.append({"key": r["key"], "label": r["label"], "sha256": r["sha256"], "url": r["url"],
                         "width": r["width"], "height": r["height"], "phash": r.get("phash"),
                         "split": split_of(r["sha256"], val_percent)})
    summary = {
        **counts,
        "cross_class_images": [{"sha256": h, "labels": ls} for h, ls in sorted(cross.items())
                               if not any(i in junk_rows for i in (firsts.get((lb, h)) for lb in ls))],
        "near_cross_class_images": [{"sha256": h, "labels": sorted(ls)} for h, ls in sorted(near_cross.items())],
        "near_within_class_images": near_within,
        "junk_images": [{"sha256": h, "labels": sorted(ls)} for h, ls in sorted(junk_groups.items())],
        "near_distance": near_distance,
        "junk_min_classes": junk_min_classes,
    }
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
        "duplicates_removed": sum(dups[k] for k in ("within_class", "cross_class", "near_within_class",
                                                     "near_cross_class", "junk")),
        "duplicates": dups,
        "pages": {"expected": pages_expected, "with_shard": len(shards),
                  "failed": page_failures or []},
        "empty_classes": [lb for lb in labels if classes.get(lb, 0) == 0],
        "search_notes": search_notes or {},
        "val_percent": val_percent,
    }
    retrying(store.put_json, report_key(dataset), report)
    return report
