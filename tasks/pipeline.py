"""The pipeline's tasks: thin wrappers that call into `workers` and wire the canvas.

collect_breeds -> chord(resolve_query per query) -> plan_pages
    -> chord(download_page per (query, page)) -> finalize_dataset -> train_dataset (gpu)

Arguments and results are small JSON: names, counts, tokens. Never image bytes,
never the API key (workers read it from their environment).

Under faults (README "Faults"): every task is idempotent; page, finalize and train
task ids are deterministic; the chord is the trigger, and a page latch in Redis plus
the sweep (tasks/sweep.py) finish a dataset whose trigger never came; a lease makes
one training per dataset version; a delivery counter stops a poison task.
"""
from __future__ import annotations

import logging
import time
import uuid
from functools import lru_cache

import redis
from celery import Task, chord

from tasks.celery import app
from tasks.request import parse_request
from workers import coordination as co
from workers.dataset import finalize
from workers.failpoints import failpoint
from workers.fetch import Fetcher
from workers.names import slugify
from workers.page import PageSpec, download_page as run_page, shard_key
from workers.search import SearchError, SerpApiClient
from workers.settings import get_settings
from workers.status import FINAL_STATES, mark_failed, read_status, set_status
from workers.store import ObjectStore, StoreError, open_store
from workers.train import TrainSpec, run_key, run_name, train_run

log = logging.getLogger(__name__)
ACTIVE = co.PREFIX + "active-datasets"


@lru_cache(maxsize=1)
def get_store() -> ObjectStore:
    return open_store()


@lru_cache(maxsize=1)
def get_fetcher() -> Fetcher:
    s = get_settings()
    return Fetcher(user_agent=s.user_agent, pool_size=s.download_threads)


def get_redis() -> redis.Redis:
    return co.client(get_settings().result_backend_url())


def search_client(engine: str) -> SerpApiClient:
    s = get_settings()
    key = s.serpapi_api_key.get_secret_value() if s.serpapi_api_key else None
    return SerpApiClient(s.serpapi_base_url, key, engine=engine, store=get_store(), timeout=s.serpapi_timeout)


def request_key(dataset: str) -> str:
    return f"datasets/{dataset}/request.json"


def plan_key(dataset: str) -> str:
    return f"datasets/{dataset}/plan.json"


def page_task_id(dataset: str, label: str, ijn: int) -> str:
    return f"page-{dataset}-{label}-{ijn}"


def touch_progress(dataset: str) -> None:
    co.redis_retry(get_redis().set, f"{co.PREFIX}progress:{dataset}", time.time(), ex=30 * co.DAY)


class DatasetTask(Task):
    """Tasks whose first argument is the dataset.

    - a store or Redis outage is retried with exponential backoff and jitter;
    - a task delivered more than ATSCALE_MAX_DELIVERIES times (its worker died each
      time) is not run again: `on_poison` records why;
    - any other failure marks the dataset failed with the exception's message
      (the rest of the cluster goes on)."""

    autoretry_for = (StoreError,)
    retry_backoff = 2
    retry_backoff_max = 60
    retry_jitter = True
    max_retries = 10

    def __call__(self, *args, **kwargs):
        req = self.request
        if req.id and not req.called_directly:
            n = co.count_delivery(get_redis(), f"{req.id}:{req.retries}")
            if n > get_settings().max_deliveries:
                dataset = kwargs.get("dataset") or (args[0] if args else None)
                log.error("task %s delivered %d times; not running it again", req.id, n)
                return self.on_poison(dataset, n, *args, **kwargs)
        return super().__call__(*args, **kwargs)

    def on_poison(self, dataset, deliveries, *args, **kwargs):
        if dataset:
            mark_failed(get_store(), dataset, f"{self.name} was delivered {deliveries} times (its worker died "
                                              f"each time); stopped so that it cannot loop")
        return {"poison": True, "deliveries": deliveries}

    def on_failure(self, exc, task_id, args, kwargs, einfo):
        dataset = kwargs.get("dataset") or (args[0] if args else None)
        if not dataset:
            return
        try:
            msg = exc.message if isinstance(exc, SearchError) else f"{type(exc).__name__}: {exc}"
            mark_failed(get_store(), dataset, f"{self.name} failed: {msg}")
            co.redis_retry(get_redis().srem, ACTIVE, dataset)
        except Exception:  # the store itself may be what failed; Celery logs the task's own failure
            log.exception("could not mark dataset %s failed", dataset)


