"""Run mergekit 0.1.5 (in its own venv) on tiny models, for parity tests and the bench.

mergekit pins its own dependency set, so it lives in a separate virtual environment and is
driven as a subprocess: `mergekit-yaml` for whole-model merges, or a short script calling
mergekit's per-tensor merge code directly where the YAML cannot reach an option (TIES 'count'
sign consensus is not selectable from YAML in 0.1.5).

The venv is $CRUCIBLE_MERGEKIT_VENV, default <repo>/.venv-mergekit.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from tests.support.side_venv import checked_python, reference_env, require

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parents[2]
MERGEKIT_VERSION = "0.1.5"
INSTALL_HINT = (
    "mergekit is not installed where the parity tests look for it. From the repository "
    "root run:\n"
    "  python3.11 -m venv .venv-mergekit && "
    ".venv-mergekit/bin/pip install torch==2.13.0 mergekit==0.1.5\n"
    "or point CRUCIBLE_MERGEKIT_VENV at an existing venv with mergekit 0.1.5."
)


class MergekitUnavailable(RuntimeError):
    """The mergekit venv is missing or broken; the message says how to install it."""


class MergekitFailed(RuntimeError):
    """mergekit ran and failed; the message carries its stderr."""


def mergekit_venv() -> Path:
    return Path(os.environ.get("CRUCIBLE_MERGEKIT_VENV", REPO / ".venv-mergekit"))


def mergekit_executables() -> tuple[Path, Path]:
    """(mergekit-yaml, python) of the mergekit venv, checked to be mergekit 0.1.5."""
    venv = mergekit_venv()
    exe = venv / "bin" / "mergekit-yaml"
    if not exe.exists():
        raise MergekitUnavailable(f"no {exe}.\n{INSTALL_HINT}")
    python = checked_python(venv, "mergekit", MERGEKIT_VERSION, INSTALL_HINT, MergekitUnavailable)
    return exe, python


def require_mergekit() -> None:
    """Fail (never skip) the calling test when the mergekit venv is missing."""
    require(mergekit_executables, MergekitUnavailable)


# --- tiny models ---------------------------------------------------------------------------


def tiny_gpt2_config(
    n_embd: int = 32, n_layer: int = 1, n_head: int = 2, vocab_size: int = 64, n_positions: int = 16
) -> dict[str, Any]:
    """A config.json mergekit accepts: it needs `architectures` (one entry it knows) and the
    layer count key of its gpt2 definition; the token ids must lie inside the vocabulary."""
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "n_embd": n_embd,
        "n_layer": n_layer,
        "n_head": n_head,
        "n_inner": 4 * n_embd,
        "vocab_size": vocab_size,
        "n_positions": n_positions,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "tie_word_embeddings": True,
    }


def gpt2_tensor_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor of a GPT2LMHeadModel checkpoint (lm_head is tied to wte, so absent).

    GPT-2 keeps Conv1D weights as (d_in, d_out) and has biases and LayerNorm vectors: 1-D
    and 2-D tensors of several shapes."""
    e, inner = config["n_embd"], config["n_inner"]
    shapes: dict[str, tuple[int, ...]] = {
        "transformer.wte.weight": (config["vocab_size"], e),
        "transformer.wpe.weight": (config["n_positions"], e),
        "transformer.ln_f.weight": (e,),
        "transformer.ln_f.bias": (e,),
    }
    for i in range(config["n_layer"]):
        p = f"transformer.h.{i}."
        shapes |= {
            p + "ln_1.weight": (e,),
            p + "ln_1.bias": (e,),
            p + "attn.c_attn.weight": (e, 3 * e),
            p + "attn.c_attn.bias": (3 * e,),
            p + "attn.c_proj.weight": (e, e),
            p + "attn.c_proj.bias": (e,),
            p + "ln_2.weight": (e,),
            p + "ln_2.bias": (e,),
            p + "mlp.c_fc.weight": (e, inner),
            p + "mlp.c_fc.bias": (inner,),
            p + "mlp.c_proj.weight": (inner, e),
            p + "mlp.c_proj.bias": (e,),
        }
    return shapes


