"""S3-compatible storage access shared by the s3:// sink and the artifact store: the client
(endpoint, region and credentials from settings, else boto3's default chain), locations, and
the transfer settings. Torch-free; the secret key is handed to boto3 and never logged.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Any

from crucible.settings import Settings
from crucible.sources.uri import parse_uri

# S3 refuses CopyObject above 5 GiB; larger objects are copied in parts (UploadPartCopy).
COPY_OBJECT_MAX_BYTES = 5 * 1024**3

_session_lock = threading.Lock()
_session: Any = None


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # no leading or trailing slash; "" for the bucket's root

    @classmethod
    def parse(cls, uri: str) -> S3Location:
        parsed = parse_uri(uri)
        if parsed.scheme != "s3":
            raise ValueError(f"{uri!r} is not an s3://bucket/prefix URI")
        bucket, _, prefix = parsed.target.partition("/")
        return cls(bucket, prefix.strip("/"))

    def key(self, *parts: str) -> str:
        """The object key of `parts` under the prefix, joined with '/'."""
        return "/".join(p.strip("/") for p in (self.prefix, *parts) if p.strip("/"))

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")


def session() -> Any:
    """The process's boto3 session (creating sessions is not thread-safe; clients are)."""
    global _session
    with _session_lock:
        if _session is None:
            import boto3

            _session = boto3.session.Session()
        return _session


def s3_client(settings: Settings) -> Any:
    """A boto3 S3 client for the configured endpoint; path-style addressing when an endpoint
    is set (MinIO, s3rver and most S3-compatible servers need it). botocore's own retries are
    off: crucible.retry is the one policy."""
    from botocore.config import Config

    secret = settings.s3_secret_access_key
    kwargs: dict[str, Any] = {
        "endpoint_url": settings.s3_endpoint_url,
        "region_name": settings.s3_region,
        "aws_access_key_id": settings.s3_access_key_id,
        "aws_secret_access_key": secret.get_secret_value() if secret is not None else None,
    }
    config = Config(
        s3={"addressing_style": "path"} if settings.s3_endpoint_url else {},
        retries={"max_attempts": 1, "mode": "standard"},
        connect_timeout=10,
        read_timeout=120,
    )
    return session().client("s3", config=config, **{k: v for k, v in kwargs.items() if v})


def transfer_config(settings: Settings, copy: bool = False) -> Any:
    """Multipart above `s3_part_bytes`, in parts of that size. For server-side copies the
    threshold is S3's single-request limit, so an object up to 5 GiB is one CopyObject."""
    from boto3.s3.transfer import TransferConfig

    part = settings.s3_part_bytes
    return TransferConfig(
        multipart_threshold=COPY_OBJECT_MAX_BYTES if copy else part,
        multipart_chunksize=part,
        max_concurrency=4,
        use_threads=True,
    )


def is_not_found(exc: BaseException) -> bool:
    """A botocore ClientError for a missing key or bucket (404, NoSuchKey, NoSuchBucket)."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return False
    code = str(response.get("Error", {}).get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in {"404", "NoSuchKey", "NotFound"} or (status == 404 and code != "NoSuchBucket")


_IPV4 = re.compile(r"^\d{1,3}(\.\d{1,3}){3}$")


def check_location(uri: str) -> S3Location:
    """An s3:// URI checked against S3's bucket naming rules and safe key prefixes;
    ValueError naming the rule otherwise."""
    loc = S3Location.parse(uri)
    b = loc.bucket
    if not 3 <= len(b) <= 63 or not re.fullmatch(r"[a-z0-9][a-z0-9.\-]*[a-z0-9]", b):
        raise ValueError(
            f"bucket {b!r}: 3 to 63 lowercase letters, digits, dots and hyphens, starting and "
            "ending with a letter or digit"
        )
    if ".." in b or ".-" in b or "-." in b or _IPV4.match(b):
        raise ValueError(f"bucket {b!r}: no adjacent dots, no dot next to a hyphen, not an IP")
    if b.startswith(("xn--", "sthree-")) or b.endswith(("-s3alias", "--ol-s3")):
        raise ValueError(f"bucket {b!r} uses a prefix or suffix S3 reserves")
    segments = loc.prefix.split("/") if loc.prefix else []
    if any(s in ("", ".", "..") for s in segments):
        raise ValueError(f"prefix {loc.prefix!r}: empty, '.' and '..' segments are not allowed")
    if len(loc.prefix) > 512:
        raise ValueError("prefix: at most 512 characters")
    return loc


def unwrap_transfer_error(exc: BaseException) -> BaseException:
    """boto3's managed upload turns a ClientError into S3UploadFailedError, which carries no
    status: give back the ClientError, so crucible.retry can tell a 503 from a 403."""
    cause = exc.__cause__ or exc.__context__
    if type(exc).__name__ == "S3UploadFailedError" and cause is not None:
        return cause
    return exc
