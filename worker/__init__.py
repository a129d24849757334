"""Celery worker: the app and thin tasks that call crucible's pipeline."""
