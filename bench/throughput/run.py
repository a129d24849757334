"""Throughput bench: Crucible vs mergekit 0.1.5 vs the disk floor, on the same inputs.

    .venv/bin/python bench/throughput/run.py --runs 3 --cache both

Inputs: base + 4 Llama-shaped experts from gen.py (generated once into the cache). For
each cache state (warm, cold) and run, interleaved so machine noise hits every tool alike:

- floor: read every input file once (16 MiB reads; cold: with O_DIRECT, the disk's own
  speed, as Crucible reads uncached ranges) and write the output's size, fsynced;
- crucible: `crucible merge <spec> --out ...` in a child process;
- mergekit: `mergekit-yaml <config> <out> --lazy-unpickle --device cpu` in a child process
  (same output dtype and shard size, --no-copy-tokenizer: the synthetic base has none);
  `--device cuda` runs both tools on the GPU.

Per run: wall time of the child (interpreter start included, for both tools), input GB/s
(base + 4 experts over the wall time), peak RSS (the larger of the child tree's summed RSS
polled every 50 ms and ru_maxrss from wait4). Medians over --runs. Cold: page cache
dropped before every run (`echo 1 > /proc/sys/vm/drop_caches`, after sync), or, where that
is not permitted, posix_fadvise(DONTNEED) on every input file; the table says which.
Every timed run starts after os.sync(), so an earlier run's dirty pages do not slow it.

After the runs, a few output tensors of Crucible and mergekit are compared (max abs diff,
share of entries that differ by more than one bf16 ulp of the larger value).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gen import VARIANTS, Variant, cache_root, generate, weight_files

ROOT = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
BEGIN, END = "<!-- run.py: begin -->", "<!-- run.py: end -->"
METHODS = ["linear", "task_arithmetic", "ties", "dare_ties"]
# The same parameters on both sides (mergekit's names in brackets): expert weights 1,
# linear normalized; TA lambda 1, no normalization; TIES density 0.2, sign by total,
# disjoint mean; DARE-TIES density 0.2, plain sum. DARE's masks are random on both sides
# and mergekit rescales to the L1 norm, not by 1/density: its output is not compared.
CRUCIBLE_PARAMS: dict[str, dict[str, Any]] = {
    "linear": {"normalize": True},
    "task_arithmetic": {"scale": 1.0, "normalize": False},
    "ties": {"density": 0.2, "majority_sign": "total", "normalize": True, "scale": 1.0},
    "dare_ties": {"density": 0.2, "normalize": False, "scale": 1.0, "seed": 0},
}
MERGEKIT_PARAMS: dict[str, dict[str, Any]] = {
    "linear": {"normalize": True},
    "task_arithmetic": {"normalize": False, "lambda": 1.0},
    "ties": {"density": 0.2, "normalize": True, "lambda": 1.0},
    "dare_ties": {"density": 0.2, "normalize": False, "lambda": 1.0},
}
COMPARE = [
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.1.mlp.down_proj.weight",
    "model.norm.weight",
]
CHUNK = 16 * 2**20


@dataclass
class Measure:
    wall: float
    rss: int
    cpu: float = 0.0  # user + system seconds of the child tree: less sensitive to load


@dataclass
class Row:
    tool: str
    method: str
    cache: str
    runs: list[Measure] = field(default_factory=list)

    @property
    def wall(self) -> float:
        return statistics.median(m.wall for m in self.runs)

    @property
    def rss(self) -> int:
        return int(statistics.median(m.rss for m in self.runs))

    @property
    def cpu(self) -> float:
        return statistics.median(m.cpu for m in self.runs)


# ----------------------------------------------------------------------------- helpers


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


def run_child(argv: list[str], env: dict[str, str], log: Path) -> Measure:
    """Wall time and peak RSS of one child process (and its children)."""
    os.sync()
    peak = 0
    stop = threading.Event()
    with log.open("wb") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        ps = psutil.Process(proc.pid)

        def poll() -> None:
            nonlocal peak
            while not stop.is_set():
                try:
                    peak = max(peak, tree_rss(ps))
                except psutil.Error:
                    return
                stop.wait(0.05)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        stop.set()
        poller.join()
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"{' '.join(argv)} exited {proc.returncode}:\n{tail}")
    return Measure(wall, max(peak, usage.ru_maxrss * 1024), usage.ru_utime + usage.ru_stime)


def drop_cache(files: list[Path]) -> str:
    """Evict the inputs from the page cache; returns how."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return "drop_caches"
    except OSError:
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return "fadvise"


