"""The worker's Celery app: `celery -A worker.app:celery worker -Q gpu`."""

from __future__ import annotations

from crucible.queue import make_celery
from crucible.settings import get_settings

celery = make_celery(get_settings())
celery.conf.imports = ("worker.tasks",)
