"""Cluster-wide coordination through Redis: leases (a lock that expires unless its
holder keeps renewing it), a page latch (set of finished pages), and delivery counters.

These make the pipeline idempotent under redelivery: exactly one training run per
dataset version, a dataset that finishes even when its chord trigger never came,
and a cap on how often one task may be delivered.
"""
from __future__ import annotations

import threading
import time
import uuid
from functools import lru_cache

import redis

PREFIX = "atscale:"
DAY = 24 * 3600


@lru_cache(maxsize=4)
def client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5, health_check_interval=30,
                                retry_on_timeout=True)


def redis_retry(fn, *args, timeout: float = 120.0, **kw):
    """Call a Redis operation, waiting (backoff, up to `timeout` s) while Redis is away:
    a restart must delay the work, not fail it."""
    delay, end = 0.2, time.monotonic() + timeout
    while True:
        try:
            return fn(*args, **kw)
        except (redis.ConnectionError, redis.TimeoutError):
            if time.monotonic() > end:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


class Lease:
    """`SET key owner NX EX ttl`, renewed every ttl/3 by a daemon thread while held.
    If the holder dies, the lease expires after `ttl` seconds and another may take it."""

    _RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('expire', KEYS[1], ARGV[2]) end return 0"
    _RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"

    def __init__(self, r: redis.Redis, name: str, ttl: int = 60):
        self.r, self.key, self.ttl = r, PREFIX + "lease:" + name, ttl
        self.owner = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> bool:
        if not redis_retry(self.r.set, self.key, self.owner, nx=True, ex=self.ttl):
            return False
        self._thread = threading.Thread(target=self._renew, daemon=True, name=f"lease-{self.key}")
        self._thread.start()
        return True

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                if not self.r.eval(self._RENEW, 1, self.key, self.owner, self.ttl):
                    return  # lost it (expired while Redis was away): the holder finishes, no one else re-runs
            except redis.RedisError:
                continue  # Redis restarting: try again at the next tick

    def release(self) -> None:
        self._stop.set()
        try:
            self.r.eval(self._RELEASE, 1, self.key, self.owner)
        except redis.RedisError:
            pass  # expires by itself after ttl; nothing is lost

    def held_by_anyone(self) -> bool:
        return bool(self.r.exists(self.key))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def lease_alive(r: redis.Redis, name: str) -> bool:
    return bool(redis_retry(r.exists, PREFIX + "lease:" + name))


def mark_page_done(r: redis.Redis, dataset: str, page_id: str) -> int:
    """Record a finished page (idempotent); returns how many distinct pages are done."""
    key = f"{PREFIX}pages-done:{dataset}"

    def run():
        pipe = r.pipeline()
        pipe.sadd(key, page_id)
        pipe.expire(key, 30 * DAY)
        pipe.scard(key)
        return pipe.execute()[2]

    return redis_retry(run)


def count_delivery(r: redis.Redis, task_id: str) -> int:
    """How many times this task id has started (redeliveries and re-sends included)."""
    key = f"{PREFIX}deliveries:{task_id}"

    def run():
        pipe = r.pipeline()
        pipe.incr(key)
        pipe.expire(key, 7 * DAY)
        return pipe.execute()[0]

    return redis_retry(run)


def claim_once(r: redis.Redis, name: str, value: str = "1", ttl: int = 30 * DAY) -> bool:
    """True the first time `name` is claimed, False afterwards."""
    return bool(redis_retry(r.set, PREFIX + "once:" + name, value, nx=True, ex=ttl))


def release_claim(r: redis.Redis, name: str) -> None:
    redis_retry(r.delete, PREFIX + "once:" + name)