def write_model(
    directory: Path, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]
) -> Path:
    """A model directory as mergekit reads it: config.json and model.safetensors."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(dict(config), indent=2))
    save_file(
        {k: v.detach().contiguous() for k, v in tensors.items()},
        str(directory / "model.safetensors"),
        metadata={"format": "pt"},
    )
    return directory


def read_model(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(directory.glob("*.safetensors")):
        tensors |= load_file(str(shard))
    if not tensors:
        raise MergekitFailed(f"no safetensors written in {directory}")
    return tensors


# --- mergekit-yaml ---------------------------------------------------------------------------


@dataclass
class ParityModels:
    """A base and three experts, on disk (for mergekit) and in memory (for Crucible)."""

    base_dir: Path
    expert_dirs: list[Path]
    base: dict[str, torch.Tensor]
    experts: list[dict[str, torch.Tensor]]


def parity_models(
    root: Path, seed: int, check_cuts: Callable[[str, torch.Tensor], None]
) -> ParityModels:
    """Three experts of a tiny float32 GPT-2 (embeddings, Conv1D weights, biases, norms):
    base N(0, 0.2^2), experts base + N(0, 0.05^2), with one zero task vector (zeros never
    win a sign election nor count in a divisor) and two exactly opposite ones (the elected
    sign then depends on the weights alone). Before writing, `check_cuts(name, magnitudes)`
    sees every task vector's magnitudes sorted descending: the parity tests assert there
    that no magnitude tie falls at a cut they use (mergekit breaks ties arbitrarily)."""
    import torch

    config = tiny_gpt2_config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=16)
    g = torch.Generator().manual_seed(seed)
    base = {
        name: 0.2 * torch.randn(shape, generator=g)
        for name, shape in gpt2_tensor_shapes(config).items()
    }
    experts = [
        {name: w + 0.05 * torch.randn(w.shape, generator=g) for name, w in base.items()}
        for _ in range(3)
    ]
    experts[2]["transformer.ln_f.bias"] = base["transformer.ln_f.bias"].clone()
    bias = "transformer.h.0.attn.c_proj.bias"
    experts[1][bias] = base[bias] - (experts[0][bias] - base[bias])
    for expert in experts:
        for name, w in base.items():
            check_cuts(name, (expert[name] - w).abs().reshape(-1).sort(descending=True).values)
    base_dir = write_model(root / "base", base, config)
    expert_dirs = [write_model(root / f"expert{i}", e, config) for i, e in enumerate(experts)]
    return ParityModels(base_dir, expert_dirs, base, experts)


def crucible_merge(
    models: ParityModels, method: str, params: dict[str, Any], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """Crucible's method, tensor by tensor, on the same in-memory models."""
    from crucible.methods.base import TensorContext
    from crucible.methods.registry import METHODS

    info = METHODS[method]
    p = info.params(**params)
    return {
        name: info.merge(
            TensorContext(name, base, [e[name] for e in models.experts], list(weights)), p
        )
        for name, base in models.base.items()
    }


@dataclass
class MergeRun:
    """One mergekit-yaml merge: a method, its global parameters, and the inputs.

    `models` are (path, per-model parameters such as weight/density); `base` is the base
    model path for task-vector methods, None for linear."""

    method: str
    models: Sequence[tuple[Path, Mapping[str, Any]]]
    base: Path | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict)

    def config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "merge_method": self.method,
            "models": [
                {"model": str(path), "parameters": dict(params)} for path, params in self.models
            ],
            # Load and write float32 so the comparison sees fp32 arithmetic on both sides.
            "dtype": "float32",
            "out_dtype": "float32",
        }
        if self.base is not None:
            cfg["base_model"] = str(self.base)
        if self.parameters:
            cfg["parameters"] = dict(self.parameters)
        return cfg


def run_mergekit_yaml(
    run: MergeRun, workdir: Path, *, timeout: float = 600
) -> dict[str, torch.Tensor]:
    """Write the YAML, run `mergekit-yaml` on the CPU, return the output tensors."""
    exe, _ = mergekit_executables()
    workdir.mkdir(parents=True, exist_ok=True)
    cfg_path, out = workdir / "merge.yml", workdir / "out"
    cfg_path.write_text(yaml.safe_dump(run.config(), sort_keys=False))
    cmd = [
        str(exe),
        str(cfg_path),
        str(out),
        "--lazy-unpickle",
        "--allow-crimes",
        "--device",
        "cpu",
        "--no-copy-tokenizer",
        "--no-write-model-card",
        "--quiet",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=reference_env())
    if done.returncode != 0:
        raise MergekitFailed(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stderr[-4000:]}")
    return read_model(out)


