"""Training tasks beyond the pipeline's first run: retrain a dataset with another
spec, evaluate a run on a dataset. Both run on the `gpu` queue (one training per
GPU worker). A retrain is idempotent like the pipeline's training: a run already
trained returns its metrics, a run whose lease another worker holds is not started
twice, and a retrain redelivered after a crash resumes from the run's checkpoint."""
from __future__ import annotations

import logging

from tasks.celery import app
from tasks.pipeline import get_redis, get_store
from workers import coordination as co
from workers.names import checked_slug
from workers.runs import check_run
from workers.settings import get_settings
from workers.spec import parse_spec
from workers.train import run_name, train_run

log = logging.getLogger(__name__)


@app.task(name="atscale.retrain", bind=True)
def retrain(self, dataset: str, run: str | None = None, spec: dict | None = None, force: bool = False) -> dict:
    """Train `spec` (a dict, checked again here) on an existing dataset as run `run`
    (default: the spec's deterministic run name)."""
    checked_slug(dataset, "dataset")
    s = parse_spec(spec or {})
    run = check_run(run or run_name(dataset, s))
    lease = co.Lease(get_redis(), f"train:{run}", ttl=60)  # the same lease as the pipeline's training
    if not lease.acquire():
        log.info("run %s is being trained by another worker; not starting a second one", run)
        return {"run": run, "dataset": dataset, "skipped": "running"}
    try:
        metrics = train_run(get_store(), dataset, run, s, cache_dir=get_settings().cache_dir, force=force)
    finally:
        lease.release()
    return {"run": run, "dataset": dataset, "val_accuracy": metrics["val_accuracy"], "epochs": metrics["epochs"],
            "best_epoch": metrics.get("best_epoch")}


@app.task(name="atscale.evaluate", bind=True)
def evaluate(self, run: str, dataset: str | None = None) -> dict:
    """Measure `run` on the validation split of `dataset` (default: its own)."""
    from workers.predict import evaluate_run

    result = evaluate_run(get_store(), run, dataset, cache_dir=get_settings().cache_dir)
    return {k: result[k] for k in ("run", "dataset", "accuracy", "images", "loss")}
