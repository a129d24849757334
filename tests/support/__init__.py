"""Test helpers that start real servers (olah, Redis, PostgreSQL, uvicorn, Celery)."""
