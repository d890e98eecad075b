"""Scale out on real separate hosts, built on this machine with network namespaces
(tests/netns.py): a hub (Redis, moto's S3 server, the replay search service, Flower),
three download hosts, a GPU host and an operator host, each reaching the others only
by its namespace address and configured only by the environment variables a user sets.

1. Throughput grows with hosts: the same collection (12 pages of 50 images, each image
   answered after 0.4 s, 4 download threads and 1 page task per host) on 1, 2 and 3
   download hosts, added one by one while the cluster runs.
2. A host lost mid-run costs nothing: dl3's cable pulled, then its processes killed,
   while it holds a page; the run completes, every page once, no image lost or
   doubled, one training.
3. Everyone is visible: Flower, on the hub, seen in a real headless Chromium.

Needs root (namespaces); without it every test here is skipped, saying why. Prints
its figures (pytest -s) and writes them to test-artifacts/scale_out.json.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from tests import netns
from tests.flower_check import TASKS_INFO_JS, WORKER_METRICS_JS, WORKER_ROWS_JS, Chromium, chromium_path, \
    tasks_count, worker_table
from tests.test_faults import assert_complete, training_attempts

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
QUERIES = ["Alaskan Malamute", "Boston Terrier", "Boykin Spaniel", "Chesapeake Bay Retriever"]
PAGES = 3  # 4 queries x 3 pages = 12 page tasks of 50 images
IMAGE_DELAY = 0.4
TARGETS = {2: 1.8, 3: 2.5}  # images/s with n download hosts, over one host
TINY = {"model": [{"name": "Conv2d", "out_channels": 8, "kernel_size": 3, "stride": 2}, {"name": "ReLU"},
                  {"name": "AdaptiveAvgPool2d", "output_size": 1}, {"name": "Flatten"},
                  {"name": "Linear", "out_features": "n_labels"}],
        "epochs": 1, "image_size": 32, "batch_size": 64, "num_workers": 0}  # a tiny training: 1 epoch, 5 layers
LOSS_DATASET = "scale-loss"
CUT_HOST = "dl3"


def save(cluster, key: str, value) -> None:
    cluster.results[key] = value
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "scale_out.json").write_text(json.dumps(cluster.results, indent=2, sort_keys=True))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = netns.unavailable_reason()
    if reason:
        pytest.skip(f"scale-out hosts cannot be built here: {reason}")
    c = netns.HostCluster(tmp_path_factory.mktemp("hosts"), download_hosts=3, image_delay=IMAGE_DELAY,
                          download_threads=4, concurrency=1, stall_seconds=20, sweep_interval=2)
    c.results = {"config": {"queries": QUERIES, "pages": PAGES, "images_per_page": 50, "image_delay_s": IMAGE_DELAY,
                            "download_threads": 4, "worker_concurrency": 1}}
    c.browser = None
    try:
        c.start()
        c.results["config"]["subnet"] = str(c.lab.subnet)
        c.results["config"]["hosts"] = {n: h.addr for n, h in c.lab.hosts.items()}
        c.start_gpu_worker()
        c.start_download_worker("dl1")
        c.wait_workers(["download@dl1", "gpu0@gpu"])
        c.warm_replay(QUERIES, PAGES)
        yield c
    finally:
        if c.browser is not None:
            c.browser.close()
        c.close()
    left = c.lab.leftovers()
    assert not left, f"namespaces or links left behind: {left}"


def ensure_download_hosts(c, n: int) -> None:
    new = [c.start_download_worker(f"dl{i}") for i in range(1, n + 1) if f"dl{i}" not in c.workers]
    if new:
        c.wait_workers(new)


def test_throughput_grows_with_hosts(cluster):
    runs = {}
    for n in (1, 2, 3):
        ensure_download_hosts(cluster, n)  # a host joins: a worker started with the same variables
        runs[n] = cluster.measure(f"scale-{n}h", QUERIES, PAGES)
        r = runs[n]
        print(f"\n{n} download host(s): {r['images']} images in {r['seconds']:.1f} s = {r['images_per_s']:.2f} "
              f"images/s (whole run {r['run_seconds']:.1f} s; pages per host {r['pages_by_host']})")
    ratios = {n: round(runs[n]["images_per_s"] / runs[1]["images_per_s"], 2) for n in (2, 3)}
    print(f"throughput over one host: 2 hosts {ratios[2]:.2f}x (target {TARGETS[2]}x), "
          f"3 hosts {ratios[3]:.2f}x (target {TARGETS[3]}x)")
    save(cluster, "throughput", {"runs": {str(n): r for n, r in runs.items()},
                                 "ratios": {str(n): v for n, v in ratios.items()},
                                 "targets": {str(n): v for n, v in TARGETS.items()}})

    for n, r in runs.items():
        assert r["pages"] == len(QUERIES) * PAGES and r["swept"] is None, r
        # every host that was up took its share of the pages (none idle, none doing it all)
        busy = {h: k for h, k in r["pages_by_host"].items() if k}
        assert sorted(busy) == [f"dl{i}" for i in range(1, n + 1)], r["pages_by_host"]
        assert sum(busy.values()) == r["pages"], r["pages_by_host"]
    assert runs[1]["images"] == runs[2]["images"] == runs[3]["images"] > 0
    assert ratios[2] >= TARGETS[2], ratios
    assert ratios[3] >= TARGETS[3], ratios


def flower_workers(c) -> dict[str, dict]:
    """Flower's own view of the workers (the data its dashboard shows)."""
    return {w["hostname"]: w for w in c.flower_get("/workers?json=1")["data"]}