def run_mergekit_yaml_many(
    runs: Mapping[str, MergeRun], workdir: Path, *, max_workers: int = 2
) -> dict[str, dict[str, torch.Tensor]]:
    """Several independent merges, `max_workers` processes at a time (each is mostly
    interpreter start-up)."""
    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        futures = {
            key: pool.submit(run_mergekit_yaml, run, workdir / key) for key, run in runs.items()
        }
        return {key: future.result() for key, future in futures.items()}


# --- mergekit's per-tensor code, called directly ----------------------------------------------

_GROUP_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from safetensors.torch import load_file, save_file
    from mergekit.merge_methods.base import TensorGroup
    from mergekit.merge_methods.generalized_task_arithmetic import (
        ConsensusMethod, GeneralizedTaskArithmeticMerge,
    )
    from mergekit.sparsify import SparsificationMethod

    spec = json.loads(open(sys.argv[1]).read())
    method = GeneralizedTaskArithmeticMerge(
        consensus_method=spec["consensus"] and ConsensusMethod(spec["consensus"]),
        sparsification_method=spec["sparsification"]
        and SparsificationMethod(spec["sparsification"]),
        default_normalize=spec["normalize"],
        default_rescale=False,
        method_name="parity",
        method_pretty_name=None,
        method_reference_url=None,
    )
    inputs = load_file(spec["inputs"])
    n = spec["experts"]
    ids = ["base"] + [f"e{i}" for i in range(n)]
    out = {}
    for name in spec["names"]:
        tensors = [inputs[f"{name}/base"]] + [inputs[f"{name}/{i}"] for i in range(n)]
        group = TensorGroup.from_tensors(tensors, ids=ids, base_index=0, name=name)
        params = {
            "int8_mask": False,
            "normalize": spec["normalize"],
            "rescale": False,
            "lambda": spec["lambda"],
            "weight": dict(zip(ids[1:], spec["weights"])),
            "density": {i: spec["density"] for i in ids[1:]},
        }
        out[name] = method.merge_group(group, **params).contiguous()
    save_file(out, spec["output"])
    """
)


def run_mergekit_gta_tensors(
    base: Mapping[str, torch.Tensor],
    experts: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    *,
    consensus: str | None,
    sparsification: str | None,
    density: float,
    normalize: bool,
    lam: float,
    workdir: Path,
    timeout: float = 600,
) -> dict[str, torch.Tensor]:
    """mergekit's GeneralizedTaskArithmeticMerge.merge_group on each tensor, with a free
    choice of consensus ('sum' | 'count' | None) and sparsification ('magnitude' | None)."""
    from safetensors.torch import save_file

    _, python = mergekit_executables()
    workdir.mkdir(parents=True, exist_ok=True)
    flat: dict[str, torch.Tensor] = {}
    for name, tensor in base.items():
        flat[f"{name}/base"] = tensor.contiguous()
        for i, expert in enumerate(experts):
            flat[f"{name}/{i}"] = expert[name].contiguous()
    save_file(flat, str(workdir / "inputs.safetensors"))
    spec = {
        "inputs": str(workdir / "inputs.safetensors"),
        "output": str(workdir / "output.safetensors"),
        "names": list(base),
        "experts": len(experts),
        "weights": list(weights),
        "consensus": consensus,
        "sparsification": sparsification,
        "density": density,
        "normalize": normalize,
        "lambda": lam,
    }
    (workdir / "spec.json").write_text(json.dumps(spec))
    (workdir / "group_merge.py").write_text(_GROUP_SCRIPT)
    done = subprocess.run(
        [str(python), str(workdir / "group_merge.py"), str(workdir / "spec.json")],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=reference_env(),
    )
    if done.returncode != 0:
        raise MergekitFailed(f"mergekit group merge exited {done.returncode}:\n{done.stderr}")
    from safetensors.torch import load_file

    return load_file(str(workdir / "output.safetensors"))
