"""The pipeline's tasks: thin wrappers that call into `workers` and wire the canvas.

collect_breeds -> chord(resolve_query per query) -> plan_pages
    -> chord(download_page per (query, page)) -> finalize_dataset -> train_dataset (gpu)

Arguments and results are small JSON: names, counts, tokens. Never image bytes,
never the API key (workers read it from their environment).
"""
from __future__ import annotations

import logging
from functools import lru_cache

from celery import Task, chord

from tasks.celery import app
from tasks.request import parse_request
from workers.dataset import finalize
from workers.fetch import Fetcher
from workers.names import slugify
from workers.page import PageSpec, download_page as run_page
from workers.search import SearchError, SerpApiClient
from workers.settings import get_settings
from workers.status import mark_failed, read_status, set_status
from workers.store import ObjectStore, StoreError, open_store
from workers.train import TrainSpec, run_key, run_name, train_run

log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def get_store() -> ObjectStore:
    return open_store()


@lru_cache(maxsize=1)
def get_fetcher() -> Fetcher:
    s = get_settings()
    return Fetcher(user_agent=s.user_agent, pool_size=s.download_threads)


def search_client(engine: str) -> SerpApiClient:
    s = get_settings()
    key = s.serpapi_api_key.get_secret_value() if s.serpapi_api_key else None
    return SerpApiClient(s.serpapi_base_url, key, engine=engine, store=get_store(), timeout=s.serpapi_timeout)


def request_key(dataset: str) -> str:
    return f"datasets/{dataset}/request.json"


class DatasetTask(Task):
    """Tasks whose first argument is the dataset: any unexpected failure marks the
    dataset failed with the exception's message (the rest of the cluster goes on)."""

    def on_failure(self, exc, task_id, args, kwargs, einfo):
        dataset = kwargs.get("dataset") or (args[0] if args else None)
        if not dataset:
            return
        try:
            msg = exc.message if isinstance(exc, SearchError) else f"{type(exc).__name__}: {exc}"
            mark_failed(get_store(), dataset, f"{self.name} failed: {msg}")
        except Exception:  # the store itself may be what failed; the task's own failure is logged by Celery
            log.exception("could not mark dataset %s failed", dataset)


@app.task(name="collect_breeds", bind=True)
def collect_breeds(self, **kwargs) -> dict:
    """Entry point. With no arguments: the nine American breeds, chips name "dog",
    500x500, 2 pages, google.com. Returns the dataset name at once; the work goes on."""
    req = parse_request(kwargs)
    store = get_store()
    store.put_json(request_key(req.dataset), req.model_dump())
    set_status(store, req.dataset, "collecting", queries=len(req.queries), pages_total=len(req.queries) * req.pages,
               reason=None)
    header = [resolve_query.s(req.dataset, q) for q in req.queries]
    chord(header)(plan_pages.s(req.dataset).on_error(dataset_failed.s(req.dataset)))
    log.info("dataset %s: %d queries x %d pages queued", req.dataset, len(req.queries), req.pages)
    return {"dataset": req.dataset, "queries": len(req.queries), "pages": len(req.queries) * req.pages}


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
            raise  # the dataset fails with SerpApi's message (DatasetTask.on_failure)
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
    header = []
    for t in tokens:
        if t.get("empty") or (t["token"] is None and req.on_missing_chip == "skip"):
            continue
        for ijn in range(req.pages):
            header.append(download_page.s(dataset, t["query"], t["label"], t["token_param"], t["token"], ijn))
    set_status(store, dataset, "collecting", pages_total=len(header))
    if not header:
        mark_failed(store, dataset, "no class has a page to download (every query was skipped)")
        return {"pages": 0}
    chord(header)(finalize_dataset.si(dataset).on_error(dataset_failed.s(dataset)))
    return {"pages": len(header)}


@app.task(name="atscale.download_page", base=DatasetTask, bind=True, max_retries=5)
def download_page(self, dataset: str, query: str, label: str, token_param: str | None, token: str | None,
                  ijn: int) -> dict:
    store = get_store()
    req = parse_request(store.get_json(request_key(dataset)))
    try:
        results = search_client(req.engine).page(query, ijn, token_param=token_param, token=token, size=req.size,
                                                 google_domain=req.google_domain, no_cache=req.no_cache)
    except SearchError as exc:
        if exc.reason in ("invalid_key", "forbidden", "out_of_searches"):
            raise  # the whole dataset fails with SerpApi's message (DatasetTask.on_failure)
        # this page is reported failed (or empty); the other pages go on
        store.put_json(f"datasets/{dataset}/failures/{label}-{ijn}.json",
                       {"label": label, "ijn": ijn, **exc.to_dict()})
        store.put_jsonl(f"datasets/{dataset}/pages/{label}/{ijn}.jsonl", [])
        return {"label": label, "ijn": ijn, "results": 0, "stored": 0, "rejected": {}, "error": exc.to_dict()}
    spec = PageSpec(dataset=dataset, label=label, ijn=ijn, max_side=req.size_max_side)
    try:
        return run_page(store, get_fetcher(), spec, [(r.position, r.original) for r in results],
                        threads=get_settings().download_threads)
    except StoreError as exc:
        raise self.retry(exc=exc, countdown=min(60, 2 ** self.request.retries * 2))


@app.task(name="atscale.finalize_dataset", base=DatasetTask, bind=True)
def finalize_dataset(self, dataset: str) -> dict:
    store = get_store()
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
    if len(with_images) < 2:
        mark_failed(store, dataset, f"only {len(with_images)} class(es) have images; nothing to train "
                                    f"(rejected: {report['rejected']})")
        return {"dataset": dataset, "images": report["images"], "run": None}
    if not req.train:
        set_status(store, dataset, "partial" if failures else "done", report=True)
        return {"dataset": dataset, "images": report["images"], "run": None}
    run = run_name(dataset, req.spec)
    set_status(store, dataset, "training", run=run)
    train_dataset.apply_async(args=[dataset, run, req.spec.model_dump()], task_id=f"train-{run}")
    return {"dataset": dataset, "images": report["images"], "run": run}


@app.task(name="atscale.train_dataset", base=DatasetTask, bind=True)
def train_dataset(self, dataset: str, run: str, spec: dict) -> dict:
    store = get_store()
    record = store.get_json_or(run_key(run, "record.json"))
    if record and record.get("status") == "trained":
        log.info("run %s already trained; not training again", run)
        return {"run": run, "val_accuracy": record.get("val_accuracy"), "skipped": True}
    metrics = train_run(store, dataset, run, TrainSpec(**spec), cache_dir=get_settings().cache_dir)
    failures = store.list(f"datasets/{dataset}/failures/")
    set_status(store, dataset, "partial" if failures else "done", run=run, val_accuracy=metrics["val_accuracy"])
    return {"run": run, "val_accuracy": metrics["val_accuracy"], "epochs": metrics["epochs"]}


@app.task(name="atscale.dataset_failed")
def dataset_failed(request, exc, traceback, dataset: str) -> None:
    """Error callback of the chords: the dataset never stays "collecting" forever."""
    store = get_store()
    status = read_status(store, dataset) or {}
    if status.get("state") != "failed":
        mark_failed(store, dataset, f"a step of the pipeline failed: {exc}")
