"""Support files next to the merged weights, and the manifest of what was written."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import shutil
import uuid
from pathlib import Path
from typing import Any

# What a merged full model needs besides weights: config and tokenizer/processor files.
SUPPORT_PATTERNS = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer*.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "spiece.model",
    "sentencepiece*.model",
    "*.tiktoken",
    "chat_template.json",
    "chat_template.jinja",
    "*.jinja",
    "preprocessor_config.json",
    "processor_config.json",
)
# Never copied even when a pattern matches (e.g. vocab.bin): weights and pickles come only
# from the merge itself.
_NEVER = (
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".h5", ".msgpack",
    ".onnx", ".gguf", ".npz", ".npy", ".py",
)  # fmt: skip
_DTYPE_KEYS = ("torch_dtype", "dtype")  # transformers 4 wrote torch_dtype, 5 writes dtype


def is_support_file(name: str) -> bool:
    return not name.endswith(_NEVER) and any(fnmatch.fnmatch(name, p) for p in SUPPORT_PATTERNS)


# A model's own config files: not copied next to a LoRA adapter, where a config.json would
# make the folder look like a model without weights.
MODEL_CONFIG_FILES = ("config.json", "generation_config.json")


def copy_support_files(
    src_root: Path, out_dir: Path, dtype: str | None = None, adapter: bool = False
) -> list[Path]:
    """Copy config and tokenizer files (top level of `src_root`) into `out_dir`; for an
    adapter output (`adapter`), the tokenizer files only.

    Symlinks are followed (the Hugging Face cache is made of them). With `dtype`
    ("bfloat16", "float16", "float32"), the copied config.json records it when it differs
    from the base's, so `from_pretrained` loads the merged model in its stored dtype.
    Returns the written paths, sorted.
    """
    src_root = Path(src_root)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for src in sorted(src_root.iterdir()):
        if not src.is_file() or not is_support_file(src.name):
            continue
        if adapter and src.name in MODEL_CONFIG_FILES:
            continue
        dest = out_dir / src.name
        if src.name == "config.json" and dtype is not None:
            _copy_config(src, dest, dtype)
        else:
            shutil.copyfile(src, dest)
        written.append(dest)
    return written


def _copy_config(src: Path, dest: Path, dtype: str) -> None:
    raw = src.read_bytes()
    try:
        config = json.loads(raw)
    except ValueError:
        config = None
    if not isinstance(config, dict):
        dest.write_bytes(raw)  # not ours to repair; from_pretrained will say what is wrong
        return
    present = [k for k in _DTYPE_KEYS if k in config]
    if present and all(config[k] == dtype for k in present):
        dest.write_bytes(raw)  # unchanged: keep the original bytes
        return
    for key in present or ["dtype"]:
        config[key] = dtype
    dest.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_manifest(out_dir: Path) -> list[dict[str, Any]]:
    """[{"path", "sha256", "bytes"}] for every file under `out_dir`, sorted by path.

    Paths are relative, with forward slashes. Hidden temporary files of an unfinished
    writer (".<name>.<tag>.partial") are not part of the output and are skipped.
    """
    out_dir = Path(out_dir)
    entries = [
        manifest_entry(out_dir, path)
        for path in out_dir.rglob("*")
        if path.is_file() and not path.name.endswith(".partial")
    ]
    return sorted(entries, key=lambda e: e["path"])


def manifest_entry(out_dir: Path, path: Path) -> dict[str, Any]:
    """One file's {"path", "sha256", "bytes"}, its path relative to `out_dir`."""
    return {
        "path": path.relative_to(out_dir).as_posix(),
        "sha256": sha256_file(path),
        "bytes": path.stat().st_size,
    }


def remove_staging(output_dir: Path) -> None:
    """Every attempt's staging folder next to `output_dir`."""
    if output_dir.parent.is_dir():
        for staging in output_dir.parent.glob(f"{output_dir.name}.partial*"):
            shutil.rmtree(staging, ignore_errors=True)


def new_staging(output_dir: Path) -> Path:
    """A fresh staging folder next to `output_dir`, named for this attempt alone."""
    staging = output_dir.with_name(f"{output_dir.name}.partial-{uuid.uuid4().hex[:8]}")
    staging.mkdir(parents=True)
    return staging
