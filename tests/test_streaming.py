"""Stream mode (CRUCIBLE_SOURCE_MODE=stream): Hub weights read with HTTP range requests.

The Hub is olah serving local git repos. olah in that mode ignores `Range` (200 with the
whole file), where huggingface.co and its CDN answer 206; tests/support/range_proxy.py puts
a range-answering front on olah (the bytes are olah's), and tests/support/flaky_proxy.py
injects faults in front of that. Direct olah is the "server without ranges" case.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from peft import LoraConfig

import crucible.engine as engine
import crucible.sources.remote as remote
from crucible.errors import CrucibleError
from crucible.pipeline import _streams, run_merge_job
from crucible.settings import Settings
from crucible.sources.resolve import resolve_model
from crucible.sources.tensor_reader import TensorReader
from crucible.spec import MergeSpec, ModelRef
from tests.support.flaky_proxy import Fault, FlakyProxy
from tests.support.lora_models import make_lora_family
from tests.support.olah import HUB_ENV_REMOVE, OlahServer, hub_env
from tests.support.range_proxy import RangeProxy
from tests.support.reporters import QuietReporter
from tests.support.tiny_models import make_gpt2_family

WEIGHTS = r"/resolve/[0-9a-f]{40}/model\.safetensors$"


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("hub")
    base, experts = make_gpt2_family(root / "gpt2", n_experts=2, seed=21)
    sharded, sharded_experts = make_gpt2_family(
        root / "sharded", n_experts=1, seed=22, max_shard_size="100KB"
    )
    lora = make_lora_family(
        root / "lora",
        [LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])],
        base_name="org/llama-base",
    )
    with OlahServer(root / "olah") as server, RangeProxy(server.endpoint) as ranges:
        server.add_repo("org/base", base)
        for i, folder in enumerate(experts):
            server.add_repo(f"org/expert-{i}", folder)
        server.add_repo("org/sharded", sharded)
        server.add_repo("org/sharded-expert", sharded_experts[0])
        server.add_repo("org/llama-base", lora.base)
        server.add_repo("org/adapter", lora.adapters[0])
        yield {"server": server, "ranges": ranges, "base": base}


@pytest.fixture
def hub_at(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Any]:
    """`hub_at(endpoint, name)` points the process at `endpoint` with a fresh HF cache."""
    for key in HUB_ENV_REMOVE:
        monkeypatch.delenv(key, raising=False)

    def point(endpoint: str, name: str) -> Path:
        home = tmp_path / name
        for key, value in hub_env(endpoint, home).items():
            monkeypatch.setenv(key, value)
        return home

    yield point


class Recorder(QuietReporter):
    """Keeps events; runs `on_merge` when the merge stage starts (after resolve)."""

    def __init__(self, on_merge: Any = None) -> None:
        self.events: list[tuple[str, str, dict[str, Any] | None]] = []
        self.on_merge = on_merge

    def stage(self, name: str) -> None:
        if name == "merge" and self.on_merge is not None:
            self.on_merge()

    def event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        self.events.append((kind, message, data))

    def kinds(self) -> list[str]:
        return [k for k, _, _ in self.events]

    def retries(self) -> list[dict[str, Any]]:
        return [d or {} for k, _, d in self.events if k == "retry"]


def _spec(method: str, base: str = "org/base", experts: tuple[str, ...] = ()) -> MergeSpec:
    names = experts or ("org/expert-0", "org/expert-1")
    params: dict[str, Any] = {"density": 0.5} if method == "ties" else {}
    return MergeSpec.model_validate(
        {
            "base": {"uri": f"hf://{base}"},
            "experts": [{"uri": f"hf://{n}", "weight": 0.5 + i} for i, n in enumerate(names)],
            "method": {"name": method, "params": params},
        }
    )


def _settings(tmp_path: Path, mode: str, attempts: int = 4) -> Settings:
    return Settings(
        data_dir=tmp_path / f"data-{mode}",
        source_mode=mode,  # type: ignore[arg-type]
        retry_attempts=attempts,
        retry_base_seconds=0.01,
        retry_max_seconds=0.05,
    )


def _weights(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


def _weight_blobs(hf_home: Path) -> list[str]:
    """Files in the HF cache that hold safetensors bytes (snapshot links or blobs)."""
    found = []
    for path in hf_home.rglob("*"):
        if path.is_file() and not path.name.endswith(".lock"):
            with path.open("rb") as fh:
                head = fh.read(16)
            if path.name.endswith(".safetensors") or head[8:10] == b'{"':
                found.append(str(path.relative_to(hf_home)))
    return found


def _download_merge(spec: MergeSpec, hub: dict[str, Any], hub_at: Any, tmp_path: Path) -> Path:
    hub_at(hub["server"].endpoint, "hf-download")
    out = run_merge_job(
        spec, tmp_path / "download", _settings(tmp_path, "download"), QuietReporter()
    ).output_dir
    return out


@pytest.mark.parametrize(
    ("method", "base", "experts"),
    [
        ("task_arithmetic", "org/base", ()),
        ("ties", "org/base", ()),
        ("tsv", "org/base", ()),  # a matrix method: whole tensors in float64
        ("linear", "org/sharded", ("org/sharded-expert",)),  # index + several shards
    ],
)
def test_stream_merge_equals_download_merge_and_leaves_no_weights_in_the_cache(
    hub: dict[str, Any],
    hub_at: Any,
    tmp_path: Path,
    method: str,
    base: str,
    experts: tuple[str, ...],
) -> None:
    spec = _spec(method, base, experts)
    expected = _weights(_download_merge(spec, hub, hub_at, tmp_path))

    hub["ranges"].clear()
    home = hub_at(hub["ranges"].endpoint, "hf-stream")
    reporter = Recorder()
    outcome = run_merge_job(spec, tmp_path / "stream", _settings(tmp_path, "stream"), reporter)

    assert _weights(outcome.output_dir) == expected  # byte for byte, every shard
    assert len(expected) >= 1
    assert "stream_fallback" not in reporter.kinds()
    assert _weight_blobs(home) == []  # config/tokenizer only: no weights on disk
    assert (home / "hub" / f"models--{base.replace('/', '--')}" / "snapshots").is_dir()
    served = hub["ranges"].ranges
    assert served and all("/resolve/" in s.path and s.path.endswith(".safetensors") for s in served)
    assert outcome.metrics["input_bytes"] > 0


def test_reads_are_ranges_of_the_engine_blocks_and_each_byte_is_fetched_once(
    hub: dict[str, Any], hub_at: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine's bounded memory holds: with small blocks (and no coalescing beyond a
    small window) no request is larger than a block or the window, while the largest
    tensor is several times larger, and the data of each file is fetched once."""
    monkeypatch.setattr(engine, "BLOCK_ELEMENTS", 2048)  # 8 KiB of float32 per input
    monkeypatch.setattr(engine, "CHUNK_BYTES", 1, raising=False)  # prefetch: one block a chunk
    monkeypatch.setattr(remote, "SMALL_READ_BYTES", 4096)
    monkeypatch.setattr(remote, "COALESCE_BYTES", 12 * 1024)
    monkeypatch.setattr(remote, "HEADER_PROBE_BYTES", 512)  # header in two requests
    spec = _spec("task_arithmetic")
    expected = _weights(_download_merge(spec, hub, hub_at, tmp_path))

    hub["ranges"].clear()
    hub_at(hub["ranges"].endpoint, "hf-stream")
    outcome = run_merge_job(spec, tmp_path / "stream", _settings(tmp_path, "stream"), Recorder())
    assert _weights(outcome.output_dir) == expected

    base_file = hub["base"] / "model.safetensors"
    size = base_file.stat().st_size
    with TensorReader(resolve_model(ModelRef(uri=f"file://{hub['base']}"), _local(hub))) as r:
        largest = max(r.info(n).nbytes for n in r.names())
    assert largest >= 4 * 12 * 1024
    per_file: dict[str, list[tuple[int, int]]] = {}
    for s in hub["ranges"].ranges:
        per_file.setdefault(s.path, []).append((s.first, s.last))
    assert len(per_file) == 3  # base and two experts
    for path, spans in per_file.items():
        probes = [sp for sp in spans if sp[0] < 512 + 8]  # the header's two requests
        data = sorted(sp for sp in spans if sp not in probes)
        assert len(probes) == 2, (path, probes)
        assert all(last - first + 1 <= 12 * 1024 for first, last in data), path
        fetched = sum(last - first + 1 for first, last in data)
        header_end = probes[-1][1] + 1
        assert fetched == size - header_end, path  # every data byte once, none twice


