"""The merge stage: every tensor of the base, one at a time, through the method.

Tensors are read with pread, merged on the compute device and written in plan order, so
memory is bounded by one tensor position across the experts (elementwise methods: one block
of rows), never by the model.

- Elementwise and tensor-statistics methods (linear, TA, TIES, DARE, breadcrumbs) compute in
  float32 on blocks of rows.
- Matrix methods (tsv, iso, wudi, ace, regmean, bmm) get whole tensors in float64 where the
  module fits (merge-math.md section 12), 2-D weights in nn.Linear layout (GPT-2 Conv1D
  weights are transposed in and out), the experts' Grams when the job has them, and record
  per-module diagnostics for the job's report.
- Non-float tensors are copied from the base; tensors whose shapes differ between the base
  and an expert follow the job's shape_mismatch policy.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from crucible.errors import CrucibleError
from crucible.methods.base import MethodInfo, MethodParams, TensorContext
from crucible.methods.linalg import FLOAT64_MAX_DIM, FLOAT64_MAX_ELEMENTS
from crucible.methods.overrides import count_layers, has_overrides, resolve_params
from crucible.methods.registry import get_method
from crucible.overlap import BackgroundWriter, Prefetcher
from crucible.publish.writer import PlanItem, ShardedSafetensorsWriter
from crucible.report import MergeReport
from crucible.sources.layout import transposed_weights
from crucible.sources.resolve import ResolvedModel
from crucible.sources.tensor_reader import TensorReader
from crucible.spec import MergeSpec

# Floating dtypes by safetensors code; other tensors (int buffers, masks) are copied from base.
FLOAT_CODES: dict[str, torch.dtype] = {
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}
OUTPUT_CODES: dict[str, str] = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
# Elementwise methods compute in float32: exact for fp16/bf16 inputs, and the dtype of the
# output cast.
COMPUTE_DTYPE = torch.float32
# Large tensors are merged in blocks of rows of about this many elements (1 MiB per input
# in float32), so memory does not grow with the largest tensor, and a block's inputs and
# temporaries stay in the caches: every elementwise op is a pass over the block, and at
# 2 Mi elements (8 MiB per fp32 temporary, freshly page-faulted) a linear merge cost
# 5.1 ms per Mi entries against 2.1 at 256 Ki (bench/throughput/RESULTS.md). Every method
# gives the same bytes for any blocking (tests/test_blockwise.py).
BLOCK_ELEMENTS = 256 * 2**10
PER_EXPERT_DIR = "per_expert"
# Elementwise merges of full models read ahead on a thread, in chunks of whole blocks of
# about this many input bytes (all inputs together): a chunk is read while the one before
# is merged, so about two chunks' inputs are in memory. Methods with tensor statistics
# (TIES) take a whole tensor as one chunk up to WHOLE_TENSOR_BYTES, so the statistics come
# from memory instead of a second read of the files. Larger tensors (a 32000 x 2048
# embedding: 655 MB of bf16 inputs for 4 experts) are read twice instead: held whole, the
# bench's TIES peaked at 2.1 GB RSS, more than half of mergekit's.
CHUNK_BYTES = 64 * 2**20
WHOLE_TENSOR_BYTES = 256 * 2**20
# Merged blocks waiting for the writer thread: 64 blocks of BLOCK_ELEMENTS are 32 MiB of
# bf16 output, so a write that stalls (page-cache reclaim made the first 1.3 GB written
# after a sync run at 0.3-0.6 GB/s on the bench machine, later ones at 3-4) does not stop
# the merge thread at once.
WRITE_QUEUE_BLOCKS = 64
# glibc malloc thresholds set for a streamed merge (process-wide, once). By default a
# block's float32 temporaries (1-4 MiB) are mmapped or trimmed back to the OS when freed,
# so each new one page-faults: a TIES election on one 256 Ki-entry block took 6.9 ms that
# way and 2.5 ms with these (freed memory up to 256 MiB stays in the heap for reuse;
# allocations from 64 MiB up, the chunk buffers, are still mapped and returned).
MALLOC_MMAP_THRESHOLD = 64 * 2**20
MALLOC_TRIM_THRESHOLD = 256 * 2**20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers
_heap_tuned = False
# Task vectors for tensor statistics are assembled in slices of this many entries.
STATS_SLICE = 2**18
# Inputs of a chunk start at multiples of this in its buffer (a typed view needs alignment).
ALIGN = 64
# torch intra-op threads while an elementwise merge streams. The ops are memory-bound (one
# core converts bf16 -> fp32 at ~12 GB/s), and a 2-thread OpenMP team next to the prefetch
# and writer threads, or on a busy machine, spins at every op's barrier: measured on the
# 2-core CI machine under load, 0.68 ms of CPU per 2 Mi-entry conversion with one thread
# against 7.8 ms with two. The same bytes either way (elementwise ops, ordered reductions).
ELEMENTWISE_THREADS = 1


@dataclass
class MergeInputs:
    base: ResolvedModel
    experts: list[ResolvedModel]
    labels: list[str]
    # Per expert, its Gram folder when the method uses Grams.
    grams: list[ResolvedModel] | None = None
    # Tensor -> indices of the experts whose shape differs from the base's.
    mismatched: dict[str, list[int]] = field(default_factory=dict)
    # Per expert, the tensors only it has (its task head, by its own names): never merged,
    # written to its per_expert/ folder with its config.json.
    expert_only: list[list[str]] = field(default_factory=list)


class TensorSink(Protocol):
    """Where merged tensors go: a ShardedSafetensorsWriter or a BackgroundWriter over one."""

    def write(self, name: str, tensor: torch.Tensor, first_row: int = 0) -> None: ...


@dataclass
class Chunk:
    """Consecutive merge blocks of one tensor, as read from every input (stored dtype)."""

    name: str
    rows: tuple[int, int] | None  # None: the whole tensor
    blocks: list[tuple[int, int] | None]
    base: torch.Tensor
    experts: list[torch.Tensor]
    whole: bool  # holds every row of the tensor
    last: bool  # the tensor's last chunk
    prepared: Any = None  # method.prepare's result for these rows (ctx.extra["prepared"])


class ProgressSink(Protocol):
    """What this stage needs of the pipeline's Reporter."""

    def progress(self, done: int, total: int, unit: str) -> None: ...
    def check_cancelled(self) -> None: ...


