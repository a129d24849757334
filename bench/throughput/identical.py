"""Byte-identity check of the merge engine: the same inputs and seeds must give the same
output bytes before and after a speed change.

    .venv/bin/python bench/throughput/identical.py --save   # record (before the change)
    .venv/bin/python bench/throughput/identical.py          # compare (after it)

Runs `crucible merge` on gen.py's `small` variant (bf16 inputs; tensors both above and
below the engine's block size) for every elementwise/tensor-statistics method, to bf16
and float32 outputs, and hashes every output safetensors file. The hashes are stored in
identical.json next to this file (torch's seeded generators make the inputs
reproducible on one torch version).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gen import VARIANTS, cache_root, generate, weight_files

ROOT = Path(__file__).resolve().parents[2]
STORE = Path(__file__).resolve().parent / "identical.json"
CASES: dict[str, tuple[str, dict[str, object]]] = {
    "linear": ("linear", {}),
    "task_arithmetic": ("task_arithmetic", {"scale": 0.7}),
    "ties": ("ties", {"density": 0.2}),
    "ties_count": ("ties", {"density": 0.5, "majority_sign": "count", "normalize": False}),
    "dare_ties": ("dare_ties", {"density": 0.3, "seed": 7}),
    "dare_linear": ("dare_linear", {"density": 0.3, "seed": 7}),
    "breadcrumbs": ("breadcrumbs", {}),
}


def hashes(out_dtypes: list[str], cases: list[str]) -> dict[str, str]:
    base, experts = generate(VARIANTS["small"])
    work = cache_root() / f"identical-{os.getpid()}"  # concurrent checks must not collide
    work.mkdir(parents=True, exist_ok=True)
    result: dict[str, str] = {}
    for key in cases:
        method, params = CASES[key]
        for out_dtype in out_dtypes:
            spec = {
                "base": {"uri": base.as_uri()},
                "experts": [
                    {"uri": e.as_uri(), "weight": w}
                    for e, w in zip(experts, [1, 0.5, 0.8, 1.2], strict=True)
                ],
                "method": {"name": method, "params": params},
                "output": {"dtype": out_dtype, "shard_size": 60 * 10**6},
            }
            spec_file = work / f"{key}-{out_dtype}.json"
            spec_file.write_text(json.dumps(spec))
            out = work / f"out-{key}-{out_dtype}"
            shutil.rmtree(out, ignore_errors=True)
            done = subprocess.run(
                [sys.executable, "-m", "crucible.cli", "merge", str(spec_file), "--out", str(out)],
                cwd=ROOT,
                capture_output=True,
                text=True,
            )
            if done.returncode != 0:
                log = done.stdout[-3000:] + done.stderr[-3000:]
                raise SystemExit(f"{key} {out_dtype} failed:\n{log}")
            digest = hashlib.sha256()
            for f in weight_files(out):
                digest.update(f.name.encode())
                digest.update(f.read_bytes())
            result[f"{key}/{out_dtype}"] = digest.hexdigest()
            shutil.rmtree(out)
            print(f"{key}/{out_dtype}: {result[f'{key}/{out_dtype}'][:16]}", file=sys.stderr)
    shutil.rmtree(work)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--save", action="store_true", help="record the hashes instead of checking")
    ap.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    args = ap.parse_args()
    got = hashes(["bfloat16", "float32"], args.cases)
    if args.save:
        STORE.write_text(json.dumps(got, indent=2, sort_keys=True) + "\n")
        print(f"saved {len(got)} hashes to {STORE}")
        return
    want = json.loads(STORE.read_text())
    bad = [k for k in got if want.get(k) != got[k]]
    for k in got:
        print(f"{'OK  ' if k not in bad else 'DIFF'} {k}")
    if bad:
        raise SystemExit(f"{len(bad)} of {len(got)} outputs changed")
    print(f"all {len(got)} outputs byte-identical")


if __name__ == "__main__":
    main()
