"""file:// sources, sharded (index.json) models, compatibility checks, the tensor reader."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from crucible.errors import CrucibleError
from crucible.settings import Settings
from crucible.sources.compat import check_compatible
from crucible.sources.resolve import ResolvedModel, resolve_model
from crucible.sources.tensor_reader import TensorReader
from crucible.spec import ModelRef
from tests.support.tiny_models import make_gpt2_family

GPT2_TENSORS = 28  # 2 layers x 12 + wte, wpe, ln_f.{weight,bias}; lm_head is tied


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    return make_gpt2_family(tmp_path_factory.mktemp("allowed") / "models", n_experts=2, seed=1)


@pytest.fixture(scope="module")
def allowed(family: tuple[Path, list[Path]]) -> Path:
    return family[0].parent.parent


def _resolve(path: Path, allowed_dirs: list[Path]) -> ResolvedModel:
    return resolve_model(
        ModelRef(uri=f"file://{path}", revision="main"), Settings(allowed_local_dirs=allowed_dirs)
    )


def _error(path: Path, allowed_dirs: list[Path]) -> CrucibleError:
    with pytest.raises(CrucibleError) as err:
        _resolve(path, allowed_dirs)
    return err.value


# ----------------------------------------------------------------------------- file://


def test_local_model_resolves_with_headers(family: tuple[Path, list[Path]], allowed: Path) -> None:
    base_dir, _ = family
    model = _resolve(base_dir, [allowed])
    assert model.uri == f"file://{base_dir}"
    assert model.revision == "main"
    assert model.commit is None
    assert model.root == base_dir.resolve()
    assert model.weight_files == [base_dir.resolve() / "model.safetensors"]
    state = load_file(base_dir / "model.safetensors")
    assert len(model.tensors) == len(state) == GPT2_TENSORS
    for name, t in state.items():
        info = model.tensors[name]
        assert info.shape == tuple(t.shape)
        assert info.dtype == "F32"
        assert info.nbytes == t.numel() * 4
    assert model.total_bytes == sum(t.numel() * 4 for t in state.values())


def test_local_path_outside_allowed_is_forbidden(
    family: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    base_dir, _ = family
    err = _error(base_dir, [tmp_path])
    assert err.code == "local_path_forbidden"
    assert str(base_dir) in err.message
    # Nothing allowed at all: refused with a hint at the setting.
    err = _error(base_dir, [])
    assert err.code == "local_path_forbidden"
    assert "CRUCIBLE_ALLOWED_LOCAL_DIRS" in err.message
    # A non-existent path outside is refused the same way (no existence oracle).
    err = _error(tmp_path.parent / "does-not-exist", [tmp_path])
    assert err.code == "local_path_forbidden"


def test_dotdot_cannot_climb_out(family: tuple[Path, list[Path]], tmp_path: Path) -> None:
    base_dir, _ = family
    # Textually under tmp_path, really the model folder beside it: a prefix check on the
    # string would let it through.
    sneaky = tmp_path / os.path.relpath(base_dir, tmp_path)
    assert str(sneaky).startswith(str(tmp_path)) and ".." in sneaky.parts
    assert (sneaky / "model.safetensors").is_file()
    err = _error(sneaky, [tmp_path])
    assert err.code == "local_path_forbidden"


def test_symlink_escaping_allowed_dir_is_forbidden(
    family: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    base_dir, _ = family
    allowed_dir = tmp_path / "allowed"
    allowed_dir.mkdir()
    (allowed_dir / "link").symlink_to(base_dir)  # base_dir lies outside allowed_dir
    err = _error(allowed_dir / "link", [allowed_dir])
    assert err.code == "local_path_forbidden"

    # A real folder inside, whose weight file is a symlink to a file outside.
    folder = allowed_dir / "model"
    folder.mkdir()
    shutil.copy(base_dir / "config.json", folder / "config.json")
    (folder / "model.safetensors").symlink_to(base_dir / "model.safetensors")
    err = _error(folder, [allowed_dir])
    assert err.code == "local_path_forbidden"
    assert "model.safetensors" in err.message


def test_symlink_inside_allowed_dirs_is_fine(
    family: tuple[Path, list[Path]], allowed: Path
) -> None:
    base_dir, _ = family
    link = allowed / "base-link"
    link.symlink_to(base_dir)
    try:
        model = _resolve(link, [allowed])
        assert model.root == base_dir.resolve()
        assert len(model.tensors) == GPT2_TENSORS
    finally:
        link.unlink()


def test_missing_local_path(tmp_path: Path) -> None:
    err = _error(tmp_path / "nope", [tmp_path])
    assert err.code == "source_not_found"
    assert "nope" in err.message
    (tmp_path / "file.txt").write_text("x")
    err = _error(tmp_path / "file.txt", [tmp_path])
    assert err.code == "source_not_found"
    assert "not a folder" in err.message


def test_pickles_only_is_no_weights(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    (tmp_path / "m" / "config.json").write_text("{}")
    err = _error(tmp_path / "m", [tmp_path])
    assert err.code == "no_weights"
    assert "pytorch_model.bin" in err.message
    assert ".bin" in err.message and "not read" in err.message
    (tmp_path / "empty").mkdir()
    assert _error(tmp_path / "empty", [tmp_path]).code == "no_weights"


def test_tensor_in_two_files_is_refused(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    save_file({"a": torch.zeros(2), "b": torch.ones(2)}, tmp_path / "m" / "one.safetensors")
    save_file({"b": torch.ones(2)}, tmp_path / "m" / "two.safetensors")
    err = _error(tmp_path / "m", [tmp_path])
    assert err.code == "corrupt_safetensors"
    assert "'b'" in err.message and "one.safetensors" in err.message
    assert "two.safetensors" in err.message


def test_corrupt_weight_file_is_reported(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\x10\0\0\0\0\0\0\0{not json")
    err = _error(tmp_path / "m", [tmp_path])
    assert err.code == "corrupt_safetensors"
    assert "model.safetensors" in err.message


# ----------------------------------------------------------------------------- index.json


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("sharded")
    return make_gpt2_family(root, n_experts=1, seed=2, max_shard_size="100KB")


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def test_sharded_model_uses_index(sharded: tuple[Path, list[Path]]) -> None:
    base_dir, _ = sharded
    index = json.loads((base_dir / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    model = _resolve(base_dir, [base_dir.parent])
    assert [p.name for p in model.weight_files] == [
        n for n in dict.fromkeys(index["weight_map"].values())
    ]
    assert set(model.tensors) == set(index["weight_map"])
    for name, fname in index["weight_map"].items():
        assert model.tensors[name].file.name == fname
    with TensorReader(model) as reader:
        for name, fname in index["weight_map"].items():
            assert torch.equal(reader.read(name), load_file(base_dir / fname)[name])


def test_index_ignores_unlisted_files(sharded: tuple[Path, list[Path]], tmp_path: Path) -> None:
    model_dir = _copy(sharded[0], tmp_path / "m")
    save_file({"stray": torch.zeros(2)}, model_dir / "stray.safetensors")
    model = _resolve(model_dir, [tmp_path])
    assert "stray" not in model.tensors
    assert all(p.name != "stray.safetensors" for p in model.weight_files)


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda idx: "{broken", "not valid JSON"),
        (lambda idx: {"metadata": {}}, "no weight_map"),
        (lambda idx: {**idx, "weight_map": {**idx["weight_map"], "ghost": idx["weight_map"][
            next(iter(idx["weight_map"]))]}}, "'ghost'"),
        (lambda idx: {**idx, "weight_map": {k: "../escape.safetensors"
                                            for k in idx["weight_map"]}}, "plain file name"),
        (lambda idx: {**idx, "weight_map": {k: "missing-00001.safetensors"
                                            for k in idx["weight_map"]}}, "missing"),
        (lambda idx: {**idx, "weight_map": dict(list(idx["weight_map"].items())[1:])},
         "does not list tensor"),
    ],
    ids=["json", "no-map", "ghost-tensor", "traversal", "missing-shard", "unlisted-tensor"],
)  # fmt: skip
def test_broken_index_is_refused(
    sharded: tuple[Path, list[Path]], tmp_path: Path, mutate, needle: str
) -> None:
    model_dir = _copy(sharded[0], tmp_path / "m")
    index_path = model_dir / "model.safetensors.index.json"
    new = mutate(json.loads(index_path.read_text()))
    index_path.write_text(new if isinstance(new, str) else json.dumps(new))
    err = _error(model_dir, [tmp_path])
    assert err.code == "corrupt_safetensors"
    assert needle in err.message


# ----------------------------------------------------------------------------- compat


def _fake(tensors: dict[str, torch.Tensor], root: Path) -> ResolvedModel:
    root.mkdir(parents=True)
    save_file(tensors, root / "model.safetensors")
    return _resolve(root, [root.parent])


def test_compatible_family_passes(family: tuple[Path, list[Path]], allowed: Path) -> None:
    base_dir, expert_dirs = family
    base = _resolve(base_dir, [allowed])
    experts = [_resolve(d, [allowed]) for d in expert_dirs]
    assert check_compatible(base, experts, ["a", "b"]) == {}
    # The experts really are distinct fine-tunes of the base, not copies.
    with TensorReader(base) as rb, TensorReader(experts[0]) as r0, TensorReader(experts[1]) as r1:
        w = "transformer.h.0.attn.c_attn.weight"
        d0, d1 = r0.read(w) - rb.read(w), r1.read(w) - rb.read(w)
        assert 0 < d0.abs().mean() < 0.1 * rb.read(w).abs().mean() + 0.01
        assert not torch.allclose(d0, d1)


def test_shape_mismatch_names_expert_and_tensor(tmp_path: Path) -> None:
    base = _fake({"a": torch.zeros(2, 3), "b": torch.zeros(4)}, tmp_path / "base")
    good = _fake({"a": torch.ones(2, 3), "b": torch.ones(4)}, tmp_path / "good")
    bad = _fake({"a": torch.ones(3, 2), "b": torch.ones(4)}, tmp_path / "bad")
    with pytest.raises(CrucibleError) as err:
        check_compatible(base, [good, bad], ["legal", "medical"])
    e = err.value
    assert e.code == "incompatible_models"
    assert "'medical'" in e.message and "'a'" in e.message
    assert "[3, 2] in the expert, [2, 3] in the base" in e.message
    assert e.detail["total"] == 1
    assert e.detail["problems"] == [
        {"expert": "medical", "tensor": "a", "kind": "shape",
         "message": "shape [3, 2] in the expert, [2, 3] in the base"}
    ]  # fmt: skip


def test_missing_extra_and_dtype_problems(tmp_path: Path) -> None:
    base = _fake({"a": torch.zeros(2), "b": torch.zeros(2), "c": torch.zeros(2)}, tmp_path / "b")
    expert = _fake(
        {"b": torch.zeros(2).half(), "c": torch.zeros(2), "d": torch.zeros(2)}, tmp_path / "e"
    )
    with pytest.raises(CrucibleError) as err:
        check_compatible(base, [expert], ["x"])
    e = err.value
    assert e.message.startswith("expert 'x' does not match the base: tensor 'a' is present in")
    assert [(p["tensor"], p["kind"]) for p in e.detail["problems"]] == [
        ("a", "missing"),
        ("b", "dtype"),
        ("d", "extra"),
    ]
    assert "dtype F16 in the expert, F32 in the base" in e.detail["problems"][1]["message"]


def test_problem_list_is_capped(tmp_path: Path) -> None:
    base = _fake({f"t{i:02d}": torch.zeros(2) for i in range(30)}, tmp_path / "b")
    expert = _fake({f"t{i:02d}": torch.zeros(3) for i in range(30)}, tmp_path / "e")
    with pytest.raises(CrucibleError) as err:
        check_compatible(base, [expert, expert], ["one", "two"])
    assert err.value.detail["total"] == 60
    assert len(err.value.detail["problems"]) == 20
    assert "59 more problems" in err.value.message
    with pytest.raises(ValueError):
        check_compatible(base, [expert], [])


# ----------------------------------------------------------------------------- reader


def test_reader_opens_lazily_and_closes(sharded: tuple[Path, list[Path]]) -> None:
    base_dir, _ = sharded
    model = _resolve(base_dir, [base_dir.parent])
    first = next(iter(model.tensors))
    with TensorReader(model) as reader:
        assert reader.open_files == []
        t = reader.read(first)
        assert reader.open_files == [model.tensors[first].file]
        assert torch.equal(t, load_file(model.tensors[first].file)[first])
        reader.read(first)  # the same file is not opened twice
        assert len(reader.open_files) == 1
        for name in model.tensors:
            reader.read(name)
        assert sorted(reader.open_files) == sorted(model.weight_files)
        with pytest.raises(KeyError, match="not-there"):
            reader.read("not-there")
    assert reader.open_files == []
    with pytest.raises(RuntimeError, match="closed"):
        reader.read(first)
