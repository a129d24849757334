"""s3rver (npm), a real S3-compatible server storing objects on disk, for the sink and
artifact-store tests. Installed by `make test-deps` into .tools/node_modules."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config

from tests.support.ports import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
S3RVER = REPO_ROOT / ".tools" / "node_modules" / ".bin" / "s3rver"
# s3rver accepts these (and only these) credentials by default.
ACCESS_KEY = "S3RVER"
SECRET_KEY = "S3RVER"
REGION = "us-east-1"


class S3Server:
    """`s3rver --address 127.0.0.1 --port <free> --directory <dir> --silent`, stopped by PID.

    Restartable on the same directory (`stop()` then `start()`): the objects stay."""

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> S3Server:
        if not S3RVER.exists():
            pytest.fail(f"{S3RVER} is missing: run `make test-deps` (npm install s3rver@3.7.1)")
        self.directory.mkdir(parents=True, exist_ok=True)
        log = (self.directory.parent / f"s3rver-{self.port}.log").open("ab")
        self._proc = subprocess.Popen(
            [
                str(S3RVER),
                "--address",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--directory",
                str(self.directory),
                "--silent",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: node and nothing else of ours
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"s3rver exited with {self._proc.returncode}")
            try:
                self.client().list_buckets()
                return self
            except Exception:  # not listening yet
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"s3rver did not answer on {self.endpoint} within {timeout}s")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def client(self) -> Any:
        """A boto3 client for this server: path-style, the dummy credentials, few retries."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            config=Config(
                s3={"addressing_style": "path"},
                retries={"max_attempts": 1},
                connect_timeout=5,
                read_timeout=30,
            ),
        )

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def env(self) -> dict[str, str]:
        """The CRUCIBLE_S3_* settings pointing the service at this server."""
        return {
            "CRUCIBLE_S3_ENDPOINT_URL": self.endpoint,
            "CRUCIBLE_S3_REGION": REGION,
            "CRUCIBLE_S3_ACCESS_KEY_ID": ACCESS_KEY,
            "CRUCIBLE_S3_SECRET_ACCESS_KEY": SECRET_KEY,
        }

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        paginator = self.client().get_paginator("list_objects_v2")
        return sorted(
            obj["Key"]
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix)
            for obj in page.get("Contents", [])
        )

    def read(self, bucket: str, key: str) -> bytes:
        return self.client().get_object(Bucket=bucket, Key=key)["Body"].read()

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextmanager
def s3_server(root: Path, buckets: tuple[str, ...] = ()) -> Iterator[S3Server]:
    """A running s3rver storing under root/objects, with these buckets created."""
    with S3Server(root / "objects") as server:
        for bucket in buckets:
            server.create_bucket(bucket)
        try:
            yield server
        finally:
            server.stop()
            shutil.rmtree(root / "objects", ignore_errors=True)
