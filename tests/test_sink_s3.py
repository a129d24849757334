"""The s3:// sink against s3rver, a real S3-compatible server (npm), over HTTP.

Checked: a >10 MB file goes up in several multipart parts of the configured size; every
published object's sha256 equals the local file's; crucible-manifest.json is the last object
written and lists exactly the files; the temporary prefix is gone; re-publishing the same job
changes nothing; a publish that fails (the server stops mid-upload, a missing bucket) leaves
no manifest, and the next attempt publishes completely.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import SecretStr
from safetensors.numpy import save_file

from crucible import s3 as crucible_s3
from crucible.errors import CrucibleError
from crucible.publish.files import file_manifest
from crucible.publish.s3_sink import MANIFEST, TMP_PREFIX, manifest_bytes, publish_to_s3
from crucible.settings import Settings
from tests.support.s3 import ACCESS_KEY, REGION, SECRET_KEY, S3Server, s3_server

BUCKET = "models"
PART = 5 * 1024 * 1024  # S3's smallest part


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with s3_server(tmp_path_factory.mktemp("s3"), (BUCKET,)) as s:
        yield s


def _settings(server: S3Server, tmp: Path) -> Settings:
    return Settings(
        data_dir=tmp / "data",
        s3_endpoint_url=server.endpoint,
        s3_region=REGION,
        s3_access_key_id=ACCESS_KEY,
        s3_secret_access_key=SECRET_KEY,
        s3_part_bytes=PART,
        retry_attempts=2,
        retry_base_seconds=0.05,
        retry_max_seconds=0.1,
    )


def _output(root: Path, seed: int) -> Path:
    """A model-shaped output: a 12 MiB safetensors shard, config, card, a per-expert file."""
    out = root / f"output-{seed}"
    (out / "per_expert" / "0-a").mkdir(parents=True)
    rng = np.random.default_rng(seed)
    big = {"w": rng.standard_normal((3 * 1024, 1024), dtype=np.float32)}  # 12 MiB
    save_file(big, str(out / "model.safetensors"), metadata={"format": "pt"})
    small = {"head": rng.standard_normal((4, 8), dtype=np.float32)}
    save_file(small, str(out / "per_expert" / "0-a" / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({"model_type": "gpt2", "seed": seed}))
    (out / "README.md").write_text(f"---\ntags: [merge]\n---\n# seed {seed}\n")
    return out


class Recorder:
    """Reporter for the sink; optionally runs `on_first_progress` once (from boto3's thread)."""

    def __init__(self, on_first_progress: Any = None) -> None:
        self.progress_calls: list[tuple[int, int, str]] = []
        self.events: list[tuple[str, str]] = []
        self._hook = on_first_progress
        self._lock = threading.Lock()

    def progress(self, done: int, total: int, unit: str) -> None:
        with self._lock:
            self.progress_calls.append((done, total, unit))
            hook, self._hook = self._hook, None
        if hook is not None:
            hook()

    def event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        self.events.append((kind, message))


@pytest.fixture
def calls() -> Iterator[list[tuple[str, str | None]]]:
    """(operation, key) of every S3 call the sink's clients make, in order."""
    seen: list[tuple[str, str | None]] = []
    lock = threading.Lock()

    def record(params: dict[str, Any], model: Any, **_: Any) -> None:
        with lock:
            seen.append((model.name, params.get("Key")))

    events = crucible_s3.session().events
    events.register("provide-client-params.s3", record, unique_id="test-sink-s3")
    try:
        yield seen
    finally:
        events.unregister("provide-client-params.s3", unique_id="test-sink-s3")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_multipart_upload_hashes_and_manifest_last(
    server: S3Server, tmp_path: Path, calls: list[tuple[str, str | None]]
) -> None:
    out = _output(tmp_path, seed=1)
    files = file_manifest(out)
    reporter = Recorder()
    uri = publish_to_s3(
        out, files, f"s3://{BUCKET}/merged/one", "job_a", _settings(server, tmp_path), reporter
    )
    assert uri == f"s3://{BUCKET}/merged/one"

    keys = server.keys(BUCKET, "merged/one/")
    assert keys == sorted([f"merged/one/{f['path']}" for f in files] + [f"merged/one/{MANIFEST}"])
    for f in files:  # every object byte-equal to the local file
        data = server.read(BUCKET, f"merged/one/{f['path']}")
        assert len(data) == f["bytes"]
        assert _sha(data) == _sha((out / f["path"]).read_bytes()) == f["sha256"]
    manifest = json.loads(server.read(BUCKET, f"merged/one/{MANIFEST}"))
    assert manifest["job_id"] == "job_a"
    assert manifest["files"] == files
    assert manifest["bytes"] == sum(f["bytes"] for f in files)

    big = next(f for f in files if f["path"] == "model.safetensors")
    assert big["bytes"] > 10 * 1024 * 1024
    parts = [k for op, k in calls if op == "UploadPart"]
    assert len(parts) == -(-big["bytes"] // PART) == 3  # ceil(12.0x MiB / 5 MiB)
    assert {k for k in parts} == {f"merged/one/{TMP_PREFIX}job_a/model.safetensors"}
    # Uploads go to the temporary prefix; the final keys only ever come from copies.
    writes = [(op, k) for op, k in calls if op in {"PutObject", "CopyObject", "UploadPart"}]
    assert all(
        TMP_PREFIX in k
        for op, k in writes
        if op in ("PutObject", "UploadPart") and k != f"merged/one/{MANIFEST}"
    )
    assert writes[-1] == ("PutObject", f"merged/one/{MANIFEST}")  # the manifest is last
    copied = {k for op, k in writes if op == "CopyObject"}
    assert copied == {f"merged/one/{f['path']}" for f in files}
    # Progress in bytes reached the total.
    assert reporter.progress_calls[-1][1:] == (sum(f["bytes"] for f in files), "bytes")
    assert max(d for d, _, _ in reporter.progress_calls) == sum(f["bytes"] for f in files)


def test_republish_is_idempotent(
    server: S3Server, tmp_path: Path, calls: list[tuple[str, str | None]]
) -> None:
    out = _output(tmp_path, seed=2)
    files = file_manifest(out)
    settings = _settings(server, tmp_path)
    uri = f"s3://{BUCKET}/merged/two"
    publish_to_s3(out, files, uri, "job_b", settings, Recorder())
    before = {k: _sha(server.read(BUCKET, k)) for k in server.keys(BUCKET, "merged/two/")}
    calls.clear()

    assert publish_to_s3(out, files, uri, "job_b", settings, Recorder()) == uri
    after = {k: _sha(server.read(BUCKET, k)) for k in server.keys(BUCKET, "merged/two/")}
    assert after == before
    assert not [c for c in calls if c[0] in ("PutObject", "CopyObject", "UploadPart")]

    # An object lost since: the manifest no longer holds, so everything is published again,
    # to the same keys with the same manifest bytes.
    server.client().delete_object(Bucket=BUCKET, Key="merged/two/config.json")
    publish_to_s3(out, files, uri, "job_b", settings, Recorder())
    again = {k: _sha(server.read(BUCKET, k)) for k in server.keys(BUCKET, "merged/two/")}
    assert again == before
    assert server.read(BUCKET, f"merged/two/{MANIFEST}") == manifest_bytes("job_b", files)


def test_failed_upload_leaves_no_manifest(server: S3Server, tmp_path: Path) -> None:
    settings = _settings(server, tmp_path)
    uri = f"s3://{BUCKET}/merged/three"
    first = _output(tmp_path, seed=3)
    publish_to_s3(first, file_manifest(first), uri, "job_c1", settings, Recorder())
    assert f"merged/three/{MANIFEST}" in server.keys(BUCKET, "merged/three/")

    # Another job publishes to the same prefix; the server goes away mid-upload.
    second = _output(tmp_path, seed=4)
    files = file_manifest(second)
    reporter = Recorder(on_first_progress=server.stop)
    try:
        with pytest.raises(CrucibleError) as err:
            publish_to_s3(second, files, uri, "job_c2", settings, reporter)
    finally:
        server.start()
    assert err.value.code == "publish_failed"
    assert uri in err.value.message
    assert SECRET_KEY not in json.dumps(err.value.as_dict())
    # The old manifest was withdrawn before any file was replaced; no new one was written.
    assert f"merged/three/{MANIFEST}" not in server.keys(BUCKET, "merged/three/")

    # The job's next attempt publishes completely.
    publish_to_s3(second, files, uri, "job_c2", settings, Recorder())
    assert json.loads(server.read(BUCKET, f"merged/three/{MANIFEST}"))["files"] == files
    assert not [k for k in server.keys(BUCKET, "merged/three/") if TMP_PREFIX in k]
    for f in files:
        assert _sha(server.read(BUCKET, f"merged/three/{f['path']}")) == f["sha256"]


def test_missing_bucket_is_a_clear_failure(server: S3Server, tmp_path: Path) -> None:
    out = _output(tmp_path, seed=5)
    with pytest.raises(CrucibleError) as err:
        publish_to_s3(
            out,
            file_manifest(out),
            "s3://no-such-bucket/x",
            "job_d",
            _settings(server, tmp_path),
            Recorder(),
        )
    assert err.value.code == "publish_failed"
    assert "bucket 'no-such-bucket' does not exist" in err.value.message


def test_credentials_come_from_settings(server: S3Server, tmp_path: Path) -> None:
    """An access key the server does not know is refused (so the settings' credentials are
    the ones used; s3rver checks the key id, not SigV4 signatures), and the failure names
    the problem without carrying the secret."""
    out = _output(tmp_path, seed=6)
    settings = _settings(server, tmp_path).model_copy(
        update={
            "s3_access_key_id": "NOTAKEY",
            "s3_secret_access_key": SecretStr("wrong-secret-value"),
        }
    )
    with pytest.raises(CrucibleError) as err:
        publish_to_s3(
            out, file_manifest(out), f"s3://{BUCKET}/denied", "job_e", settings, Recorder()
        )
    assert err.value.code == "publish_failed"
    assert "access denied (InvalidAccessKeyId)" in err.value.message
    assert "wrong-secret-value" not in json.dumps(err.value.as_dict())
    assert "wrong-secret-value" not in repr(settings)
    assert not server.keys(BUCKET, "denied/")


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("s3://ab/x", "expected s3://bucket/prefix"),
        ("s3://Bucket/x", "expected s3://bucket/prefix"),
        ("s3://my..bucket/x", "no adjacent dots"),
        ("s3://192.168.1.2/x", "not an IP"),
        ("s3://xn--bucket/x", "reserves"),
        ("s3://bucket/a//b", "segments are not allowed"),
        ("s3://bucket/a/../b", "segments are not allowed"),
        ("hf://name-only", "hf://org/name"),
        ("hf://org/bad name", "malformed Hub URI"),
        ("file:///tmp/out", "is not an output"),
    ],
)
def test_output_uri_validation(uri: str, message: str) -> None:
    from pydantic import ValidationError

    from crucible.spec import OutputSpec

    with pytest.raises(ValidationError, match=re.escape(message)):
        OutputSpec(uri=uri)


def test_output_uris_accepted() -> None:
    from crucible.spec import OutputSpec

    assert (
        OutputSpec(uri="s3://my-bucket.v2/models/merged").uri == "s3://my-bucket.v2/models/merged"
    )
    assert OutputSpec(uri="hf://org/merged-7b").private is True
    assert OutputSpec(uri="local://").uri == "local://"


def test_artifacts_uri_setting_is_checked() -> None:
    from pydantic import ValidationError

    assert (
        Settings(artifacts_uri="s3://artifacts/crucible").artifacts_uri == "s3://artifacts/crucible"
    )
    with pytest.raises(ValidationError, match="not an s3://bucket/prefix URI"):
        Settings(artifacts_uri="file:///srv/artifacts")
