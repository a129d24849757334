"""PEFT LoRA adapters as experts: read and check `adapter_config.json`, then map the
adapter's tensors onto the base's (merge-math.md section 11).

An adapter expert is the base plus, for each module it targets, ΔW = scaling · B A, with
scaling = lora_alpha / r (rsLoRA: lora_alpha / sqrt(r)), r and lora_alpha per module from
`rank_pattern` / `alpha_pattern` (PEFT's rule: a pattern matches a module name that equals it
or ends with "." + it, as a regular expression). Modules it does not target have ΔW = 0;
`modules_to_save` tensors (and an embedding's saved `base_layer`) replace the base's tensor.

Only plain LoRA (ΔW = B A) is accepted. DoRA, LoRA with trainable biases, trainable tokens,
LoRA on raw parameters, layer replication, LoRA on convolutions and every other PEFT type are
refused with a message naming the reason: none of them is B A, and merging them as if they
were would silently be wrong.

Torch-free: headers and JSON only (the worker adds ΔW in `TensorReader`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crucible.errors import CrucibleError
from crucible.sources.align import align_names
from crucible.sources.safetensors_header import TensorInfo

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# PEFT saves keys under the wrapper's names: base_model.model.<module path>...
PEFT_PREFIX = "base_model.model."
# Config switches that make ΔW something other than scaling · B A (or add tensors of their
# own), with the reason given when one is set.
_REFUSED_SWITCHES = {
    "use_dora": "DoRA rescales each column by a learned magnitude, so ΔW is not B·A",
    "lora_bias": "a LoRA with trainable biases (lora_bias) changes the biases too",
    "layer_replication": "layer_replication duplicates layers, so the model differs from the base",
    "target_parameters": "LoRA on raw parameters (target_parameters) is not a per-module B·A",
    "trainable_token_indices": "trainable tokens add a sparse embedding delta of their own",
    "use_qalora": "QA-LoRA pools the inputs, so ΔW is not B·A",
    "use_bdlora": "block-diagonal LoRA (use_bdlora) shares factors across modules",
    "alora_invocation_tokens": "activated LoRA applies only after invocation tokens",
}


@dataclass(frozen=True)
class LoraDelta:
    """One module's ΔW = scaling · B A, in the base tensor's layout:
    `linear`: B A (d_out x d_in); `transposed`: (B A)^T (GPT-2 Conv1D with fan_in_fan_out,
    and embeddings, whose weight is num_embeddings x dim)."""

    module: str  # the module's path in the adapter's naming, e.g. model.layers.0.mlp.up_proj
    a: TensorInfo  # r x d_in (embeddings: r x num_embeddings)
    b: TensorInfo  # d_out x r (embeddings: dim x r)
    scaling: float
    transposed: bool
    embedding: bool = False

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass
class AdapterPlan:
    """What an adapter changes, by the base's tensor names."""

    config: dict[str, Any]
    deltas: dict[str, LoraDelta] = field(default_factory=dict)
    # base tensor name -> the adapter's full tensor that replaces it (modules_to_save,
    # an embedding's base_layer)
    full: dict[str, TensorInfo] = field(default_factory=dict)

    @property
    def target_modules(self) -> Any:
        return self.config.get("target_modules")

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.config.get("fan_in_fan_out"))


def is_adapter_folder(root: Path) -> bool:
    return (root / ADAPTER_CONFIG).is_file()


