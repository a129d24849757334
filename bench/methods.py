"""Matrix-method bench: tsv, ace and data-free bmm on synthetic models with 2048- and
4096-wide linear layers; wall time, peak RSS and time per module, next to the floor (one bare
float64 SVD and one Cholesky of the same size on the same machine).

    .venv/bin/python bench/methods.py [--widths 2048 4096] [--modules 2] [--experts 3]

Each model is `--modules` square linear layers (width x width) plus a norm; experts are
base + N(0, 0.002) deltas (bench/memory.py's generator). Each merge runs `crucible merge`
in a child process (peak RSS = the child's ru_maxrss); per-module seconds come from the
job's merge_report.json. The floor runs in its own child, with torch's default threads.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

from memory import CACHE, generate, run_child

FLOOR_CODE = """
import json, sys, time, torch
n = int(sys.argv[1])
g = torch.Generator().manual_seed(0)
a = torch.randn(n, n, generator=g, dtype=torch.float64)
spd = a @ a.T / n + torch.eye(n, dtype=torch.float64)
out = {}
for label, fn in (("svd", lambda: torch.linalg.svd(a, full_matrices=False)),
                  ("cholesky", lambda: torch.linalg.cholesky(spd))):
    fn()  # warm up (thread pools, allocator)
    t = time.perf_counter(); fn(); out[label] = time.perf_counter() - t
print(json.dumps(out))
"""

METHOD_PARAMS = {
    "tsv": {},
    "ace": {},
    "bmm": {"gram": "data_free", "anchor": "task_arithmetic"},
}


def plan_for(width: int, modules: int) -> list[tuple[str, tuple[int, ...], str]]:
    plan: list[tuple[str, tuple[int, ...], str]] = []
    for i in range(modules):
        plan += [
            (f"model.layers.{i}.mlp.proj.weight", (width, width), "F32"),
            (f"model.layers.{i}.norm.weight", (width,), "F32"),
        ]
    return plan


def floor(width: int) -> dict[str, float]:
    proc = subprocess.run(
        [sys.executable, "-c", FLOOR_CODE, str(width)], capture_output=True, text=True, check=True
    )
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--widths", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--modules", type=int, default=2)
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--methods", nargs="+", default=list(METHOD_PARAMS))
    args = ap.parse_args()

    baseline_code = "import torch, crucible.pipeline, crucible.cli"
    _, baseline_rss, _ = run_child([sys.executable, "-c", baseline_code])
    rows = []
    for width in args.widths:
        folder = CACHE / f"square-w{width}-m{args.modules}"
        plan = plan_for(width, args.modules)
        print(f"generating {folder} (once) ...", file=sys.stderr)
        generate(folder / "base", plan, seed=0, base_seed=None)
        experts = [folder / f"expert{i}" for i in range(args.experts)]
        for i, d in enumerate(experts):
            generate(d, plan, seed=i + 1, base_seed=0)
        bare = floor(width)
        for method in args.methods:
            spec = {
                "base": {"uri": (folder / "base").as_uri()},
                "experts": [{"uri": d.as_uri()} for d in experts],
                "method": {"name": method, "params": METHOD_PARAMS.get(method, {})},
                "output": {"dtype": "float32", "shard_size": "2GB"},
            }
            spec_file = CACHE / f"spec-{method}-w{width}.json"
            spec_file.write_text(json.dumps(spec))
            out = CACHE / f"out-{method}-w{width}"
            print(f"{method} w={width} ...", file=sys.stderr)
            wall, rss, _ = run_child(
                [sys.executable, "-m", "crucible.cli", "merge", str(spec_file), "--out", str(out)]
            )
            report = json.loads((out / "merge_report.json").read_text())
            per_module = [
                m["seconds"] for m in report["modules"] if m["tensor"].endswith("proj.weight")
            ]
            rows.append(
                (method, width, wall, statistics.mean(per_module), rss - baseline_rss, bare)
            )

    print(
        f"\n{args.experts} experts, {args.modules} square linear modules per model, float64 "
        f"math on cpu; interpreter baseline RSS {baseline_rss / 2**20:.0f} MiB\n"
    )
    print(
        "| method | width | wall s | s per module | peak above baseline MiB "
        "| floor: one SVD s | floor: one Cholesky s | module / SVD |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for method, width, wall, per, above, bare in rows:
        print(
            f"| {method} | {width} | {wall:.1f} | {per:.2f} | {above / 2**20:.0f} "
            f"| {bare['svd']:.2f} | {bare['cholesky']:.3f} | {per / bare['svd']:.1f} |"
        )


if __name__ == "__main__":
    main()
