"""Failpoints: named places where a test can make a worker fail on purpose.

Off unless the worker's environment names them: ATSCALE_FAILPOINTS="crash_page:pug,raise_page:beagle".
`crash_*` ends the worker process at once (as the OOM killer would); `raise_*` raises.
Used by the fault tests to make a poison task; never set in production.
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def failpoint(name: str, key: str) -> None:
    spec = os.environ.get("ATSCALE_FAILPOINTS")
    if not spec:
        return
    for item in spec.split(","):
        point, _, target = item.strip().partition(":")
        if point == name and target == key:
            log.error("failpoint %s hit for %s", name, key)
            if name.startswith("crash"):
                os._exit(70)
            raise RuntimeError(f"failpoint {name} hit for {key}")
