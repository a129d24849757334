"""Activation Grams: G = X^T X / n of every linear module's input, from forward passes
(merge-math.md section 5, "Gram estimation").

- A forward pre-hook on each listed module (nn.Linear, or transformers' Conv1D of GPT-2,
  whose weight is stored d_in x d_out but whose input is still (..., d_in)) takes the
  module's input, keeps the rows of real tokens only (the batch's attention_mask; padding
  would otherwise pull every Gram toward the pad token's activations) and adds
  X^T X to a float64 sum on the compute device. n counts the real rows seen, so
  G = sum / n is the per-token mean: each task weighs the same whatever its token count.
- Inputs whose leading dims are (batch, seq, ...) or (batch * seq) are masked; inputs with
  one row per example (batch, d_in), such as BERT's pooler on the [CLS] token, count every
  row (that token is never padding).
- Grams are keyed by the BASE model's weight name (`linear_modules` maps module paths of
  the loaded expert to them, through the expert's files and crucible.sources.align), so a
  classifier saved with a `bert.` prefix gives Grams under the base's names, and its head,
  which the base lacks, gets none.
- Memory: the float64 Grams of all modules may not fit (8 d_in^2 bytes each). `plan_groups`
  splits the modules into groups within a byte budget, and the caller makes one pass over
  the data per group, writing each group out before the next.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from typing import TYPE_CHECKING

from crucible.errors import CrucibleError
from crucible.sources.align import NameAlignment, align_names

if TYPE_CHECKING:
    import torch

    from crucible.evaluate.batches import Batch

GRAM_ITEM_BYTES = 8  # float64


def gram_bytes(d_in: int) -> int:
    return GRAM_ITEM_BYTES * d_in * d_in


def _linear_types() -> tuple[type, ...]:
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, Conv1D)


def linear_modules(
    model: torch.nn.Module, file_tensor_names: Collection[str], alignment: NameAlignment
) -> dict[str, str]:
    """{module path in `model`: BASE weight name} for every nn.Linear / Conv1D whose weight
    is a tensor of the model's files (`file_tensor_names`, the expert's safetensors names)
    with a counterpart in the base (`alignment` = align_names(base names, expert names)).

    The model's own parameter names are matched to its files' names first (a checkpoint
    may carry a prefix the loaded class lacks, or the reverse); weights not in the files
    (a tied lm_head) and the expert's own heads are left out. Order: `named_modules`."""
    model_to_file = align_names(list(model.state_dict().keys()), file_tensor_names).to_expert
    expert_to_base = {e: b for b, e in alignment.to_expert.items()}
    out: dict[str, str] = {}
    for path, module in model.named_modules():
        if not isinstance(module, _linear_types()):
            continue
        file_name = model_to_file.get(f"{path}.weight" if path else "weight")
        base_name = expert_to_base.get(file_name) if file_name is not None else None
        if base_name is not None:
            out[path] = base_name
    return out


def module_input_dims(model: torch.nn.Module, modules: Iterable[str]) -> dict[str, int]:
    """d_in of each listed module: in_features (nn.Linear) or weight.shape[0] (Conv1D)."""
    from torch import nn

    dims: dict[str, int] = {}
    for path in modules:
        module = model.get_submodule(path)
        if isinstance(module, nn.Linear):
            dims[path] = int(module.in_features)
        else:
            dims[path] = int(module.weight.shape[0])
    return dims


def plan_groups(
    modules: Mapping[str, str], d_in: Mapping[str, int], budget_bytes: int
) -> list[dict[str, str]]:
    """Split {module path: base name} into groups whose Grams fit in `budget_bytes`, in order.

    Modules sharing a base name share one Gram and stay in one group; a Gram larger than
    the budget is a group of its own."""
    by_base: dict[str, list[str]] = {}
    for path, base in modules.items():
        by_base.setdefault(base, []).append(path)
    groups: list[dict[str, str]] = []
    used = 0
    for base, paths in by_base.items():
        cost = gram_bytes(d_in[paths[0]])
        if not groups or (used + cost > budget_bytes and used > 0):
            groups.append({})
            used = 0
        groups[-1].update(dict.fromkeys(paths, base))
        used += cost
    return groups


class _Accumulator:
    """Float64 sums of X^T X and real-row counts per base name, fed by pre-hooks."""

    def __init__(
        self, model: torch.nn.Module, modules: Mapping[str, str], device: torch.device
    ) -> None:
        import torch

        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.mask: torch.Tensor | None = None  # the current batch's attention_mask, bool
        dims = module_input_dims(model, modules)
        for path, base in modules.items():
            if base not in self.sums:
                d = dims[path]
                self.sums[base] = torch.zeros((d, d), dtype=torch.float64, device=device)
                self.counts[base] = 0
        self._handles = [
            model.get_submodule(path).register_forward_pre_hook(
                self._hook(path, base), with_kwargs=True
            )
            for path, base in modules.items()
        ]

    def _hook(self, path: str, base: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else next(iter(kwargs.values()))
            rows = self._real_rows(path, x)
            self.sums[base].addmm_(rows.T, rows)
            self.counts[base] += int(rows.shape[0])

        return hook

    def _real_rows(self, path: str, x: torch.Tensor) -> torch.Tensor:
        import torch

        mask = self.mask
        assert mask is not None
        batch, seq = mask.shape
        lead = tuple(x.shape[:-1])
        d_in = int(x.shape[-1])
        if lead[:2] == (batch, seq):
            keep = mask.reshape(batch, seq, *([1] * (len(lead) - 2))).expand(lead)
            rows = x[keep]
        elif lead == (batch * seq,):
            rows = x[mask.reshape(-1)]
        elif lead == (batch,):
            rows = x
        else:
            raise CrucibleError(
                "unsupported_model",
                f"module {path!r} received inputs of shape {list(x.shape)}, which do not "
                f"line up with the batch's (batch, seq) = ({batch}, {seq}): its padding "
                "tokens cannot be told apart",
                {"module": path, "shape": list(x.shape)},
            )
        return rows.reshape(-1, d_in).to(torch.float64)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def collect_activation_grams(
    model: torch.nn.Module,
    batches: Iterable[Batch],
    modules: Mapping[str, str],
    *,
    device: torch.device,
    progress: Callable[[int], None] | None = None,
    check_cancelled: Callable[[], None] | None = None,
) -> dict[str, torch.Tensor]:
    """{base weight name: X^T X / n} (float64, on the CPU) over the real tokens of `batches`,
    one forward pass per batch; `modules` is {module path: base name} (`linear_modules`).

    `model` must already be on `device`; it is put in eval mode. `progress(examples)` is
    called after each batch with the examples done so far in this call, `check_cancelled()`
    before each batch. Modules that saw no input (never called) are left out."""
    import torch

    model.eval()
    acc = _Accumulator(model, modules, device)
    done = 0
    try:
        with torch.no_grad():
            for batch in batches:
                if check_cancelled is not None:
                    check_cancelled()
                moved = batch.to(device)
                acc.mask = moved.attention_mask.bool()
                model(**moved.model_inputs())
                done += batch.size
                if progress is not None:
                    progress(done)
    finally:
        acc.remove()
    grams: dict[str, torch.Tensor] = {}
    for base in list(acc.sums):
        total = acc.sums.pop(base)  # freed from the device one at a time
        if acc.counts[base]:
            grams[base] = total.div_(acc.counts[base]).cpu()
        del total
    return grams