def row_blocks(shape: tuple[int, ...], blockwise: bool) -> list[tuple[int, int] | None]:
    """[None] for the whole tensor, or row ranges along dim 0 for blockwise merging."""
    numel = 1
    for d in shape:
        numel *= d
    if not blockwise or not shape or shape[0] == 0 or numel <= BLOCK_ELEMENTS:
        return [None]
    per_row = numel // shape[0]
    step = max(1, BLOCK_ELEMENTS // per_row)
    return [(r, min(shape[0], r + step)) for r in range(0, shape[0], step)]


def matrix_dtype(shape: tuple[int, ...]) -> torch.dtype:
    """float64 where the module fits (d_in <= 8192 and a bounded tensor), else float32."""
    numel = 1
    for d in shape:
        numel *= d
    if (shape and min(shape) > FLOAT64_MAX_DIM) or numel > FLOAT64_MAX_ELEMENTS:
        return torch.float32
    return torch.float64


def expert_slug(label: str, index: int) -> str:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-.") or "expert"
    return f"{index}-{slug}"[:100]


class ParamsFor:
    """Concrete params per tensor: resolved through the overrides only when the request
    uses them, so the common case validates once."""

    def __init__(self, spec: MergeSpec, method: MethodInfo, names: list[str]) -> None:
        self._request = spec.method.params
        self._cls = method.params
        self._layers = count_layers(names)
        self._overrides = has_overrides(self._request, self._cls)
        self._fixed = (
            None if self._overrides else self._cls.model_validate(self._request.model_dump())
        )

    @property
    def overridden(self) -> bool:
        return self._overrides

    def __call__(self, name: str) -> MethodParams:
        if self._fixed is not None:
            return self._fixed
        return resolve_params(self._request, self._cls, name, self._layers)


def output_plan(spec: MergeSpec, base: ResolvedModel) -> tuple[list[str], list[PlanItem]]:
    """The merged tensors in write order (base file order keeps reads sequential on disk)
    and the writer's plan: (name, shape, output dtype code). Fixed by the headers alone, so
    scale-out (crucible.split) partitions the output before anything is merged."""
    file_order = {f: i for i, f in enumerate(base.weight_files)}
    names = sorted(
        base.tensors, key=lambda n: (file_order[base.tensors[n].file], base.tensors[n].start)
    )
    out_code = OUTPUT_CODES[spec.output.dtype] if spec.output.dtype else None
    plan = [
        (n, base.tensors[n].shape, out_code if out_code and t.dtype in FLOAT_CODES else t.dtype)
        for n in names
        for t in [base.tensors[n]]
    ]
    return names, plan


def merge_model(
    spec: MergeSpec,
    inputs: MergeInputs,
    staging: Path,
    reporter: ProgressSink,
    device: torch.device,
    only_shards: set[int] | None = None,
) -> tuple[dict[str, Any], MergeReport]:
    """Merge every tensor into sharded safetensors under `staging`; (metrics, report).

    `only_shards`: merge just the tensors of these output shards and write just those files
    (one scale-out part, crucible.parts; no index, no per-expert outputs)."""
    base = inputs.base
    method = get_method(spec.method.name)
    weights = [ref.weight for ref in spec.experts]
    names, plan = output_plan(spec, base)
    params_for = ParamsFor(spec, method, names)
    transposed = transposed_weights(base.root, names) if method.matrix else frozenset()
    out_code = OUTPUT_CODES[spec.output.dtype] if spec.output.dtype else None

    def planned_code(code: str) -> str:
        return out_code if (out_code and code in FLOAT_CODES) else code

    writer = ShardedSafetensorsWriter(
        staging, plan, int(spec.output.shard_size), {"format": "pt"}, only_shards
    )
    per_expert = _per_expert_writers(spec, inputs, names, staging, planned_code)
    if only_shards is not None:
        if per_expert:
            raise ValueError("a scale-out part cannot write per-expert outputs")
        names = writer.tensor_names()
    report = MergeReport(method.name, str(device))
    report.note("overrides", params_for.overridden)
    if transposed:
        report.note("transposed_conv1d_weights", len(transposed))
    if inputs.mismatched:
        report.note(
            "shape_mismatch",
            {
                "policy": spec.shape_mismatch,
                "tensors": {
                    n: [inputs.labels[i] for i in idx] for n, idx in inputs.mismatched.items()
                },
            },
        )
    total = len(names)
    started = time.perf_counter()
    merged_count = 0
    sink = BackgroundWriter(writer, depth=WRITE_QUEUE_BLOCKS)
    writers: list[BackgroundWriter | ShardedSafetensorsWriter] = [sink, *per_expert.values()]
    # Elementwise methods on full models (no adapter's ΔW to add) read ahead on a thread.
    streamed = (
        [n for n in names if base.tensors[n].dtype in FLOAT_CODES and n not in inputs.mismatched]
        if not method.matrix and all(m.adapter is None for m in [base, *inputs.experts])
        else []
    )
    try:
        with ExitStack() as stack:
            base_reader, readers, gram_readers = open_readers(stack, inputs)
            chunks: Prefetcher[Chunk] | None = None
            if streamed:
                keep_heap_memory()
                # One compute thread: the prefetch and writer threads use the other core.
                stack.callback(torch.set_num_threads, torch.get_num_threads())
                torch.set_num_threads(ELEMENTWISE_THREADS)
                ahead = [stack.enter_context(TensorReader(m)) for m in [base, *inputs.experts]]
                pin = device.type == "cuda"
                produce = chunk_producer(streamed, method, ahead[0], ahead[1:], params_for, pin)
                chunks = stack.enter_context(Prefetcher(produce))
            reporter.progress(0, total, "tensors")
            for i, name in enumerate(names):
                reporter.check_cancelled()
                code = base.tensors[name].dtype
                if code not in FLOAT_CODES or name in inputs.mismatched:
                    sink.write(name, base_reader.read(name))
                    for index, expert_writer in per_expert.items():
                        if index in inputs.mismatched.get(name, ()):
                            out = readers[index].read(name)
                            if code in FLOAT_CODES:  # int buffers are copied as they are
                                out = out.to(FLOAT_CODES[planned_code(code)])
                            expert_writer.write(name, out)
                else:
                    out_dtype = FLOAT_CODES[planned_code(code)]
                    params = params_for(name)
                    if method.matrix:
                        diagnostics = merge_matrix(
                            name, method, params, base_reader, readers, gram_readers,
                            weights, name in transposed, device, out_dtype, sink,
                        )  # fmt: skip
                        report.add_module(name, diagnostics)
                    elif chunks is not None:
                        merge_chunks(
                            name, method, params, chunks, base_reader, readers, weights,
                            device, out_dtype, sink,
                        )  # fmt: skip
                    else:
                        merge_blocks(
                            name, method, params, base_reader, readers, weights, device,
                            out_dtype, sink,
                        )  # fmt: skip
                    merged_count += 1
                reporter.progress(i + 1, total, "tensors")
            _write_expert_only(inputs, readers, per_expert, planned_code)
        for w in writers:
            w.close()
    except BaseException:
        for w in writers:
            w.abort()
        raise
    seconds = time.perf_counter() - started
    input_bytes = sum(m.file_bytes for m in [base, *inputs.experts])  # streamed files too
    metrics = {
        "tensors": total,
        "merged_tensors": merged_count,
        "merge_seconds": round(seconds, 3),
        "input_bytes": input_bytes,
        "device": str(device),
    }
    return metrics, report


def _per_expert_writers(
    spec: MergeSpec,
    inputs: MergeInputs,
    names: list[str],
    staging: Path,
    planned_code: Callable[[str], str],
) -> dict[int, ShardedSafetensorsWriter]:
    """One writer per expert that has tensors of its own: the differing-shape tensors under
    keep_per_expert (base names, base order) and its expert-only tensors (its head)."""
    keep_mismatched = spec.shape_mismatch == "keep_per_expert"
    writers: dict[int, ShardedSafetensorsWriter] = {}
    for index, expert in enumerate(inputs.experts):
        own = inputs.expert_only[index] if inputs.expert_only else []
        differing = [n for n in names if index in inputs.mismatched.get(n, ())]
        plan = [
            (n, expert.tensors[n].shape, planned_code(expert.tensors[n].dtype))
            for n in [*(differing if keep_mismatched else []), *own]
        ]
        if plan:
            folder = staging / PER_EXPERT_DIR / expert_slug(inputs.labels[index], index)
            writers[index] = ShardedSafetensorsWriter(
                folder, plan, int(spec.output.shard_size), metadata={"format": "pt"}
            )
            if own and (expert.root / "config.json").is_file():
                # With the expert's config, base + merged weights + this file rebuild the
                # expert's own task model (e.g. AutoModelForSequenceClassification).
                folder.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(expert.root / "config.json", folder / "config.json")
    return writers


def _write_expert_only(
    inputs: MergeInputs,
    readers: list[TensorReader],
    per_expert: dict[int, ShardedSafetensorsWriter],
    planned_code: Callable[[str], str],
) -> None:
    for index, own in enumerate(inputs.expert_only):
        for name in own:
            out = readers[index].read(name)
            code = inputs.experts[index].tensors[name].dtype
            if code in FLOAT_CODES:
                out = out.to(FLOAT_CODES[planned_code(code)])
            per_expert[index].write(name, out)


def check_finite(name: str, merged: torch.Tensor) -> None:
    # A finite sum means every entry is finite (an inf or NaN makes the sum inf or NaN);
    # one vectorized reduction, where isfinite() first fills a bool tensor (11-16% of a
    # linear merge's samples). Only a non-finite sum (overflow included) looks closer.
    if merged.is_floating_point() and bool(torch.isfinite(merged.sum())):
        return
    if not bool(torch.isfinite(merged).all()):
        raise CrucibleError(
            "non_finite",
            f"the merge of tensor {name!r} produced NaN or infinite values",
            {"tensor": name},
        )


def open_readers(
    stack: ExitStack, inputs: MergeInputs
) -> tuple[TensorReader, list[TensorReader], list[TensorReader] | None]:
    """Readers of the base, each expert and (when the job has them) each Gram folder,
    closed with `stack`."""
    base_reader = stack.enter_context(TensorReader(inputs.base))
    readers = [stack.enter_context(TensorReader(e)) for e in inputs.experts]
    grams = [stack.enter_context(TensorReader(g)) for g in inputs.grams] if inputs.grams else None
    return base_reader, readers, grams


def merge_blocks(
    name: str,
    method: MethodInfo,
    params: MethodParams,
    base_reader: TensorReader,
    readers: list[TensorReader],
    weights: list[float],
    device: torch.device,
    out_dtype: torch.dtype,
    writer: TensorSink,
) -> None:
    shape = base_reader.info(name).shape
    blockwise = method.elementwise or method.tensor_stats is not None
    blocks = row_blocks(shape, blockwise)
    extra: dict[str, Any] = {"shape": shape}
    if method.tensor_stats is not None and blocks != [None]:
        extra["stats"] = [
            method.tensor_stats(task_vector(name, base_reader, r, blocks), params) for r in readers
        ]
    for rows in blocks:
        experts = [r.read(name, rows).to(device=device, dtype=COMPUTE_DTYPE) for r in readers]
        ctx = TensorContext(
            name=name,
            base=(
                base_reader.read(name, rows).to(device=device, dtype=COMPUTE_DTYPE)
                if method.needs_base
                else absent_base(experts[0])
            ),
            experts=experts,
            weights=weights,
            extra=extra if rows is None else {**extra, "rows": rows},
        )
        merged = method.merge(ctx, params)
        check_finite(name, merged)
        writer.write(name, merged.to(device="cpu", dtype=out_dtype), 0 if rows is None else rows[0])
        del ctx, merged


def keep_heap_memory() -> None:
    """Set MALLOC_MMAP_THRESHOLD / MALLOC_TRIM_THRESHOLD (glibc; elsewhere nothing)."""
    global _heap_tuned
    if _heap_tuned or not sys.platform.startswith("linux"):
        return
    _heap_tuned = True
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc: keep the allocator's defaults
        return
    mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)
    mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD)


