"""`crucible` command line: up | serve | worker | reap | merge | submit | download | keys |
openapi."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console

from crucible.settings import Settings, get_settings

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
keys_app = typer.Typer(no_args_is_help=True, help="Manage API keys (stored hashed).")
app.add_typer(keys_app, name="keys")
console = Console(stderr=True)


def _store(settings: Settings) -> Any:
    from crucible.store import JobStore

    store = JobStore(settings.resolved_database_url, settings.artifacts_root)
    store.migrate()
    return store


def worker_argv(concurrency: int, pool: str, loglevel: str) -> list[str]:
    """The command line of one Celery worker on the gpu queue (used by `up` and tests)."""
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.app:celery",
        "worker",
        "-Q",
        "gpu",
        "--concurrency",
        str(concurrency),
        "--pool",
        pool,
        "--loglevel",
        loglevel,
        "--without-gossip",
        "--without-mingle",
    ]


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Bind address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
) -> None:
    """Run the HTTP API (uvicorn). Logs JSON lines unless CRUCIBLE_LOG_FORMAT=text."""
    import uvicorn

    from crucible.logs import configure_logging

    configure_logging("json")
    # log_config=None: uvicorn's loggers go through ours instead of its own formatters.
    uvicorn.run("service.app:create_app", factory=True, host=host, port=port, log_config=None)


@app.command()
def worker(
    concurrency: Annotated[int, typer.Option(help="Jobs run at once.")] = 1,
    pool: Annotated[str, typer.Option(help="Celery pool: prefork or solo.")] = "prefork",
    loglevel: Annotated[str, typer.Option()] = "info",
) -> None:
    """Run a Celery worker on the `gpu` queue."""
    os.execv(sys.executable, worker_argv(concurrency, pool, loglevel))


@app.command()
def reap() -> None:
    """Requeue running jobs whose worker stopped renewing its lease (or fail them with
    worker_lost after max_attempts), resend stale queued jobs and owed webhooks. Workers
    do this on their own; this is one pass now."""
    from crucible.reaper import celery_enqueue, celery_enqueue_webhook, reap_once

    settings = get_settings()
    store = _store(settings)
    result = reap_once(store, settings, celery_enqueue(settings), celery_enqueue_webhook(settings))
    typer.echo(
        json.dumps(
            {
                "requeued": result.requeued,
                "failed": result.failed,
                "unsent": result.unsent,
                "resent": result.resent,
                "webhooks": result.webhooks,
                "webhooks_unsent": result.webhooks_unsent,
            }
        )
    )
    if result.unsent or result.webhooks_unsent:
        raise typer.Exit(1)


@app.command()
def up(
    data_dir: Annotated[Path, typer.Option(help="Folder for every embedded default.")] = Path(
        ".data"
    ),
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
) -> None:
    """Start the API and one worker with embedded defaults (SQLite, filesystem broker,
    local artifact store), all under DATA_DIR. Ctrl-C stops both."""
    import uvicorn

    from crucible.logs import LOG_FORMAT_ENV, configure_logging

    os.environ["CRUCIBLE_DATA_DIR"] = str(data_dir.resolve())
    os.environ.setdefault(LOG_FORMAT_ENV, "text")  # a person reads these; the worker too
    configure_logging("text")
    settings = get_settings()
    _store(settings)  # migrate once before two processes race to it
    worker_proc = subprocess.Popen(worker_argv(1, "prefork", "warning"))
    console.print(
        f"[bold]crucible[/] API on http://{host}:{port}, worker pid {worker_proc.pid}, "
        f"data in {settings.data_root}"
    )
    try:
        uvicorn.run("service.app:create_app", factory=True, host=host, port=port, log_config=None)
    finally:
        worker_proc.send_signal(signal.SIGTERM)
        try:
            worker_proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            worker_proc.kill()


class ConsoleReporter:
    """Prints stages and progress for `crucible merge`."""

    def __init__(self) -> None:
        self._stage = ""
        self._last = 0.0

    def stage(self, name: str) -> None:
        self._stage = name
        console.print(f"[bold]{name}[/]")

    def progress(self, done: int, total: int, unit: str) -> None:
        now = time.monotonic()
        if done >= total or now - self._last > 1.0:
            console.print(f"  {self._stage}: {done}/{total} {unit}")
            self._last = now

    def event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        console.print(f"  {message}")

    def check_cancelled(self) -> None:
        return None

    def trial(self, index: int, data: dict[str, Any]) -> None:
        console.print(
            f"  trial {index}: {data.get('metric')} {data.get('value')} "
            f"({data.get('seconds', {}).get('total', '?')} s)"
        )


@app.command()
def merge(
    spec_file: Annotated[Path, typer.Argument(help="A MergeSpec as YAML or JSON.")],
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("merged"),
    tenant: Annotated[
        str, typer.Option(help="Whose uploaded datasets (ds_...) the spec may name.")
    ] = "default",
) -> None:
    """Run a merge locally, without the service (like mergekit-yaml). Datasets the spec
    names are looked up in the store of CRUCIBLE_DATA_DIR / CRUCIBLE_DATABASE_URL."""
    from pydantic import ValidationError

    from crucible.errors import CrucibleError
    from crucible.logs import configure_logging
    from crucible.pipeline import run_merge_job
    from crucible.secrets import JobSecrets
    from crucible.spec import MergeSpec

    configure_logging("text", "WARNING")
    try:
        raw = yaml.safe_load(spec_file.read_text())
        spec = MergeSpec.model_validate(raw)
    except (OSError, yaml.YAMLError) as exc:
        console.print(f"[red]cannot read {spec_file}: {exc}[/]")
        raise typer.Exit(2) from None
    except ValidationError as exc:
        console.print(f"[red]invalid spec:[/]\n{exc}")
        raise typer.Exit(2) from None
    # The local operator may read any local path.
    settings = Settings(allowed_local_dirs=[Path("/")])
    datasets = {}
    if spec.dataset_ids():
        store = _store(settings)
        datasets = {d: store.fetch_dataset(tenant, d) for d in spec.dataset_ids()}
    try:
        # A hub_token in the spec file is used for its hf:// sources (never printed).
        token = JobSecrets.from_spec(spec).hub_token
        outcome = run_merge_job(
            spec, out.resolve(), settings, ConsoleReporter(), datasets, hub_token=token
        )
    except CrucibleError as exc:
        console.print(f"[red]{exc.code}: {exc.message}[/]")
        raise typer.Exit(1) from None
    console.print(f"[green]merged model written to {outcome.output_dir}[/]")
    if outcome.report and (
        outcome.report["summary"]["fallbacks"] or outcome.report["summary"]["ill_conditioned"]
    ):
        console.print(
            f"[yellow]numerics: see {outcome.output_dir / 'merge_report.json'} "
            f"(fallbacks: {len(outcome.report['summary']['fallbacks'])}, ill-conditioned: "
            f"{len(outcome.report['summary']['ill_conditioned'])})[/]"
        )
    typer.echo(json.dumps(outcome.metrics))


@app.command()
def methods(
    name: Annotated[str | None, typer.Argument(help="Show one method's params in full.")] = None,
) -> None:
    """List the merge methods (or one method's params as JSON schema), as GET /v1/methods."""
    from crucible.methods.registry import METHODS, describe, get_method

    if name is not None:
        try:
            info = get_method(name)
        except KeyError as exc:
            console.print(f"[red]{exc.args[0]}[/]")
            raise typer.Exit(2) from None
        typer.echo(json.dumps(describe(info), indent=2))
        return
    for info in METHODS.values():
        needs = f" [needs: {', '.join(sorted(info.needs))}]" if info.needs else ""
        typer.echo(f"{info.name:18} {info.summary.split('. ')[0]}{needs}")


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="Tenant the key acts for.")],
    label: Annotated[str | None, typer.Option(help="A note to recognise the key.")] = None,
) -> None:
    """Create an API key; it is printed once and stored only as a hash."""
    key_id, plaintext = _store(get_settings()).create_api_key(tenant, label)
    console.print(
        f"created key {key_id} for tenant {tenant!r}; store it now, it is not shown again"
    )
    typer.echo(plaintext)


