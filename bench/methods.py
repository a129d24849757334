"""Matrix-method bench: tsv, ace, regmean and bmm (data-free and with activation Grams) on
synthetic models; wall time, peak RSS and time per module, next to the floor (one bare
float64 SVD of the module's shape and one Cholesky of its d_in x d_in system, on the same
machine), and the total for a 7B-shaped Llama extrapolated from the measured per-module times.

    .venv/bin/python bench/methods.py [--widths 2048 4096] [--modules 2] [--experts 3]
    .venv/bin/python bench/methods.py --layout llama [--hidden 4096 --intermediate 11008]
        [--modules 1] [--experts 2] [--threads 1] [--methods ...] [--results FILE]
    .venv/bin/python bench/methods.py --layout llama --report-only --results FILE

Layouts:
- square: each model is `--modules` width x width linear layers plus a norm, per width;
- llama: each model is `--modules` layers of one q_proj (hidden x hidden), one up_proj
  (intermediate x hidden) and one down_proj (hidden x intermediate) plus a norm: one module of
  each shape a 7B Llama has (q/k/v/o, gate/up, down).
Experts are base + N(0, 0.002) deltas (bench/memory.py's generator). regmean and bmm with
gram=activations get one Gram folder per expert: a safetensors file with, for every 2-D
weight, G = X^T X / n (d_in x d_in, float32), X of n = d_in rows of N(0, 1) with per-feature
scales in [0.2, 3) (full rank), passed as the expert's `grams` (crucible.spec.ExpertRef).

Each merge runs `crucible merge` in a child process (peak RSS = the child's ru_maxrss);
per-module seconds come from the job's merge_report.json. The floor runs in its own child.
`--threads N` sets OMP_NUM_THREADS / MKL_NUM_THREADS for every child (merges and floor
alike); unset, torch picks its default. Every finished row is appended to `--results`
(JSON lines) as soon as it is measured, so two invocations with different `--methods` (one
with `--no-floor`) can share one file, and `--report-only` prints the tables from it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from memory import CACHE, generate, run_child

from crucible.publish.writer import ShardedSafetensorsWriter

FLOOR_CODE = """
import json, sys, time, torch
d_out, d_in = int(sys.argv[1]), int(sys.argv[2])
g = torch.Generator().manual_seed(0)
small = torch.randn(256, 256, generator=g, dtype=torch.float64)
torch.linalg.svd(small); torch.linalg.cholesky(small @ small.T + torch.eye(256, dtype=small.dtype))
a = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
x = torch.randn(d_in, d_in, generator=g, dtype=torch.float64)
spd = x @ x.T / d_in + torch.eye(d_in, dtype=torch.float64)
del x
out = {}
for label, fn in (("svd", lambda: torch.linalg.svd(a, full_matrices=False)),
                  ("cholesky", lambda: torch.linalg.cholesky(spd))):
    t = time.perf_counter(); fn(); out[label] = time.perf_counter() - t