def absent_base(like: torch.Tensor) -> torch.Tensor:
    """The base a method with needs_base=False gets: `like`'s shape, dtype and device, no
    memory (one NaN, expanded), so reading it by mistake yields NaN and check_finite."""
    return torch.full((), float("nan"), dtype=like.dtype, device=like.device).expand(like.shape)


@dataclass(frozen=True)
class _PlannedChunk:
    """Where one chunk's bytes are: the tensor, its rows (None: whole), its blocks, the
    bytes read from each input (0: not read), and its place among the tensor's chunks."""

    name: str
    shape: tuple[int, ...]
    rows: tuple[int, int] | None
    group: list[tuple[int, int] | None]
    sizes: list[int]
    index: int
    count: int


def chunk_producer(
    names: list[str],
    method: MethodInfo,
    base: TensorReader,
    experts: list[TensorReader],
    params_for: Callable[[str], MethodParams] | None = None,
    pin: bool = False,
) -> Callable[[Callable[[], int]], Iterator[tuple[int, Chunk]]]:
    """The prefetch thread's work: every chunk of `names`, in order, read with pread into
    one reused buffer per slot (no allocation, no page faults once the buffers are grown),
    with the method's `prepare` work for its rows (on this thread, in parallel with the
    merge: DARE's mask draws were most of a dare_ties merge's time). `pin`: the buffers
    are page-locked (merging on CUDA), so merge_chunks' uploads are DMA copies that do
    not block the merge thread."""
    buffers: dict[int, torch.Tensor] = {}
    blockwise = method.elementwise or method.tensor_stats is not None
    stats = method.tensor_stats is not None
    inputs = [base, *experts]

    def plan() -> Iterator[_PlannedChunk]:
        for name in names:
            shape = base.info(name).shape
            blocks = row_blocks(shape, blockwise)
            row_bytes = [_row_bytes(r, name) for r in inputs]
            read_bytes = sum(row_bytes[0 if method.needs_base else 1 :])
            groups = _chunk_groups(shape, blocks, read_bytes, stats)
            for index, group in enumerate(groups):
                rows = _span(group, shape)
                sizes = [_aligned(_rows_count(rows, shape) * b) for b in row_bytes]
                if not method.needs_base:
                    sizes[0] = 0  # not read: merge_chunks hands the method a placeholder
                yield _PlannedChunk(name, shape, rows, group, sizes, index, len(groups))

    def produce(take_slot: Callable[[], int]) -> Iterator[tuple[int, Chunk]]:
        for current in plan():
            name, shape, rows, sizes = current.name, current.shape, current.rows, current.sizes
            slot = take_slot()
            buf = buffers.get(slot)
            need = sum(sizes)
            if buf is None or buf.numel() < need or buf.numel() > 4 * max(need, CHUNK_BYTES):
                buffers.pop(slot, None)  # free the old one before growing
                buf = buffers[slot] = torch.empty(max(need, 1), dtype=torch.uint8, pin_memory=pin)
            views, offset = [], 0
            for i, (reader, size) in enumerate(zip(inputs, sizes, strict=True)):
                if i == 0 and not method.needs_base:
                    views.append(buf[:0])
                    continue
                views.append(reader.read_into(name, rows, buf[offset : offset + size]))
                offset += size
            last = current.index == current.count - 1
            chunk = Chunk(name, rows, current.group, views[0], views[1:], current.count == 1, last)
            if method.prepare is not None and params_for is not None:
                done = method.prepare(name, shape, rows, params_for(name), len(experts))
                chunk.prepared = (rows, done)
            yield slot, chunk

    return produce