def _local(hub: dict[str, Any]) -> Settings:
    return Settings(allowed_local_dirs=[hub["base"].parent])


def test_a_server_that_ignores_range_falls_back_to_download(
    hub: dict[str, Any], hub_at: Any, tmp_path: Path
) -> None:
    spec = _spec("task_arithmetic")
    expected = _weights(_download_merge(spec, hub, hub_at, tmp_path))
    home = hub_at(hub["server"].endpoint, "hf-direct")  # olah itself: 200 to a range
    reporter = Recorder()
    outcome = run_merge_job(spec, tmp_path / "stream", _settings(tmp_path, "stream"), reporter)
    assert _weights(outcome.output_dir) == expected
    fallbacks = [m for k, m, _ in reporter.events if k == "stream_fallback"]
    assert len(fallbacks) == 3
    assert "answered HTTP 200 to a range request" in fallbacks[0]
    assert len(_weight_blobs(home)) == 6  # downloaded: 3 snapshot links + 3 blobs


def test_an_adapter_expert_is_downloaded_and_its_base_streamed(
    hub: dict[str, Any], hub_at: Any, tmp_path: Path
) -> None:
    spec = _spec("task_arithmetic", "org/llama-base", ("org/adapter",))
    expected = _weights(_download_merge(spec, hub, hub_at, tmp_path))
    home = hub_at(hub["ranges"].endpoint, "hf-stream")
    outcome = run_merge_job(spec, tmp_path / "stream", _settings(tmp_path, "stream"), Recorder())
    assert _weights(outcome.output_dir) == expected
    on_disk = _weight_blobs(home)
    assert on_disk and all("models--org--adapter" in p for p in on_disk)


