"""safetensors headers, the streaming sharded writer, support files, manifest, model card."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import crucible
from crucible.errors import CrucibleError
from crucible.publish.files import copy_support_files, file_manifest
from crucible.publish.model_card import render_model_card
from crucible.publish.writer import ShardedSafetensorsWriter
from crucible.settings import Settings
from crucible.sources.resolve import ResolvedModel, resolve_model
from crucible.sources.safetensors_header import (
    DTYPES,
    code_for_torch_name,
    read_safetensors_header,
    read_safetensors_metadata,
)
from crucible.sources.tensor_reader import TensorReader
from crucible.spec import ModelRef
from tests.support.tiny_models import make_gpt2_family

# ----------------------------------------------------------------------------- headers


def _raw_file(path: Path, header: Any, data: bytes, header_len: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(raw) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + raw + data)
    return path


def test_header_matches_tensors_and_offsets(tmp_path: Path) -> None:
    tensors = {
        "a.weight": torch.randn(3, 5),
        "b.bias": torch.randn(7).to(torch.bfloat16),
        "c.half": torch.randn(2, 2, 2).to(torch.float16),
        "d.ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "e.scalar": torch.tensor(1.5),
    }
    path = tmp_path / "m.safetensors"
    save_file(tensors, path, metadata={"format": "pt", "x": "y"})

    infos = read_safetensors_header(path)
    assert set(infos) == set(tensors)
    raw = path.read_bytes()
    for name, t in tensors.items():
        info = infos[name]
        assert info.name == name
        assert info.file == path
        assert info.shape == tuple(t.shape)
        assert info.dtype == code_for_torch_name(str(t.dtype))
        assert info.nbytes == t.numel() * t.element_size()
        # The absolute offsets point at exactly this tensor's bytes.
        expected = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        assert raw[info.start : info.end] == expected
    assert infos["e.scalar"].shape == ()
    assert read_safetensors_metadata(path) == {"format": "pt", "x": "y"}


def test_dtype_table() -> None:
    assert DTYPES["BF16"].itemsize == 2 and DTYPES["BF16"].torch_name == "bfloat16"
    assert DTYPES["F32"].itemsize == 4 and DTYPES["F64"].itemsize == 8
    for code, info in DTYPES.items():
        assert torch.empty(0, dtype=getattr(torch, info.torch_name)).element_size() == (
            info.itemsize
        ), code
    assert code_for_torch_name("torch.float16") == "F16"
    assert code_for_torch_name("float32") == "F32"


def _tensor(offsets: list[int], dtype: str = "F32", shape: list[int] | None = None) -> dict:
    n = (offsets[1] - offsets[0]) // DTYPES[dtype].itemsize
    return {"dtype": dtype, "shape": shape if shape is not None else [n], "data_offsets": offsets}


CORRUPT_CASES: list[tuple[str, Any, bytes, int | None, str]] = [
    ("invalid JSON", b"{not json", b"", None, "not valid JSON"),
    ("not an object", b"[1, 2]", b"", None, "not a JSON object"),
    ("utf8", b"\xff\xfe{}", b"", None, "not valid JSON"),
    ("length past end", {"a": _tensor([0, 8])}, b"\0" * 8, 10_000, "past the end"),
    ("huge length", b"{}", b"", 2**62, "exceeds"),
    ("no dtype", {"a": {"shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "no dtype"),
    ("unknown dtype", {"a": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}, b"\0",
     None, "unsupported dtype 'F4'"),
    ("negative shape", {"a": _tensor([0, 8], shape=[-2])}, b"\0" * 8, None, "invalid shape"),
    ("bad offsets", {"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8,
     None, "invalid data_offsets"),
    ("size vs shape", {"a": _tensor([0, 8], shape=[3])}, b"\0" * 8, None, "needs 12"),
    ("truncated", {"a": _tensor([0, 8]), "b": _tensor([8, 16])}, b"\0" * 12, None,
     "truncated"),
    ("overlap", {"a": _tensor([0, 8]), "b": _tensor([4, 12])}, b"\0" * 12, None, "overlaps"),
    ("gap", {"a": _tensor([0, 4]), "b": _tensor([8, 12])}, b"\0" * 12, None, "gap"),
    ("trailing", {"a": _tensor([0, 8])}, b"\0" * 12, None, "4 trailing bytes"),
    ("bad metadata", {"__metadata__": {"n": 1}, "a": _tensor([0, 4])}, b"\0" * 4, None,
     "__metadata__"),
    ("duplicate key", b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
     b'"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', b"\0" * 4, None,
     "duplicate key 'a'"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("header", "data", "header_len", "needle"),
    [c[1:] for c in CORRUPT_CASES],
    ids=[c[0] for c in CORRUPT_CASES],
)
def test_corrupt_headers_are_refused(
    tmp_path: Path, header: Any, data: bytes, header_len: int | None, needle: str
) -> None:
    path = _raw_file(tmp_path / "bad.safetensors", header, data, header_len)
    with pytest.raises(CrucibleError) as err:
        read_safetensors_header(path)
    assert err.value.code == "corrupt_safetensors"
    assert "bad.safetensors" in err.value.message
    assert needle in err.value.message
    assert err.value.detail["file"] == str(path)


@pytest.mark.parametrize("size", [0, 3, 7])
def test_too_short_files_are_refused(tmp_path: Path, size: int) -> None:
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x01" * size)
    with pytest.raises(CrucibleError, match="too short") as err:
        read_safetensors_header(path)
    assert err.value.code == "corrupt_safetensors"


def test_truncated_real_file_and_garbage(tmp_path: Path) -> None:
    good = tmp_path / "good.safetensors"
    save_file({"w": torch.randn(16, 16)}, good)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-10])
    with pytest.raises(CrucibleError, match=r"cut\.safetensors.*truncated"):
        read_safetensors_header(cut)

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(bytes(range(256)) * 64)  # length prefix decodes to an absurd number
    with pytest.raises(CrucibleError) as err:
        read_safetensors_header(garbage)
    assert err.value.code == "corrupt_safetensors"
    assert "garbage.safetensors" in err.value.message


def test_valid_edge_cases_accepted(tmp_path: Path) -> None:
    # Zero-size tensors, header padding and a metadata-only file are all valid safetensors.
    header = json.dumps({"empty": _tensor([0, 0], shape=[0, 3]), "x": _tensor([0, 8])})
    padded = header.encode() + b"    "
    path = _raw_file(tmp_path / "edge.safetensors", padded, b"\1" * 8)
    infos = read_safetensors_header(path)
    assert infos["empty"].shape == (0, 3) and infos["empty"].nbytes == 0
    assert (infos["x"].start, infos["x"].end) == (8 + len(padded), 8 + len(padded) + 8)
    only_meta = _raw_file(tmp_path / "meta.safetensors", {"__metadata__": {"a": "b"}}, b"")
    assert read_safetensors_header(only_meta) == {}


# ----------------------------------------------------------------------------- writer


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(64, 32, generator=g),
        "layers.0.weight": torch.randn(32, 32, generator=g),
        "layers.0.bias": torch.randn(32, generator=g),
        "layers.1.weight": torch.randn(32, 32, generator=g),
        "layers.1.bias": torch.randn(32, generator=g),
        "head.weight": torch.randn(10, 32, generator=g),
    }


def _write_all(
    out: Path, tensors: dict[str, torch.Tensor], code: str, shard_size: int, **kw: Any
) -> list[Path]:
    plan = [(n, tuple(t.shape), code) for n, t in tensors.items()]
    writer = ShardedSafetensorsWriter(out, plan, shard_size, **kw)
    for name, t in tensors.items():
        writer.write(name, t)
    return writer.close()


def test_single_shard_round_trip(tmp_path: Path) -> None:
    tensors = _tensors()
    files = _write_all(tmp_path / "out", tensors, "F32", 10**9, metadata={"crucible": "1"})
    assert [p.name for p in files] == ["model.safetensors"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.safetensors"]
    loaded = load_file(files[0])
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert torch.equal(loaded[name], t), name
    with safe_open(str(files[0]), "pt") as f:
        assert f.metadata() == {"format": "pt", "crucible": "1"}
    # Our own parser agrees with the file, including the 8-byte header padding.
    infos = read_safetensors_header(files[0])
    assert min(i.start for i in infos.values()) % 8 == 0


def test_multi_shard_layout_and_index(tmp_path: Path) -> None:
    tensors = _tensors()
    sizes = {n: t.numel() * 4 for n, t in tensors.items()}
    shard_size = 9000  # embed (8192) alone; 32x32 (4096) + bias (128) + ... pack greedily
    out = tmp_path / "out"
    files = _write_all(out, tensors, "F32", shard_size)

    index_path = out / "model.safetensors.index.json"
    assert files[-1] == index_path
    index = json.loads(index_path.read_text())
    assert index["metadata"] == {"total_size": sum(sizes.values())}
    shards = [p.name for p in files[:-1]]
    n = len(shards)
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert set(index["weight_map"]) == set(tensors)
    assert set(index["weight_map"].values()) == set(shards)

    # Greedy in plan order: recompute the expected assignment independently.
    expected: dict[str, int] = {}
    shard, used = 0, 0
    for name in tensors:
        if used and used + sizes[name] > shard_size:
            shard, used = shard + 1, 0
        expected[name] = shard
        used += sizes[name]
    assert n == shard + 1 == 3
    for name, idx in expected.items():
        assert index["weight_map"][name] == shards[idx]

    for shard_name in shards:
        loaded = load_file(out / shard_name)
        data = sum(t.numel() * t.element_size() for t in loaded.values())
        assert data <= shard_size
        for name, t in loaded.items():
            assert index["weight_map"][name] == shard_name
            assert torch.equal(t, tensors[name])


def test_tensor_bigger_than_shard_gets_its_own(tmp_path: Path) -> None:
    tensors = {"small.a": torch.ones(4), "big": torch.randn(100, 100), "small.b": torch.ones(4)}
    files = _write_all(tmp_path / "o", tensors, "F32", 1024)
    weight_map = json.loads(files[-1].read_text())["weight_map"]
    assert len(files) == 4  # three shards + index
    assert len({weight_map["small.a"], weight_map["big"], weight_map["small.b"]}) == 3
    assert torch.equal(load_file(tmp_path / "o" / weight_map["big"])["big"], tensors["big"])


@pytest.mark.parametrize(
    ("code", "torch_dtype"),
    [("F32", torch.float32), ("F16", torch.float16), ("BF16", torch.bfloat16)],
)
@pytest.mark.parametrize("source", [torch.float32, torch.bfloat16, torch.float64])
def test_dtype_output_round_trip(
    tmp_path: Path, code: str, torch_dtype: torch.dtype, source: torch.dtype
) -> None:
    tensors = {n: t.to(source) for n, t in _tensors(seed=1).items()}
    files = _write_all(tmp_path / "o", tensors, code, 20_000)
    loaded: dict[str, torch.Tensor] = {}
    for f in files:
        if f.suffix == ".safetensors":
            loaded.update(load_file(f))
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert loaded[name].dtype == torch_dtype
        # Bit-exact against torch's own cast: no detour through another dtype.
        assert torch.equal(loaded[name], t.to(torch_dtype)), name


def test_mixed_dtypes_are_aligned(tmp_path: Path) -> None:
    tensors = {
        "odd_half": torch.randn(3).to(torch.float16),  # 6 bytes: would misalign what follows
        "f32": torch.randn(5),
        "i64": torch.arange(3),
        "flag": torch.tensor([True, False, True]),
    }
    plan = [(n, tuple(t.shape), code_for_torch_name(str(t.dtype))) for n, t in tensors.items()]
    out = tmp_path / "o"
    with ShardedSafetensorsWriter(out, plan, 10**6) as writer:
        for name, t in tensors.items():
            writer.write(name, t)
    infos = read_safetensors_header(out / "model.safetensors")
    for name, info in infos.items():
        assert info.start % DTYPES[info.dtype].itemsize == 0, name
    loaded = load_file(out / "model.safetensors")
    for name, t in tensors.items():
        assert torch.equal(loaded[name], t)


def test_writer_streams_shards_instead_of_buffering(tmp_path: Path) -> None:
    tensors = _tensors()
    plan = [(n, tuple(t.shape), "F32") for n, t in tensors.items()]
    out = tmp_path / "o"
    writer = ShardedSafetensorsWriter(out, plan, 9000)
    writer.write("embed.weight", tensors["embed.weight"])  # fills shard 1 of 3
    writer.write("layers.0.weight", tensors["layers.0.weight"])  # first of shard 2
    partial = sorted(out.iterdir(), key=lambda p: p.name)
    # Nothing has a final name yet; shard 1 is already complete on disk (a valid file on its
    # own) while shard 2 is open: shards are never assembled in memory.
    assert all(p.name.startswith(".") and p.name.endswith(".partial") for p in partial)
    assert [p.name.split(".")[1] for p in partial] == [
        "model-00001-of-00003",
        "model-00002-of-00003",
    ]
    first = read_safetensors_header(partial[0])
    assert list(first) == ["embed.weight"]
    assert torch.equal(load_file(partial[0])["embed.weight"], tensors["embed.weight"])
    for name in list(tensors)[2:]:
        writer.write(name, tensors[name])
    writer.close()
    assert not [p for p in out.iterdir() if p.name.endswith(".partial")]


def test_writer_rejects_wrong_order_shape_and_dtype(tmp_path: Path) -> None:
    plan = [("a", (2, 3), "F32"), ("b", (4,), "I64")]
    writer = ShardedSafetensorsWriter(tmp_path / "o", plan, 10**6)
    with pytest.raises(ValueError, match="'b' is out of order: the plan expects 'a' next"):
        writer.write("b", torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="'zzz' is not in the plan"):
        writer.write("zzz", torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"shape \(3, 2\), the plan says \(2, 3\)"):
        writer.write("a", torch.zeros(3, 2))
    writer.write("a", torch.zeros(2, 3))
    with pytest.raises(ValueError, match="only floating point tensors are cast"):
        writer.write("b", torch.zeros(4))
    with pytest.raises(ValueError, match="1 planned tensors were not written, first 'b'"):
        writer.close()
    writer.abort()
    assert list((tmp_path / "o").iterdir()) == []

    with pytest.raises(ValueError, match="appears twice"):
        ShardedSafetensorsWriter(tmp_path / "x", [("a", (1,), "F32")] * 2, 10)
    with pytest.raises(ValueError, match="unknown safetensors dtype"):
        ShardedSafetensorsWriter(tmp_path / "x", [("a", (1,), "float32")], 10)


def test_abort_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("not ours")
    tensors = _tensors()
    plan = [(n, tuple(t.shape), "F32") for n, t in tensors.items()]
    with (
        pytest.raises(RuntimeError, match="boom"),
        ShardedSafetensorsWriter(out, plan, 9000) as writer,
    ):
        for name in list(tensors)[:4]:
            writer.write(name, tensors[name])
        assert len(list(out.iterdir())) == 3  # keep.txt + two partial shards
        raise RuntimeError("boom")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_abort_after_close_keeps_output(tmp_path: Path) -> None:
    tensors = _tensors()
    plan = [(n, tuple(t.shape), "F32") for n, t in tensors.items()]
    writer = ShardedSafetensorsWriter(tmp_path / "o", plan, 9000)
    for name, t in tensors.items():
        writer.write(name, t)
    files = writer.close()
    writer.abort()
    assert all(p.exists() for p in files)


def test_transformers_loads_written_multi_shard_gpt2(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    base_dir, _ = make_gpt2_family(tmp_path / "models", n_experts=0, seed=5)
    model = resolve_model(
        ModelRef(uri=f"file://{base_dir}"), Settings(allowed_local_dirs=[tmp_path])
    )
    plan = [(n, info.shape, "F32") for n, info in model.tensors.items()]
    out = tmp_path / "out"
    with TensorReader(model) as reader, ShardedSafetensorsWriter(out, plan, 60_000) as writer:
        for name, _, _ in plan:
            writer.write(name, reader.read(name))
    copy_support_files(base_dir, out)
    assert len(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]) == (
        len(plan)
    )
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 2

    ids = torch.tensor([[1, 5, 9, 200, 3, 77]])
    reference = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        expected = reference(ids).logits
        got = loaded(ids).logits
    assert got.shape == (1, 6, 256)
    assert torch.equal(got, expected)


def test_transformers_loads_bf16_output(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    base_dir, _ = make_gpt2_family(tmp_path / "models", n_experts=0, seed=6)
    model = resolve_model(
        ModelRef(uri=f"file://{base_dir}"), Settings(allowed_local_dirs=[tmp_path])
    )
    plan = [(n, info.shape, "BF16") for n, info in model.tensors.items()]
    out = tmp_path / "out"
    with TensorReader(model) as reader, ShardedSafetensorsWriter(out, plan, 10**9) as writer:
        for name, _, _ in plan:
            writer.write(name, reader.read(name))
    copy_support_files(base_dir, out, dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.dtype == torch.bfloat16
    wte = loaded.state_dict()["transformer.wte.weight"]
    with TensorReader(model) as reader:
        assert torch.equal(wte, reader.read("transformer.wte.weight").to(torch.bfloat16))


# ----------------------------------------------------------------------------- support files


def test_copy_support_files_copies_config_and_tokenizer_only(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    wanted = {
        "config.json": '{"model_type": "gpt2", "dtype": "float32"}',
        "generation_config.json": "{}",
        "tokenizer.json": "{}",
        "tokenizer_config.json": "{}",
        "tokenizer.model": "spm",
        "special_tokens_map.json": "{}",
        "vocab.json": "{}",
        "vocab.txt": "a\nb",
        "merges.txt": "a b",
        "added_tokens.json": "{}",
        "chat_template.jinja": "{{ x }}",
    }
    unwanted = {
        "model.safetensors": "w",
        "pytorch_model.bin": "pickle",
        "model.safetensors.index.json": "{}",
        "training_args.bin": "pickle",
        "optimizer.pt": "pickle",
        "README.md": "card of the base",
        "modeling_custom.py": "import os",
        "vocab.bin": "pickle",
    }
    for name, text in {**wanted, **unwanted}.items():
        (src / name).write_text(text)
    (src / "sub").mkdir()
    (src / "sub" / "config.json").write_text("{}")
    # The HF cache is made of symlinks: copies must hold the target's bytes.
    (tmp_path / "blob").write_text('{"eos": 1}')
    (src / "tokenizer_extra.json").symlink_to(tmp_path / "blob")

    out = tmp_path / "out"
    written = copy_support_files(src, out)
    assert [p.name for p in written] == sorted([*wanted, "tokenizer_extra.json"])
    assert sorted(p.name for p in out.iterdir()) == sorted([*wanted, "tokenizer_extra.json"])
    for name, text in wanted.items():
        assert (out / name).read_text() == text  # untouched when no dtype is given
    assert not (out / "tokenizer_extra.json").is_symlink()
    assert (out / "tokenizer_extra.json").read_text() == '{"eos": 1}'


@pytest.mark.parametrize(
    ("config", "dtype", "expected"),
    [
        ({"dtype": "float32", "n": 1}, "bfloat16", {"dtype": "bfloat16", "n": 1}),
        ({"torch_dtype": "float32"}, "float16", {"torch_dtype": "float16"}),
        ({"n": 1}, "bfloat16", {"n": 1, "dtype": "bfloat16"}),
    ],
)
def test_copy_support_files_updates_dtype(
    tmp_path: Path, config: dict, dtype: str, expected: dict
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(config))
    copy_support_files(src, tmp_path / "out", dtype=dtype)
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == expected


def test_same_dtype_keeps_config_bytes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    raw = '{"dtype":   "bfloat16"}'
    (src / "config.json").write_text(raw)
    copy_support_files(src, tmp_path / "out", dtype="bfloat16")
    assert (tmp_path / "out" / "config.json").read_text() == raw


def test_file_manifest(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "b.json").write_bytes(b'{"x": 1}')
    (out / "a.safetensors").write_bytes(b"\x00" * 3000)
    (out / "sub" / "c.txt").write_bytes(b"hello")
    (out / ".model.safetensors.abcd1234.partial").write_bytes(b"junk")
    manifest = file_manifest(out)
    assert manifest == [
        {"path": "a.safetensors", "sha256": hashlib.sha256(b"\x00" * 3000).hexdigest(),
         "bytes": 3000},
        {"path": "b.json", "sha256": hashlib.sha256(b'{"x": 1}').hexdigest(), "bytes": 8},
        {"path": "sub/c.txt", "sha256": hashlib.sha256(b"hello").hexdigest(), "bytes": 5},
    ]  # fmt: skip


# ----------------------------------------------------------------------------- model card


def _card_args() -> dict[str, Any]:
    spec = {
        "base": {"uri": "hf://org/base", "revision": "main"},
        "experts": [
            {"uri": "hf://org/legal", "revision": "v1", "name": "legal", "weight": 0.7},
            {"uri": "file:///models/med", "revision": "main", "name": "med|x", "weight": 0.3},
        ],
        "method": {"name": "ties", "params": {"density": 0.2, "lambda_": 1.0}},
        "output": {"uri": "local://", "dtype": "bfloat16"},
        "webhook": {"url": "https://example.invalid", "secret": "s3cr3t"},
    }
    inputs = [
        {"role": "base", "name": "base", "uri": "hf://org/base", "revision": "main",
         "commit": "a" * 40, "weight": None},
        {"role": "expert", "name": "legal", "uri": "hf://org/legal", "revision": "v1",
         "commit": "b" * 40, "weight": 0.7},
        {"role": "expert", "name": "med|x", "uri": "file:///models/med", "revision": "main",
         "commit": None, "weight": 0.3},
    ]  # fmt: skip
    files = [
        {"path": "config.json", "sha256": "c" * 64, "bytes": 812},
        {"path": "model.safetensors", "sha256": "d" * 64, "bytes": 482304},
    ]
    return {
        "spec": spec,
        "inputs": inputs,
        "method": "ties",
        "params": {"density": 0.2, "lambda_": 1.0},
        "files": files,
    }


def test_model_card_front_matter_and_sections() -> None:
    card = render_model_card(**_card_args())
    assert card.startswith("---\n")
    front_text, body = card[4:].split("\n---\n", 1)
    front = yaml.safe_load(front_text)
    assert front == {
        "base_model": ["org/base", "org/legal"],
        "tags": ["merge", "crucible", "ties"],
        "library_name": "transformers",
    }
    assert "| density | `0.2` |" in body
    assert "| lambda_ | `1.0` |" in body
    assert f"Produced by Crucible {crucible.__version__}: 2 experts merged" in body
    assert f"| base | base | `hf://org/base` | `main` | `{'a' * 40}` | - |" in body
    assert f"| expert | legal | `hf://org/legal` | `v1` | `{'b' * 40}` | 0.7 |" in body
    # A pipe in a user-supplied name must not split the table row.
    assert "| expert | med\\|x | `file:///models/med` | `main` | - | 0.3 |" in body
    assert f"| model.safetensors | 482304 | `{'d' * 64}` |" in body
    # The spec block parses back to the spec, with the secret redacted.
    spec_block = body.split("```yaml\n", 1)[1].split("\n```", 1)[0]
    parsed = yaml.safe_load(spec_block)
    assert parsed["experts"][0]["weight"] == 0.7
    assert parsed["method"] == {"name": "ties", "params": {"density": 0.2, "lambda_": 1.0}}
    assert parsed["webhook"]["secret"] == "***"
    assert "s3cr3t" not in card


def test_model_card_single_hub_base_and_fence_escape() -> None:
    args = _card_args()
    args["inputs"] = [args["inputs"][0], args["inputs"][2]]
    args["spec"]["experts"][1]["name"] = "```evil"
    card = render_model_card(**args)
    front = yaml.safe_load(card[4:].split("\n---\n", 1)[0])
    assert front["base_model"] == "org/base"
    assert "````yaml\n" in card  # the fence grew past the backticks inside the spec


def test_row_block_reads_and_writes_equal_whole_tensors(tmp_path: Path) -> None:
    """Blocks of rows read with TensorReader.read(rows=...) and written with
    write(first_row=...) give byte-identical files to whole-tensor writes."""
    g = torch.Generator().manual_seed(5)
    tensors = {
        "a": torch.randn(37, 5, 3, generator=g),
        "b": torch.randn(11, generator=g),
        "c": torch.randn(0, 4, generator=g),
        "d": torch.tensor(2.5),
    }
    src = tmp_path / "src"
    src.mkdir()
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    headers = read_safetensors_header(src / "model.safetensors")
    model = ResolvedModel(
        uri="file://x",
        revision="main",
        commit=None,
        root=src,
        weight_files=[src / "model.safetensors"],
        tensors=headers,
    )
    plan = [(n, tuple(t.shape), "BF16") for n, t in tensors.items()]
    with TensorReader(model) as reader:
        whole, blocks = tmp_path / "whole", tmp_path / "blocks"
        with ShardedSafetensorsWriter(whole, plan, 10**9) as w:
            for n in tensors:
                w.write(n, reader.read(n))
        with ShardedSafetensorsWriter(blocks, plan, 10**9) as w:
            for n, t in tensors.items():
                if t.dim() == 0 or t.shape[0] == 0:
                    w.write(n, reader.read(n))
                    continue
                for start in range(0, t.shape[0], 4):
                    stop = min(t.shape[0], start + 4)
                    part = reader.read(n, (start, stop))
                    assert torch.equal(part, t[start:stop])
                    w.write(n, part, first_row=start)
        with pytest.raises(ValueError, match="out of range"):
            reader.read("a", (30, 40))
    assert (whole / "model.safetensors").read_bytes() == (blocks / "model.safetensors").read_bytes()
    with ShardedSafetensorsWriter(tmp_path / "bad", plan, 10**9) as w:
        with pytest.raises(ValueError, match="does not continue"):
            w.write("a", tensors["a"][4:8], first_row=4)
        w.abort()