def _row_bytes(reader: TensorReader, name: str) -> int:
    info = reader.info(name)
    return info.nbytes // info.shape[0] if info.shape and info.shape[0] else info.nbytes


def _rows_count(rows: tuple[int, int] | None, shape: tuple[int, ...]) -> int:
    if rows is None:
        return 1 if not shape or shape[0] == 0 else shape[0]
    return rows[1] - rows[0]


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _span(group: list[tuple[int, int] | None], shape: tuple[int, ...]) -> tuple[int, int] | None:
    """The rows a group of blocks covers; None for the one whole-tensor block."""
    if group == [None]:
        return None
    first, last = group[0], group[-1]
    assert first is not None and last is not None
    return (first[0], last[1])


def _chunk_groups(
    shape: tuple[int, ...],
    blocks: list[tuple[int, int] | None],
    bytes_per_row: int,
    whole_wanted: bool,
) -> list[list[tuple[int, int] | None]]:
    """Consecutive blocks grouped into chunks of about CHUNK_BYTES of input (whole tensors
    up to WHOLE_TENSOR_BYTES when the method wants tensor statistics)."""
    if blocks == [None]:
        return [blocks]
    if whole_wanted and shape[0] * bytes_per_row <= WHOLE_TENSOR_BYTES:
        return [blocks]
    groups: list[list[tuple[int, int] | None]] = [[]]
    size = 0
    for block in blocks:
        assert block is not None
        n = (block[1] - block[0]) * bytes_per_row
        if groups[-1] and size + n > CHUNK_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(block)
        size += n
    return groups