@app.task(name="collect_breeds", bind=True)
def collect_breeds(self, **kwargs) -> dict:
    """Entry point. With no arguments: the nine American breeds, chips name "dog",
    500x500, 2 pages, google.com. Returns the dataset name at once; the work goes on.
    Called again for the same dataset while it runs or after it is done, it does nothing."""
    req = parse_request(kwargs)
    store, r = get_store(), get_redis()
    claim = f"collect:{req.dataset}"
    if not co.claim_once(r, claim, self.request.id or "direct"):
        owner = r.get(co.PREFIX + "once:" + claim)
        status = read_status(store, req.dataset) or {}
        if owner and owner.decode() == self.request.id:
            pass  # this very message, redelivered: carry on (every step is idempotent)
        elif status.get("state") in (None, "failed"):
            co.release_claim(r, claim)  # a failed (or since deleted) dataset may be collected again
            if not co.claim_once(r, claim, self.request.id or "direct"):
                return {"dataset": req.dataset, "state": "collecting", "duplicate": True}
        else:
            log.info("dataset %s is already %s; not collecting it twice", req.dataset, status.get("state"))
            out = {"dataset": req.dataset, "state": status.get("state", "pending"), "duplicate": True}
            run = run_name(req.dataset, req.spec)
            record = store.get_json_or(run_key(run, "record.json")) or {}
            if (req.train and status.get("state") in ("done", "partial") and status.get("run") != run
                    and record.get("status") not in ("trained", "evaluated", "training", "queued")):
                # the same dataset with another training spec: one more run, on the data already collected
                set_status(store, req.dataset, "training", run=run)
                co.redis_retry(r.sadd, ACTIVE, req.dataset)
                touch_progress(req.dataset)
                send_training(req.dataset, run, req.spec.model_dump())
                out.update(state="training", run=run)
            return out
    store.put_json(request_key(req.dataset), req.model_dump())
    store.delete(plan_key(req.dataset))
    r.delete(f"{co.PREFIX}pages-done:{req.dataset}")
    co.release_claim(r, f"finalized:{req.dataset}")
    set_status(store, req.dataset, "collecting", queries=len(req.queries), pages_total=len(req.queries) * req.pages,
               reason=None, run=None, sweeps=0)
    co.redis_retry(r.sadd, ACTIVE, req.dataset)
    touch_progress(req.dataset)
    start_search(req.dataset, req.queries)
    log.info("dataset %s: %d queries x %d pages queued", req.dataset, len(req.queries), req.pages)
    return {"dataset": req.dataset, "queries": len(req.queries), "pages": len(req.queries) * req.pages}


def start_search(dataset: str, queries: list[str]) -> None:
    header = [resolve_query.s(dataset, q).set(task_id=f"search-{dataset}-{slugify(q)}") for q in queries]
    chord(header)(plan_pages.s(dataset).set(task_id=f"plan-{dataset}").on_error(dataset_failed.s(dataset)))


@app.task(name="atscale.resolve_query", base=DatasetTask, bind=True)
def resolve_query(self, dataset: str, query: str) -> dict:
    store = get_store()
    req = parse_request(store.get_json(request_key(dataset)))
    try:
        tok = search_client(req.engine).resolve_token(
            query, req.chips_name, size=req.size, google_domain=req.google_domain, no_cache=req.no_cache,
            on_missing=req.on_missing_chip)
        out = tok.to_dict()
    except SearchError as exc:
        if exc.reason != "no_results":
            raise  # the dataset fails with SerpApi's message (DatasetTask.on_failure), no retry storm
        # asked twice, still nothing: the class is reported empty, the others go on
        out = {"query": query, "token_param": None, "token": None, "empty": True, "suggestions": [],
               "note": f"class is empty: {exc.message} (asked twice)"}
    out["label"] = slugify(query)
    store.put_json(f"datasets/{dataset}/search/{out['label']}.json", out)
    return out


