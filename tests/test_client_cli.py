"""`crucible submit --wait`, `crucible download` and crucible.client against the live
service: `crucible serve` and a Celery worker as processes, PostgreSQL, Redis, s3rver (a
real S3-compatible server) for the output, and a webhook receiver on loopback.

The end-to-end path of issue 7: submit with --wait (live stages and best trial, the result
URI printed), the output found in S3 with the recorded hashes, the webhook delivered and
its HMAC signature verified by the receiver, and the files downloaded and hash-checked.
Client retries and the polling fallback go through a fault-injecting proxy in front of
the real API.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from rich.console import Console

from crucible.client import (
    ChecksumMismatch,
    CrucibleClient,
    Event,
    InvalidRequest,
    NotFound,
    Unauthorized,
    parse_sse,
)
from crucible.watch import JobView
from tests.support.flaky_proxy import Fault, FlakyProxy
from tests.support.receiver import WebhookReceiver
from tests.support.s3 import S3Server, s3_server
from tests.support.stack import REPO_ROOT
from tests.support.watch_world import TRIALS, ServeStack, World, submit, watch_stack

BUCKET = "merged"
SECRET = "a-webhook-secret-of-enough-length"


@pytest.fixture(scope="module")
def live(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[ServeStack, World, S3Server, WebhookReceiver]]:
    work = tmp_path_factory.mktemp("client-cli")
    with (
        s3_server(work / "s3", buckets=(BUCKET,)) as s3,
        WebhookReceiver() as hook,
    ):
        env = {**s3.env(), "CRUCIBLE_WEBHOOK_ALLOWED_HOSTS": json.dumps(["127.0.0.1/32"])}
        with watch_stack(work, work / "models", env) as (stack, world):
            yield stack, world, s3, hook


def cli(stack: ServeStack, key: str | None, *args: str) -> subprocess.CompletedProcess[str]:
    """The `crucible` command as a user runs it: URL and key from the environment."""
    env = {**os.environ, "CRUCIBLE_URL": stack.base_url, "COLUMNS": "200"}
    env.pop("CRUCIBLE_API_KEY", None)
    if key is not None:
        env["CRUCIBLE_API_KEY"] = key
    return subprocess.run(
        [sys.executable, "-m", "crucible.cli", *args],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def write_spec(path: Path, spec: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(spec))
    return path


def job_id_in(stderr: str) -> str:
    match = re.search(r"job (job_[0-9a-f]{24}) ", stderr)
    assert match, stderr
    return match.group(1)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.e2e
def test_submit_wait_publishes_to_s3_signs_the_webhook_and_downloads(
    live: tuple[ServeStack, World, S3Server, WebhookReceiver], tmp_path: Path
) -> None:
    stack, world, s3, hook = live
    spec = world.tuned_spec()
    spec["output"]["uri"] = f"s3://{BUCKET}/cli/run-1"
    spec["webhook"] = {"url": hook.url, "secret": SECRET}
    done = cli(stack, world.key, "submit", str(write_spec(tmp_path / "s.yaml", spec)), "--wait")
    assert done.returncode == 0, done.stderr + stack.logs()
    job_id = job_id_in(done.stderr)
    job = world.client.get(f"/v1/merges/{job_id}").json()
    assert job["status"] == "succeeded"

    # The result URI is what stdout ends with; the stages and the best trial were shown live.
    assert done.stdout.strip().splitlines()[-1] == job["result"]["uri"] == spec["output"]["uri"]
    shown = re.findall(r"^stage (\w+)$", done.stderr, flags=re.MULTILINE)
    assert shown == ["resolve", "tune", "merge", "evaluate", "publish"], done.stderr
    trials = world.client.get(f"/v1/merges/{job_id}/trials").json()
    best_lines = re.findall(r"best trial (\d+):", done.stderr)
    assert best_lines and int(best_lines[-1]) == trials["best"], done.stderr

    # The output is in S3 under the prefix, every file with the recorded hash.
    files = {f["path"]: f for f in job["result"]["files"]}
    keys = set(s3.keys(BUCKET, "cli/run-1/"))
    for path, entry in files.items():
        assert f"cli/run-1/{path}" in keys, (path, sorted(keys))
        assert hashlib.sha256(s3.read(BUCKET, f"cli/run-1/{path}")).hexdigest() == entry["sha256"]

    # The webhook came, signed with the spec's secret over timestamp + "." + body.
    deliveries = [d for d in hook.wait_for(1) if json.loads(d.body).get("id") == job_id]
    assert deliveries, [d.body[:200] for d in hook.deliveries]
    delivery = deliveries[-1]
    body = json.loads(delivery.body)
    assert body["status"] == "succeeded" and body["result"]["uri"] == spec["output"]["uri"]
    expected = hmac.new(
        SECRET.encode(),
        delivery.headers["X-Crucible-Timestamp"].encode() + b"." + delivery.body,
        hashlib.sha256,
    ).hexdigest()
    assert hmac.compare_digest(delivery.headers["X-Crucible-Signature"], f"sha256={expected}")
    assert SECRET not in delivery.body.decode()

    # `crucible download` writes every file, each with its recorded sha256.
    out = tmp_path / "downloaded"
    got = cli(stack, world.key, "download", job_id, str(out))
    assert got.returncode == 0, got.stderr
    assert sorted(got.stdout.split()) == sorted(str(out / p) for p in files)
    for path, entry in files.items():
        assert sha256(out / path) == entry["sha256"], path
        assert (out / path).stat().st_size == entry["bytes"]

    # A file altered on the server is refused, and nothing is left where it would go.
    served = stack.env["CRUCIBLE_DATA_DIR"]
    config = Path(served) / "artifacts" / "jobs" / job_id / "output" / "config.json"
    config.write_text(config.read_text().replace("{", "{ ", 1))
    bad = cli(stack, world.key, "download", job_id, str(tmp_path / "bad"))
    assert bad.returncode == 1
    assert "config.json" in bad.stderr and "sha256" in bad.stderr, bad.stderr
    assert not (tmp_path / "bad" / "config.json").exists()
    assert not list((tmp_path / "bad").glob(".*.partial"))


@pytest.mark.e2e
def test_submit_wait_exits_non_zero_with_the_code_when_the_job_fails(
    live: tuple[ServeStack, World, S3Server, WebhookReceiver], tmp_path: Path
) -> None:
    stack, world, _, _ = live
    path = write_spec(tmp_path / "failing.yaml", world.failing_spec())
    done = cli(stack, world.key, "submit", str(path), "--wait")
    assert done.returncode == 1, done.stderr
    job_id = job_id_in(done.stderr)
    assert f"job {job_id} failed: source_not_found:" in " ".join(done.stderr.split())
    assert "no-such-expert" in done.stderr
    assert done.stdout.strip() == ""  # no URI


@pytest.mark.e2e
def test_submit_refusals_exit_2_with_the_servers_code(
    live: tuple[ServeStack, World, S3Server, WebhookReceiver], tmp_path: Path
) -> None:
    stack, world, _, _ = live
    spec = world.plain_spec()
    spec["method"] = {"name": "no_such_method"}
    bad = cli(stack, world.key, "submit", str(write_spec(tmp_path / "bad.yaml", spec)))
    assert bad.returncode == 2 and "invalid_request" in bad.stderr, bad.stderr
    plain = write_spec(tmp_path / "plain.yaml", world.plain_spec())
    anonymous = cli(stack, None, "submit", str(plain))
    assert anonymous.returncode == 2 and "unauthorized" in anonymous.stderr
    missing = cli(stack, world.key, "submit", str(tmp_path / "missing.yaml"))
    assert missing.returncode == 2 and "missing.yaml" in missing.stderr
    # Without --wait: the job id on stdout, queued.
    queued = cli(stack, world.key, "submit", str(plain))
    assert queued.returncode == 0, queued.stderr
    job_id = queued.stdout.strip()
    assert re.fullmatch(r"job_[0-9a-f]{24}", job_id)
    assert stack.wait_for_job(world.client, job_id)["status"] == "succeeded"


@pytest.mark.e2e
def test_python_client_submit_wait_trials_datasets_and_errors(
    live: tuple[ServeStack, World, S3Server, WebhookReceiver], tmp_path: Path
) -> None:
    stack, world, _, _ = live
    with CrucibleClient(stack.base_url, world.key) as client:
        job = client.submit(world.tuned_spec(), idempotency_key="pipeline-run-7")
        again = client.submit(world.tuned_spec(), idempotency_key="pipeline-run-7")
        assert again.id == job.id
        seen: list[Event] = []
        done = client.wait(job.id, on_event=seen.append, timeout=600)
        assert done.status == "succeeded" and done.result is not None
        assert seen[0].event == "status" and seen[-1].event == "status"
        assert [e.data["stage"] for e in seen if e.event == "stage"] == [
            "resolve",
            "tune",
            "merge",
            "evaluate",
            "publish",
        ]
        assert [e.data["index"] for e in seen if e.event == "trial"] == list(range(TRIALS))
        trials = client.trials(job.id)
        assert len(trials["items"]) == TRIALS and trials["best"] in range(TRIALS)
        assert client.cancel(job.id).status == "succeeded"  # finished jobs are unchanged
        assert job.id in [j.id for j in client.list_jobs(status="succeeded", limit=1)]

        paths = client.download(job.id, tmp_path / "out")
        recorded = {f.path: f.sha256 for f in done.result.files}
        assert {p.relative_to(tmp_path / "out").as_posix(): sha256(p) for p in paths} == recorded

        data = tmp_path / "extra.jsonl"
        data.write_text('{"text": "a b c", "label": "pos"}\n{"text": "d e", "label": "neg"}\n')
        record = client.upload_dataset(data, name="extra", labels=["pos", "neg"])
        assert record["rows"] == 2 and record["schema"] == "classification"
        listed = {d["id"] for d in client.list_datasets(limit=1)}
        assert {record["id"], *world.datasets.values()} <= listed
        client.delete_dataset(record["id"])
        assert record["id"] not in {d["id"] for d in client.list_datasets()}

        with pytest.raises(NotFound) as missing:
            client.get("job_000000000000000000000000")
        assert missing.value.code == "not_found" and missing.value.status_code == 404
        bad = world.plain_spec()
        bad["experts"][0]["weight"] = "heavy"
        with pytest.raises(InvalidRequest) as invalid:
            client.submit(bad)
        assert invalid.value.code == "invalid_request"
        assert any("weight" in d["field"] for d in invalid.value.detail)
    with CrucibleClient(stack.base_url, "not-a-key") as stranger:
        with pytest.raises(Unauthorized) as denied:
            stranger.get(job.id)
        assert denied.value.code == "unauthorized" and denied.value.request_id


@pytest.mark.e2e
def test_client_retries_and_falls_back_to_polling_through_a_flaky_proxy(
    live: tuple[ServeStack, World, S3Server, WebhookReceiver], tmp_path: Path
) -> None:
    stack, world, _, _ = live
    faults = [
        # The first two POSTs never reach the API: a retried submit makes one job.
        Fault(r"^/v1/merges$", "status", times=2, status=503, method="POST"),
        # This "server" has no event stream: wait() polls instead.
        Fault(r"/events$", "status", times=-1, status=404),
        # A download cut mid-body is fetched again, and passes its hash check.
        Fault(r"/files/model\.safetensors", "cut", times=1),
    ]

    def job_count() -> int:
        return len(world.client.get("/v1/merges", params={"limit": 200}).json()["items"])

    before = job_count()
    with (
        FlakyProxy(stack.base_url, faults) as proxy,
        CrucibleClient(proxy.endpoint, world.key, retry_base_seconds=0.05) as client,
    ):
        job = client.submit(world.plain_spec())
        assert proxy.count(r"^/v1/merges$", "POST") == 3
        assert job_count() == before + 1
        polled: list[Event] = []
        done = client.wait(job.id, on_event=polled.append, timeout=600, poll_interval=0.2)
        assert done.status == "succeeded"
        assert proxy.count(r"/events$") >= 1 and proxy.count(rf"^/v1/merges/{job.id}$") >= 2
        assert polled[-1].event == "status" and polled[-1].data["status"] == "succeeded"
        assert any(e.event == "progress" for e in polled)

        out = tmp_path / "out"
        client.download(job.id, out)
        files = {f.path: f for f in done.result.files} if done.result else {}
        assert "model.safetensors" in files
        assert proxy.count(r"/files/model\.safetensors") == 2
        for path, entry in files.items():
            assert sha256(out / path) == entry.sha256

    # A hash mismatch is an error, not a silently kept file (short answer, matching length).
    short = [Fault(r"/files/config\.json", "short", times=-1)]
    with (
        FlakyProxy(stack.base_url, short) as proxy,
        CrucibleClient(proxy.endpoint, world.key, retries=1) as client,
    ):
        with pytest.raises(ChecksumMismatch, match=r"config\.json"):
            client.download(job.id, tmp_path / "short")
        assert not (tmp_path / "short" / "config.json").exists()


@pytest.mark.e2e
def test_logs_are_json_lines_with_request_and_job_ids(
    live: tuple[ServeStack, World, S3Server, WebhookReceiver],
) -> None:
    stack, world, _, _ = live
    resp = world.client.get("/v1/merges", headers={"X-Request-ID": "trace-abc.123"})
    assert resp.status_code == 200 and resp.headers["X-Request-ID"] == "trace-abc.123"
    generated = world.client.get("/healthz").headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    unsafe = world.client.get("/healthz", headers={"X-Request-ID": "bad id\twith spaces"})
    assert unsafe.headers["X-Request-ID"] != "bad id\twith spaces"
    job_id = submit(world, world.plain_spec())
    stack.wait_for_job(world.client, job_id)

    def records(name: str) -> list[dict[str, Any]]:
        lines = [ln for ln in stack.log_text(name).splitlines() if ln.startswith("{")]
        return [json.loads(ln) for ln in lines]

    api = records("api")
    assert api and all({"ts", "level", "logger", "message"} <= set(r) for r in api)
    access = [r for r in api if r.get("request_id") == "trace-abc.123"]
    assert access and "/v1/merges" in access[0]["message"], api[-5:]
    worker = records("worker")
    assert any(r.get("job_id") == job_id for r in worker), worker[-10:]
    # Nothing secret reaches the logs: the webhook secret of the first test, the API key.
    text = stack.log_text("api") + stack.log_text("worker")
    assert SECRET not in text and world.key not in text


def _feed(view: JobView) -> None:
    view.on_event(Event("status", {"status": "running"}))
    view.on_event(Event("stage", {"stage": "resolve"}))
    view.on_event(Event("progress", {"stage": "tune", "done": 2, "total": 8, "unit": "trials"}))
    for index, score in enumerate((0.5, 0.8, 0.6)):
        trial = {"index": index, "objective": score, "metric": "accuracy", "value": score}
        view.on_event(Event("trial", trial))
    view.on_event(Event("event", {"kind": "warning", "message": "odd [bold]x[/bold] thing"}))


def test_the_view_draws_stage_percentage_and_best_trial_on_a_terminal() -> None:
    out = io.StringIO()
    with JobView(Console(file=out, force_terminal=True, width=140), "job_x") as view:
        _feed(view)
    text = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", out.getvalue()).replace("\r", "\n")
    last = [ln for ln in text.splitlines() if ln.startswith("tune")][-1]
    assert "25%" in last and "2/8 trials" in last and "best trial 1: accuracy 0.8" in last
    assert "odd [bold]x[/bold] thing" in text  # server text is shown, never read as markup


def test_the_view_prints_lines_elsewhere() -> None:
    out = io.StringIO()
    with JobView(Console(file=out, force_terminal=False, width=140), "job_x") as view:
        _feed(view)
    lines = out.getvalue().splitlines()
    assert lines == [
        "stage resolve",
        "stage tune",
        "  best trial 0: accuracy 0.5",
        "  best trial 1: accuracy 0.8",
        "  warning: odd [bold]x[/bold] thing",
    ]


def test_sse_parsing_follows_the_format() -> None:
    stream = [
        "retry: 2000",
        "",
        ": keep-alive",
        "",
        "id: 3-1",
        "event: trial",
        'data: {"index": 0,',
        'data:  "objective": 0.5}',
        "",
        "data: plain text",
        "",
    ]
    events = list(parse_sse(iter(stream)))
    assert events == [
        Event("trial", {"index": 0, "objective": 0.5}, "3-1"),
        Event("message", "plain text", "3-1"),
    ]
