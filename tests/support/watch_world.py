"""A small world for the progress, client and metrics tests: tiny BERT classifiers (a base
saved from BertModel and two experts with heads of their own), labelled datasets uploaded
over HTTP, and specs for a plain merge, a tuned merge (trials) and a failing one."""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from crucible.cli import worker_argv
from tests.support.postgres import throwaway_postgres_url
from tests.support.redis_server import private_redis
from tests.support.stack import Stack
from tests.support.tiny_models import make_bert_classifier_family, tiny_texts

LABELS = [["pos", "neg"], ["x", "y", "z"]]
NAMES = ["sentiment", "topic"]
TRIALS = 4


@dataclass
class World:
    stack: Stack
    client: httpx.Client
    key: str
    base: Path
    experts: list[Path]
    models: Path
    datasets: dict[str, str] = field(default_factory=dict)

    def plain_spec(self) -> dict[str, Any]:
        """Task arithmetic of the two experts: resolve, merge, publish."""
        return {
            "base": {"uri": self.base.as_uri()},
            "experts": [
                {"uri": d.as_uri(), "name": n} for d, n in zip(self.experts, NAMES, strict=True)
            ],
            "method": {"name": "task_arithmetic", "params": {"scale": 0.5}},
            "output": {"dtype": "float32", "shard_size": "100KB"},
        }

    def tuned_spec(self) -> dict[str, Any]:
        """The same merge with its scale tuned over TRIALS trials: trials are recorded."""
        return {
            **self.plain_spec(),
            "tuning": {
                "dataset": dict(self.datasets),
                "metric": "accuracy",
                "trials": TRIALS,
                "init_trials": 2,
                "groups": "global",
                "split": {"validation": 0.5, "test": 0.5, "seed": 1},
                "max_samples": 32,
            },
        }

    def failing_spec(self) -> dict[str, Any]:
        """An expert folder that does not exist: the job fails in resolve."""
        spec = self.plain_spec()
        spec["experts"][1]["uri"] = (self.models / "no-such-expert").as_uri()
        return spec


class ServeStack(Stack):
    """The API started the way operators start it, `crucible serve` (JSON logs through
    crucible.logs), instead of bare uvicorn; the worker as `Stack` starts it."""

    def start(self) -> Stack:
        self.crucible("keys", "list")  # migrates the database before two processes start
        serve = [sys.executable, "-m", "crucible.cli", "serve", "--port", str(self.port)]
        self._spawn("api", serve)
        self._spawn("worker", worker_argv(concurrency=1, pool="prefork", loglevel="info"))
        self.wait_ready()
        return self

    def log_text(self, name: str) -> str:
        return (self.logdir / f"{name}.log").read_text()


@contextmanager
def watch_stack(
    work: Path, models: Path, extra_env: dict[str, str] | None = None, tenant: str = "acme"
) -> Iterator[tuple[ServeStack, World]]:
    """`crucible serve` + a Celery worker on a throwaway PostgreSQL database and a private
    Redis (file:// sources under `models`, Hub offline, `extra_env` on top), and the world
    of tiny models and datasets uploaded as `tenant`."""
    env = {
        "CRUCIBLE_DATA_DIR": str(work / "data"),
        "CRUCIBLE_ALLOWED_LOCAL_DIRS": json.dumps([str(models)]),
        "HF_HUB_OFFLINE": "1",
        **(extra_env or {}),
    }
    with throwaway_postgres_url() as db_url, private_redis(work / "redis") as redis_url:
        env["CRUCIBLE_DATABASE_URL"] = db_url
        env["CRUCIBLE_BROKER_URL"] = redis_url
        stack = ServeStack(env, work / "logs")
        stack.start()
        try:
            key = stack.crucible("keys", "create", "--tenant", tenant).strip()
            with stack.client(key) as client:
                yield stack, make_world(stack, client, key, models)
        finally:
            stack.stop()


def _jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def make_world(stack: Stack, client: httpx.Client, key: str, models: Path) -> World:
    """Models under `models` (allowed for file:// sources), datasets uploaded as the
    client's tenant."""
    base, experts = make_bert_classifier_family(models, LABELS, seed=5)
    world = World(stack, client, key, base, experts, models)
    for i, (name, labels) in enumerate(zip(NAMES, LABELS, strict=True)):
        rows = [
            {"text": t, "label": labels[j % len(labels)]}
            for j, t in enumerate(tiny_texts(24, seed=40 + i))
        ]
        resp = client.post(
            "/v1/datasets",
            files={"file": (f"{name}.jsonl", io.BytesIO(_jsonl(rows)))},
            data={"name": name},
        )
        assert resp.status_code == 201, resp.text
        world.datasets[name] = resp.json()["id"]
    return world


def submit(world: World, spec: dict[str, Any]) -> str:
    resp = world.client.post("/v1/merges", json=spec)
    assert resp.status_code == 202, resp.text
    return str(resp.json()["id"])
