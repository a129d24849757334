"""Pickled checkpoints: refused by default; with CRUCIBLE_ALLOW_PICKLE, weight pickles are
loaded with torch.load(weights_only=True, mmap=True) and converted to safetensors; a
malicious pickle is refused even then, and its payload never runs. `trust_remote_code` is
never passed as true anywhere in the service's code."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from crucible.errors import CrucibleError
from crucible.pipeline import run_merge_job
from crucible.settings import Settings
from crucible.sources.resolve import ResolvedModel, resolve_model
from crucible.sources.tensor_reader import TensorReader
from crucible.spec import MergeSpec, ModelRef
from tests.support.olah import HUB_ENV_REMOVE, OlahServer, hub_env
from tests.support.reporters import QuietReporter
from tests.support.tiny_models import make_gpt2_family

REPO_ROOT = Path(__file__).resolve().parents[1]


class _Payload:
    """Unpickling this runs `touch <marker>`: the classic pickle exploit."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("pickles")
    base_dir, (expert_dir,) = make_gpt2_family(root / "st", n_experts=1, seed=3)
    state = load_file(base_dir / "model.safetensors")
    as_bin = root / "models" / "base-bin"
    as_bin.mkdir(parents=True)
    torch.save(state, as_bin / "pytorch_model.bin")
    shutil.copy(base_dir / "config.json", as_bin / "config.json")
    return {"root": root, "st": base_dir, "expert": expert_dir, "bin": as_bin, "state": state}


def _settings(root: Path, allow: bool) -> Settings:
    return Settings(data_dir=root / "data", allowed_local_dirs=[root], allow_pickle=allow)


def _resolve(folder: Path, settings: Settings) -> ResolvedModel:
    return resolve_model(ModelRef(uri=folder.as_uri(), revision="main"), settings)


def _malicious(folder: Path, marker: Path, name: str = "pytorch_model.bin") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    torch.save({"weight": torch.zeros(2), "evil": _Payload(marker)}, path)
    (folder / "config.json").write_text('{"model_type": "gpt2"}')
    return path


def test_pickles_are_refused_by_default(family: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(CrucibleError) as err:
        _resolve(family["bin"], _settings(family["root"], allow=False))
    assert err.value.code == "no_weights"
    assert "pytorch_model.bin" in err.value.message
    assert "CRUCIBLE_ALLOW_PICKLE" in err.value.message
    assert not (family["root"] / "data" / "converted").exists()


def test_allowed_pickle_reads_like_safetensors(family: dict[str, Any]) -> None:
    settings = _settings(family["root"], allow=True)
    model = _resolve(family["bin"], settings)
    assert model.root == family["bin"].resolve()
    assert len(model.weight_files) == 1
    converted = model.weight_files[0]
    assert converted.suffix == ".safetensors"
    assert converted.is_relative_to(settings.data_root / "converted")
    reference = _resolve(family["st"], settings)
    assert {n: (t.dtype, t.shape) for n, t in model.tensors.items()} == {
        n: (t.dtype, t.shape) for n, t in reference.tensors.items()
    }
    with TensorReader(model) as reader:
        for name, tensor in family["state"].items():
            assert torch.equal(reader.read(name), tensor), name
    # Converted once: a second resolve reuses the file and does not unpickle again.
    stamp = converted.stat().st_mtime_ns
    again = _resolve(family["bin"], settings)
    assert again.weight_files == [converted]
    assert converted.stat().st_mtime_ns == stamp


def test_merge_of_a_pickled_base_equals_the_safetensors_merge(
    family: dict[str, Any], tmp_path: Path
) -> None:
    settings = _settings(family["root"], allow=True)

    def merge(base: Path, out: Path) -> dict[str, str]:
        spec = MergeSpec.model_validate(
            {
                "base": {"uri": base.as_uri()},
                "experts": [{"uri": family["expert"].as_uri(), "weight": 0.7}],
                "method": {"name": "task_arithmetic", "params": {"scale": 1.0}},
                "output": {"dtype": "float32"},
            }
        )
        outcome = run_merge_job(spec, out, settings, QuietReporter())
        return {f["path"]: f["sha256"] for f in outcome.files if f["path"].endswith("tensors")}

    from_pickle = merge(family["bin"], tmp_path / "a")
    from_safetensors = merge(family["st"], tmp_path / "b")
    assert from_pickle == from_safetensors
    assert from_pickle  # at least one weight file


def test_malicious_pickle_is_refused_even_when_allowed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    folder = tmp_path / "evil"
    path = _malicious(folder, marker)
    with pytest.raises(CrucibleError) as err:
        _resolve(folder, _settings(tmp_path, allow=True))
    assert err.value.code == "unsafe_checkpoint"
    assert "pytorch_model.bin" in err.value.message
    assert not marker.exists(), "the pickle's payload ran"
    assert not (tmp_path / "data" / "converted").exists() or not any(
        (tmp_path / "data" / "converted").rglob("*.safetensors")
    )
    # The payload is real: an unrestricted torch.load (in a child process) runs it.
    code = f"import torch; torch.load({str(path)!r}, weights_only=False)"
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=False, timeout=120)
    assert marker.exists()


