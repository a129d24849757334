"""LoRA bench (issue 5): merge 8 LoRA adapters of rank 16 on 2048-wide layers into one
rank-64 adapter, the dense path (SVD of each d_out x d_in merged ΔW) against the low-rank
path (QR of the stacked factors and an SVD of the small core, crucible.lowrank), plus a TIES
row (dense only: TIES is not a fixed linear combination, so it has no low-rank path).

    .venv/bin/python bench/lora.py [--layers 8] [--width 2048] [--adapters 8] [--rank 16]
                                   [--out-rank 64] [--device auto]

Inputs are synthetic, written with safetensors once per shape into bench/.cache/: a base
folder (no config.json) holding `--layers` float32 width x width weights named
model.layers.{i}.self_attn.q_proj.weight (N(0, 0.02)), and `--adapters` PEFT-layout adapter
folders (adapter_config.json: LORA, r, lora_alpha 32, target_modules [q_proj], the base
folder as base_model_name_or_path; adapter_model.safetensors: lora_A r x width and lora_B
width x r per layer, random). Each merge is crucible.pipeline.run_merge_job with
output {"format": "lora", "lora_rank": out-rank} in a fresh child process, so peak RSS is
that child's ru_maxrss (os.wait4); the baseline is a child that imports the same modules
and exits. `merge s` is run_merge_job alone, `wall s` the whole child (imports included).
The two task_arithmetic paths' adapters are compared module by module as B @ A (float64):
the factors themselves are unique only up to signs, so the products are what must agree.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "bench" / ".cache"
MODULE = "model.layers.{}.self_attn.q_proj"
PEFT_PREFIX = "base_model.model."
LORA_ALPHA = 32
# Both paths store float32 factors of the same truncation: their products differ by rounding
# (~1e-7 relative) unless the rank cut falls inside a cluster of equal singular values.
AGREE = 1e-5
BASELINE_CODE = "import torch, crucible.pipeline, crucible.adapter_merge"


def generate_inputs(folder: Path, layers: int, width: int, adapters: int, rank: int) -> None:
    """The base and adapter folders under `folder` (skipped when already complete)."""
    import torch
    from safetensors.torch import save_file

    if (folder / "done").exists():
        return
    base = folder / "base"
    base.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    weights = {
        f"{MODULE.format(i)}.weight": torch.randn(width, width, generator=g) * 0.02
        for i in range(layers)
    }
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})
    del weights
    for t in range(adapters):
        out = folder / f"adapter{t}"
        out.mkdir(exist_ok=True)
        g = torch.Generator().manual_seed(1000 + t)
        factors: dict[str, torch.Tensor] = {}
        for i in range(layers):
            key = PEFT_PREFIX + MODULE.format(i)
            # Kaiming-like A and a trained-sized B: each ΔW = (alpha / r) B A is ~1e-3.
            factors[f"{key}.lora_A.weight"] = torch.randn(rank, width, generator=g) / width**0.5
            factors[f"{key}.lora_B.weight"] = torch.randn(width, rank, generator=g) * 1e-3
        save_file(factors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": rank,
            "lora_alpha": LORA_ALPHA,
            "target_modules": ["q_proj"],
            "base_model_name_or_path": str(base),
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": False,
            "use_rslora": False,
            "use_dora": False,
        }
        (out / "adapter_config.json").write_text(json.dumps(config, indent=1))
    (folder / "done").write_text("ok")


class _Silent:
    """A pipeline Reporter that reports nothing."""

    def stage(self, name: str) -> None: ...
    def progress(self, done: int, total: int, unit: str) -> None: ...
    def event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None: ...
    def check_cancelled(self) -> None: ...
    def trial(self, index: int, data: dict[str, Any]) -> None: ...


def child(job_file: Path) -> None:
    """Run one merge as described by `job_file`; write {seconds, metrics} next to it."""
    from crucible.pipeline import run_merge_job
    from crucible.settings import Settings
    from crucible.spec import MergeSpec

    job = json.loads(job_file.read_text())
    if job["threads"]:
        import torch

        torch.set_num_threads(job["threads"])
    settings = Settings(
        data_dir=Path(job["data_dir"]),
        allowed_local_dirs=[Path(job["inputs"])],
        device=job["device"],
        lora_lowrank=job["lowrank"],
    )
    spec = MergeSpec.model_validate(job["spec"])
    _warm_up()
    start = time.perf_counter()
    outcome = run_merge_job(spec, Path(job["out"]), settings, _Silent())
    seconds = time.perf_counter() - start
    import torch

    result = {"seconds": seconds, "metrics": outcome.metrics, "threads": torch.get_num_threads()}
    Path(job["result"]).write_text(json.dumps(result))


def _warm_up() -> None:
    """Pay the one-time LAPACK/thread-pool start-up (first QR and SVD) before the clock
    starts, so `merge s` compares the paths, not who ran first in its process."""
    import torch

    m = torch.randn(64, 32, dtype=torch.float64)
    torch.linalg.qr(m, mode="reduced")
    torch.linalg.svd(m, full_matrices=False)
    torch.linalg.svd(m.float(), full_matrices=False)


def run_child(argv: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one child process; exits on its failure."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    assert proc.stderr is not None
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{proc.stderr.read().decode()[-3000:]}")
    return wall, usage.ru_maxrss * 1024


def products(adapter_dir: Path) -> dict[str, Any]:
    """Per module, B @ A of a published adapter in float64 (its scaling is 1: alpha = r)."""
    from safetensors.torch import load_file

    factors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["lora_alpha"] == config["r"] and not config["rank_pattern"], config
    out = {}
    for key in sorted(factors):
        if key.endswith(".lora_A.weight"):
            module = key.removesuffix(".lora_A.weight")
            b = factors[f"{module}.lora_B.weight"].double()
            out[module] = b @ factors[key].double()
    return out


def truncation_errors(inputs: Path, adapters: int, published: dict[str, Any]) -> list[float]:
    """Per module, ||ΔW - B A|| / ||ΔW|| with ΔW = sum_t (alpha / r) B_t A_t formed densely
    in float64 from the input files (task_arithmetic's merge, independently of crucible)."""
    from safetensors.torch import load_file

    sums: dict[str, Any] = {}
    for t in range(adapters):
        folder = inputs / f"adapter{t}"
        config = json.loads((folder / "adapter_config.json").read_text())
        scaling = config["lora_alpha"] / config["r"]
        factors = load_file(str(folder / "adapter_model.safetensors"))
        for module in published:
            delta = (
                factors[f"{module}.lora_B.weight"].double()
                @ factors[f"{module}.lora_A.weight"].double()
            )
            sums[module] = sums.get(module, 0) + scaling * delta
    return [float((sums[m] - published[m]).norm() / sums[m].norm()) for m in published]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--out-rank", type=int, default=64)
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--threads", type=int, help="torch threads in each child (default: torch's)")
    ap.add_argument("--no-ties", action="store_true", help="skip the (dense-only) TIES row")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        child(args.child)
        return

    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 120)
    tag = f"lora-w{args.width}-l{args.layers}-a{args.adapters}-r{args.rank}"
    inputs = CACHE / tag
    console.print(f"inputs in {inputs} (generated once) ...", style="dim")
    generate_inputs(inputs, args.layers, args.width, args.adapters, args.rank)
    _, baseline_rss = run_child([sys.executable, "-c", BASELINE_CODE])

    runs = [("task_arithmetic", True), ("task_arithmetic", False)]
    if not args.no_ties:
        runs.append(("ties", False))
    rows = []
    outputs: dict[tuple[str, bool], Path] = {}
    with tempfile.TemporaryDirectory(prefix="lora-bench-", dir=CACHE) as scratch:
        for method, lowrank in runs:
            label = f"{method}-{'lowrank' if lowrank else 'dense'}"
            work = Path(scratch) / label
            work.mkdir()
            spec = {
                "base": {"uri": (inputs / "base").as_uri()},
                "experts": [
                    {"uri": (inputs / f"adapter{t}").as_uri()} for t in range(args.adapters)
                ],
                "method": {"name": method},
                "output": {"format": "lora", "lora_rank": args.out_rank},
            }
            job = {
                "spec": spec,
                "out": str(work / "output"),
                "result": str(work / "result.json"),
                "data_dir": str(work / "data"),
                "inputs": str(inputs),
                "device": args.device,
                "lowrank": lowrank,
                "threads": args.threads,
            }
            (work / "job.json").write_text(json.dumps(job))
            console.print(f"merging: {label} ...", style="dim")
            wall, rss = run_child(
                [sys.executable, str(Path(__file__).resolve()), "--child", str(work / "job.json")]
            )
            result = json.loads((work / "result.json").read_text())
            rows.append((label, wall, rss, result))
            outputs[(method, lowrank)] = work / "output"

        dense = products(outputs[("task_arithmetic", False)])
        low = products(outputs[("task_arithmetic", True)])
        assert dense.keys() == low.keys() and len(dense) == args.layers
        diff = max(float((dense[m] - low[m]).abs().max()) for m in dense)
        rel = max(float((dense[m] - low[m]).norm() / dense[m].norm()) for m in dense)
        scale = max(float(dense[m].abs().max()) for m in dense)
        independent = max(truncation_errors(inputs, args.adapters, low))

    table = Table(
        title=(
            f"{args.adapters} LoRA adapters of rank {args.rank} on {args.layers} layers of "
            f"{args.width} x {args.width} -> rank {args.out_rank} "
            f"(torch threads {rows[0][3]['threads']}, baseline RSS {baseline_rss / 2**20:.0f} MiB)"
        )
    )
    for column in (
        "run", "device", "wall s", "merge s", "peak MiB", "+base MiB", "err max", "err mean",
        "low/dense",
    ):  # fmt: skip
        table.add_column(column, justify="left" if column in ("run", "device") else "right")
    for label, wall, rss, result in rows:
        lora = result["metrics"]["lora"]
        table.add_row(
            label,
            str(result["metrics"].get("device")),
            f"{wall:.1f}",
            f"{result['seconds']:.2f}",
            f"{rss / 2**20:.0f}",
            f"{(rss - baseline_rss) / 2**20:.0f}",
            f"{lora['error_max']:.4f}",
            f"{lora['error_mean']:.4f}",
            f"{lora['lowrank_modules']} / {lora['dense_modules']}",
        )
    console.print(table)
    console.print(
        "wall s: the child process; merge s: run_merge_job alone; peak MiB: the child's "
        "ru_maxrss; +base MiB: above the baseline child; err: relative Frobenius error "
        "||ΔW - BA|| / ||ΔW|| of the rank truncation per module (max, mean); low/dense: "
        "modules factored by each path"
    )
    reported = rows[0][3]["metrics"]["lora"]["error_max"]
    console.print(
        f"task_arithmetic low-rank, max error from a dense float64 sum of the inputs' ΔW: "
        f"{independent:.6f} (reported {reported:.6f})"
    )
    console.print(
        f"task_arithmetic dense vs low-rank, B @ A per module: max |difference| {diff:.3e} "
        f"(largest |entry| {scale:.3e}); max relative Frobenius difference {rel:.3e}: "
        + ("[green]agree[/]" if rel < AGREE else f"[red]DISAGREE (>= {AGREE:g})[/]")
    )


if __name__ == "__main__":
    main()
