"""hf:// sources against a real Hub-compatible server (olah serving local git repos)."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from crucible.errors import CrucibleError
from crucible.settings import Settings
from crucible.sources.compat import check_compatible
from crucible.sources.resolve import ResolvedModel, resolve_model
from crucible.sources.tensor_reader import TensorReader
from crucible.spec import ModelRef
from tests.support.olah import HUB_ENV_REMOVE, OlahServer, hub_env
from tests.support.ports import free_port
from tests.support.tiny_models import make_gpt2_family


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("hub")
    base_dir, (expert_dir,) = make_gpt2_family(root / "gpt2", n_experts=1, seed=4)
    sharded_dir, _ = make_gpt2_family(root / "sharded", n_experts=0, seed=5, max_shard_size="100KB")

    bin_only = root / "bin-only"
    bin_only.mkdir()
    (bin_only / "pytorch_model.bin").write_bytes(torch.randn(1000).numpy().tobytes())
    (bin_only / "config.json").write_text('{"model_type": "gpt2"}')

    # Weights plus things that must not be fetched: pickles, other formats, subfolders.
    mixed = root / "mixed"
    shutil.copytree(base_dir, mixed)
    (mixed / "pytorch_model.bin").write_bytes(b"\x80\x04" + b"p" * 3000)
    (mixed / "tokenizer.json").write_text('{"version": "1.0"}')
    (mixed / "onnx").mkdir()
    (mixed / "onnx" / "model.onnx").write_bytes(b"o" * 3000)
    save_file({"x": torch.zeros(64)}, mixed / "onnx" / "extra.safetensors")

    with OlahServer(root / "olah") as server:
        commits = {
            "base": server.add_repo("org/base", base_dir),
            "expert": server.add_repo("org/expert", expert_dir),
            "sharded": server.add_repo("org/sharded", sharded_dir),
            "bin-only": server.add_repo("org/bin-only", bin_only),
            "mixed": server.add_repo("org/mixed", mixed),
        }
        yield {
            "server": server,
            "commits": commits,
            "base": base_dir,
            "expert": expert_dir,
            "sharded": sharded_dir,
            "root": root,
        }


@pytest.fixture
def hf_home(hub: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh Hugging Face cache per test, and the process pointed at olah."""
    home = tmp_path / "hf-home"
    for key in HUB_ENV_REMOVE:
        monkeypatch.delenv(key, raising=False)
    for key, value in hub_env(hub["server"].endpoint, home).items():
        monkeypatch.setenv(key, value)
    return home


def _resolve(uri: str, revision: str = "main") -> ResolvedModel:
    return resolve_model(ModelRef(uri=uri, revision=revision), Settings())


def _error(uri: str, revision: str = "main") -> CrucibleError:
    with pytest.raises(CrucibleError) as err:
        _resolve(uri, revision)
    return err.value


