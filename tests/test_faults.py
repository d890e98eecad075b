"""Faults, each injected for real into a running one-machine cluster: a worker killed
with SIGKILL, Redis restarted, the S3 endpoint unreachable, SerpApi answering errors,
a page task raising. Each run must end correctly or stop with a reason in words."""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.clusters import SECRET, celery_call, start, wait_for, wait_state
from workers.replay import expected_counts

pytestmark = pytest.mark.integration
TINY = {"epochs": 1, "image_size": 32, "batch_size": 32, "num_workers": 0}


def expected_class_size(query: str, pages: int) -> int:
    return sum(expected_counts(query, p)["store"] for p in range(pages))


def assert_complete(store, dataset: str, queries: list[str], pages: int) -> dict:
    """Every image stored once, every page once, training once."""
    report = store.get_json(f"datasets/{dataset}/report.json")
    from workers.names import slugify

    for q in queries:
        assert report["classes"][slugify(q)] == expected_class_size(q, pages), q
    manifest = store.get_jsonl(f"datasets/{dataset}/manifest.jsonl")
    assert len({m["sha256"] for m in manifest}) == len(manifest) == report["images"]
    shards = [k for k in store.list(f"datasets/{dataset}/pages/") if k.endswith(".jsonl")]
    assert len(shards) == len(queries) * pages
    for key in shards:
        rows = store.get_jsonl(key)
        assert len(rows) == 50 and len({r["position"] for r in rows}) == 50, key
    return report


def record_outcome(fault: str, store, dataset: str, **extra) -> None:
    """Write what a fault run ended with to test-artifacts/faults.json (for the record)."""
    import json

    st = store.get_json(f"datasets/{dataset}/status.json")
    rep = store.get_json_or(f"datasets/{dataset}/report.json") or {}
    out = {"fault": fault, "state": st["state"], "reason": st.get("reason"), "images": rep.get("images"),
           "duplicates_removed": rep.get("duplicates_removed"), "rejected": rep.get("rejected"),
           "swept": st.get("swept"), **extra}
    if st.get("run"):
        out["training_attempts"] = len(store.get_json_or(f"runs/{st['run']}/attempts.json") or [])
    path = Path(__file__).resolve().parent.parent / "test-artifacts" / "faults.json"
    path.parent.mkdir(exist_ok=True)
    rows = json.loads(path.read_text()) if path.exists() else []
    rows = [r for r in rows if r["fault"] != fault] + [out]
    path.write_text(json.dumps(rows, indent=2))
    print(out)


def training_attempts(store, dataset: str) -> list:
    run = store.get_json(f"datasets/{dataset}/status.json")["run"]
    assert store.get_json(f"runs/{run}/record.json")["status"] == "trained"
    return store.get_json(f"runs/{run}/attempts.json")


def test_serpapi_errors_and_a_raising_page(tmp_path):
    """One cluster, five datasets at once, each meeting another SerpApi answer."""
    c = start(tmp_path)
    try:
        runs = {
            "rate-limited": ["Pug zz429once", "Beagle zz429once"],     # 429 then success
            "server-errors": ["Pug zz500page", "Beagle"],              # 500s on Pug's page
            "empty-class": ["Pug", "zznoresults Whippet", "Beagle"],   # "hasn't returned any results"
            "bad-json": ["Pug zzbadjson", "Beagle"],                   # malformed JSON on Pug's page
            "raising-page": ["Pug zzbadposition", "Beagle"],           # page task raises ValueError
        }
        for name, queries in runs.items():
            celery_call(c, {"queries": queries, "pages": 1, "dataset": name, "train": False})
        st = {name: wait_state(c.store, name, timeout=300) for name in runs}

        # 429: waited and retried, then the dataset completes with every image
        assert st["rate-limited"]["state"] == "done"
        assert_complete(c.store, "rate-limited", runs["rate-limited"], 1)

        # 500s: retried, then that page is reported failed; the rest completes
        assert st["server-errors"]["state"] == "partial"
        rep = c.store.get_json("datasets/server-errors/report.json")
        (failed,) = rep["pages"]["failed"]
        assert (failed["label"], failed["reason"], failed["status"]) == ("pug-zz500page", "server_error", 500)
        # (with Pug empty, the placeholder image Beagle shares with other classes is seen in one class only)
        beagle = expected_class_size("Beagle", 1) + expected_counts("Beagle", 0)["cross_duplicate"]
        assert rep["classes"] == {"pug-zz500page": 0, "beagle": beagle}

        # no results: asked twice, then the class is reported empty; the others complete
        assert st["empty-class"]["state"] == "done"
        rep = c.store.get_json("datasets/empty-class/report.json")
        assert rep["empty_classes"] == ["zznoresults-whippet"]
        assert "asked twice" in rep["search_notes"]["zznoresults-whippet"]
        assert rep["classes"]["pug"] == expected_class_size("Pug", 1)

        # malformed JSON: a clear reason on the failed page
        assert st["bad-json"]["state"] == "partial"
        (failed,) = c.store.get_json("datasets/bad-json/report.json")["pages"]["failed"]
        assert failed["reason"] == "bad_response" and "not JSON" in failed["message"]

        # an unexpected exception in a page task: the dataset fails with its message
        assert st["raising-page"]["state"] == "failed"
        assert "download_page failed: ValueError" in st["raising-page"]["reason"]
        assert "first" in st["raising-page"]["reason"]

        # the cluster kept working: a new dataset after all that still completes
        celery_call(c, {"queries": ["Boston Terrier", "Boykin Spaniel"], "pages": 1, "dataset": "after",
                        "train": False})
        assert wait_state(c.store, "after")["state"] == "done"
        for name, fault in (("rate-limited", "SerpApi 429 then success"), ("server-errors", "SerpApi 500s on a page"),
                            ("empty-class", "SerpApi no-results body"), ("bad-json", "SerpApi malformed JSON"),
                            ("raising-page", "page task raises ValueError")):
            record_outcome(fault, c.store, name)
    finally:
        c.stop()


