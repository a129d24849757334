"""Streaming vs download-then-merge of Hub inputs, against olah serving them (issue 8).

    .venv/bin/python bench/streaming.py --runs 3 --write-results

Makes a Llama-shaped base and `--experts` fine-tunes (synthetic bf16 safetensors, sizes
from --layers/--hidden/--intermediate/--vocab; ~17 MB each by default: olah serves about
24 MB/s on a quiet machine, much less on a loaded one), publishes them as repos of a
local olah, and runs the same task_arithmetic job (crucible.pipeline.run_merge_job, in
process) in each mode, alternating, each run with an empty Hugging Face cache:

- download: CRUCIBLE_SOURCE_MODE=download against olah: resolve downloads every model
  (snapshot_download, hash-checked), then the merge reads the local files;
- stream: CRUCIBLE_SOURCE_MODE=stream: config files downloaded, weights read with HTTP
  range requests. olah's git mirror ignores Range, so the Hub here is olah behind
  tests/support/range_proxy.py, which fills each file from olah from its first request on
  (as a CDN fills from its origin) and answers each range once olah has delivered it: the
  transfer rate is olah's. Its file cache is emptied before every stream run.

Reports, median over `--runs`: time to the first merged tensor (from the job's start to
the merge stage's first progress step), total time, the peak disk use of the HF cache
(sampled every 20 ms, allocated blocks), and the bytes streamed (stream) or downloaded.
The outputs of both modes are checked to be byte-identical. Prints a markdown table;
`--write-results` puts it in bench/RESULTS.md (replacing an earlier streaming section).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.olah import HUB_ENV_REMOVE, OlahServer, hub_env  # noqa: E402
from tests.support.range_proxy import RangeProxy  # noqa: E402

RESULTS = ROOT / "bench" / "RESULTS.md"
BEGIN, END = "<!-- streaming.py: begin -->", "<!-- streaming.py: end -->"


def make_models(root: Path, args: argparse.Namespace) -> list[Path]:
    """A base and `args.experts` experts (base + small noise), Llama tensor names, bf16."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    h, f, v = args.hidden, args.intermediate, args.vocab

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    base: dict[str, torch.Tensor] = {"model.embed_tokens.weight": rand(v, h)}
    for i in range(args.layers):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            base[p + f"self_attn.{name}.weight"] = rand(h, h)
        base[p + "mlp.gate_proj.weight"] = rand(f, h)
        base[p + "mlp.up_proj.weight"] = rand(f, h)
        base[p + "mlp.down_proj.weight"] = rand(h, f)
        base[p + "input_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        base[p + "post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    base["model.norm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    base["lm_head.weight"] = rand(v, h)
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": h,
        "intermediate_size": f,
        "num_hidden_layers": args.layers,
        "num_attention_heads": max(1, h // 64),
        "vocab_size": v,
        "torch_dtype": "bfloat16",
    }
    folders = []
    for k in range(args.experts + 1):
        folder = root / ("base" if k == 0 else f"expert_{k}")
        folder.mkdir(parents=True)
        tensors = base
        if k:
            noise = {n: torch.randn(t.shape, generator=g) * 1e-3 for n, t in base.items()}
            tensors = {n: (t.float() + noise[n]).to(t.dtype) for n, t in base.items()}
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(config))
        folders.append(folder)
    return folders


class DiskPeak:
    """The largest allocated size of a folder tree, sampled on a thread."""

    def __init__(self, folder: Path, interval: float = 0.02) -> None:
        self.folder, self.interval, self.peak = folder, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _size(self) -> int:
        total = 0
        for dirpath, _, names in os.walk(self.folder):
            for name in names:
                # A file renamed or removed between listing and stat is skipped.
                with contextlib.suppress(FileNotFoundError):
                    total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._size())
            time.sleep(self.interval)

    def __enter__(self) -> DiskPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._size())