def merge_chunks(
    name: str,
    method: MethodInfo,
    params: MethodParams,
    chunks: Prefetcher[Chunk],
    base_reader: TensorReader,
    readers: list[TensorReader],
    weights: list[float],
    device: torch.device,
    out_dtype: torch.dtype,
    writer: TensorSink,
) -> None:
    """merge_blocks on prefetched chunks: the same blocks, the same arithmetic (so the same
    bytes), with reading on the prefetch thread and writing on the writer thread."""
    shape = base_reader.info(name).shape
    extra: dict[str, Any] = {"shape": shape}
    first = True
    # On CUDA the chunk's buffers are pinned and uploads are queued without waiting. The
    # slot is released (and its buffer refilled) only after the block's download to the
    # CPU, which is synchronous: by then the stream has consumed every upload from it.
    upload = {"device": device, "dtype": COMPUTE_DTYPE, "non_blocking": device.type == "cuda"}
    while True:
        slot, chunk = next(chunks)
        try:
            if chunk.name != name:
                raise RuntimeError(f"prefetched {chunk.name!r} while merging {name!r}")
            if first and method.tensor_stats is not None and chunk.blocks != [None]:
                if chunk.whole:
                    extra["stats"] = _stats_in_memory(method, params, chunk)
                else:  # too large to hold: read each task vector again, block by block
                    blocks = row_blocks(shape, True)
                    extra["stats"] = [
                        method.tensor_stats(task_vector(name, base_reader, r, blocks), params)
                        for r in readers
                    ]
            first = False
            start = chunk.rows[0] if chunk.rows is not None else 0
            storage = chunk.experts[0].untyped_storage().data_ptr()
            for rows in chunk.blocks:
                local = slice(None) if rows is None else slice(rows[0] - start, rows[1] - start)
                experts = [e[local].to(**upload) for e in chunk.experts]
                ctx = TensorContext(
                    name=name,
                    base=(
                        chunk.base[local].to(**upload)
                        if method.needs_base
                        else absent_base(experts[0])
                    ),
                    experts=experts,
                    weights=weights,
                    extra=_block_extra(extra, rows, chunk.prepared),
                )
                merged = method.merge(ctx, params)
                check_finite(name, merged)
                out = merged.to(device="cpu", dtype=out_dtype)
                if out.untyped_storage().data_ptr() == storage:
                    out = out.clone()  # a view of the reused buffer: the writer needs its own
                writer.write(name, out, 0 if rows is None else rows[0])
                del ctx, merged, out
        finally:
            chunks.release(slot)
        if chunk.last:
            return