def in_flight_on(c, node: str, dataset: str, min_age: float = 1.0) -> str | None:
    """A page task of ``dataset`` that ``node`` has been running for at least ``min_age`` s."""
    started = c.flower_get(f"/api/tasks?workername={node}&state=STARTED&taskname=atscale.download_page")
    for uuid, t in started.items():
        if uuid.startswith(f"page-{dataset}-") and t.get("started") and time.time() - t["started"] >= min_age:
            return uuid
    return None


def test_a_lost_host_costs_nothing(cluster):
    c = cluster
    ensure_download_hosts(c, 3)
    nodes = {f"download@dl{i}" for i in (1, 2, 3)} | {"gpu0@gpu"}
    c.start_flower()  # on the hub, with basic auth; it sees this run from the start
    seen = None
    end = time.time() + 60
    while time.time() < end:
        seen = {k: w.get("status") for k, w in flower_workers(c).items()}
        if all(seen.get(n) for n in nodes):
            break
        time.sleep(0.5)
    assert all(seen.get(n) for n in nodes), f"Flower does not list every host online: {seen}"

    browser_before = None
    if chromium_path():  # the same view in a real browser, on the operator's host
        c.browser = Chromium(c.lab["ops"].command, c.lab["ops"].workdir)
        c.page = c.browser.open(c.flower_url + "/workers", basic_auth=c.FLOWER_AUTH)
        c.page.wait_for(WORKER_ROWS_JS, lambda rows: len(rows) == 4, what="4 workers in Flower's table")
        browser_before = worker_table(c.page)
        c.page.screenshot(ARTIFACTS / "flower-workers-before.png")

    t0 = time.time()
    c.call({"queries": QUERIES, "pages": PAGES, "dataset": LOSS_DATASET, "spec": TINY})
    node = c.workers[CUT_HOST]
    # the moment: some pages stored, and dl3 a second or more into one of its pages
    in_flight = None
    end = time.time() + 300
    while time.time() < end and in_flight is None:
        if len(c.store.list(f"datasets/{LOSS_DATASET}/pages/")) >= 3:
            in_flight = in_flight_on(c, node, LOSS_DATASET)
        time.sleep(0.2)
    assert in_flight, f"{node} never held a page of the run"
    pages_before = len(c.store.list(f"datasets/{LOSS_DATASET}/pages/"))
    c.lab[CUT_HOST].link_down()
    t_cut = time.time()
    time.sleep(2)
    c.lab[CUT_HOST].kill_all()  # then its processes, main and pool, whatever they were doing
    assert c.lab[CUT_HOST].pids() == []

    offline_after = None
    if c.browser is not None:  # the open page refreshes itself every second: watch dl3 go offline
        c.page.wait_for(WORKER_ROWS_JS, lambda rows: any(r[0] == node and r[1] == "Offline" for r in rows),
                        timeout=90, what=f"{node} shown Offline")
        offline_after = round(time.time() - t_cut, 1)
        c.page.screenshot(ARTIFACTS / "flower-workers-offline.png")

    st = c.wait_state(LOSS_DATASET, timeout=600 - (time.time() - t_cut))  # within 10 minutes of the cut
    t_done = time.time()
    assert st["state"] == "done", st.get("reason")
    store = c.store
    report = assert_complete(store, LOSS_DATASET, QUERIES, PAGES)  # every image once, every page's 50 rows once
    manifest = store.get_jsonl(f"datasets/{LOSS_DATASET}/manifest.jsonl")
    assert len({m["url"] for m in manifest}) == len(manifest)  # each result (page, position) once
    shard_rows = [r for k in store.list(f"datasets/{LOSS_DATASET}/pages/") if k.endswith(".jsonl")
                  for r in store.get_jsonl(k)]
    stored_rows = [r for r in shard_rows if r["status"] == "stored"]
    objects = set(store.list(f"datasets/{LOSS_DATASET}/images/"))
    assert objects == {r["key"] for r in stored_rows}  # nothing stored that no page recorded, nothing missing
    assert {m["key"] for m in manifest} <= objects
    attempts = training_attempts(store, LOSS_DATASET)
    record = store.get_json(f"runs/{st['run']}/record.json")
    assert len(attempts) == 1, attempts
    assert attempts[0]["hostname"] == "gpu0@gpu"
    assert "re-sent" in (st.get("swept") or ""), st  # the lost page came back through the sweep

    # Flower: every page of the run succeeded once, on the hosts that were up; dl3 offline
    done_pages = {u: t for u, t in c.flower_get("/api/tasks?taskname=atscale.download_page&state=SUCCESS").items()
                  if u.startswith(f"page-{LOSS_DATASET}-")}
    by_worker: dict[str, int] = {}
    for t in done_pages.values():
        by_worker[t["worker"]] = by_worker.get(t["worker"], 0) + 1
    assert len(done_pages) == len(QUERIES) * PAGES, sorted(done_pages)
    assert sum(by_worker.values()) == len(QUERIES) * PAGES and set(by_worker) <= nodes - {"gpu0@gpu"}, by_worker
    assert done_pages[in_flight]["worker"] != node  # the page dl3 held was finished elsewhere
    workers_now = {k: w.get("status") for k, w in flower_workers(c).items()}
    assert workers_now == {**{n: True for n in nodes}, node: False}, workers_now
    logs = {h: len(re.findall(rf"Task atscale\.download_page\[page-{LOSS_DATASET}-[^\]]+\] succeeded",
                              c.lab[h].log("worker"))) for h in c.dl_names}
    assert sum(logs.values()) == len(QUERIES) * PAGES, logs  # no page finished twice

    outcome = {"cut_host": CUT_HOST, "cut_after_s": round(t_cut - t0, 1), "pages_done_at_cut": pages_before,
               "page_in_flight": in_flight, "completed_after_cut_s": round(t_done - t_cut, 1),
               "flower_offline_after_cut_s": offline_after, "state": st["state"], "swept": st.get("swept"),
               "pages": len(shard_rows) // 50, "images_stored": len(objects), "manifest_images": report["images"],
               "duplicates_in_manifest": len(manifest) - len({m["sha256"] for m in manifest}),
               "training_attempts": len(attempts), "pages_by_worker_flower": by_worker,
               "pages_by_host_logs": logs,
               "timeline_after_cut_s": [(h.get("state"), round(h["at"] - t_cut, 1)) for h in st.get("history", [])
                                        if isinstance(h, dict) and isinstance(h.get("at"), (int, float))],
               "training_s": round(float(record.get("seconds") or 0), 1)}
    print(f"\nhost lost: {CUT_HOST} cut {outcome['cut_after_s']} s into the run with {pages_before} pages stored, "
          f"holding {in_flight}; run done {outcome['completed_after_cut_s']} s after the cut "
          f"({st.get('swept')}); {len(objects)} images stored, {report['images']} in the manifest, "
          f"0 duplicates, {len(attempts)} training attempt; pages per worker (Flower): {by_worker}"
          + (f"; Flower showed {node} offline {offline_after} s after the cut" if offline_after else ""))
    print(f"timeline after the cut (s): {outcome['timeline_after_cut_s']}; training took {outcome['training_s']} s")
    c.results["flower_before"] = browser_before
    save(c, "host_loss", outcome)
    c.loss_outcome = outcome


