"""atscale's Celery app and pipeline: `celery -A tasks worker`, `celery -A tasks call collect_breeds`.

``tasks.app`` is the Celery app of :mod:`tasks.celery`, imported on first use
(PEP 562): the ``atscale`` command line lives in this package too, and most of
its commands (``fetch``, ``train``, ``predict`` ...) never touch Celery, whose
import alone takes about half a second.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from celery import Celery

    app: Celery

__all__ = ["app"]


def __getattr__(name: str):
    if name == "app":
        from tasks.celery import app

        return app
    raise AttributeError(f"module 'tasks' has no attribute {name!r}")