def _block_extra(
    extra: dict[str, Any], rows: tuple[int, int] | None, prepared: Any
) -> dict[str, Any]:
    if rows is None and prepared is None:
        return extra
    block = dict(extra)
    if rows is not None:
        block["rows"] = rows
    if prepared is not None:
        block["prepared"] = prepared
    return block


def _stats_in_memory(method: MethodInfo, params: MethodParams, chunk: Chunk) -> list[Any]:
    """tensor_stats of each whole task vector, assembled block by block from the chunk as
    task_vector() does from the files (so the same values)."""
    assert method.tensor_stats is not None
    stats = []
    base = chunk.base.reshape(-1)
    n = base.numel()
    for expert in chunk.experts:
        flat = expert.reshape(-1)
        tau = torch.empty(n, dtype=COMPUTE_DTYPE)
        # Elementwise, so any slicing gives task_vector's values; cache-sized slices keep
        # the float32 temporaries out of fresh (page-faulting) memory.
        for i in range(0, n, STATS_SLICE):
            j = min(n, i + STATS_SLICE)
            torch.sub(flat[i:j].to(COMPUTE_DTYPE), base[i:j].to(COMPUTE_DTYPE), out=tau[i:j])
        stats.append(method.tensor_stats(tau, params))
        del tau
    return stats


