"""The sweep: notices datasets that stopped moving and moves them on.

A chord trigger can be lost (a worker killed with its messages unacknowledged,
which Redis hands back only after the visibility timeout; a Redis hiccup in the
chord counter). Every worker runs the sweep in a background thread; a lease makes
one of them sweep at a time. For each active dataset with no progress for
ATSCALE_STALL_SECONDS it re-sends what is missing (every task is idempotent):

- collecting, no plan yet: the searches (their responses are cached);
- collecting, plan known: the pages without a shard; finalize when none is missing;
- finalizing: finalize again;
- training: the training, when no worker holds its lease (it resumes).

A dataset swept ATSCALE_MAX_DELIVERIES times without any progress is marked failed.
"""
from __future__ import annotations

import logging
import threading
import time

from celery.signals import worker_ready, worker_shutting_down

from tasks import pipeline as p
from workers import coordination as co
from workers.settings import get_settings
from workers.status import FINAL_STATES, mark_failed, read_status, set_status

log = logging.getLogger(__name__)


def last_progress(dataset: str, status: dict) -> float:
    raw = p.get_redis().get(f"{co.PREFIX}progress:{dataset}")
    return max(float(raw or 0), float(status.get("updated_at") or 0))


def sweep_dataset(dataset: str, now: float | None = None) -> str | None:
    """Look at one dataset; re-send what it waits for. Returns what was done, or None."""
    s = get_settings()
    store, r = p.get_store(), p.get_redis()
    status = read_status(store, dataset)
    if status is None or status.get("state") in FINAL_STATES:
        r.srem(p.ACTIVE, dataset)
        return None
    now = now or time.time()
    idle = now - last_progress(dataset, status)
    if idle < s.stall_seconds:
        return None
    sweeps = int(status.get("sweeps") or 0) + 1
    if sweeps > s.max_deliveries:
        mark_failed(store, dataset, f"no progress after {sweeps - 1} attempts to move it on "
                                    f"({status['state']}, idle {idle:.0f}s)")
        r.srem(p.ACTIVE, dataset)
        return "failed"
    state = status["state"]
    action = None
    if state == "collecting":
        plan = store.get_json_or(p.plan_key(dataset))
        if plan is None:
            req = p.parse_request(store.get_json(p.request_key(dataset)))
            p.start_search(dataset, req.queries)
            action = f"re-sent {len(req.queries)} searches"
        else:
            shards = set(store.list(f"datasets/{dataset}/pages/"))
            missing = [pg for pg in plan["pages"]
                       if p.shard_key(dataset, pg["label"], pg["ijn"]) not in shards]
            for pg in missing:
                p.page_signature(pg).apply_async()
            if not missing:
                co.release_claim(r, f"finalized:{dataset}")
                p.finalize_dataset.apply_async(args=[dataset], task_id=f"finalize-{dataset}")
                action = "all pages stored; finalize re-sent"
            else:
                action = f"re-sent {len(missing)} page(s) without a shard"
    elif state == "finalizing":
        co.release_claim(r, f"finalized:{dataset}")
        p.finalize_dataset.apply_async(args=[dataset], task_id=f"finalize-{dataset}")
        action = "finalize re-sent"
    elif state == "training":
        run = status.get("run")
        if run and not co.lease_alive(r, f"train:{run}"):
            record = store.get_json_or(p.run_key(run, "record.json")) or {}
            if record.get("status") in ("trained", "evaluated"):
                p.finish_dataset(dataset, run, record.get("val_accuracy"))
                action = "run already trained; dataset finished"
            else:
                req = p.parse_request(store.get_json(p.request_key(dataset)))
                p.send_training(dataset, run, req.spec.model_dump())
                action = "training re-sent (no worker holds it)"
        else:
            return None  # a worker is training it: progress is the lease
    if action:
        log.warning("sweep: dataset %s idle %.0fs in %s: %s", dataset, idle, state, action)
        set_status(store, dataset, state, sweeps=sweeps, swept=action)
        p.touch_progress(dataset)
    return action


def sweep_once() -> dict:
    """Sweep every active dataset once (if no other worker is sweeping now)."""
    s = get_settings()
    r = p.get_redis()
    lease = co.Lease(r, "sweeper", ttl=max(5, int(s.sweep_interval)))
    if not lease.acquire():
        return {}
    try:
        out = {}
        for raw in r.smembers(p.ACTIVE):
            dataset = raw.decode()
            try:
                action = sweep_dataset(dataset)
            except Exception as exc:  # one broken dataset must not stop the sweep of the others
                log.exception("sweep of %s failed", dataset)
                action = f"error: {exc}"
            if action:
                out[dataset] = action
        return out
    finally:
        lease.release()


class Sweeper(threading.Thread):
    def __init__(self, interval: float):
        super().__init__(daemon=True, name="atscale-sweeper")
        self.interval = interval
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                sweep_once()
            except Exception:  # Redis or the store away: the next tick tries again
                log.warning("sweep skipped", exc_info=True)


_sweeper: Sweeper | None = None


@worker_ready.connect
def start_sweeper(sender=None, **_kw) -> None:
    global _sweeper
    _sweeper = Sweeper(get_settings().sweep_interval)
    _sweeper.start()


@worker_shutting_down.connect
def stop_sweeper(**_kw) -> None:
    if _sweeper:
        _sweeper.stopped.set()