def read_all(files: list[Path], direct: bool = False) -> int:
    """Read every file once in CHUNK reads; `direct`: with O_DIRECT into a page-aligned
    buffer (bypassing the page cache, as a cold merge reads; buffered where refused)."""
    buf = mmap.mmap(-1, CHUNK)  # page-aligned, as O_DIRECT wants
    view = memoryview(buf)
    total = 0
    for f in files:
        try:
            fd = os.open(f, os.O_RDONLY | (os.O_DIRECT if direct else 0))
        except OSError:
            fd = os.open(f, os.O_RDONLY)
        try:
            offset = 0
            while n := os.preadv(fd, [view], offset):
                offset += n
            total += offset
        finally:
            os.close(fd)
    view.release()
    buf.close()
    return total


def floor(files: list[Path], out_bytes: int, out: Path, direct: bool = False) -> Measure:
    """dd-style: read every input once (`direct`: O_DIRECT, the disk's own speed, for a
    cold cache; buffered from a warm one), write `out_bytes` to `out` and fsync it."""
    os.sync()
    start, cpu0 = time.perf_counter(), time.process_time()
    read_all(files, direct)
    block = bytes(CHUNK)
    with out.open("wb", buffering=0) as fh:
        left = out_bytes
        while left:
            left -= fh.write(memoryview(block)[: min(CHUNK, left)])
        os.fsync(fh.fileno())
    wall = time.perf_counter() - start
    out.unlink()
    return Measure(wall, psutil.Process().memory_info().rss, time.process_time() - cpu0)


# ----------------------------------------------------------------------------- configs