def read_adapter_config(path: Path, uri: str) -> dict[str, Any]:
    """The adapter's config, checked to be a plain LoRA: anything else is refused here,
    before any weights are read or downloaded."""

    def refuse(message: str, **detail: Any) -> CrucibleError:
        return CrucibleError("unsupported_adapter", f"{uri}: {message}", {"uri": uri, **detail})

    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise refuse(f"{ADAPTER_CONFIG} is not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise refuse(f"{ADAPTER_CONFIG} is not a JSON object")
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise refuse(
            f"PEFT type {peft_type!r} is not supported: only LoRA adapters (ΔW = B·A) can be "
            "merged",
            peft_type=peft_type,
        )
    for key, why in _REFUSED_SWITCHES.items():
        value = config.get(key)
        if value:  # None, false, {} and [] are all "off"
            raise refuse(f"{why}; it is set here ({key}={value!r})", switch=key)
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(("pissa", "olora", "corda", "loftq")):
        # Their B A is relative to a base with the principal part moved into the adapter.
        raise refuse(
            f"init_lora_weights={init!r}: this adapter's B·A applies to a modified base, not "
            "the original one; convert it first (PEFT save_pretrained with "
            "path_initial_model_for_weight_conversion) and merge the converted adapter",
            switch="init_lora_weights",
        )
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
            raise refuse(f"{ADAPTER_CONFIG}: {key} must be a positive number, got {value!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        value = config.get(key) or {}
        if not isinstance(value, dict):
            raise refuse(f"{ADAPTER_CONFIG}: {key} must be an object, got {value!r}")
    return config


def check_adapter_base(
    config: dict[str, Any], adapter_uri: str, base_uri: str, allow_mismatch: bool
) -> str | None:
    """None when the adapter was trained on the job's base (or the caller allows any base);
    else raise `adapter_base_mismatch`. Returns a warning when the base cannot be checked.

    A Hub base matches the adapter's `base_model_name_or_path` by repo id (case-insensitive,
    as the Hub's ids are). A local base matches a path to the same folder, or a Hub id whose
    name part is the folder's name (a local copy of that repo)."""
    named = config.get("base_model_name_or_path")
    if not isinstance(named, str) or not named.strip():
        return f"{adapter_uri} does not record its base model (base_model_name_or_path)"
    if allow_mismatch:
        return None
    named = named.strip().rstrip("/")
    if base_uri.startswith("hf://"):
        repo = base_uri.removeprefix("hf://").strip("/")
        ok = named.lower() == repo.lower()
    else:
        folder = Path(base_uri.removeprefix("file://")).resolve()
        ok = (
            Path(named).expanduser().resolve() == folder
            if named.startswith("/")
            else (named.rsplit("/", 1)[-1] == folder.name)
        )
    if ok:
        return None
    raise CrucibleError(
        "adapter_base_mismatch",
        f"adapter {adapter_uri} was trained on {named!r}, not on this job's base {base_uri}; "
        "set allow_base_mismatch: true on the expert to merge it anyway",
        {"adapter": adapter_uri, "adapter_base": named, "base": base_uri},
    )


def pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern/alpha_pattern lookup: the first key k (in order) that matches
    `module` as the regular expression (.*\\.)?(k)$."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def module_scaling(config: dict[str, Any], module: str, rank: int) -> float:
    alpha = float(pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"]))
    if config.get("use_rslora"):
        return alpha / math.sqrt(rank)
    return alpha / rank


def plan_adapter(
    config: dict[str, Any],
    adapter: dict[str, TensorInfo],
    base: dict[str, TensorInfo],
    uri: str,
) -> AdapterPlan:
    """Map the adapter's tensors onto the base's names and check every shape."""

    def corrupt(message: str, **detail: Any) -> CrucibleError:
        return CrucibleError("corrupt_adapter", f"{uri}: {message}", {"uri": uri, **detail})

    factors: dict[str, dict[str, TensorInfo]] = {}
    full: dict[str, TensorInfo] = {}
    for key, info in adapter.items():
        name = key.removeprefix(PEFT_PREFIX)
        if "lora_magnitude_vector" in name:
            raise CrucibleError(
                "unsupported_adapter",
                f"{uri}: tensor {key!r} is a DoRA magnitude: DoRA is not B·A and is not merged",
                {"uri": uri, "tensor": key},
            )
        match = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight|(.+)\.(lora_embedding_[AB])", name)
        if match:
            module = match[1] or match[3]
            kind = (match[2] or match[4]).replace("lora_embedding_", "lora_")
            factors.setdefault(module, {})[kind] = info
            continue
        if re.search(r"\.lora_[A-Za-z_]+(\.|$)", name):
            raise CrucibleError(
                "unsupported_adapter",
                f"{uri}: tensor {key!r} is not a LoRA factor this service can merge "
                "(expected <module>.lora_A.weight / lora_B.weight or lora_embedding_A/B)",
                {"uri": uri, "tensor": key},
            )
        # modules_to_save and saved embedding base layers: full tensors of the model.
        full[name.replace(".base_layer.", ".")] = info

    # The base may be saved with or without the task wrapper's prefix (model., bert., ...).
    wanted = [f"{m}.weight" for m in factors] + list(full)
    alignment = align_names(base, wanted)
    to_base = {v: k for k, v in alignment.to_expert.items()}
    unknown = [n for n in wanted if n not in to_base]
    tied = [n for n in unknown if n in full and n.rsplit(".", 2)[-2:] == ["lm_head", "weight"]]
    if tied:
        raise CrucibleError(
            "unsupported_adapter",
            f"{uri}: the adapter saves {tied[0]!r} (modules_to_save), but the base's files "
            "hold no such tensor (its output layer is tied to the input embeddings); an "
            "untied lm_head on a tied base is not supported",
            {"uri": uri, "tensors": tied},
        )
    if unknown:
        raise CrucibleError(
            "adapter_base_mismatch",
            f"{uri}: the adapter changes {unknown[0]!r}, which the base does not have "
            f"({len(unknown)} such tensors); is it an adapter of another model?",
            {"uri": uri, "tensors": unknown[:20]},
        )
    plan = AdapterPlan(config=config)
    for name, info in full.items():
        plan.full[to_base[name]] = info
    fan_in_fan_out = bool(config.get("fan_in_fan_out"))
    for module, pair in sorted(factors.items()):
        if set(pair) != {"lora_A", "lora_B"}:
            missing = ({"lora_A", "lora_B"} - set(pair)).pop()
            raise corrupt(f"module {module!r} has no {missing} tensor", module=module)
        a, b = pair["lora_A"], pair["lora_B"]
        if len(a.shape) != 2 or len(b.shape) != 2:
            raise CrucibleError(
                "unsupported_adapter",
                f"{uri}: module {module!r} has {len(a.shape)}-D LoRA factors (a convolution); "
                "only linear and embedding LoRA layers are merged",
                {"uri": uri, "module": module},
            )
        rank = a.shape[0]
        if b.shape[1] != rank:
            raise corrupt(
                f"module {module!r}: lora_A is {list(a.shape)} but lora_B is {list(b.shape)}; "
                "their ranks differ",
                module=module,
            )
        expected_rank = int(pattern_value(config.get("rank_pattern") or {}, module, config["r"]))
        if rank != expected_rank:
            raise corrupt(
                f"module {module!r} has rank {rank} but the config (r / rank_pattern) says "
                f"{expected_rank}; the scaling alpha/r would be wrong",
                module=module,
            )
        target = to_base[f"{module}.weight"]
        embedding = "lora_embedding" in a.name
        transposed = embedding or fan_in_fan_out
        shape = base[target].shape
        product = (a.shape[1], b.shape[0]) if transposed else (b.shape[0], a.shape[1])
        if tuple(shape) != product:
            raise CrucibleError(
                "adapter_base_mismatch",
                f"{uri}: module {module!r} gives a ΔW of shape {list(product)} but the base's "
                f"{target!r} is {list(shape)}",
                {"uri": uri, "module": module, "delta": list(product), "base": list(shape)},
            )
        plan.deltas[target] = LoraDelta(
            module=module,
            a=a,
            b=b,
            scaling=module_scaling(config, module, rank),
            transposed=transposed,
            embedding=embedding,
        )
    if not plan.deltas and not plan.full:
        raise corrupt(f"{ADAPTER_WEIGHTS} holds no LoRA tensors")
    return plan