def matrix_context(
    name: str,
    base_reader: TensorReader,
    readers: list[TensorReader],
    gram_readers: list[TensorReader] | None,
    weights: list[float],
    transposed: bool,
    device: torch.device,
) -> TensorContext:
    """The whole-tensor context a matrix method merges: float64 (float32 when large), in
    nn.Linear layout (`transposed`: a GPT-2 Conv1D weight), with the experts' Grams. The
    tuner builds its per-module factorizations from the same contexts."""
    shape = base_reader.info(name).shape
    dtype = matrix_dtype(shape)

    def load(reader: TensorReader) -> torch.Tensor:
        tensor = reader.read(name).to(device=device, dtype=dtype)
        return tensor.T if transposed else tensor

    base = load(base_reader)
    return TensorContext(
        name=name,
        base=base,
        experts=[load(r) for r in readers],
        weights=weights,
        extra={"shape": shape},
        grams=_grams(name, base, gram_readers, device, dtype),
    )


def whole_context(
    name: str,
    base_reader: TensorReader,
    readers: list[TensorReader],
    weights: list[float],
    device: torch.device,
) -> TensorContext:
    """One whole tensor of an elementwise method, in its compute dtype (float32)."""
    return TensorContext(
        name=name,
        base=base_reader.read(name).to(device=device, dtype=COMPUTE_DTYPE),
        experts=[r.read(name).to(device=device, dtype=COMPUTE_DTYPE) for r in readers],
        weights=weights,
        extra={"shape": base_reader.info(name).shape},
    )


