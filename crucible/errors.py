"""The one error type that crosses layers: a stable code, a human message, optional detail.

A job that fails records exactly these three fields; the API answers them in the shape
`{"error": {"code", "message", "detail"}}`.
"""

from __future__ import annotations

from typing import Any


class CrucibleError(Exception):
    """An expected failure with a stable machine-readable code.

    Codes used so far:
      invalid_spec, unsupported_uri, local_path_forbidden,
      source_not_found, source_unavailable, no_weights, corrupt_safetensors,
      incompatible_models, bad_grams, non_finite, device_unavailable, dataset_not_found,
      bad_dataset, dataset_mismatch, dataset_too_small, unsupported_model, no_tokenizer,
      limit_exceeded, nothing_to_tune, tuning_failed, unsupported_adapter, corrupt_adapter,
      adapter_base_mismatch, lora_output_needs_adapters, cancelled, internal,
      worker_lost (lease expired max_attempts times), disk_full (ENOSPC/EDQUOT/EFBIG),
      unsafe_checkpoint (a pickle weights_only refuses), corrupt_checkpoint,
      secrets_unreadable (the job's secrets do not decrypt with this CRUCIBLE_SECRETS_KEY),
      webhook_url_forbidden (the SSRF policy refuses a webhook URL; 422 at submit),
      publish_failed (the output could not be written to its s3:// or hf:// destination),
      lease_lost (this worker's lease ran out and another delivery owns the job now; the
      run stops without touching the job), stream_unavailable (a ranged read of a streamed
      Hub input failed after its retries).
    """

    def __init__(self, code: str, message: str, detail: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.detail = detail

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "detail": self.detail}


class JobCancelled(CrucibleError):
    def __init__(self, message: str = "the job was cancelled") -> None:
        super().__init__("cancelled", message)