@keys_app.command("list")
def keys_list(tenant: Annotated[str | None, typer.Option()] = None) -> None:
    """List keys (ids, tenants, labels; never the secrets)."""
    for row in _store(get_settings()).list_api_keys(tenant):
        typer.echo(json.dumps(row, default=str))


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument()]) -> None:
    """Revoke a key at once."""
    if not _store(get_settings()).revoke_api_key(key_id):
        console.print(f"[red]no key {key_id}[/]")
        raise typer.Exit(1)
    console.print(f"revoked {key_id}")


@keys_app.command("rotate")
def keys_rotate(key_id: Annotated[str, typer.Argument()]) -> None:
    """Replace a key: a new one for the same tenant is printed once, the old one is revoked
    at once (in one transaction)."""
    rotated = _store(get_settings()).rotate_api_key(key_id)
    if rotated is None:
        console.print(f"[red]no active key {key_id}[/]")
        raise typer.Exit(1)
    new_id, plaintext = rotated
    console.print(f"revoked {key_id}; new key {new_id}: store it now, it is not shown again")
    typer.echo(plaintext)


@app.command()
def openapi(
    check: Annotated[bool, typer.Option(help="Fail if openapi/openapi.json is stale.")] = False,
    path: Annotated[Path, typer.Option()] = Path("openapi/openapi.json"),
) -> None:
    """Write (or check) the OpenAPI document generated from the app."""
    from service.openapi_doc import render_openapi

    text = render_openapi()
    if check:
        if not path.exists() or path.read_text() != text:
            console.print(f"[red]{path} is stale: run `crucible openapi`[/]")
            raise typer.Exit(1)
        console.print(f"{path} is up to date")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    console.print(f"wrote {path}")


