"""A dataset's status record in the store: pending, collecting, finalizing,
training, done, partial or failed (with the reason in words)."""
from __future__ import annotations

import time

from workers.store import ObjectStore, retrying

STATES = ("pending", "collecting", "finalizing", "training", "done", "partial", "failed")
FINAL_STATES = ("done", "partial", "failed")


def status_key(dataset: str) -> str:
    return f"datasets/{dataset}/status.json"


def read_status(store: ObjectStore, dataset: str) -> dict | None:
    return store.get_json_or(status_key(dataset))


def set_status(store: ObjectStore, dataset: str, state: str, **fields) -> dict:
    if state not in STATES:
        raise ValueError(f"unknown state {state!r}")
    record = read_status(store, dataset) or {"dataset": dataset, "created_at": time.time()}
    record.update(fields)
    record["state"] = state
    record["updated_at"] = time.time()
    history = record.setdefault("history", [])
    history.append({"state": state, "at": record["updated_at"], **({"reason": fields["reason"]} if "reason" in fields else {})})
    retrying(store.put_json, status_key(dataset), record)
    return record


def mark_failed(store: ObjectStore, dataset: str, reason: str) -> dict:
    return set_status(store, dataset, "failed", reason=reason)


def pages_done(store: ObjectStore, dataset: str) -> int:
    return len([k for k in store.list(f"datasets/{dataset}/pages/") if k.endswith(".jsonl")])
