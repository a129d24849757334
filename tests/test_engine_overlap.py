"""The merge stage's threads (crucible/overlap.py and engine.merge_chunks): the prefetch
thread reads chunks ahead, the writer thread writes behind. Their results must equal the
whole-tensor method; an error in either thread must fail the merge with that error, a
cancel must stop both, and no thread may outlive the merge.

Fault injection (a read or a write that fails) patches the one call that fails; every
other part (files, threads, writer) is real."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import crucible.engine as engine
import crucible.pipeline as pipeline
from crucible.errors import CrucibleError
from crucible.methods.base import TensorContext
from crucible.methods.registry import get_method
from crucible.overlap import BackgroundWriter, Prefetcher
from crucible.publish.writer import ShardedSafetensorsWriter
from crucible.settings import Settings
from crucible.sources.tensor_reader import TensorReader
from crucible.spec import MergeSpec
from tests.support.reporters import QuietReporter
from tests.support.tiny_models import make_gpt2_family

THREAD_PREFIX = "crucible-"


def our_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX)]


def wait_no_threads(timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while our_threads() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert our_threads() == [], f"threads left running: {our_threads()}"


# ------------------------------------------------------------------- Prefetcher alone


def test_prefetcher_yields_in_order_and_stays_within_its_slots() -> None:
    out = {"now": 0, "max": 0}
    lock = threading.Lock()

    def produce(take_slot: Callable[[], int]) -> Iterator[tuple[int, int]]:
        for i in range(20):
            slot = take_slot()
            with lock:
                out["now"] += 1
                out["max"] = max(out["max"], out["now"])
            yield slot, i

    got = []
    with Prefetcher(produce, slots=2) as items:
        for slot, item in items:
            time.sleep(0.005)  # the consumer is slower: the producer must wait for slots
            got.append(item)
            with lock:
                out["now"] -= 1
            items.release(slot)
    assert got == list(range(20))
    assert out["max"] == 2
    wait_no_threads()


def test_an_error_in_the_producer_is_raised_in_the_consumer() -> None:
    def produce(take_slot: Callable[[], int]) -> Iterator[tuple[int, int]]:
        for i in range(3):
            yield take_slot(), i
        raise OSError("disk read failed at byte 42")

    got = []
    with pytest.raises(OSError, match="byte 42"), Prefetcher(produce, slots=4) as items:
        for slot, item in items:
            got.append(item)
            items.release(slot)
    assert got == [0, 1, 2]
    wait_no_threads()


def test_close_stops_a_producer_waiting_for_a_slot() -> None:
    def produce(take_slot: Callable[[], int]) -> Iterator[tuple[int, int]]:
        i = 0
        while True:  # endless: only close() ends it
            yield take_slot(), i
            i += 1

    items = Prefetcher(produce, slots=1)
    _slot, first = next(items)  # never released: the producer blocks on its next slot
    assert first == 0
    started = time.monotonic()
    items.close()
    assert time.monotonic() - started < 5
    wait_no_threads()


# ------------------------------------------------------------------- BackgroundWriter alone


def test_writer_thread_error_is_raised_and_abort_removes_the_files(tmp_path: Path) -> None:
    plan = [("a", (4, 3), "F32"), ("b", (2,), "F32")]
    sink = BackgroundWriter(ShardedSafetensorsWriter(tmp_path / "out", plan, 10**6))
    sink.write("a", torch.ones(4, 3))
    sink.write("c", torch.ones(2))  # not in the plan: the writer thread fails
    with pytest.raises(ValueError, match="not in the plan"):
        sink.close()
    sink.abort()
    assert list((tmp_path / "out").iterdir()) == []
    wait_no_threads()


def test_writer_thread_writes_in_order(tmp_path: Path) -> None:
    plan = [("a", (40, 3), "BF16"), ("b", (2,), "F32")]
    sink = BackgroundWriter(ShardedSafetensorsWriter(tmp_path / "out", plan, 10**6), depth=1)
    a = torch.arange(120, dtype=torch.float32).reshape(40, 3)
    for r in range(0, 40, 7):
        sink.write("a", a[r : r + 7].to(torch.bfloat16), r)
    sink.write("b", torch.tensor([1.5, -2.0]))
    sink.close()
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert torch.equal(got["a"], a.to(torch.bfloat16))
    assert torch.equal(got["b"], torch.tensor([1.5, -2.0]))
    wait_no_threads()


# ------------------------------------------------------------------- the merge stage


def _spec(base: Path, experts: list[Path], method: str, params: dict, dtype: str) -> MergeSpec:
    return MergeSpec.model_validate(
        {
            "base": {"uri": base.as_uri()},
            "experts": [
                {"uri": e.as_uri(), "weight": w}
                for e, w in zip(experts, [1.0, 0.6, 1.4], strict=True)
            ],
            "method": {"name": method, "params": params},
            "output": {"dtype": dtype},
        }
    )


@pytest.fixture
def family(tmp_path: Path) -> tuple[Path, list[Path], Settings]:
    base, experts = make_gpt2_family(tmp_path / "models", n_experts=3, seed=21)
    settings = Settings(data_dir=tmp_path / "data", allowed_local_dirs=[tmp_path / "models"])
    return base, experts, settings


CASES = [
    ("linear", {}),
    ("task_arithmetic", {"scale": 0.7}),
    ("ties", {"density": 0.3}),
    ("dare_ties", {"density": 0.4, "seed": 3}),
]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("method", "params"), CASES, ids=[c[0] for c in CASES])
def test_cuda_chunked_merge_equals_the_cpu_merge(
    family: tuple[Path, list[Path], Settings],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    params: dict,
) -> None:
    """On CUDA the prefetch buffers are pinned and uploads are not waited for; a buffer
    reused before its upload finished would corrupt blocks. Many small chunks over few
    slots make reuse frequent; the float32 output must match the CPU merge's to float32
    rounding (GPU kernels may fuse a multiply-add the CPU rounds twice)."""
    base, experts, settings = family
    monkeypatch.setattr(engine, "BLOCK_ELEMENTS", 1000)
    monkeypatch.setattr(engine, "CHUNK_BYTES", 20_000)
    spec = _spec(base, experts, method, params, "float32")
    outputs = {}
    for device in ("cpu", "cuda"):
        run = settings.model_copy(update={"device": device})
        outcome = pipeline.run_merge_job(spec, tmp_path / device, run, QuietReporter())
        outputs[device] = load_file(str(outcome.output_dir / "model.safetensors"))
    assert outputs["cuda"].keys() == outputs["cpu"].keys()
    for name, expected in outputs["cpu"].items():
        torch.testing.assert_close(outputs["cuda"][name], expected, rtol=1e-6, atol=1e-7)
    wait_no_threads()


@pytest.mark.parametrize("whole_bytes", [1 << 30, 0], ids=["stats-in-memory", "stats-reread"])
@pytest.mark.parametrize(("method", "params"), CASES, ids=[c[0] for c in CASES])
def test_chunked_merge_equals_the_whole_tensor_method(
    family: tuple[Path, list[Path], Settings],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    params: dict,
    whole_bytes: int,
) -> None:
    """Small blocks and chunks of a few blocks, so every large tensor is split across
    several chunks; TIES's statistics come from memory (whole-tensor chunk) or from a
    second read of the files. Outputs (bf16) equal the method on whole float32 tensors."""
    base, experts, settings = family
    monkeypatch.setattr(engine, "BLOCK_ELEMENTS", 1000)
    monkeypatch.setattr(engine, "CHUNK_BYTES", 20_000)
    monkeypatch.setattr(engine, "WHOLE_TENSOR_BYTES", whole_bytes)
    spec = _spec(base, experts, method, params, "bfloat16")
    outcome = pipeline.run_merge_job(spec, tmp_path / "out", settings, QuietReporter())
    merged = load_file(str(outcome.output_dir / "model.safetensors"))
    w0 = load_file(str(base / "model.safetensors"))
    ex = [load_file(str(e / "model.safetensors")) for e in experts]
    info = get_method(method)
    p = info.params.model_validate(params)
    chunked = 0
    for name, w in w0.items():
        if not w.is_floating_point():
            continue
        chunked += len(engine.row_blocks(tuple(w.shape), True)) > 2
        ctx = TensorContext(
            name, w.float(), [e[name].float() for e in ex], [1.0, 0.6, 1.4],
            extra={"shape": tuple(w.shape)},
        )  # fmt: skip
        expected = info.merge(ctx, p).to(torch.bfloat16)
        assert torch.equal(merged[name], expected), name
    assert chunked >= 3, "the test models must have tensors split into several chunks"
    wait_no_threads()


def test_a_read_error_on_the_prefetch_thread_fails_the_merge(
    family: tuple[Path, list[Path], Settings], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, experts, settings = family
    real = TensorReader.read_into
    calls = {"n": 0}

    def failing(self: TensorReader, name: str, rows: object, out: torch.Tensor) -> torch.Tensor:
        assert threading.current_thread().name.startswith("crucible-prefetch")
        calls["n"] += 1
        if calls["n"] == 9:
            raise OSError(5, "Input/output error", str(self.model.weight_files[0]))
        return real(self, name, rows, out)  # type: ignore[arg-type]

    monkeypatch.setattr(TensorReader, "read_into", failing)
    spec = _spec(base, experts, "task_arithmetic", {}, "float32")
    with pytest.raises(OSError, match="Input/output error"):
        pipeline.run_merge_job(spec, tmp_path / "out", settings, QuietReporter())
    assert calls["n"] == 9
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.glob("out.partial*")) == []
    wait_no_threads()


def test_a_write_error_on_the_writer_thread_fails_the_merge(
    family: tuple[Path, list[Path], Settings], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, experts, settings = family
    real = ShardedSafetensorsWriter.write
    calls = {"n": 0}

    def failing(self: ShardedSafetensorsWriter, *args: object) -> None:
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(28, "No space left on device")
        real(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(ShardedSafetensorsWriter, "write", failing)
    spec = _spec(base, experts, "ties", {"density": 0.5}, "bfloat16")
    with pytest.raises(OSError, match="No space left"):
        pipeline.run_merge_job(spec, tmp_path / "out", settings, QuietReporter())
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.glob("out.partial*")) == []
    wait_no_threads()


class CancelAfter(QuietReporter):
    def __init__(self, polls: int) -> None:
        self.polls = polls

    def check_cancelled(self) -> None:
        self.polls -= 1
        if self.polls < 0:
            raise CrucibleError("cancelled", "the job was cancelled")


def test_a_cancel_mid_merge_stops_both_threads(
    family: tuple[Path, list[Path], Settings], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, experts, settings = family
    monkeypatch.setattr(engine, "BLOCK_ELEMENTS", 1000)
    monkeypatch.setattr(engine, "CHUNK_BYTES", 20_000)
    spec = _spec(base, experts, "linear", {}, "bfloat16")
    # A few polls pass before the merge stage; then it cancels after some tensors.
    with pytest.raises(CrucibleError) as err:
        pipeline.run_merge_job(spec, tmp_path / "out", settings, CancelAfter(8))
    assert err.value.code == "cancelled"
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.glob("out.partial*")) == []
    wait_no_threads()


def test_repeated_merges_leave_no_threads(
    family: tuple[Path, list[Path], Settings], tmp_path: Path
) -> None:
    base, experts, settings = family
    spec = _spec(base, experts, "dare_ties", {"density": 0.5}, "float32")
    outputs: list[dict[str, torch.Tensor]] = []
    for i in range(3):
        outcome = pipeline.run_merge_job(spec, tmp_path / f"out{i}", settings, QuietReporter())
        outputs.append(load_file(str(outcome.output_dir / "model.safetensors")))
        wait_no_threads()
    for name in outputs[0]:
        assert torch.equal(outputs[0][name], outputs[2][name]), name