_URL = typer.Option(envvar="CRUCIBLE_URL", help="The API's base URL.")
_KEY = typer.Option(envvar="CRUCIBLE_API_KEY", help="API key (or CRUCIBLE_API_KEY).")


@app.command()
def submit(
    spec_file: Annotated[Path, typer.Argument(help="A MergeSpec as YAML or JSON.")],
    wait: Annotated[bool, typer.Option(help="Follow the job live until it ends.")] = False,
    url: Annotated[str, _URL] = "http://127.0.0.1:8000",
    api_key: Annotated[str | None, _KEY] = None,
    idempotency_key: Annotated[
        str | None, typer.Option(help="Resubmitting with the same key returns the same job.")
    ] = None,
    timeout: Annotated[
        float | None, typer.Option(help="With --wait: give up after this many seconds.")
    ] = None,
) -> None:
    """Submit a merge to a Crucible server. Prints the job id; with --wait, shows the
    stage, progress, ETA and best trial live and prints the result URI. Exit status: 0
    succeeded (or queued, without --wait), 1 failed or cancelled, 2 refused by the server
    or unreadable spec, 124 timed out."""
    import httpx
    from rich.markup import escape

    from crucible.client import ApiError, CrucibleClient, WaitTimeout
    from crucible.watch import JobView

    with CrucibleClient(url, api_key) as client:
        try:
            job = client.submit(spec_file, idempotency_key=idempotency_key)
        except (OSError, ValueError, yaml.YAMLError) as exc:
            console.print(f"[red]cannot read {spec_file}: {escape(str(exc))}[/]")
            raise typer.Exit(2) from None
        except ApiError as exc:
            console.print(f"[red]refused: {exc.code}: {escape(exc.message)}[/]")
            raise typer.Exit(2) from None
        except httpx.TransportError as exc:
            console.print(f"[red]cannot reach {url}: {type(exc).__name__}[/]")
            raise typer.Exit(2) from None
        console.print(f"job {job.id} {job.status}")
        if not wait:
            typer.echo(job.id)
            return
        try:
            with JobView(console, job.id) as view:
                job = client.wait(job.id, on_event=view.on_event, timeout=timeout)
        except WaitTimeout as exc:
            console.print(f"[red]{exc}[/]")
            raise typer.Exit(124) from None
    if job.status != "succeeded" or job.result is None:
        error = job.error
        code, message = (error.code, error.message) if error else (job.status, "no error recorded")
        console.print(f"[red]job {job.id} {job.status}: {code}: {escape(message)}[/]")
        raise typer.Exit(1)
    console.print(f"[green]job {job.id} succeeded[/]")
    typer.echo(job.result.uri)


@app.command()
def download(
    job_id: Annotated[str, typer.Argument(help="A succeeded job's id.")],
    dest: Annotated[Path, typer.Argument(help="Folder to write the output files into.")],
    url: Annotated[str, _URL] = "http://127.0.0.1:8000",
    api_key: Annotated[str | None, _KEY] = None,
) -> None:
    """Download every output file of a job, each checked against its recorded sha256."""
    import httpx
    from rich.markup import escape

    from crucible.client import ApiError, ChecksumMismatch, CrucibleClient, JobNotSucceeded

    with CrucibleClient(url, api_key) as client:
        try:
            paths = client.download(job_id, dest)
        except (ApiError, JobNotSucceeded, ChecksumMismatch, ValueError) as exc:
            console.print(f"[red]{escape(str(exc))}[/]")
            raise typer.Exit(1) from None
        except httpx.TransportError as exc:
            console.print(f"[red]cannot reach {url}: {type(exc).__name__}[/]")
            raise typer.Exit(2) from None
    for path in paths:
        typer.echo(str(path))


if __name__ == "__main__":
    app()
