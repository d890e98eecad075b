"""End to end against real parts: a Redis server, Celery worker processes (a
search+download worker and a gpu-queue worker), the replay service over HTTP, and
`celery -A tasks call collect_breeds` run as a user runs it."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from tasks.embedded import Cluster
from workers.replay import expected_counts
from workers.store import LocalStore

pytestmark = pytest.mark.integration

SECRET = "sk-test-3f9d1c7a-never-shown"
FLOWER_AUTH = "admin:flower-test-pw"
QUERIES = ["Alaskan Malamute", "Boykin Spaniel", "Toy Fox Terrier nodogchip"]
SPEC = {"epochs": 3, "image_size": 48, "batch_size": 16, "num_workers": 0}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    work = tmp_path_factory.mktemp("cluster")
    env = {k: v for k, v in __import__("os").environ.items()
           if not k.startswith(("CELERY_", "SERPAPI_", "ATSCALE_", "AWS_"))}
    env.update(ATSCALE_STORE=str(work / "store"), ATSCALE_CACHE_DIR=str(work / "cache"),
               ATSCALE_ALLOWED_NETWORKS="127.0.0.0/8", ATSCALE_DOWNLOAD_THREADS="16")
    with Cluster(work, env) as c:
        c.start_redis()
        c.start_replay(api_key=SECRET)
        c.start_worker("download", "search,download", concurrency=2)
        c.start_worker("gpu", "gpu", concurrency=1, pool="threads")
        c.flower = c.start_flower(FLOWER_AUTH)
        c.wait_workers(["download", "gpu"], timeout=120)
        c.store = LocalStore(work / "store")
        yield c


def celery_call(cluster, kwargs: dict) -> str:
    out = subprocess.run([sys.executable, "-m", "celery", "-A", "tasks", "call", "collect_breeds",
                          "--kwargs", json.dumps(kwargs)], cwd=cluster.env["PYTHONPATH"].split(":")[0],
                         env=cluster.env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def wait_state(store, dataset: str, timeout: float = 400) -> dict:
    end = time.time() + timeout
    st = {}
    while time.time() < end:
        st = store.get_json_or(f"datasets/{dataset}/status.json") or {}
        if st.get("state") in ("done", "partial", "failed"):
            return st
        time.sleep(1)
    raise AssertionError(f"dataset {dataset} still {st.get('state')} after {timeout}s")


def test_collect_breeds_end_to_end(cluster):
    task_id = celery_call(cluster, {"queries": QUERIES, "pages": 2, "dataset": "e2e-dogs", "spec": SPEC})
    assert len(task_id) == 36  # celery call prints the task id
    st = wait_state(cluster.store, "e2e-dogs")
    assert st["state"] == "done", st.get("reason")
    store = cluster.store
    report = store.get_json("datasets/e2e-dogs/report.json")
    labels = ["alaskan-malamute", "boykin-spaniel", "toy-fox-terrier-nodogchip"]
    # every class holds exactly the catalog's distinct valid images
    for q, label in zip(QUERIES, labels):
        assert report["classes"][label] == sum(expected_counts(q, p)["store"] for p in (0, 1)), label
    bad = {k: sum(expected_counts(q, p)[k] for q in QUERIES for p in (0, 1)) for k in ("not_found", "html", "truncated")}
    assert report["rejected"] == {"http_error": bad["not_found"], "html": bad["html"], "truncated": bad["truncated"]}
    within = sum(expected_counts(q, p)["duplicate"] for q in QUERIES for p in (0, 1))
    cross = sum(expected_counts(q, p)["cross_duplicate"] for q in QUERIES for p in (0, 1))
    assert report["duplicates"]["within_class"] == within and report["duplicates"]["cross_class"] == cross
    assert report["duplicates_removed"] == within + cross
    assert len(report["duplicates"]["cross_class_images"]) == 1
    # the query without a "dog" suggestion was searched unfiltered, and the report says so
    assert list(report["search_notes"]) == ["toy-fox-terrier-nodogchip"]
    assert "searched unfiltered" in report["search_notes"]["toy-fox-terrier-nodogchip"]

    manifest = store.get_jsonl("datasets/e2e-dogs/manifest.jsonl")
    assert len(manifest) == report["images"] == sum(report["classes"].values())
    assert len({m["sha256"] for m in manifest}) == len(manifest)
    assert {m["key"] for m in manifest} <= set(store.list("datasets/e2e-dogs/images/"))
    assert {m["split"] for m in manifest} == {"train", "val"}

    # one search per query + one per page, each cached in the store
    assert len(store.list("serpapi-cache/")) == len(QUERIES) * 3

    metrics = store.get_json(f"runs/{st['run']}/metrics.json")
    assert metrics["epochs"] == 3 and len(metrics["per_epoch"]) == 3 and len(metrics["train_loss"]) == 3
    assert metrics["val_images"] == sum(m["split"] == "val" for m in manifest)
    assert metrics["train_images"] == sum(m["split"] == "train" for m in manifest)
    assert metrics["val_accuracy"] > 1.5 / 3  # far above chance even after 3 short epochs
    assert store.get_json(f"runs/{st['run']}/record.json")["status"] == "trained"
    assert store.exists(f"runs/{st['run']}/model.pt") and store.exists(f"runs/{st['run']}/curves.png")


def test_bad_arguments_fail_with_a_clear_message(cluster):
    from celery import Celery

    task_id = celery_call(cluster, {"pages": 0, "dataset": "../escape"})
    app = Celery(broker=cluster.env["CELERY_BROKER_URL"], backend=cluster.env["CELERY_RESULT_BACKEND"])
    res = app.AsyncResult(task_id)
    end = time.time() + 30
    while res.state == "PENDING" and time.time() < end:
        time.sleep(0.2)
    assert res.state == "FAILURE"
    msg = str(res.result)
    assert "invalid collect_breeds arguments" in msg and "pages" in msg and "dataset" in msg
    assert not Path(cluster.env["ATSCALE_STORE"]).parent.joinpath("escape").exists()


def test_the_api_key_never_leaves_the_workers(cluster):
    """After the run: not in worker logs, not in the result backend, not in the store."""
    if not cluster.store.exists("datasets/e2e-dogs/status.json"):
        pytest.skip(reason="needs test_collect_breeds_end_to_end to have run first (run the module, not this test alone)")
    for log in cluster.workdir.glob("*.log"):
        assert SECRET not in log.read_text(errors="replace"), log.name
    r = redis.Redis.from_url(cluster.env["CELERY_BROKER_URL"])
    for key in r.scan_iter():
        kind = r.type(key).decode()
        value = {"string": lambda: r.get(key), "list": lambda: b"".join(r.lrange(key, 0, -1)),
                 "hash": lambda: b"".join(k + v for k, v in r.hgetall(key).items()),
                 "set": lambda: b"".join(r.smembers(key)),
                 "zset": lambda: b"".join(r.zrange(key, 0, -1))}.get(kind, lambda: b"")()
        assert SECRET.encode() not in (value or b""), key
    for path in Path(cluster.env["ATSCALE_STORE"]).rglob("*"):
        if path.is_file() and path.suffix in (".json", ".jsonl"):
            assert SECRET not in path.read_text(), path


def test_flower_shows_the_run_but_not_the_key(cluster):
    import requests

    if not cluster.store.exists("datasets/e2e-dogs/status.json"):
        pytest.skip(reason="needs test_collect_breeds_end_to_end to have run first (run the module, not this test alone)")
    assert requests.get(cluster.flower + "/api/tasks", timeout=10).status_code == 401  # auth is on
    auth = tuple(FLOWER_AUTH.split(":"))
    tasks = requests.get(cluster.flower + "/api/tasks", auth=auth, timeout=10)
    assert tasks.status_code == 200
    names = [t.get("name") for t in tasks.json().values()]
    assert names.count("atscale.download_page") == 6 and names.count("atscale.train_dataset") == 1
    assert SECRET not in tasks.text
    workers = requests.get(cluster.flower + "/api/workers?refresh=1", auth=auth, timeout=30)
    assert {w.split("@")[0] for w in workers.json()} >= {"download", "gpu"}
    assert SECRET not in workers.text


def test_status_command_shows_the_dataset(cluster):
    if not cluster.store.exists("datasets/e2e-dogs/status.json"):
        pytest.skip(reason="needs test_collect_breeds_end_to_end to have run first (run the module, not this test alone)")
    atscale = [sys.executable, "-m", "tasks.cli"]
    one = subprocess.run([*atscale, "status", "e2e-dogs", "--json"], env=cluster.env, capture_output=True,
                         text=True, timeout=60, cwd=cluster.env["PYTHONPATH"].split(":")[0])
    assert one.returncode == 0, one.stderr
    st = json.loads(one.stdout)
    assert (st["dataset"], st["state"], st["pages_done"], st["pages_total"]) == ("e2e-dogs", "done", 6, 6)
    assert [h["state"] for h in st["history"]][-3:] == ["finalizing", "training", "done"]
    table = subprocess.run([*atscale, "status"], env=cluster.env, capture_output=True, text=True, timeout=60,
                           cwd=cluster.env["PYTHONPATH"].split(":")[0])
    assert "e2e-dogs" in table.stdout and "done" in table.stdout
    bad = subprocess.run([*atscale, "status", "../../etc"], env=cluster.env, capture_output=True, text=True,
                         timeout=60, cwd=cluster.env["PYTHONPATH"].split(":")[0])
    assert bad.returncode == 2 and "not a valid name" in bad.stdout
