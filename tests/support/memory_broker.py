"""The tasks the in-process API sent through kombu's in-memory broker (memory://)."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient


def drain_tasks(client: TestClient) -> list[tuple[str, Any]]:
    """(task name, decoded body) of every message waiting in the gpu queue, acknowledged so
    the next call starts empty (the memory broker is per process: earlier tests' too)."""
    celery = client.app.state.celery  # type: ignore[attr-defined]
    tasks = []
    with celery.connection_for_read() as conn:
        queue = conn.SimpleQueue("gpu")
        while True:
            try:
                msg = queue.get(timeout=0.05)
            except queue.Empty:
                break
            tasks.append((msg.headers["task"], msg.decode()))
            msg.ack()
        queue.close()
    return tasks