@app.task(name="atscale.plan_pages", base=DatasetTask, bind=True)
def plan_pages(self, tokens: list[dict], dataset: str) -> dict:
    store = get_store()
    req = parse_request(store.get_json(request_key(dataset)))
    pages = []
    for t in tokens:
        if t.get("empty") or (t["token"] is None and req.on_missing_chip == "skip"):
            continue
        for ijn in range(req.pages):
            pages.append({"dataset": dataset, "query": t["query"], "label": t["label"],
                          "token_param": t["token_param"], "token": t["token"], "ijn": ijn})
    store.put_json(plan_key(dataset), {"pages": pages})
    set_status(store, dataset, "collecting", pages_total=len(pages))
    if not pages:
        mark_failed(store, dataset, "no class has a page to download (every query was empty or skipped)")
        return {"pages": 0}
    header = [page_signature(p) for p in pages]
    chord(header)(finalize_dataset.si(dataset).set(task_id=f"finalize-{dataset}")
                  .on_error(dataset_failed.s(dataset)))
    return {"pages": len(pages)}


def page_signature(p: dict):
    return download_page.si(p["dataset"], p["query"], p["label"], p["token_param"], p["token"], p["ijn"]).set(
        task_id=page_task_id(p["dataset"], p["label"], p["ijn"]))


def page_finished(dataset: str, label: str, ijn: int) -> None:
    """Latch: when the last page of the plan is done, make sure finalize runs, even
    if the chord's trigger is lost (a page re-sent by the sweep is outside the chord)."""
    touch_progress(dataset)
    done = co.mark_page_done(get_redis(), dataset, f"{label}/{ijn}")
    plan = get_store().get_json_or(plan_key(dataset)) or {}
    if plan.get("pages") and done >= len(plan["pages"]):
        finalize_dataset.apply_async(args=[dataset], task_id=f"finalize-{dataset}")


class PageTask(DatasetTask):
    def on_poison(self, dataset, deliveries, *args, **kwargs):
        """A page that kills its worker again and again is reported failed; the dataset goes on."""
        _dataset, _query, label, _tp, _tok, ijn = args
        record_page_failure(get_store(), dataset, label, ijn,
                            {"reason": "poison", "status": None,
                             "message": f"page task delivered {deliveries} times (its worker died each time)"})
        page_finished(dataset, label, ijn)
        return {"poison": True, "deliveries": deliveries}


@app.task(name="atscale.download_page", base=PageTask, bind=True)
def download_page(self, dataset: str, query: str, label: str, token_param: str | None, token: str | None,
                  ijn: int) -> dict:
    failpoint("crash_page", label)
    store = get_store()
    req = parse_request(store.get_json(request_key(dataset)))
    try:
        results = search_client(req.engine).page(query, ijn, token_param=token_param, token=token, size=req.size,
                                                 google_domain=req.google_domain, no_cache=req.no_cache)
    except SearchError as exc:
        if exc.reason in ("invalid_key", "forbidden", "out_of_searches"):
            raise  # the whole dataset fails with SerpApi's message (DatasetTask.on_failure)
        # this page is reported failed (or empty); the other pages go on
        summary = record_page_failure(store, dataset, label, ijn, exc.to_dict())
        page_finished(dataset, label, ijn)
        return summary
    spec = PageSpec(dataset=dataset, label=label, ijn=ijn, max_side=req.size_max_side)
    summary = run_page(store, get_fetcher(), spec, [(r.position, r.original) for r in results],
                       threads=get_settings().download_threads)
    page_finished(dataset, label, ijn)
    return summary


def record_page_failure(store: ObjectStore, dataset: str, label: str, ijn: int, error: dict) -> dict:
    store.put_json(f"datasets/{dataset}/failures/{label}-{ijn}.json", {"label": label, "ijn": ijn, **error})
    store.put_jsonl(shard_key(dataset, label, ijn), [])
    return {"label": label, "ijn": ijn, "results": 0, "stored": 0, "rejected": {}, "error": error}




