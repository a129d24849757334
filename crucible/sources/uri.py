"""Parsing of model URIs. Torch-free: the API validates URIs with this."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

# Hub repo ids: "name" or "org/name"; the Hub's own character rules.
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.\-]{0,95}/)?[A-Za-z0-9][\w.\-]{0,95}$")
_S3 = re.compile(r"^s3://(?P<bucket>[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9])(?:/(?P<key>.*))?$")

SOURCE_SCHEMES = ("hf", "file")


@dataclass(frozen=True)
class ParsedURI:
    scheme: str  # "hf" | "file" | "s3" | "local"
    target: str  # repo id, absolute path, "bucket/prefix", or "" for the artifact store

    @property
    def path(self) -> Path:
        return Path(self.target)


def parse_uri(uri: str) -> ParsedURI:
    """Parse `hf://org/name`, `file:///abs/path`, `s3://bucket/prefix` or `local://`.

    Raises ValueError with a message that says what a valid URI looks like.
    """
    if not isinstance(uri, str) or not uri.strip():
        raise ValueError("URI must be a non-empty string")
    if uri.startswith("hf://"):
        repo = uri[len("hf://") :].strip("/")
        if "/../" in f"/{repo}/" or not _REPO_ID.match(repo) or ".." in repo:
            raise ValueError(f"malformed Hub URI {uri!r}: expected hf://org/name")
        return ParsedURI("hf", repo)
    if uri.startswith("file://"):
        parsed = urlparse(uri)
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"malformed file URI {uri!r}: expected file:///absolute/path")
        path = unquote(parsed.path)
        if not path.startswith("/"):
            raise ValueError(f"malformed file URI {uri!r}: the path must be absolute")
        return ParsedURI("file", path)
    if uri.startswith("s3://"):
        m = _S3.match(uri)
        if not m:
            raise ValueError(f"malformed S3 URI {uri!r}: expected s3://bucket/prefix")
        return ParsedURI("s3", f"{m['bucket']}/{m['key'] or ''}".rstrip("/"))
    if uri.rstrip("/") == "local:":
        return ParsedURI("local", "")
    raise ValueError(
        f"unsupported URI {uri!r}: use hf://org/name, file:///path, s3://bucket/prefix"
    )
