"""The OpenAPI document fuzzed against the live service by Schemathesis.

uvicorn over HTTP on loopback, a throwaway PostgreSQL database, a private Redis and a Celery
worker (tests.support.stack.service_stack), authenticated with an API key made through the
CLI. Every operation of the served `/openapi.json` gets examples, coverage (boundary and
invalid values, negative mode included) and fuzzing phases, `CRUCIBLE_SCHEMATHESIS_EXAMPLES`
fuzzed examples per operation (default 200), then a stateful run over the links Schemathesis
infers from the schema (POST /v1/merges -> GET/cancel/trials of that job, and so on).

Path parameters are drawn from both the fuzzer and the ids that exist (a succeeded job with
its output files, a queued job, a dataset), so the 200 paths of reads, cancels and file
downloads are exercised, not only their 404s.

Checks on every response: no 5xx, the status code is documented for the operation, the
content type is the documented one, the body and headers match the documented schema, invalid
input is refused with a 4xx, auth is enforced (the same request without the key is a 401),
and unsupported methods are a 405. Two of Schemathesis's checks are left out because they
judge the schema's looseness rather than the service: `positive_data_acceptance` expects every
schema-valid request to be accepted, but opaque cursors, URI syntax, dataset contents and
file formats are validated beyond what JSON Schema says (each refusal is a documented 4xx);
`allow_header_conformance` judges the Allow header of 405s that Starlette builds per route,
not per path.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from tests.support.stack import service_stack
from tests.support.tiny_models import make_gpt2_family

pytestmark = pytest.mark.e2e

OPENAPI = Path(__file__).resolve().parents[1] / "openapi" / "openapi.json"
MAX_EXAMPLES = int(os.environ.get("CRUCIBLE_SCHEMATHESIS_EXAMPLES", "200"))
# Every check Schemathesis has, in every phase, except these two (see the module docstring).
CHECKS_OFF = ("positive_data_acceptance", "allow_header_conformance")
DATASET = b'{"text": "the cat sat", "label": "pos"}\n{"text": "a sad song", "label": "neg"}\n'


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The running service, its API key and ids that exist: a succeeded job (with files),
    a queued-then-cancelled job and a dataset."""
    work = tmp_path_factory.mktemp("schemathesis")
    models = work / "models"
    base, experts = make_gpt2_family(models, n_experts=2, seed=3)
    with service_stack(work, models) as (stack, client):
        spec = {
            "base": {"uri": f"file://{base}"},
            "experts": [{"uri": f"file://{e}", "name": e.name} for e in experts],
            "method": {"name": "linear"},
            "output": {"dtype": "float32"},
        }
        submitted = client.post("/v1/merges", json=spec)
        assert submitted.status_code == 202, submitted.text
        done = stack.wait_for_job(client, submitted.json()["id"])
        assert done["status"] == "succeeded", done
        other = client.post("/v1/merges", json=spec)
        assert other.status_code == 202, other.text
        dataset = client.post("/v1/datasets", files={"file": ("ds.jsonl", DATASET)})
        assert dataset.status_code == 201, dataset.text
        KNOWN.update(
            job_id=[done["id"], other.json()["id"]],
            path=[f["path"] for f in done["result"]["files"]],
            dataset_id=[dataset.json()["id"]],
        )
        try:
            yield {
                "stack": stack,
                "base_url": stack.base_url,
                "headers": {"Authorization": client.headers["Authorization"]},
            }
        finally:
            KNOWN.clear()


# Ids that exist in the live service, filled in by the `live` fixture (the schema and its
# hook are built at import time, before the service runs).
KNOWN: dict[str, list[str]] = {}

schema = schemathesis.openapi.from_path(
    OPENAPI,
    config=schemathesis.Config.from_dict(
        {
            "request-timeout": 60,
            "generation": {
                "max-examples": MAX_EXAMPLES,
                "mode": "all",
                # The key is sent by the test (ignored_auth checks requests without it).
                "with-security-parameters": False,
                # Unknown query parameters are ignored, as in most HTTP APIs, not refused.
                "allow-extra-parameters": False,
            },
            "checks": {name: {"enabled": False} for name in CHECKS_OFF},
        }
    ),
)


@schema.hook
def before_generate_path_parameters(_: Any, strategy: st.SearchStrategy) -> Any:
    """Path parameters are the fuzzer's, or (half the time) ids that exist."""

    def swap(params: dict[str, Any] | None) -> st.SearchStrategy:
        names = [name for name in params or {} if KNOWN.get(name)]
        if not names:
            return st.just(params)
        real = st.fixed_dictionaries(
            {n: st.sampled_from(KNOWN[n]) if n in names else st.just(v) for n, v in params.items()}
        )
        return st.one_of(st.just(params), real)  # type: ignore[arg-type]

    return strategy.flatmap(swap)


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_openapi_contract(case: schemathesis.Case, live: dict[str, Any]) -> None:
    case.call_and_validate(base_url=live["base_url"], headers=live["headers"])


def test_stateful_links(live: dict[str, Any]) -> None:
    """Sequences along the links Schemathesis infers: a job made by POST /v1/merges is read,
    cancelled and its trials listed; a dataset made by POST /v1/datasets is read and deleted,
    then reads as 404 (use_after_free). The same checks run on every step."""

    class Links(schema.as_state_machine()):  # type: ignore[misc]
        def get_call_kwargs(self, case: schemathesis.Case) -> dict[str, Any]:
            return {"base_url": live["base_url"], "headers": live["headers"]}

    Links.run(
        settings=settings(
            max_examples=max(10, MAX_EXAMPLES // 4),
            stateful_step_count=6,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        )
    )
    # Every step above was checked; the service is still up and answering after all of it.
    live["stack"].wait_ready(timeout=30)
