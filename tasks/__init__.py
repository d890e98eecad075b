"""atscale's Celery app and pipeline: `celery -A tasks worker`, `celery -A tasks call collect_breeds`."""
from tasks.celery import app

__all__ = ["app"]