def test_invalid_key_fails_the_dataset_at_once_without_a_retry_storm(tmp_path):
    c = start(tmp_path, api_key="wrong-key-123", replay_key=SECRET)
    try:
        celery_call(c, {"pages": 2, "dataset": "bad-key"})
        st = wait_state(c.store, "bad-key", timeout=120)
        assert st["state"] == "failed"
        assert st["reason"].startswith("atscale.resolve_query failed: SerpApi refused the API key (HTTP 401): "
                                       "Invalid API key. Your API key should be here: "
                                       "https://serpapi.com/manage-api-key")
        assert "wrong-key-123" not in st["reason"]
        time.sleep(2)  # anything still in flight would reach the replay service now
        searches = (tmp_path / "replay.log").read_text().count("/search.json")
        assert searches == 9  # one per query (9 default breeds), none retried, no page fetched
        assert c.store.list("datasets/bad-key/pages/") == []
        record_outcome("SerpApi 401 invalid key", c.store, "bad-key", searches_sent=searches)
    finally:
        c.stop()


def test_same_dataset_called_twice_at_once_trains_once(tmp_path):
    c = start(tmp_path)
    try:
        kwargs = {"queries": ["Alaskan Malamute", "Toy Fox Terrier"], "pages": 1, "dataset": "twice", "spec": TINY}
        threads = [threading.Thread(target=celery_call, args=(c, kwargs)) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert wait_state(c.store, "twice")["state"] == "done"
        assert_complete(c.store, "twice", kwargs["queries"], 1)
        celery_call(c, kwargs)  # and once more after it is done: nothing new happens
        time.sleep(3)
        assert len(training_attempts(c.store, "twice")) == 1
        record_outcome("collect_breeds called twice at once + once after", c.store, "twice")
        first_run = c.store.get_json("datasets/twice/status.json")["run"]
        celery_call(c, {**kwargs, "spec": {**TINY, "epochs": 2}})  # another spec: one more run, no re-collection
        wait_for(lambda: c.store.get_json("datasets/twice/status.json")["run"] != first_run, what="the second run")
        st = wait_state(c.store, "twice")
        assert st["state"] == "done" and st["run"] != first_run
        assert len(training_attempts(c.store, "twice")) == 1
        assert c.store.get_json(f"runs/{st['run']}/metrics.json")["epochs"] == 2
        assert len(c.store.list("serpapi-cache/")) == 4  # nothing searched again
        assert c.store.get_json("datasets/twice/status.json")["state"] == "done"
    finally:
        c.stop()


def test_download_worker_killed_mid_run(tmp_path):
    """SIGKILL to a whole download worker (main process and pool) while it holds pages:
    its messages stay unacknowledged in Redis; the sweep re-sends the missing pages."""
    c = start(tmp_path, image_delay=0.2, download_workers=("dl-a", "dl-b"), ATSCALE_DOWNLOAD_THREADS=4,
              ATSCALE_STALL_SECONDS=6, ATSCALE_SWEEP_INTERVAL=1)
    try:
        queries = ["Alaskan Malamute", "Boston Terrier", "Boykin Spaniel"]
        celery_call(c, {"queries": queries, "pages": 3, "dataset": "killed", "spec": TINY})
        wait_for(lambda: len(c.store.list("datasets/killed/pages/")) >= 1, what="a first page")
        before = len(c.store.list("datasets/killed/pages/"))
        c.kill("dl-a", signal.SIGKILL)
        assert before < 9
        st = wait_state(c.store, "killed", timeout=300)
        assert st["state"] == "done", st.get("reason")
        assert_complete(c.store, "killed", queries, 3)
        assert len(training_attempts(c.store, "killed")) == 1
        record_outcome("download worker SIGKILL mid-run", c.store, "killed", pages_done_at_kill=before)
        assert "re-sent" in st["swept"]  # the sweep moved on the pages the dead worker held
    finally:
        c.stop()


def test_redis_restarted_mid_run(tmp_path):
    c = start(tmp_path, image_delay=0.1, appendonly=True, ATSCALE_DOWNLOAD_THREADS=4,
              ATSCALE_STALL_SECONDS=10, ATSCALE_SWEEP_INTERVAL=2)
    try:
        queries = ["American Eskimo Dog", "Australian Shepherd"]
        celery_call(c, {"queries": queries, "pages": 3, "dataset": "restart", "spec": TINY})
        wait_for(lambda: len(c.store.list("datasets/restart/pages/")) >= 1, what="a first page")
        c.restart_redis(down_seconds=3)
        st = wait_state(c.store, "restart", timeout=300)
        assert st["state"] == "done", st.get("reason")
        assert_complete(c.store, "restart", queries, 3)
        assert len(training_attempts(c.store, "restart")) == 1
        record_outcome("Redis restarted mid-run (AOF)", c.store, "restart")
    finally:
        c.stop()


class TcpGate:
    """A TCP forwarder on 127.0.0.1 that can be closed (connections refused and cut)
    and opened again on the same port: an S3 endpoint that goes away and comes back."""

    def __init__(self, target_port: int):
        from tasks.embedded import free_port

        self.target = target_port
        self.port = free_port()
        self.conns: list[socket.socket] = []
        self.listener = None
        self.open()

    def open(self):
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", self.port))
        self.listener.listen(128)
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def close(self):
        self.listener.close()
        for s in self.conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        self.conns.clear()

    def _accept(self, listener):
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a, b):
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.close()
                except OSError:
                    pass