def test_flower_in_chromium_shows_every_host(cluster):
    if not chromium_path():
        pytest.skip(reason="chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)")
    if getattr(cluster, "loss_outcome", None) is None or cluster.browser is None:
        pytest.skip(reason="needs test_a_lost_host_costs_nothing to have run first (run the module, not this test alone)")
    c, page = cluster, cluster.page
    node = c.workers[CUT_HOST]
    pages = len(QUERIES) * PAGES
    before = c.results["flower_before"]
    assert set(before) == {"download@dl1", "download@dl2", "download@dl3", "gpu0@gpu"}, before
    assert {v["status"] for v in before.values()} == {"Online"}, before  # all four up before the cut

    page.goto(c.flower_url + "/workers")
    rows = page.wait_for(WORKER_ROWS_JS, lambda rs: len(rs) == 4 and any(r[1] == "Offline" for r in rs),
                         what="the workers table")
    table = worker_table(page)
    metrics = page.wait_for(WORKER_METRICS_JS, lambda m: m["online"] not in ("—", None), what="the summary cards")
    shot = page.screenshot(ARTIFACTS / "flower-workers.png")
    print(f"\nFlower workers page (Chromium): {rows}; summary {metrics}; screenshot {shot}")
    assert set(table) == {"download@dl1", "download@dl2", "download@dl3", "gpu0@gpu"}, table
    assert table[node]["status"] == "Offline", table
    assert all(v["status"] == "Online" for k, v in table.items() if k != node), table
    assert metrics["online"] == "3", metrics
    assert all(int(v["succeeded"].replace(",", "")) > 0 for v in table.values()), table  # everyone worked

    # the tasks page, filtered as its links filter it: the run's page tasks, by worker
    counts = {}
    for w in ("", "download@dl1", "download@dl2", "download@dl3"):
        url = c.flower_url + "/tasks?name=atscale.download_page&state=SUCCESS" + (f"&worker={w}" if w else "")
        page.goto(url)
        info = page.wait_for(TASKS_INFO_JS, lambda s: bool(s) and ("of" in s or s.startswith("No")),
                             what="the tasks table")
        counts[w or "all"] = tasks_count(info)
        if not w:
            page.screenshot(ARTIFACTS / "flower-tasks.png")
    print(f"Flower tasks page (Chromium), succeeded download_page tasks: {counts}")
    assert counts["all"] == pages, counts  # Flower started before this run: only its pages
    assert sum(v for k, v in counts.items() if k != "all") == pages, counts
    flower_api = c.loss_outcome["pages_by_worker_flower"]
    assert all(counts[f"download@dl{i}"] == flower_api.get(f"download@dl{i}", 0) for i in (1, 2, 3)), (counts,
                                                                                                    flower_api)
    save(c, "flower", {"workers": table, "summary": metrics, "download_pages_succeeded": counts,
                       "screenshots": [str(ARTIFACTS / n) for n in ("flower-workers-before.png",
                                                                     "flower-workers-offline.png",
                                                                     "flower-workers.png", "flower-tasks.png")]})