print(json.dumps(out))
"""

# label -> (method name, params, needs Gram folders)
CONFIGS: dict[str, tuple[str, dict[str, Any], bool]] = {
    "tsv": ("tsv", {}, False),
    "ace": ("ace", {}, False),
    "bmm": ("bmm", {"gram": "data_free", "anchor": "task_arithmetic"}, False),
    "regmean": ("regmean", {}, True),
    "bmm-act": ("bmm", {"gram": "activations", "anchor": "task_arithmetic"}, True),
}

# A 7B Llama (hidden 4096, intermediate 11008, 32 layers): per layer q/k/v/o are square,
# gate/up are up-shaped, down is down-shaped.
LLAMA_7B = {"layers": 32, "square": 4, "up": 2, "down": 1, "vocab": 32000}

Plan = list[tuple[str, tuple[int, ...], str]]


def square_plan(width: int, modules: int) -> Plan:
    plan: Plan = []
    for i in range(modules):
        plan += [
            (f"model.layers.{i}.mlp.proj.weight", (width, width), "F32"),
            (f"model.layers.{i}.norm.weight", (width,), "F32"),
        ]
    return plan


def llama_plan(hidden: int, inter: int, modules: int) -> Plan:
    plan: Plan = []
    for i in range(modules):
        p = f"model.layers.{i}."
        plan += [
            (p + "input_layernorm.weight", (hidden,), "F32"),
            (p + "self_attn.q_proj.weight", (hidden, hidden), "F32"),
            (p + "mlp.up_proj.weight", (inter, hidden), "F32"),
            (p + "mlp.down_proj.weight", (hidden, inter), "F32"),
        ]
    return plan


def kind_of(hidden: int, shape: tuple[int, ...]) -> str:
    """square / up / down: the 7B module class a weight stands for."""
    if shape[0] == shape[1]:
        return "square"
    return "up" if shape[1] == hidden else "down"


def generate_grams(folder: Path, plan: Plan, seed: int) -> None:
    """One Gram per 2-D weight: G = X^T X / n, X (n = d_in rows) with uneven feature scales."""
    if (folder / "done").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    gram_plan = [(n, (s[1], s[1]), "F32") for n, s, _ in plan if len(s) == 2]
    writer = ShardedSafetensorsWriter(folder, gram_plan, 4 * 10**9, metadata={"format": "pt"})
    for idx, (name, (d_in, _), _) in enumerate(gram_plan):
        g = torch.Generator().manual_seed(seed * 1000 + idx)
        x = torch.randn(d_in, d_in, generator=g)
        x.mul_(torch.rand(d_in, generator=g) * 2.8 + 0.2)
        writer.write(name, x.T @ x / d_in)
        del x
    writer.close()
    (folder / "done").write_text("ok")


def floor(d_out: int, d_in: int) -> dict[str, float]:
    proc = subprocess.run(
        [sys.executable, "-c", FLOOR_CODE, str(d_out), str(d_in)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


def append(results: Path, row: dict[str, Any]) -> None:
    with results.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), file=sys.stderr, flush=True)


def measure(args: argparse.Namespace) -> None:
    baseline_code = "import torch, crucible.pipeline, crucible.cli"
    _, baseline_rss, _ = run_child([sys.executable, "-c", baseline_code])
    if args.layout == "square":
        groups = [
            (f"square-w{w}-m{args.modules}", square_plan(w, args.modules), w) for w in args.widths
        ]
    else:
        tag = f"llama-h{args.hidden}-i{args.intermediate}-m{args.modules}"
        plan = llama_plan(args.hidden, args.intermediate, args.modules)
        groups = [(tag, plan, args.hidden)]
        if args.split:  # one model (and one merge, one report) per module shape
            groups = []
            for kind in ("square", "up", "down"):
                sub = [
                    (n, s, d) for n, s, d in plan if len(s) == 1 or kind_of(args.hidden, s) == kind
                ]
                groups.append((f"{tag}-{kind}", sub, args.hidden))
    gram_home = {g[0]: CACHE / g[0] for g in groups}
    if args.layout == "llama" and args.split:  # the whole-plan Gram folders serve every split
        gram_home = {g[0]: CACHE / tag for g in groups}
        if any(CONFIGS[m][2] for m in args.methods):
            for i in range(args.experts):
                generate_grams(CACHE / tag / f"grams{i}", plan, seed=100 + i)
    for tag, plan, hidden in groups:
        folder = CACHE / tag
        print(f"generating {folder} (once) ...", file=sys.stderr, flush=True)
        generate(folder / "base", plan, seed=0, base_seed=None)
        experts = [folder / f"expert{i}" for i in range(args.experts)]
        for i, d in enumerate(experts):
            generate(d, plan, seed=i + 1, base_seed=0)
        matrices = {n: s for n, s, _ in plan if len(s) == 2}
        if any(CONFIGS[m][2] for m in args.methods):
            for i in range(args.experts):
                generate_grams(gram_home[tag] / f"grams{i}", plan, seed=100 + i)
        print("generated", file=sys.stderr, flush=True)
        common = {"tag": tag, "experts": args.experts, "threads": args.threads}
        if not args.no_floor:
            for shape in dict.fromkeys(matrices.values()):
                bare = floor(shape[0], shape[1])
                append(args.results, {"row": "floor", **common, "shape": list(shape), **bare})
        for label in args.methods:
            method, params, needs_grams = CONFIGS[label]
            spec = {
                "base": {"uri": (folder / "base").as_uri()},
                "experts": [
                    {
                        "uri": d.as_uri(),
                        **(
                            {"grams": {"uri": (gram_home[tag] / f"grams{i}").as_uri()}}
                            if needs_grams
                            else {}
                        ),
                    }
                    for i, d in enumerate(experts)
                ],
                "method": {"name": method, "params": params},
                "output": {"dtype": "float32", "shard_size": "2GB"},
            }
            spec_file = CACHE / f"spec-{label}-{tag}.json"
            spec_file.write_text(json.dumps(spec))
            out = CACHE / f"out-{label}-{tag}"
            print(f"{label} {tag} ...", file=sys.stderr, flush=True)
            started = time.time()
            wall, rss, _ = run_child(
                [sys.executable, "-m", "crucible.cli", "merge", str(spec_file), "--out", str(out)]
            )
            report = json.loads((out / "merge_report.json").read_text())
            seconds: dict[str, list[float]] = {}
            for m in report["modules"]:
                if m["tensor"] in matrices:
                    shape = matrices[m["tensor"]]
                    seconds.setdefault(json.dumps(list(shape)), []).append(m["seconds"])
            for shape_key, values in seconds.items():
                shape = tuple(json.loads(shape_key))
                append(
                    args.results,
                    {
                        "row": "method",
                        **common,
                        "method": label,
                        "shape": list(shape),
                        "kind": kind_of(hidden, shape),
                        "per_module": statistics.mean(values),
                        "modules": len(values),
                        "wall": wall,
                        "peak_above_baseline": rss - baseline_rss,
                        "started": started,
                    },
                )


def report(results: Path, hidden: int) -> None:
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    floors = {tuple(r["shape"]): r for r in rows if r["row"] == "floor"}
    methods = [r for r in rows if r["row"] == "method"]
    if not methods:
        raise SystemExit(f"{results}: no method rows")
    first = methods[0]
    print(
        f"\n{first['experts']} experts, {first['tag']}, float64 math on cpu, "
        f"threads per child: {first['threads'] or 'torch default'}\n"
    )
    print(
        "| method | module (d_out x d_in) | s per module | one SVD s | one Cholesky s "
        "| module / SVD | merge wall s | peak above baseline MiB |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in methods:
        shape = tuple(r["shape"])
        bare = floors.get(shape, {"svd": float("nan"), "cholesky": float("nan")})
        print(
            f"| {r['method']} | {shape[0]} x {shape[1]} ({r['kind']}) | {r['per_module']:.1f} "
            f"| {bare['svd']:.1f} | {bare['cholesky']:.2f} "
            f"| {r['per_module'] / bare['svd']:.2f} | {r['wall']:.0f} "
            f"| {r['peak_above_baseline'] / 2**20:.0f} |"
        )

    # 7B extrapolation: per shape class, count x measured per-module time.
    n = LLAMA_7B
    counts = {k: n["layers"] * n[k] for k in ("square", "up", "down")}
    by_kind_shape = {kind_of(hidden, shape): shape for shape in floors}
    up_shape = by_kind_shape.get("up")
    # embed_tokens / lm_head (vocab x hidden): matrices for tsv, ace and data-free bmm (not
    # measured: scaled from the up-shaped module by d_out, as SVD and GEMM cost m n^2 for
    # m >= n); regmean and bmm-act have no Gram for them and take an elementwise mean.
    embed_factor = n["vocab"] / up_shape[0] if up_shape else float("nan")
    floor_total_svd = sum(counts[k] * floors[by_kind_shape[k]]["svd"] for k in counts)
    floor_total_chol = sum(counts[k] * floors[by_kind_shape[k]]["cholesky"] for k in counts)
    print(
        f"\n7B-shaped model, extrapolated ({n['layers']} layers x ({n['square']} square + "
        f"{n['up']} up + {n['down']} down) = {sum(counts.values())} linear modules; "
        f"{first['experts']} experts)\n"
    )
    print(
        "| method | square s | up s | down s | embed+head s (scaled) | total h "
        "| total / SVD floor |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    per_method: dict[str, dict[str, float]] = {}
    for r in methods:
        per_method.setdefault(r["method"], {})[r["kind"]] = r["per_module"]
    for label, per in per_method.items():
        # A shape this run did not reach is left out of the total, which is then a lower bound.
        parts = {k: counts[k] * per[k] for k in counts if k in per}
        matrix_embed = label in ("tsv", "ace", "bmm")
        embed = 2 * embed_factor * per["up"] if matrix_embed and "up" in per else 0.0
        total = sum(parts.values()) + embed
        bound = "" if len(parts) == len(counts) else ">= "
        cells = " | ".join(f"{parts[k]:.0f}" if k in parts else "not measured" for k in counts)
        print(
            f"| {label} | {cells} | {embed:.0f} | {bound}{total / 3600:.2f} "
            f"| {bound}{total / floor_total_svd:.1f} |"
        )
    print(
        "| floor: one SVD per module | "
        + " | ".join(f"{counts[k] * floors[by_kind_shape[k]]['svd']:.0f}" for k in counts)
        + f" | - | {floor_total_svd / 3600:.2f} | 1.0 |"
    )
    print(
        "| floor: one Cholesky (d_in) per module | "
        + " | ".join(f"{counts[k] * floors[by_kind_shape[k]]['cholesky']:.0f}" for k in counts)
        + f" | - | {floor_total_chol / 3600:.3f} | {floor_total_chol / floor_total_svd:.2f} |"
    )


def legacy_report(results: Path) -> None:
    """The square layout's table (per width, as in the first RESULTS.md section)."""
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    floors = {tuple(r["shape"]): r for r in rows if r["row"] == "floor"}
    print(
        "| method | width | wall s | s per module | peak above baseline MiB "
        "| floor: one SVD s | floor: one Cholesky s | module / SVD |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if r["row"] != "method":
            continue
        bare = floors[tuple(r["shape"])]
        print(
            f"| {r['method']} | {r['shape'][0]} | {r['wall']:.1f} | {r['per_module']:.2f} "
            f"| {r['peak_above_baseline'] / 2**20:.0f} | {bare['svd']:.2f} "
            f"| {bare['cholesky']:.3f} | {r['per_module'] / bare['svd']:.1f} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--layout", choices=["square", "llama"], default="square")
    ap.add_argument("--widths", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--modules", type=int, default=2)
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--methods", nargs="+", default=["tsv", "ace", "bmm"], choices=list(CONFIGS))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument(
        "--split",
        action="store_true",
        help="llama layout: one model and merge per module shape, each row saved as it ends",
    )
    ap.add_argument("--no-floor", action="store_true", help="skip the floor (another run has it)")
    ap.add_argument("--results", type=Path, default=None)
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    if args.results is None:
        args.results = CACHE / f"methods-{args.layout}-{int(time.time())}.jsonl"
    if args.threads:  # inherited by every child (merges and floor)
        os.environ.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    if not args.report_only:
        CACHE.mkdir(parents=True, exist_ok=True)
        measure(args)
    if args.layout == "square":
        legacy_report(args.results)
    else:
        report(args.results, args.hidden)


if __name__ == "__main__":
    main()