def test_s3_endpoint_unreachable_for_20s(tmp_path, monkeypatch):
    from tasks.embedded import free_port, wait_port

    for k, v in dict(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1").items():
        monkeypatch.setenv(k, v)
    moto_port = free_port()
    moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(moto_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port("127.0.0.1", moto_port)
        gate = TcpGate(moto_port)
        s3env = dict(ATSCALE_STORE="s3://faults/atscale", AWS_ENDPOINT_URL_S3=f"http://127.0.0.1:{gate.port}",
                     AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
        c = start(tmp_path, image_delay=0.1, ATSCALE_DOWNLOAD_THREADS=4, ATSCALE_STALL_SECONDS=60, **s3env)
        try:
            from workers.store import S3Store

            c.store = S3Store("faults", "atscale", endpoint_url=f"http://127.0.0.1:{moto_port}")  # the test's view
            queries = ["Catahoula Leopard Dog", "Chesapeake Bay Retriever"]
            celery_call(c, {"queries": queries, "pages": 3, "dataset": "s3-outage", "spec": TINY})
            wait_for(lambda: len(c.store.list("datasets/s3-outage/pages/")) >= 1, what="a first page")
            gate.close()
            time.sleep(20)
            down_pages = len(c.store.list("datasets/s3-outage/pages/"))
            gate.open()
            st = wait_state(c.store, "s3-outage", timeout=400)
            assert st["state"] == "done", st.get("reason")
            assert down_pages < 6  # the outage really hit the run
            assert_complete(c.store, "s3-outage", queries, 3)
            assert len(training_attempts(c.store, "s3-outage")) == 1
            record_outcome("S3 endpoint unreachable 20 s", c.store, "s3-outage", pages_done_during_outage=down_pages)
        finally:
            gate.close()
            c.stop()
    finally:
        moto.terminate()
        moto.wait(10)


def test_poison_page_is_stopped_after_the_delivery_cap(tmp_path):
    """A page whose task kills its worker process every time (as an OOM would): with late
    ack and reject-on-worker-lost it comes back each time, until the cap stops it; the
    page is reported failed and the rest of the dataset completes."""
    c = start(tmp_path, ATSCALE_FAILPOINTS="crash_page:pug", ATSCALE_MAX_DELIVERIES=3)
    try:
        celery_call(c, {"queries": ["Pug", "Beagle", "Whippet"], "pages": 1, "dataset": "poison", "spec": TINY})
        st = wait_state(c.store, "poison", timeout=300)
        assert st["state"] == "partial", st.get("reason")
        rep = c.store.get_json("datasets/poison/report.json")
        (failed,) = rep["pages"]["failed"]
        assert failed["label"] == "pug" and failed["reason"] == "poison"
        assert "delivered 4 times" in failed["message"]
        assert rep["classes"]["pug"] == 0 and rep["classes"]["beagle"] == expected_class_size("Beagle", 1)
        log = (tmp_path / "download.log").read_text()
        assert log.count("failpoint crash_page hit for pug") == 3  # ran 3 times, then was stopped
        assert len(training_attempts(c.store, "poison")) == 1
        record_outcome("poison page (kills its worker)", c.store, "poison")
    finally:
        c.stop()
