"""The Celery app (`celery -A tasks ...`). JSON only; queues search, download, gpu."""
from __future__ import annotations

import logging

from celery import Celery
from kombu import Queue

from workers.settings import get_settings

QUEUES = ("search", "download", "gpu")
# Longer than the longest training: a late-acked message is only handed to another
# worker after this long (see ../shared/notes/celery-pitfalls.md).
VISIBILITY_TIMEOUT = 12 * 3600

settings = get_settings()
app = Celery("atscale", broker=settings.broker_url, backend=settings.result_backend_url(),
             include=["tasks.pipeline", "tasks.sweep", "tasks.training"])
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_accept_content=["json"],
    task_queues=[Queue(q) for q in QUEUES],
    task_default_queue="search",
    task_routes={
        "collect_breeds": {"queue": "search"},
        "atscale.resolve_query": {"queue": "search"},
        "atscale.plan_pages": {"queue": "search"},
        "atscale.download_page": {"queue": "download"},
        "atscale.finalize_dataset": {"queue": "search"},
        "atscale.train_dataset": {"queue": "gpu"},
        "atscale.retrain": {"queue": "gpu"},
        "atscale.evaluate": {"queue": "gpu"},
    },
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    broker_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT},
    result_backend_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT},
    visibility_timeout=VISIBILITY_TIMEOUT,
    broker_connection_retry_on_startup=True,
    broker_connection_max_retries=None,  # a Redis restart is waited out, however long
    result_backend_always_retry=True,  # results and chord counters survive a Redis restart
    result_backend_max_retries=60,
    redis_retry_on_timeout=True,
    redis_socket_keepalive=True,
    redis_backend_health_check_interval=10,
    result_expires=7 * 24 * 3600,
    result_extended=False,
    task_track_started=True,
    worker_send_task_events=True,
    task_send_sent_event=True,
    worker_hijack_root_logger=True,
    worker_redirect_stdouts_level="INFO",
)

# urllib3 logs request lines (with query strings) at DEBUG: keep them out of worker logs.
logging.getLogger("urllib3").setLevel(logging.WARNING)