def test_other_pickles_are_never_loaded(tmp_path: Path) -> None:
    """training_args.bin, optimizer.pt and the like are not weights: not even opened."""
    marker = tmp_path / "pwned"
    folder = tmp_path / "m"
    _malicious(folder, marker, name="training_args.bin")
    with pytest.raises(CrucibleError) as err:
        _resolve(folder, _settings(tmp_path, allow=True))
    assert err.value.code == "no_weights"
    assert not marker.exists()


def test_legacy_and_wrapped_checkpoints(tmp_path: Path) -> None:
    state = {"a.weight": torch.randn(4, 3), "a.bias": torch.randn(4).to(torch.bfloat16)}
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    # The pre-1.6 format cannot be memory-mapped: read into memory instead (weights_only).
    torch.save(state, legacy / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    wrapped = tmp_path / "wrapped"
    wrapped.mkdir()
    torch.save({"state_dict": state}, wrapped / "model.pt")
    settings = _settings(tmp_path, allow=True)
    for folder in (legacy, wrapped):
        model = _resolve(folder, settings)
        assert model.tensors["a.bias"].dtype == "BF16"
        with TensorReader(model) as reader:
            for name, tensor in state.items():
                assert torch.equal(reader.read(name), tensor), (folder.name, name)


def test_a_pickle_that_is_not_a_state_dict_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "odd"
    folder.mkdir()
    torch.save({"step": 3, "weight": torch.zeros(2)}, folder / "pytorch_model.bin")
    with pytest.raises(CrucibleError) as err:
        _resolve(folder, _settings(tmp_path, allow=True))
    assert err.value.code == "corrupt_checkpoint"
    assert "'step'" in err.value.message
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "pytorch_model.bin").write_bytes(b"\x80\x04not a checkpoint" * 20)
    with pytest.raises(CrucibleError) as err:
        _resolve(garbage, _settings(tmp_path, allow=True))
    assert err.value.code in ("corrupt_checkpoint", "unsafe_checkpoint")
    assert "pytorch_model.bin" in err.value.message


# ----------------------------------------------------------------------------- the Hub


@pytest.fixture(scope="module")
def hub(family: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    root = tmp_path_factory.mktemp("hub")
    repo = root / "bin-repo"
    shutil.copytree(family["bin"], repo)
    marker = root / "pwned-by-training-args"
    _malicious(repo, marker, name="training_args.bin")
    with OlahServer(root / "olah") as server:
        commit = server.add_repo("org/bin", repo)
        yield {"server": server, "commit": commit, "marker": marker}


def test_hub_pickle_repo_when_allowed(
    hub: dict[str, Any], family: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in HUB_ENV_REMOVE:
        monkeypatch.delenv(key, raising=False)
    for key, value in hub_env(hub["server"].endpoint, tmp_path / "hf-home").items():
        monkeypatch.setenv(key, value)
    ref = ModelRef(uri="hf://org/bin", revision="main")
    with pytest.raises(CrucibleError) as err:
        resolve_model(ref, Settings(data_dir=tmp_path / "data"))
    assert err.value.code == "no_weights"
    assert not (tmp_path / "hf-home" / "hub" / "models--org--bin" / "snapshots").exists()

    model = resolve_model(ref, Settings(data_dir=tmp_path / "data", allow_pickle=True))
    assert model.commit == hub["commit"]
    fetched = sorted(p.name for p in model.root.iterdir())
    assert fetched == ["config.json", "pytorch_model.bin"]  # not training_args.bin
    assert not hub["marker"].exists()
    with TensorReader(model) as reader:
        for name, tensor in family["state"].items():
            assert torch.equal(reader.read(name), tensor), name


# ----------------------------------------------------------------------------- remote code


def _python_sources() -> list[Path]:
    files = [p for d in ("crucible", "service", "worker") for p in (REPO_ROOT / d).rglob("*.py")]
    assert len(files) > 50
    return files


def _remote_code_uses(source: str) -> list[int]:
    """Lines where trust_remote_code is given anything but a literal False, as a keyword
    or as a key of a kwargs dict."""
    lines: list[int] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            for kw in node.keywords:
                if kw.arg == "trust_remote_code" and not (
                    isinstance(kw.value, ast.Constant) and kw.value.value is False
                ):
                    lines.append(node.lineno)
        if isinstance(node, ast.Dict) and any(
            isinstance(k, ast.Constant) and k.value == "trust_remote_code" for k in node.keys
        ):
            lines.append(node.lineno)
    return lines


def test_trust_remote_code_is_never_true() -> None:
    offending = {
        str(path.relative_to(REPO_ROOT)): lines
        for path in _python_sources()
        if (lines := _remote_code_uses(path.read_text(encoding="utf-8")))
    }
    assert offending == {}


@pytest.mark.parametrize(
    ("source", "found"),
    [
        ("AutoModel.from_pretrained(p, trust_remote_code=True)", [1]),
        ("AutoModel.from_pretrained(p, trust_remote_code=flag)", [1]),
        ("kw = {'trust_remote_code': True}\nAutoModel.from_pretrained(p, **kw)", [1]),
        ("AutoModel.from_pretrained(p, trust_remote_code=False)", []),
        ("AutoModel.from_pretrained(p)", []),
    ],
)
def test_the_remote_code_check_can_fail(source: str, found: list[int]) -> None:
    assert _remote_code_uses(source) == found