def _fault_on_merge(proxy: FlakyProxy, faults: list[Fault]) -> Recorder:
    """Faults that start with the merge stage: they hit the tensor reads, not the headers."""
    return Recorder(on_merge=lambda: proxy.set_faults(faults))


@pytest.fixture
def flaky(hub: dict[str, Any]) -> Iterator[FlakyProxy]:
    with FlakyProxy(hub["ranges"].endpoint) as proxy:
        yield proxy


def test_a_range_request_answered_503_twice_is_retried(
    hub: dict[str, Any], hub_at: Any, tmp_path: Path, flaky: FlakyProxy
) -> None:
    spec = _spec("task_arithmetic")
    expected = _weights(_download_merge(spec, hub, hub_at, tmp_path))
    hub_at(flaky.endpoint, "hf-stream")
    reporter = _fault_on_merge(flaky, [Fault(WEIGHTS, "status", times=2, status=503)])
    outcome = run_merge_job(spec, tmp_path / "stream", _settings(tmp_path, "stream"), reporter)
    assert _weights(outcome.output_dir) == expected
    retries = reporter.retries()
    assert [r["status"] for r in retries] == [503, 503]
    assert all(r["call"].startswith("range read org/") for r in retries)
    assert [s.status for s in flaky.seen if s.fault] == [503, 503]


@pytest.mark.parametrize("kind", ["short", "cut"])
def test_a_truncated_range_body_is_retried(
    hub: dict[str, Any], hub_at: Any, tmp_path: Path, flaky: FlakyProxy, kind: str
) -> None:
    """short: half the body behind a matching Content-Length (only the range's length
    shows it); cut: the connection closes mid-body."""
    spec = _spec("task_arithmetic")
    expected = _weights(_download_merge(spec, hub, hub_at, tmp_path))
    hub_at(flaky.endpoint, "hf-stream")
    reporter = _fault_on_merge(flaky, [Fault(WEIGHTS, kind, times=1)])
    outcome = run_merge_job(spec, tmp_path / "stream", _settings(tmp_path, "stream"), reporter)
    assert _weights(outcome.output_dir) == expected
    retries = reporter.retries()
    assert len(retries) == 1
    expected_error = "TruncatedBody" if kind == "short" else "RemoteProtocolError"
    assert retries[0]["error"] == expected_error


def test_a_range_that_stays_truncated_fails_clearly(
    hub: dict[str, Any], hub_at: Any, tmp_path: Path, flaky: FlakyProxy
) -> None:
    hub_at(flaky.endpoint, "hf-stream")
    reporter = _fault_on_merge(flaky, [Fault(WEIGHTS, "short", times=-1)])
    with pytest.raises(CrucibleError) as err:
        run_merge_job(
            _spec("task_arithmetic"),
            tmp_path / "stream",
            _settings(tmp_path, "stream", attempts=3),
            reporter,
        )
    assert err.value.code == "stream_unavailable"
    assert "model.safetensors in Hub repository 'org/" in err.value.message
    assert "TruncatedBody" in err.value.message and "after 3 attempts" in err.value.message
    assert err.value.detail["file"] == "model.safetensors"
    assert len(reporter.retries()) == 2
    assert not (tmp_path / "stream").exists()
    assert not list(tmp_path.glob("stream.partial*"))


def test_a_missing_file_is_source_not_found_without_retries(
    hub: dict[str, Any], hub_at: Any, tmp_path: Path, flaky: FlakyProxy
) -> None:
    hub_at(flaky.endpoint, "hf-stream")
    reporter = _fault_on_merge(flaky, [Fault(WEIGHTS, "status", times=-1, status=404)])
    with pytest.raises(CrucibleError) as err:
        run_merge_job(
            _spec("task_arithmetic"), tmp_path / "out", _settings(tmp_path, "stream"), reporter
        )
    assert err.value.code == "source_not_found"
    assert "HTTP 404" in err.value.message
    assert reporter.retries() == []


def test_jobs_that_load_whole_models_do_not_stream(tmp_path: Path) -> None:
    """Statistics (Grams from forward passes) and tuning load models through transformers:
    their weights are downloaded even in stream mode, and the job says so."""
    grams = MergeSpec.model_validate(
        {
            "base": {"uri": "hf://org/base"},
            "experts": [{"uri": "hf://org/expert-0", "dataset": "ds_0123456789"}],
            "method": {"name": "regmean", "params": {}},
        }
    )
    plain = _spec("task_arithmetic")
    reporter = Recorder()
    assert grams.needs_grams()
    assert _streams(grams, _settings(tmp_path, "stream"), reporter) is False
    assert reporter.kinds() == ["stream_skipped"]
    assert _streams(plain, _settings(tmp_path, "stream"), reporter) is True
    assert _streams(plain, _settings(tmp_path, "download"), reporter) is False