@app.task(name="atscale.finalize_dataset", base=DatasetTask, bind=True)
def finalize_dataset(self, dataset: str) -> dict:
    store, r = get_store(), get_redis()
    # the chord and the page latch may both trigger this; one runs (the sweep
    # releases the claim if the one that ran died half-way)
    if not co.claim_once(r, f"finalized:{dataset}", uuid.uuid4().hex):
        log.info("dataset %s already finalized; nothing to do", dataset)
        return {"dataset": dataset, "duplicate": True}
    req = parse_request(store.get_json(request_key(dataset)))
    set_status(store, dataset, "finalizing")
    notes = {}
    for label in req.labels():
        tok = store.get_json_or(f"datasets/{dataset}/search/{label}.json") or {}
        if tok.get("note"):
            notes[label] = tok["note"]
    failures = [store.get_json(k) for k in store.list(f"datasets/{dataset}/failures/")]
    report = finalize(store, dataset, labels=req.labels(), pages_expected=len(req.labels()) * req.pages,
                      val_percent=req.val_percent, search_notes=notes, page_failures=failures)
    with_images = [c for c, n in report["classes"].items() if n > 0]
    if len(with_images) < (2 if req.train else 1):
        have = "no class has" if not with_images else "only 1 class has"
        mark_failed(store, dataset, f"{have} images; "
                                    f"{'nothing to train' if req.train else 'nothing stored'} "
                                    f"(rejected: {report['rejected']}; failed pages: {len(failures)})")
        co.redis_retry(r.srem, ACTIVE, dataset)
        return {"dataset": dataset, "images": report["images"], "run": None}
    if not req.train:
        set_status(store, dataset, "partial" if failures else "done", report=True)
        co.redis_retry(r.srem, ACTIVE, dataset)
        return {"dataset": dataset, "images": report["images"], "run": None}
    run = run_name(dataset, req.spec)
    set_status(store, dataset, "training", run=run)
    touch_progress(dataset)
    send_training(dataset, run, req.spec.model_dump())
    return {"dataset": dataset, "images": report["images"], "run": run}


def send_training(dataset: str, run: str, spec: dict) -> None:
    record = get_store().get_json_or(run_key(run, "record.json")) or {}
    if record.get("status") not in ("training", "trained", "evaluated"):
        get_store().put_json(run_key(run, "record.json"),
                             {**record, "run": run, "dataset": dataset, "spec": spec, "status": "queued",
                              "queued_at": time.time()})
    train_dataset.apply_async(args=[dataset, run, spec], task_id=f"train-{run}")


@app.task(name="atscale.train_dataset", base=DatasetTask, bind=True)
def train_dataset(self, dataset: str, run: str, spec: dict) -> dict:
    """Exactly one training per (dataset version, spec): a run that is trained is not
    trained again, and while one worker trains (its lease alive) no other starts."""
    store = get_store()
    record = store.get_json_or(run_key(run, "record.json")) or {}
    if record.get("status") in ("trained", "evaluated"):
        log.info("run %s already trained; not training again", run)
        finish_dataset(dataset, run, record.get("val_accuracy"))
        return {"run": run, "val_accuracy": record.get("val_accuracy"), "skipped": "trained"}
    lease = co.Lease(get_redis(), f"train:{run}", ttl=60)
    if not lease.acquire():
        log.info("run %s is being trained by another worker; not starting a second one", run)
        return {"run": run, "skipped": "running"}
    try:
        attempts = store.get_json_or(run_key(run, "attempts.json")) or []
        attempts.append({"task_id": self.request.id, "hostname": self.request.hostname, "started_at": time.time()})
        store.put_json(run_key(run, "attempts.json"), attempts)
        metrics = train_run(store, dataset, run, TrainSpec(**spec), cache_dir=get_settings().cache_dir)
    finally:
        lease.release()
    finish_dataset(dataset, run, metrics["val_accuracy"])
    return {"run": run, "val_accuracy": metrics["val_accuracy"], "epochs": metrics["epochs"]}


def finish_dataset(dataset: str, run: str, val_accuracy) -> None:
    store = get_store()
    failures = store.list(f"datasets/{dataset}/failures/")
    status = read_status(store, dataset) or {}
    if status.get("state") not in FINAL_STATES:
        set_status(store, dataset, "partial" if failures else "done", run=run, val_accuracy=val_accuracy)
    co.redis_retry(get_redis().srem, ACTIVE, dataset)


@app.task(name="atscale.dataset_failed")
def dataset_failed(request, exc, traceback, dataset: str) -> None:
    """Error callback of the chords: the dataset never stays "collecting" forever."""
    store = get_store()
    status = read_status(store, dataset) or {}
    if status.get("state") != "failed":
        mark_failed(store, dataset, f"a step of the pipeline failed: {exc}")
    co.redis_retry(get_redis().srem, ACTIVE, dataset)