def child_env(work: Path, device: str = "cpu") -> dict[str, str]:
    hide_gpus = {"CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else {}
    return {
        **os.environ,
        **hide_gpus,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "CRUCIBLE_DEVICE": device,
        "CRUCIBLE_DATA_DIR": str(work / "crucible-data"),
    }


def crucible_spec(
    method: str, base: Path, experts: list[Path], out_dtype: str, shard_bytes: int
) -> dict[str, Any]:
    return {
        "base": {"uri": base.as_uri()},
        "experts": [{"uri": e.as_uri(), "weight": 1.0} for e in experts],
        "method": {"name": method, "params": CRUCIBLE_PARAMS[method]},
        "output": {"dtype": out_dtype, "shard_size": shard_bytes},
    }


def mergekit_config(
    method: str, base: Path, experts: list[Path], dtype: str, out_dtype: str
) -> dict[str, Any]:
    per_model = {"weight": 1.0}
    glob = dict(MERGEKIT_PARAMS[method])
    if "density" in glob:
        per_model["density"] = glob.pop("density")
    cfg: dict[str, Any] = {
        "merge_method": method,
        "models": [{"model": str(e), "parameters": dict(per_model)} for e in experts],
        "parameters": glob,
        "dtype": dtype,
        "out_dtype": out_dtype,
    }
    if method != "linear":
        cfg["base_model"] = str(base)
    return cfg


def compare(ours: Path, theirs: Path) -> tuple[float, float]:
    """(max abs diff, share of entries off by more than one bf16 ulp) over COMPARE."""
    from safetensors import safe_open

    def load(folder: Path, name: str) -> torch.Tensor:
        for f in weight_files(folder):
            with safe_open(str(f), framework="pt") as st:
                if name in st.keys():  # noqa: SIM118 (safe_open has no __contains__)
                    return st.get_tensor(name).float()
        raise KeyError(f"{name} not in {folder}")

    worst, off, count = 0.0, 0, 0
    for name in COMPARE:
        a, b = load(ours, name), load(theirs, name)
        diff = (a - b).abs()
        ulp = torch.maximum(a.abs(), b.abs()) * 2.0**-7  # bf16: 8 significant bits
        worst = max(worst, float(diff.max()))
        off += int(torch.count_nonzero(diff > ulp))
        count += diff.numel()
    return worst, off / count


# ----------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--variant", choices=sorted(VARIANTS), default="bf16")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    ap.add_argument("--tools", nargs="+", default=["floor", "crucible", "mergekit"])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--cache", choices=["warm", "cold", "both"], default="both")
    ap.add_argument("--out-dtype", default="bfloat16")
    ap.add_argument(
        "--mergekit-dtype", default=None, help="mergekit's compute `dtype` (default: the inputs')"
    )
    ap.add_argument("--shard-bytes", type=int, default=10**9)
    ap.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="compute device of both tools (cuda: Crucible's pinned-buffer path)",
    )
    ap.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = ap.parse_args()

    v: Variant = VARIANTS[args.variant]
    base, experts = generate(v)
    files = [f for d in [base, *experts] for f in weight_files(d)]
    input_bytes = sum(f.stat().st_size for f in files)
    out_elem = {"bfloat16": 2, "float16": 2, "float32": 4}[args.out_dtype]
    params = sum(n for n in _numels(v))
    out_bytes = params * out_elem
    mk_dtype = args.mergekit_dtype or {"BF16": "bfloat16", "F32": "float32"}[v.dtype]
    mk_exe = ROOT / ".venv-mergekit" / "bin" / "mergekit-yaml"

    work = cache_root() / f"work-{os.getpid()}"  # concurrent runs must not share it
    work.mkdir(parents=True)
    env = child_env(work, args.device)
    for method in args.methods:
        (work / f"{method}.json").write_text(
            json.dumps(crucible_spec(method, base, experts, args.out_dtype, args.shard_bytes))
        )
        cfg = mergekit_config(method, base, experts, mk_dtype, args.out_dtype)
        (work / f"{method}.yml").write_text(yaml.safe_dump(cfg, sort_keys=False))

    def argv(tool: str, method: str, out: Path) -> list[str]:
        if tool == "crucible":
            spec = work / f"{method}.json"
            return [sys.executable, "-m", "crucible.cli", "merge", str(spec), "--out", str(out)]
        return [
            str(mk_exe), str(work / f"{method}.yml"), str(out), "--lazy-unpickle",
            "--device", args.device, "--no-copy-tokenizer", "--no-write-model-card", "--quiet",
            "--out-shard-size", str(args.shard_bytes // out_elem),
        ]  # fmt: skip

    load_before = os.getloadavg()
    caches = ["warm", "cold"] if args.cache == "both" else [args.cache]
    rows: dict[tuple[str, str, str], Row] = {}
    evict_how = ""
    for cache in caches:
        if cache == "warm":
            read_all(files)
        for run in range(args.runs):
            if "floor" in args.tools:
                if cache == "cold":
                    evict_how = drop_cache(files)
                m = floor(files, out_bytes, work / "floor.bin", direct=cache == "cold")
                rows.setdefault(("floor", "-", cache), Row("floor", "-", cache)).runs.append(m)
                print(f"[{cache} {run + 1}] floor {m.wall:.2f} s", file=sys.stderr, flush=True)
            for method in args.methods:
                for tool in [t for t in args.tools if t != "floor"]:
                    out = work / f"out-{tool}-{method}"
                    shutil.rmtree(out, ignore_errors=True)
                    if cache == "cold":
                        evict_how = drop_cache(files)
                    m = run_child(argv(tool, method, out), env, work / f"{tool}-{method}.log")
                    key = (tool, method, cache)
                    rows.setdefault(key, Row(tool, method, cache)).runs.append(m)
                    print(
                        f"[{cache} {run + 1}] {tool} {method} {m.wall:.2f} s "
                        f"{m.rss / 2**20:.0f} MiB",
                        file=sys.stderr,
                        flush=True,
                    )
    load_after = os.getloadavg()

    checks: dict[str, tuple[float, float]] = {}
    if {"crucible", "mergekit"} <= set(args.tools):
        for method in args.methods:
            checks[method] = compare(
                work / f"out-crucible-{method}", work / f"out-mergekit-{method}"
            )
    shutil.rmtree(work, ignore_errors=True)

    text = report(
        v, args, rows, checks, input_bytes, out_bytes, mk_dtype, evict_how,
        (load_before, load_after),
    )  # fmt: skip
    print(text)
    if not args.no_write:
        write_results(text)


def _numels(v: Variant) -> list[int]:
    from gen import llama_plan

    out = []
    for _, shape, _ in llama_plan(v):
        n = 1
        for d in shape:
            n *= d
        out.append(n)
    return out


def report(
    v: Variant,
    args: argparse.Namespace,
    rows: dict[tuple[str, str, str], Row],
    checks: dict[str, tuple[float, float]],
    input_bytes: int,
    out_bytes: int,
    mk_dtype: str,
    evict_how: str,
    loads: tuple[tuple[float, ...], tuple[float, ...]],
) -> str:
    gb = input_bytes / 1e9
    lines = [
        f"Inputs: {v.tag} ({v.dtype}), base + 4 experts, {gb:.2f} GB read per merge; output "
        f"{args.out_dtype} ({out_bytes / 1e9:.2f} GB, shards of {args.shard_bytes / 1e9:g} GB). "
        f"mergekit compute dtype {mk_dtype}. Median of {args.runs} runs. Machine: "
        f"{os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
        f"{platform.python_version()}; load average {loads[0][0]:.2f} before, "
        f"{loads[1][0]:.2f} after." + (f" Cold cache by {evict_how}." if evict_how else ""),
        "",
        "| cache | method | floor s | crucible s | mergekit s | crucible GB/s | mergekit GB/s "
        "| crucible/mergekit | crucible/floor | crucible RSS MiB | mergekit RSS MiB | "
        "RSS ratio | crucible CPU s | mergekit CPU s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for cache in ["warm", "cold"]:
        fl = rows.get(("floor", "-", cache))
        for method in args.methods:
            cr = rows.get(("crucible", method, cache))
            mk = rows.get(("mergekit", method, cache))
            if cr is None and mk is None:
                continue

            def f(x: float | None, fmt: str = ".2f") -> str:
                return "-" if x is None else format(x, fmt)

            lines.append(
                f"| {cache} | {method} | {f(fl and fl.wall)} | {f(cr and cr.wall)} | "
                f"{f(mk and mk.wall)} | {f(cr and gb / cr.wall)} | {f(mk and gb / mk.wall)} | "
                f"{f(cr and mk and cr.wall / mk.wall)} | {f(cr and fl and cr.wall / fl.wall)} | "
                f"{f(cr and cr.rss / 2**20, '.0f')} | {f(mk and mk.rss / 2**20, '.0f')} | "
                f"{f(cr and mk and cr.rss / mk.rss)} | {f(cr and cr.cpu, '.1f')} | "
                f"{f(mk and mk.cpu, '.1f')} |"
            )
    lines += ["", "Targets (issue 8; ratios are of wall times, 0.5 = twice as fast):", ""]
    for method in args.methods:
        cr, mk = rows.get(("crucible", method, "warm")), rows.get(("mergekit", method, "warm"))
        fl = rows.get(("floor", "-", "warm"))
        if cr is None or mk is None:
            continue
        ties_like = method in ("ties", "dare_ties")
        want = 0.25 if ties_like else 0.5
        parts = [
            f"crucible/mergekit {cr.wall / mk.wall:.2f} <= {want}: "
            f"{'met' if cr.wall / mk.wall <= want else 'MISSED'}",
            f"RSS {cr.rss / mk.rss:.2f} <= 0.5: {'met' if cr.rss <= mk.rss / 2 else 'MISSED'}",
            f"(CPU time crucible/mergekit {cr.cpu / max(mk.cpu, 1e-9):.2f})",
        ]
        if not ties_like and fl is not None:
            ratio = cr.wall / fl.wall
            verdict = "met" if ratio <= 1.5 else "MISSED"
            parts.append(f"crucible/floor {ratio:.2f} <= 1.5: {verdict}")
        lines.append(f"- warm {method}: " + "; ".join(parts))
    if checks:
        lines += ["", "Crucible vs mergekit outputs (" + ", ".join(COMPARE) + "):", ""]
        lines += ["| method | max abs diff | entries off by > 1 bf16 ulp |", "|---|---:|---:|"]
        for method, (worst, share) in checks.items():
            lines.append(f"| {method} | {worst:.3g} | {share:.4%} |")
    lines += ["", "All runs (wall s / peak RSS MiB / CPU s):", ""]
    for row in rows.values():
        runs = ", ".join(f"{m.wall:.2f}/{m.rss / 2**20:.0f}/{m.cpu:.1f}" for m in row.runs)
        lines.append(f"- {row.cache} {row.tool} {row.method}: {runs}")
    return "\n".join(lines)


def write_results(text: str) -> None:
    """Replace the generated section of RESULTS.md, keeping the notes around it."""
    old = RESULTS.read_text() if RESULTS.exists() else f"# Throughput\n\n{BEGIN}\n{END}\n"
    if BEGIN not in old or END not in old:
        old = old.rstrip("\n") + f"\n\n{BEGIN}\n{END}\n"
    head, rest = old.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    RESULTS.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")


if __name__ == "__main__":
    main()
