"""Memory bench: merge 4 synthetic experts of >= 1 GB each and report wall time, input
GB/s and peak RSS against the interpreter's baseline.

    .venv/bin/python bench/memory.py [--hidden 2048] [--layers 4] [--methods ties ...]

Models are Llama-shaped (embeddings, q/k/v/o, gate/up/down, norms, lm_head), generated
once per shape into bench/.cache/ with the streaming writer (so generation is bounded too).
Each merge runs `crucible merge` in a child process; peak RSS is the child's ru_maxrss.
The baseline is a child that imports the same modules and exits.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from crucible.publish.writer import ShardedSafetensorsWriter

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "bench" / ".cache"


def llama_plan(hidden: int, layers: int, vocab: int) -> list[tuple[str, tuple[int, ...], str]]:
    inter = int(hidden * 2.75)
    plan: list[tuple[str, tuple[int, ...], str]] = [
        ("model.embed_tokens.weight", (vocab, hidden), "F32")
    ]
    for i in range(layers):
        p = f"model.layers.{i}."
        plan += [
            (p + "input_layernorm.weight", (hidden,), "F32"),
            (p + "self_attn.q_proj.weight", (hidden, hidden), "F32"),
            (p + "self_attn.k_proj.weight", (hidden, hidden), "F32"),
            (p + "self_attn.v_proj.weight", (hidden, hidden), "F32"),
            (p + "self_attn.o_proj.weight", (hidden, hidden), "F32"),
            (p + "post_attention_layernorm.weight", (hidden,), "F32"),
            (p + "mlp.gate_proj.weight", (inter, hidden), "F32"),
            (p + "mlp.up_proj.weight", (inter, hidden), "F32"),
            (p + "mlp.down_proj.weight", (hidden, inter), "F32"),
        ]
    plan += [("model.norm.weight", (hidden,), "F32"), ("lm_head.weight", (vocab, hidden), "F32")]
    return plan


def generate(folder: Path, plan: list, seed: int, base_seed: int | None) -> None:
    """Base: N(0, 0.02); expert: base + N(0, 0.002) (a fine-tune-sized delta)."""
    if (folder / "done").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    writer = ShardedSafetensorsWriter(folder, plan, 2 * 10**9, metadata={"format": "pt"})
    for idx, (name, shape, _) in enumerate(plan):
        g = torch.Generator().manual_seed(
            (base_seed if base_seed is not None else seed) * 1000 + idx
        )
        t = torch.randn(shape, generator=g) * 0.02
        if base_seed is not None:
            g2 = torch.Generator().manual_seed(seed * 1000 + idx)
            t += torch.randn(shape, generator=g2) * 0.002
        writer.write(name, t)
        del t
    writer.close()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "bench": True}))
    (folder / "done").write_text("ok")


def run_child(argv: list[str]) -> tuple[float, int, int]:
    """(wall seconds, peak RSS bytes, exit code) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{proc.stderr.read().decode()[-3000:]}")
    return wall, usage.ru_maxrss * 1024, code


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument(
        "--methods", nargs="+", default=["linear", "task_arithmetic", "ties", "dare_ties"]
    )
    ap.add_argument("--out-dtype", default="bfloat16")
    args = ap.parse_args()

    plan = llama_plan(args.hidden, args.layers, args.vocab)
    tag = f"llama-h{args.hidden}-l{args.layers}-v{args.vocab}"
    folder = CACHE / tag
    print(f"generating models in {folder} (once) ...", file=sys.stderr)
    generate(folder / "base", plan, seed=0, base_seed=None)
    experts = [folder / f"expert{i}" for i in range(args.experts)]
    for i, d in enumerate(experts):
        generate(d, plan, seed=i + 1, base_seed=0)
    size = lambda d: sum(f.stat().st_size for f in d.glob("*.safetensors"))  # noqa: E731
    expert_gb = size(experts[0]) / 1e9
    input_bytes = size(folder / "base") + sum(size(d) for d in experts)

    baseline_code = "import torch, crucible.pipeline, crucible.cli"
    _, baseline_rss, _ = run_child([sys.executable, "-c", baseline_code])

    rows = []
    for method in args.methods:
        params = {
            "ties": {"density": 0.2},
            "dare_ties": {"density": 0.2},
            "dare_linear": {"density": 0.2},
        }.get(method, {})
        spec = {
            "base": {"uri": (folder / "base").as_uri()},
            "experts": [{"uri": d.as_uri()} for d in experts],
            "method": {"name": method, "params": params},
            "output": {"dtype": args.out_dtype, "shard_size": "2GB"},
        }
        spec_file = CACHE / f"spec-{method}.json"
        spec_file.write_text(json.dumps(spec))
        out = CACHE / f"out-{method}"
        wall, rss, _ = run_child(
            [sys.executable, "-m", "crucible.cli", "merge", str(spec_file), "--out", str(out)]
        )
        rows.append((method, wall, input_bytes / wall / 1e9, rss, rss - baseline_rss))

    print(
        f"\n{args.experts} experts of {expert_gb:.2f} GB + base (fp32, {tag}), "
        f"output {args.out_dtype}; {input_bytes / 1e9:.2f} GB read per merge; "
        f"interpreter baseline RSS {baseline_rss / 2**20:.0f} MiB\n"
    )
    print("| method | wall s | input GB/s | peak RSS MiB | above baseline MiB |")
    print("|---|---:|---:|---:|---:|")
    for method, wall, gbs, rss, above in rows:
        print(f"| {method} | {wall:.1f} | {gbs:.2f} | {rss / 2**20:.0f} | {above / 2**20:.0f} |")


if __name__ == "__main__":
    main()
