"""Pickled PyTorch checkpoints (.bin, .pt, .pth), read only when the operator enables them.

A pickle can run any code when it is unpickled, so the service reads safetensors only, and
`CRUCIBLE_ALLOW_PICKLE=true` is the operator's explicit opt-in. Even then a checkpoint is
loaded with `torch.load(weights_only=True)`, whose restricted unpickler builds tensors and
plain containers and refuses everything else (an object whose `__reduce__` calls
`os.system` raises before anything runs), and with `mmap=True`, so the tensors stay in the
page cache rather than in the process's memory.

Each checkpoint file is converted, one file and one tensor at a time, into a safetensors
file under `<data dir>/converted/`: the rest of the service (header checks, `TensorReader`,
the engine) then reads it like any other safetensors weight, and a model whose conversion
is cached is not unpickled again.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crucible.errors import CrucibleError
from crucible.sources.safetensors_header import code_for_torch_name

if TYPE_CHECKING:
    import torch

    from crucible.settings import Settings

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Weight checkpoints only: training_args.bin, optimizer.pt, scheduler.pt, rng_state.pth
# are pickles of other things (and not tensors-only, so weights_only would refuse them).
_WEIGHT_PICKLE = re.compile(r"^(pytorch_model|model)([-.][\w.-]*)?\.(bin|pt|pth)$")
# Containers some trainers wrap a state dict in.
_WRAPPERS = ("state_dict", "model", "module")


def is_weight_pickle(name: str) -> bool:
    """Whether a file name is a pickled weight checkpoint this module may convert."""
    return bool(_WEIGHT_PICKLE.match(name))


def converted_weights(files: list[Path], settings: Settings) -> list[Path]:
    """safetensors copies of pickled checkpoints (converted on first use, then cached)."""
    return [convert_checkpoint(path, _cache_dir(path, settings)) for path in files]


def _cache_dir(path: Path, settings: Settings) -> Path:
    # Keyed by the file's real path, size and mtime: a replaced checkpoint is converted again.
    real = path.resolve()
    stat = real.stat()
    key = hashlib.sha256(f"{real}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()
    return settings.data_root / "converted" / key[:32]


def convert_checkpoint(path: Path, dest_dir: Path) -> Path:
    """`dest_dir/<stem>.safetensors` holding `path`'s tensors; written to a partial file and
    renamed when complete, so a crash never leaves a half-converted file in place."""
    dest = dest_dir / f"{path.stem}.safetensors"
    if dest.is_file():
        return dest
    tensors = load_checkpoint(path)
    dest_dir.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(f"{dest.name}.partial-{os.getpid()}")
    try:
        _write_safetensors(tensors, partial, path)
        partial.replace(dest)
    finally:
        partial.unlink(missing_ok=True)
    return dest


def load_checkpoint(path: Path) -> Mapping[str, torch.Tensor]:
    """A checkpoint's tensors by name, unpickled with weights_only (never any other way)."""
    import torch

    try:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            # mmap needs the zip format torch.save writes since 1.6; a legacy file is read
            # into memory instead (still weights_only; one file at a time).
            if "mmap" not in str(exc):
                raise
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only's refusal: the pickle wants an object that is not a tensor or a
        # plain container (e.g. a callable run by __reduce__). Nothing was executed.
        raise CrucibleError(
            "unsafe_checkpoint",
            f"{path.name}: refused, the pickle holds more than tensors (weights_only load "
            f"failed: {_first_line(exc)})",
            {"file": path.name},
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        raise CrucibleError(
            "corrupt_checkpoint",
            f"{path.name}: not a readable PyTorch checkpoint ({type(exc).__name__}: "
            f"{_first_line(exc)})",
            {"file": path.name},
        ) from None
    return _state_dict(loaded, path)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _state_dict(loaded: Any, path: Path) -> Mapping[str, torch.Tensor]:
    import torch

    for key in _WRAPPERS:
        if isinstance(loaded, dict) and set(loaded) == {key} and isinstance(loaded[key], dict):
            loaded = loaded[key]
    if not isinstance(loaded, dict) or not loaded:
        raise CrucibleError(
            "corrupt_checkpoint",
            f"{path.name}: expected a state dict (tensor name -> tensor), got "
            f"{type(loaded).__name__}",
            {"file": path.name},
        )
    for name, value in loaded.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise CrucibleError(
                "corrupt_checkpoint",
                f"{path.name}: entry {name!r} is a {type(value).__name__}, not a tensor",
                {"file": path.name, "entry": str(name)},
            )
    return loaded


def _write_safetensors(tensors: Mapping[str, torch.Tensor], dest: Path, source: Path) -> None:
    """A safetensors file written tensor by tensor (safetensors' save_file would first
    serialise every tensor into memory). Tied tensors are written once per name."""
    import torch

    header: dict[str, Any] = {"__metadata__": {"format": "pt", "converted_from": source.name}}
    offset = 0
    for name, tensor in tensors.items():
        try:
            code = code_for_torch_name(str(tensor.dtype))
        except KeyError:
            raise CrucibleError(
                "corrupt_checkpoint",
                f"{source.name}: tensor {name!r} has dtype {tensor.dtype}, which safetensors "
                "cannot hold",
                {"file": source.name, "tensor": name},
            ) from None
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": code,
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    with dest.open("wb") as out:
        out.write(len(raw).to_bytes(8, "little"))
        out.write(raw)
        for tensor in tensors.values():
            if tensor.numel():
                flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
                out.write(memoryview(flat.numpy()))
        out.flush()
        os.fsync(out.fileno())
