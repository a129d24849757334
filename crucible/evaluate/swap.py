"""Copy merged weights into a live model in place, named as in the base's safetensors files.

The tuner merges in memory and hands tensors named as the base's files name them
(`encoder.layer.0...`, `transformer.h.0...`), in the files' layout (GPT-2 Conv1D weights
d_in x d_out, which is also how the module holds them). The module the evaluator built may
carry a prefix the files lack, or lack one they carry (`bert.`); the names are lined up once
with `align_names`. Copies go into the existing storage (`copy_`, casting dtype and moving
device), so nothing is reallocated and every module that holds the parameter, a shared
backbone or a tied head, sees the new values at once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from crucible.errors import CrucibleError
from crucible.sources.align import align_names
from crucible.sources.resolve import ResolvedModel
from crucible.sources.tensor_reader import TensorReader


def _storage(tensor: torch.Tensor, name: str) -> tuple[str, int] | str:
    # Tied weights share one storage; empty tensors have no storage to share.
    return (str(tensor.device), tensor.data_ptr()) if tensor.numel() else name


class WeightSwapper:
    """Maps base-file tensor names to a module's parameters and persistent buffers."""

    def __init__(self, model: torch.nn.Module, file_names: Iterable[str]) -> None:
        self.model = model
        file_names = list(file_names)
        # keep_vars: the Parameters themselves, not detached views. Tied weights appear
        # under every name that holds them (lm_head.weight and transformer.wte.weight).
        live = model.state_dict(keep_vars=True)
        alignment = align_names(file_names, live)
        self.prefix = alignment.prefix
        self._targets: dict[str, torch.Tensor] = {}
        self._aliases: dict[str, str] = {}  # file name -> the file name of the same storage
        owner: dict[tuple[str, int] | str, str] = {}
        for name in file_names:  # file order: the first name of a tied tensor is canonical
            key = alignment.to_expert.get(name)
            if key is None:
                continue
            tensor = live[key]
            storage = _storage(tensor, key)
            if storage in owner:
                self._aliases[name] = owner[storage]
            else:
                owner[storage] = name
                self._targets[name] = tensor
        # File tensors the module has no place for (a base saved with an LM head the
        # evaluator does not build): swapping them changes nothing, so they are skipped.
        self.unused: list[str] = [n for n in file_names if n not in alignment.to_expert]
        # Module tensors no file name reaches, tied copies of reached ones excluded: these
        # keep whatever the evaluator put there (an expert's own pooler, a random init).
        self.uncovered: list[str] = [
            key for key, tensor in live.items() if _storage(tensor, key) not in owner
        ]

    @property
    def names(self) -> list[str]:
        """The file names this swapper writes, one per distinct tensor (ties counted once)."""
        return list(self._targets)

    def target(self, name: str) -> torch.Tensor:
        """The live tensor a file name writes into."""
        return self._targets[self._aliases.get(name, name)]

    def swap(self, tensors: Mapping[str, torch.Tensor]) -> int:
        """Copy `tensors` (file names) into the live weights in place; returns how many were
        written. Names of file tensors the module has no place for are skipped; names the
        base files do not have are an error, as is a shape that differs."""
        written = 0
        with torch.no_grad():
            for name, value in tensors.items():
                if name in self._targets or name in self._aliases:
                    self._copy(name, self.target(name), value)
                    written += 1
                elif name not in self.unused:
                    raise CrucibleError(
                        "incompatible_models",
                        f"cannot swap tensor {name!r}: the base model's files have no tensor "
                        "of that name",
                        {"tensor": name},
                    )
        return written

    def load_from(self, model: ResolvedModel, names: Iterable[str] | None = None) -> int:
        """Swap in tensors read from a model's files, one at a time (bounded memory).

        `names` are base-file names (default: every one this swapper writes); the source's
        own names are lined up with them, so an expert saved with a `bert.` prefix loads
        into a backbone built from a base without one. Names the source lacks are an error.
        """
        wanted = self.names if names is None else list(names)
        alignment = align_names(wanted, model.tensors)
        missing = [n for n in wanted if n not in alignment.to_expert]
        if missing:
            raise CrucibleError(
                "incompatible_models",
                f"{model.uri} lacks {len(missing)} tensor(s) the evaluator needs, e.g. "
                f"{missing[0]!r}",
                {"uri": model.uri, "missing": missing[:20]},
            )
        written = 0
        with TensorReader(model) as reader:
            for name in wanted:
                written += self.swap({name: reader.read(alignment.to_expert[name])})
        return written

    def snapshot(self, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """CPU copies of the live tensors (default: all this swapper writes), to restore
        them later with `swap`."""
        with torch.no_grad():
            return {
                n: self.target(n).detach().to("cpu", copy=True)
                for n in (self.names if names is None else names)
            }

    @staticmethod
    def _copy(name: str, target: torch.Tensor, value: torch.Tensor) -> None:
        if tuple(value.shape) != tuple(target.shape):
            raise CrucibleError(
                "incompatible_models",
                f"tensor {name!r} has shape {tuple(value.shape)}; the evaluated model holds "
                f"{tuple(target.shape)} there",
                {"tensor": name, "shape": list(value.shape), "expected": list(target.shape)},
            )
        target.copy_(value)