class Timer:
    """A pipeline Reporter that notes when the merge stage reports its first tensor."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.stage_name = ""
        self.first_tensor: float | None = None
        self.stages: dict[str, float] = {}  # stage -> seconds from the start when it began

    def stage(self, name: str) -> None:
        self.stage_name = name
        self.stages[name] = time.perf_counter() - self.started

    def progress(self, done: int, total: int, unit: str) -> None:
        if self.stage_name == "merge" and done >= 1 and self.first_tensor is None:
            self.first_tensor = time.perf_counter() - self.started

    def event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        if kind in ("retry", "stream_fallback"):
            print(f"  event {kind}: {message}", file=sys.stderr)

    def check_cancelled(self) -> None: ...
    def trial(self, index: int, data: dict[str, Any]) -> None: ...


def run_once(mode: str, spec: Any, work: Path, endpoint: str, n: int) -> dict[str, Any]:
    from crucible.pipeline import run_merge_job
    from crucible.settings import Settings

    hf_home = work / f"hf-{mode}-{n}"
    os.environ.update(hub_env(endpoint, hf_home))
    hf_home.mkdir(parents=True)
    settings = Settings(data_dir=work / f"data-{mode}-{n}", source_mode=mode)
    timer = Timer()
    with DiskPeak(hf_home) as disk:
        outcome = run_merge_job(spec, work / f"out-{mode}-{n}", settings, timer)
    total = time.perf_counter() - timer.started
    digest = hashlib.sha256((outcome.output_dir / "model.safetensors").read_bytes()).hexdigest()
    return {
        "first": timer.first_tensor,
        "total": total,
        "disk": disk.peak,
        "digest": digest,
        "input_bytes": outcome.metrics["input_bytes"],
        "merge_start": timer.stages.get("merge", 0.0),
    }


def table(rows: dict[str, list[dict[str, Any]]], streamed: list[int]) -> list[str]:
    def med(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in rows[mode])

    out = [
        "| mode | first merged tensor s | total s | peak HF cache MB | over HTTP MB |",
        "|---|---:|---:|---:|---:|",
    ]
    inputs = rows["download"][0]["input_bytes"] / 1e6
    for mode in ("download", "stream"):
        http = statistics.median(streamed) / 1e6 if mode == "stream" else inputs
        out.append(
            f"| {mode} | {med(mode, 'first'):.2f} | {med(mode, 'total'):.2f} | "
            f"{med(mode, 'disk') / 1e6:.2f} | {http:.1f} |"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--experts", type=int, default=2)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--write-results", action="store_true", help="update bench/RESULTS.md")
    args = p.parse_args(argv)

    for key in HUB_ENV_REMOVE:
        os.environ.pop(key, None)
    work = Path(tempfile.mkdtemp(prefix="crucible-bench-streaming-"))
    os.environ.update(hub_env("http://127.0.0.1:9", work / "hf-unused"))  # before HF imports
    from crucible.spec import MergeSpec

    folders = make_models(work / "models", args)
    sizes = [(f / "model.safetensors").stat().st_size for f in folders]
    load_before = " ".join(f"{x:.1f}" for x in os.getloadavg())
    rows: dict[str, list[dict[str, Any]]] = {"download": [], "stream": []}
    streamed: list[int] = []
    with OlahServer(work / "olah") as olah, RangeProxy(olah.endpoint) as ranges:
        names = ["org/base"] + [f"org/expert-{k}" for k in range(1, args.experts + 1)]
        for name, folder in zip(names, folders, strict=True):
            olah.add_repo(name, folder)
        spec = MergeSpec.model_validate(
            {
                "base": {"uri": "hf://org/base"},
                "experts": [{"uri": f"hf://{n}", "weight": 0.5} for n in names[1:]],
                "method": {"name": "task_arithmetic", "params": {}},
            }
        )
        for n in range(args.runs):
            for mode in ("download", "stream"):  # alternate: drift in load hits both
                ranges.clear()
                endpoint = olah.endpoint if mode == "download" else ranges.endpoint
                result = run_once(mode, spec, work, endpoint, n)
                if mode == "stream":
                    streamed.append(sum(s.last - s.first + 1 for s in ranges.ranges))
                rows[mode].append(result)
                print(
                    f"run {n} {mode}: merge stage at {result['merge_start']:.2f} s, first "
                    f"{result['first']:.2f} s, total {result['total']:.2f} s, peak cache "
                    f"{result['disk'] / 1e6:.2f} MB",
                    file=sys.stderr,
                )
    digests = {r["digest"] for rs in rows.values() for r in rs}
    if len(digests) != 1:
        print("outputs differ between modes!", file=sys.stderr)
        return 1
    load_after = " ".join(f"{x:.1f}" for x in os.getloadavg())
    lines = table(rows, streamed)
    command = "\n".join(
        [
            "## Streaming Hub inputs vs download-then-merge (issue 8)",
            "",
            "Command (run from the repository root):",
            "",
            "```",
            ".venv/bin/python bench/streaming.py " + " ".join(argv or sys.argv[1:]),
            "```",
            "",
            f"task_arithmetic of a Llama-shaped bf16 base and {args.experts} experts "
            f"({args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}, "
            f"vocab {args.vocab}: {sizes[0] / 1e6:.1f} MB per model, {sum(sizes) / 1e6:.1f} MB "
            f"in all) from olah, median of {args.runs} runs per mode, empty HF cache each run; "
            "outputs byte-identical across modes. Stream mode's Hub is olah behind "
            "tests/support/range_proxy.py (olah's git mirror ignores Range; the front fills "
            "each file from olah as a CDN from its origin, at olah's rate).",
            "",
        ]
    )
    section = "\n".join(
        [
            BEGIN,
            command,
            *lines,
            "",
            f"- Machine: {os.cpu_count()} cores, load average before / after: {load_before} / "
            f"{load_after} (1, 5, 15 min; shared machine)",
            END,
        ]
    )
    print(section)
    if args.write_results:
        text = RESULTS.read_text() if RESULTS.exists() else "# Bench results\n"
        if BEGIN in text and END in text:
            head, rest = text.split(BEGIN, 1)
            text = head + section + rest.split(END, 1)[1]
        else:
            text = text.rstrip("\n") + "\n\n" + section + "\n"
        RESULTS.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