def test_resolve_pins_commit_and_downloads(hub: dict[str, Any], hf_home: Path) -> None:
    model = _resolve("hf://org/base")
    sha = hub["commits"]["base"]
    assert len(sha) == 40
    assert model.commit == sha
    assert model.revision == "main"
    assert model.uri == "hf://org/base"
    assert model.root == hf_home / "hub" / "models--org--base" / "snapshots" / sha
    assert sorted(p.name for p in model.root.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    for name in ("config.json", "model.safetensors"):
        assert (model.root / name).read_bytes() == (hub["base"] / name).read_bytes()
    local = load_file(hub["base"] / "model.safetensors")
    assert {n: i.shape for n, i in model.tensors.items()} == {
        n: tuple(t.shape) for n, t in local.items()
    }
    with TensorReader(model) as reader:
        for name, t in local.items():
            assert torch.equal(reader.read(name), t)


def test_hub_family_is_compatible(hub: dict[str, Any], hf_home: Path) -> None:
    base = _resolve("hf://org/base")
    expert = _resolve("hf://org/expert")
    assert expert.commit == hub["commits"]["expert"]
    check_compatible(base, [expert], ["expert"])
    with TensorReader(base) as rb, TensorReader(expert) as re:
        name = "transformer.h.1.mlp.c_fc.weight"
        assert not torch.equal(rb.read(name), re.read(name))


def test_revisions_pin_to_their_commit(hub: dict[str, Any], hf_home: Path) -> None:
    server: OlahServer = hub["server"]
    first = server.add_repo("org/moving", hub["base"], message="v1")
    server.tag("org/moving", "v1")
    second = server.add_repo("org/moving", hub["expert"], message="v2")
    assert first != second

    assert _resolve("hf://org/moving", "main").commit == second
    assert _resolve("hf://org/moving", "v1").commit == first
    pinned = _resolve("hf://org/moving", first)
    assert pinned.commit == first
    assert pinned.revision == first
    # The content really is the first commit's, not main's.
    assert (pinned.root / "model.safetensors").read_bytes() == (
        hub["base"] / "model.safetensors"
    ).read_bytes()
    assert _resolve("hf://org/moving", first[:10]).commit == first


def test_only_weights_and_support_files_are_fetched(hub: dict[str, Any], hf_home: Path) -> None:
    model = _resolve("hf://org/mixed")
    assert model.commit == hub["commits"]["mixed"]
    fetched = sorted(p.relative_to(model.root).as_posix() for p in model.root.rglob("*"))
    assert fetched == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    assert [p.name for p in model.weight_files] == ["model.safetensors"]
    assert "x" not in model.tensors


def test_sharded_hub_model(hub: dict[str, Any], hf_home: Path) -> None:
    model = _resolve("hf://org/sharded")
    index = json.loads((hub["sharded"] / "model.safetensors.index.json").read_text())
    assert len(model.weight_files) == len(set(index["weight_map"].values())) > 1
    assert {n: i.file.name for n, i in model.tensors.items()} == index["weight_map"]


def test_missing_repo_is_source_not_found(hub: dict[str, Any], hf_home: Path) -> None:
    err = _error("hf://org/does-not-exist")
    assert err.code == "source_not_found"
    assert err.message == "Hub repository 'org/does-not-exist' not found or not accessible"
    assert err.detail["status"] == 401  # how olah (and the Hub, for private repos) answers


def test_missing_branch_is_source_not_found(hub: dict[str, Any], hf_home: Path) -> None:
    err = _error("hf://org/base", "no-such-branch")
    assert err.code == "source_not_found"
    assert err.message == "revision 'no-such-branch' not found in Hub repository 'org/base'"
    assert err.detail["known_refs"] == ["main"]


def test_unknown_commit_is_source_not_found(hub: dict[str, Any], hf_home: Path) -> None:
    # olah answers 500 for an unknown sha; the repo itself answers, so it is the revision.
    err = _error("hf://org/base", "0123456789abcdef0123456789abcdef01234567")
    assert err.code == "source_not_found"
    assert "revision '0123456789abcdef0123456789abcdef01234567'" in err.message
    assert "org/base" in err.message
    # The server is still usable afterwards (its reset connection was dropped).
    assert _resolve("hf://org/base").commit == hub["commits"]["base"]


def test_pickle_only_repo_is_no_weights(hub: dict[str, Any], hf_home: Path) -> None:
    err = _error("hf://org/bin-only")
    assert err.code == "no_weights"
    assert "pytorch_model.bin" in err.message
    assert "not read" in err.message
    assert err.detail["commit"] == hub["commits"]["bin-only"]
    # Refused before downloading anything.
    assert not (hf_home / "hub" / "models--org--bin-only" / "snapshots").exists()


def test_unreachable_hub_is_source_unavailable(
    hub: dict[str, Any], hf_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nobody listens
    # Connection errors are retried (crucible/retry.py); short waits keep the test quick.
    monkeypatch.setenv("CRUCIBLE_RETRY_BASE_SECONDS", "0.01")
    monkeypatch.setenv("CRUCIBLE_RETRY_MAX_SECONDS", "0.05")
    started = time.monotonic()
    err = _error("hf://org/base")
    assert err.code == "source_unavailable"
    assert "org/base" in err.message
    # A hang guard, not a timing check: the retries give up instead of waiting forever.
    assert time.monotonic() - started < 120


def test_token_never_appears_in_errors(
    hub: dict[str, Any], hf_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "hf_thisIsASecretTokenValue123"
    monkeypatch.setenv("HF_TOKEN", secret)
    for uri, rev in (
        ("hf://org/nope", "main"),
        ("hf://org/base", "nope"),
        ("hf://org/bin-only", "main"),
    ):
        err = _error(uri, rev)
        assert secret not in err.message
        assert secret not in json.dumps(err.as_dict(), default=str)
    # The token does not stop a public download either.
    assert _resolve("hf://org/base").commit == hub["commits"]["base"]
