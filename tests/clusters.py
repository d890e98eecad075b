"""Building real one-machine clusters for the integration tests."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tasks.embedded import ROOT, Cluster
from workers.store import LocalStore

SECRET = "sk-test-3f9d1c7a-never-shown"


def base_env(work: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "SERPAPI_", "ATSCALE_", "AWS_"))}
    env.update(ATSCALE_STORE=str(work / "store"), ATSCALE_CACHE_DIR=str(work / "cache"),
               ATSCALE_ALLOWED_NETWORKS="127.0.0.0/8", ATSCALE_DOWNLOAD_THREADS="16")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def start(work: Path, *, api_key: str = SECRET, image_delay: float = 0.0, download_workers=("download",),
          appendonly: bool = False, replay_key: str | None = None, **env) -> Cluster:
    c = Cluster(work, base_env(work, **env))
    try:
        c.start_redis(appendonly=appendonly)
        c.start_replay(api_key=replay_key or api_key, image_delay=image_delay, verbose=True)
        c.env["SERPAPI_API_KEY"] = api_key
        for name in download_workers:
            c.start_worker(name, "search,download", concurrency=2)
        c.start_worker("gpu", "gpu", concurrency=1, pool="threads")
        c.wait_workers([*download_workers, "gpu"], timeout=120)
    except BaseException:
        c.stop()  # nothing started here outlives a failed start
        raise
    c.store = LocalStore(work / "store") if not c.env["ATSCALE_STORE"].startswith("s3://") else None
    return c


def celery_call(cluster: Cluster, kwargs: dict) -> str:
    out = subprocess.run([sys.executable, "-m", "celery", "-A", "tasks", "call", "collect_breeds",
                          "--kwargs", json.dumps(kwargs)], cwd=ROOT, env=cluster.env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def wait_state(store, dataset: str, timeout: float = 400, states=("done", "partial", "failed")) -> dict:
    end = time.time() + timeout
    st = {}
    while time.time() < end:
        st = store.get_json_or(f"datasets/{dataset}/status.json") or {}
        if st.get("state") in states:
            return st
        time.sleep(0.5)
    raise AssertionError(f"dataset {dataset} still {st.get('state')} after {timeout}s: {st}")


def wait_for(predicate, timeout: float = 120, what: str = "condition"):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")