def merge_matrix(
    name: str,
    method: MethodInfo,
    params: MethodParams,
    base_reader: TensorReader,
    readers: list[TensorReader],
    gram_readers: list[TensorReader] | None,
    weights: list[float],
    transposed: bool,
    device: torch.device,
    out_dtype: torch.dtype,
    writer: TensorSink,
) -> dict[str, Any]:
    started = time.perf_counter()
    ctx = matrix_context(name, base_reader, readers, gram_readers, weights, transposed, device)
    base = ctx.base
    merged = method.merge(ctx, params)
    if merged.shape != base.shape:
        raise CrucibleError(
            "internal",
            f"method {method.name} returned shape {tuple(merged.shape)} for tensor {name!r} "
            f"of shape {tuple(base.shape)}",
            {"tensor": name},
        )
    check_finite(name, merged)
    if transposed:
        merged = merged.T
    writer.write(name, merged.to(device="cpu", dtype=out_dtype).contiguous())
    diagnostics = dict(ctx.diagnostics)
    diagnostics.update(_adapter_ranks(name, readers, tuple(base.shape)))
    if diagnostics:
        diagnostics["dtype"] = str(base.dtype).removeprefix("torch.")
        if transposed:
            diagnostics["transposed"] = True
        diagnostics["seconds"] = round(time.perf_counter() - started, 4)
    return diagnostics


def _adapter_ranks(name: str, readers: list[Any], shape: tuple[int, ...]) -> dict[str, Any]:
    """For a module LoRA adapters change: their ranks, and whether the task vectors span
    fewer directions than the module has inputs (a data-free Gram tau^T tau is then
    singular and only the ridge keeps the solve defined: merge-math.md section 11)."""
    ranks: list[int] = []
    for reader in readers:
        plan = reader.model.adapter
        if plan is None or name in plan.full:
            return {}  # a full tensor among the inputs: no low-rank structure to report
        if name in plan.deltas:
            ranks.append(plan.deltas[name].rank)
    if not ranks or len(shape) != 2:
        return {}
    return {"lora_ranks": ranks, "rank_deficient": sum(ranks) < min(shape)}


def _grams(
    name: str,
    base: torch.Tensor,
    gram_readers: list[TensorReader] | None,
    device: torch.device,
    dtype: torch.dtype,
) -> list[torch.Tensor] | None:
    """Every expert's Gram for this module, or None when any expert has none for it."""
    if gram_readers is None or base.ndim != 2:
        return None
    if not all(name in g.model.tensors for g in gram_readers):
        return None
    d_in = base.shape[1]
    grams = []
    for index, reader in enumerate(gram_readers):
        shape = reader.info(name).shape
        if tuple(shape) != (d_in, d_in):
            raise CrucibleError(
                "bad_grams",
                f"the Gram of expert {index} for {name!r} has shape {list(shape)}; the module "
                f"takes {d_in} inputs, so its Gram must be [{d_in}, {d_in}]",
                {"tensor": name, "expert": index, "shape": list(shape)},
            )
        gram = reader.read(name).to(device=device, dtype=dtype)
        if not bool(torch.isfinite(gram).all()):
            raise CrucibleError(
                "bad_grams",
                f"the Gram of expert {index} for {name!r} holds NaN or infinite values",
                {"tensor": name, "expert": index},
            )
        grams.append(gram)
    return grams


def task_vector(
    name: str, base: TensorReader, expert: TensorReader, blocks: list[tuple[int, int] | None]
) -> torch.Tensor:
    """One expert's whole task vector for `name`, flat, assembled block by block (so only
    it and one block of each input are in memory)."""
    tau = torch.empty(base.info(name).numel, dtype=COMPUTE_DTYPE)
    pos = 0
    for rows in blocks:
        block = expert.read(name, rows).to(COMPUTE_DTYPE) - base.read(name, rows).to(COMPUTE_DTYPE)
        tau[pos : pos + block.numel()] = block.reshape(-1)
        pos += block.numel()
    return tau
