"""Bounded concurrency for the download threads: at most N holders at once.

``threading.Semaphore`` is written in Python: every acquire and release runs a
``Condition`` (a lock, a list of waiter locks, a fresh lock per wait), and with
64 threads per process queueing for two decode slots that bookkeeping showed up
as a fifth of the time a worker holds the GIL (py-spy, 50 ms bench run).  A
:class:`queue.SimpleQueue` holding N tokens does the same job in C: ``get``
blocks with the GIL released until a token is there, ``put`` hands it to one
waiter.
"""
from __future__ import annotations

import queue
import threading
from contextlib import contextmanager


class Slots:
    """At most ``limit`` holders at once (``with slots: ...``); the others wait."""

    __slots__ = ("limit", "_tokens")

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError("a slot limit must be at least 1")
        self.limit = int(limit)
        self._tokens: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(self.limit):
            self._tokens.put(None)

    def __enter__(self) -> "Slots":
        self._tokens.get()
        return self

    def __exit__(self, *exc) -> None:
        self._tokens.put(None)

    def free(self) -> int:
        """Slots nobody holds right now (a snapshot)."""
        return self._tokens.qsize()


class HostSlots:
    """At most ``limit`` holders per key (a host) at once; threads beyond that wait.

    Entries exist only while someone holds or waits for a slot, so memory does
    not grow with the number of distinct hosts seen.
    """

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError("per-host limit must be at least 1")
        self.limit = int(limit)
        self._lock = threading.Lock()
        self._slots: dict[str, list] = {}  # key -> [Slots, holders + waiters]

    @contextmanager
    def hold(self, key: str):
        with self._lock:
            entry = self._slots.get(key)
            if entry is None:
                entry = self._slots[key] = [Slots(self.limit), 0]
            entry[1] += 1
        try:
            with entry[0]:
                yield
        finally:
            with self._lock:
                entry[1] -= 1
                if entry[1] == 0:
                    del self._slots[key]

    def active_keys(self) -> int:
        with self._lock:
            return len(self._slots)
