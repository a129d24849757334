"""Write a merged LoRA adapter as PEFT saves one: adapter_config.json and
adapter_model.safetensors (keys base_model.model.<module>.lora_A.weight / lora_B.weight,
lora_embedding_A / lora_embedding_B, and full modules_to_save tensors).

A module's rank is known only after its SVD, so tensors are spooled to a scratch file as
they come (memory: one tensor) and copied into a single safetensors file by the sharded
writer at the end, which renames it into place only when complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from crucible.publish.writer import SINGLE_FILE, ShardedSafetensorsWriter
from crucible.sources.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX
from crucible.sources.safetensors_header import code_for_torch_name, torch_name_for_code
from crucible.sources.tensor_reader import pread_exact

# One file: PEFT loads a single adapter_model.safetensors.
_NO_SHARDING = 2**62


class AdapterWriter:
    def __init__(self, out_dir: Path, dtype: torch.dtype) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.dtype = dtype
        self._code = code_for_torch_name(str(dtype))
        self._spool_path = self.out_dir / ".adapter.spool"
        self._spool = open(self._spool_path, "wb")  # noqa: SIM115 (closed in close/abort)
        self._items: list[tuple[str, tuple[int, ...], str, int, int]] = []

    def add_factors(self, module: str, b: torch.Tensor, a: torch.Tensor, embedding: bool) -> None:
        """One module's B (d_out x r) and A (r x d_in), nn.Linear layout. Embeddings are
        saved as PEFT names them: lora_embedding_A (r x num) = A, lora_embedding_B = B."""
        if embedding:
            self._spool_tensor(f"{PEFT_PREFIX}{module}.lora_embedding_A", a)
            self._spool_tensor(f"{PEFT_PREFIX}{module}.lora_embedding_B", b)
        else:
            self._spool_tensor(f"{PEFT_PREFIX}{module}.lora_A.weight", a)
            self._spool_tensor(f"{PEFT_PREFIX}{module}.lora_B.weight", b)

    def add_full(self, name: str, tensor: torch.Tensor) -> None:
        """A modules_to_save tensor, by its name in the model (e.g. lm_head.weight)."""
        self._spool_tensor(f"{PEFT_PREFIX}{name}", tensor)

    def _spool_tensor(self, key: str, tensor: torch.Tensor) -> None:
        data = tensor.detach().to(device="cpu", dtype=self.dtype).contiguous()
        raw = data.reshape(-1).view(torch.uint8).numpy().tobytes()
        offset = self._spool.tell()
        self._spool.write(raw)
        self._items.append((key, tuple(data.shape), self._code, offset, len(raw)))

    def close(self, config: dict[str, Any]) -> None:
        self._spool.close()
        plan = [(key, shape, code) for key, shape, code, _, _ in self._items]
        writer = ShardedSafetensorsWriter(self.out_dir, plan, _NO_SHARDING)
        try:
            fd = os.open(self._spool_path, os.O_RDONLY)
            try:
                for key, shape, code, offset, nbytes in self._items:
                    buf = torch.empty(nbytes, dtype=torch.uint8)
                    if nbytes:
                        pread_exact(fd, buf, offset, self._spool_path)
                    dtype = getattr(torch, torch_name_for_code(code))
                    writer.write(key, buf.view(dtype).reshape(shape))
            finally:
                os.close(fd)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        finally:
            self._spool_path.unlink(missing_ok=True)
        (self.out_dir / SINGLE_FILE).rename(self.out_dir / ADAPTER_WEIGHTS)
        (self.out_dir / ADAPTER_CONFIG).write_text(
            json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )

    def abort(self) -> None:
        if not self._spool.closed:
            self._spool.close()
        self._spool_path.unlink(missing_ok=True)
