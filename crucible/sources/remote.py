"""Hub weight files read with HTTP range requests: the `stream` source mode.

With CRUCIBLE_SOURCE_MODE=stream the resolve stage downloads a Hub model's small files
(config, tokenizer, the shard index) but not its weights: each safetensors header is read
with one or two ranged GETs (the first HEADER_PROBE_BYTES, then the rest of a longer
header), which gives every tensor's byte range, and the merge reads each tensor (or block
of rows) with its own ranged GET into the engine's buffer. So the merge starts before any
full download and the inputs never touch the disk.

- URLs are `hf_hub_url(repo, file, revision=<pinned commit>)`: the bytes of one commit, so
  every range of a file comes from the same content. Requests go through huggingface_hub's
  HTTP session and headers (`get_session`, `build_hf_headers`: the request's token, else
  the worker's, as in resolve.py; never logged).
- Every range request runs under crucible/retry.py (429/5xx, connection and read errors
  retried with backoff, each retry a job event). The answer must be a 206 whose
  Content-Range is the range asked for and whose body has exactly that many bytes: a
  shorter body is `TruncatedBody`, a ConnectionError, so it is retried like a cut
  connection. A failure that outlasts the policy is `stream_unavailable` naming the file
  and the byte range; an answer of 401/403/404 is `source_not_found` at once.
- Small adjacent tensors (biases, norms) are fetched together: a read of a whole tensor
  under SMALL_READ_BYTES extends over the following small tensors of the file, up to
  COALESCE_BYTES, and the next reads are served from that window. Memory stays one window
  per open file plus the engine's own buffers (one tensor or block at a time).
- A server that ignores Range (answers 200 with the whole file, e.g. olah serving local
  git repos) raises `RangeNotSupported` at the first header read; resolve then downloads
  that model as in download mode and records a `stream_fallback` event.

Not checked in stream mode: the whole-file hash (download mode hashes every file); each
range is length-checked and the header is validated as for a local file.
"""

from __future__ import annotations

import bisect
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crucible.errors import CrucibleError
from crucible.retry import (
    EventSink,
    describe_error,
    is_transient,
    retry_events,
    retrying,
    status_code_of,
)
from crucible.settings import Settings
from crucible.sources.byte_source import ByteSource, LocalFile
from crucible.sources.safetensors_header import (
    MAX_HEADER_BYTES,
    TensorInfo,
    parse_header_bytes,
)

# First ranged GET of a file: its header length and, usually, all of its header.
HEADER_PROBE_BYTES = 64 * 1024
# A whole-tensor read below this size may be extended over the next small tensors...
SMALL_READ_BYTES = 1024 * 1024
# ...up to this many bytes in one request.
COALESCE_BYTES = 4 * 1024 * 1024
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


class RangeNotSupported(Exception):
    """The server answered a range request with something other than 206 Partial Content."""


class TruncatedBody(ConnectionError):
    """A range answer with fewer bytes than asked for: retried like a cut connection."""


@dataclass
class _Answer:
    received: int  # bytes written into the view
    total: int | None  # the file's size from Content-Range, when the server gave it


@dataclass(frozen=True)
class HubFile:
    name: str  # path in the repo
    url: str
    size: int
    # (start, end) of every tensor's data in the file, sorted: what may be coalesced.
    spans: tuple[tuple[int, int], ...] = ()


class RemoteWeights:
    """The weight files of one Hub model at one commit, read with range requests.

    A `SourceOpener` for TensorReader: `open(path)` gives an HttpRangeFile for a streamed
    file and the local file for any other path (an adapter's own weights)."""

    def __init__(
        self,
        repo: str,
        commit: str,
        root: Path,
        endpoint: str | None,
        token: str | None,
        settings: Settings,
        on_event: EventSink | None = None,
    ) -> None:
        from huggingface_hub.utils import build_hf_headers

        self.repo = repo
        self.commit = commit
        self.root = root
        self.endpoint = endpoint
        self.settings = settings
        self.on_event = on_event
        self.files: dict[Path, HubFile] = {}
        self.headers: dict[Path, dict[str, TensorInfo]] = {}  # by read_header
        # identity: a compressed body's ranges would not be the file's bytes.
        self._headers = {**build_hf_headers(token=token), "Accept-Encoding": "identity"}

    def __repr__(self) -> str:  # never the headers: they carry the token
        return f"RemoteWeights({self.repo}@{self.commit[:12]}, {len(self.files)} files)"

    @property
    def sizes(self) -> dict[Path, int]:
        return {path: f.size for path, f in self.files.items()}

    def url(self, name: str) -> str:
        from huggingface_hub import hf_hub_url

        return hf_hub_url(self.repo, name, revision=self.commit, endpoint=self.endpoint)

    def open(self, path: Path) -> ByteSource:
        hub_file = self.files.get(path)
        if hub_file is None:
            return LocalFile(path)
        return HttpRangeFile(self, hub_file)

    def read_header(self, name: str) -> dict[str, TensorInfo]:
        """Read and validate the safetensors header of repo file `name` with ranged GETs;
        the file is then registered for streaming. Raises RangeNotSupported when the server
        ignores Range, CrucibleError(corrupt_safetensors) for a bad header."""
        path = self.root / name
        probe = HttpRangeFile(self, HubFile(name, self.url(name), size=-1))
        head = bytearray(HEADER_PROBE_BYTES)
        answer = probe.fetch(0, memoryview(head), up_to_eof=True)
        if answer.total is None:
            raise RangeNotSupported(f"{name}: the server did not give the file's size")
        size, got = answer.total, answer.received

        def corrupt(what: str) -> CrucibleError:
            return CrucibleError(
                "corrupt_safetensors", f"{name}: {what}", {"file": name, "problem": what}
            )

        if got < 8:
            raise corrupt(f"file is {size} bytes, too short for the 8-byte header length")
        (header_len,) = struct.unpack("<Q", bytes(head[:8]))
        if header_len > MAX_HEADER_BYTES:
            raise corrupt(f"header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit")
        if 8 + header_len > size:
            raise corrupt(
                f"header length {header_len} runs past the end of the file ({size} bytes): "
                "truncated or not a safetensors file"
            )
        raw = head[8 : min(got, 8 + header_len)]
        if len(raw) < header_len:  # a header longer than the probe: one more request
            rest = bytearray(header_len - len(raw))
            HttpRangeFile(self, HubFile(name, probe.file.url, size)).fetch(got, memoryview(rest))
            raw += rest
        tensors, _ = parse_header_bytes(path, bytes(raw), size)
        spans = tuple(sorted((t.start, t.end) for t in tensors.values()))
        self.files[path] = HubFile(name, probe.file.url, size, spans)
        self.headers[path] = tensors
        return tensors


class HttpRangeFile:
    """One streamed weight file: a ByteSource over ranged GETs (one per read, or one per
    window of small adjacent tensors). Not shared between threads."""

    def __init__(self, hub: RemoteWeights, file: HubFile) -> None:
        self.hub = hub
        self.file = file
        self._starts = [s for s, _ in file.spans]
        self._window: tuple[int, bytearray] | None = None  # (offset, bytes) of the last window
        self.requests = 0  # ranged GETs sent (retries included)
        self.bytes_received = 0

    def close(self) -> None:
        self._window = None

    def read_into(self, offset: int, view: memoryview) -> None:
        length = len(view)
        if not length:
            return
        if self._window is not None:
            start, data = self._window
            if start <= offset and offset + length <= start + len(data):
                view[:] = data[offset - start : offset - start + length]
                return
        end = self._coalesced_end(offset, length)
        if end > offset + length:
            data = bytearray(end - offset)
            self.fetch(offset, memoryview(data))
            self._window = (offset, data)
            view[:] = data[:length]
            return
        self.fetch(offset, view)

    def _coalesced_end(self, offset: int, length: int) -> int:
        """Where a read of a whole small tensor at `offset` may extend to: over the next
        tensors while each is small and the window stays within COALESCE_BYTES."""
        end = offset + length
        if length >= SMALL_READ_BYTES:
            return end
        i = bisect.bisect_left(self._starts, offset)
        spans = self.file.spans
        if i == len(spans) or spans[i] != (offset, end):
            return end  # rows of a tensor, not a whole one: read exactly
        for start, stop in spans[i + 1 :]:
            if start != end or stop - start >= SMALL_READ_BYTES or stop - offset > COALESCE_BYTES:
                break
            end = stop
        return end

    def fetch(self, offset: int, view: memoryview, up_to_eof: bool = False) -> _Answer:
        """Fill `view` from the file at `offset` with one ranged GET, under the retry
        policy. `up_to_eof`: a shorter answer is fine when it ends at the end of the file
        (the header probe of a small file)."""
        what = f"range read {self.hub.repo}@{self.hub.commit[:12]} {self.file.name}"
        settings = self.hub.settings
        policy = retrying(settings, what, retry_events(settings, what, self.hub.on_event))
        try:
            return policy(self._get, offset, view, up_to_eof)
        except CrucibleError:
            raise
        except RangeNotSupported as exc:
            if up_to_eof:  # the header probe: resolve falls back to downloading
                raise
            raise self._failure(exc, offset, len(view)) from exc
        except Exception as exc:
            raise self._failure(exc, offset, len(view)) from exc

    def _get(self, offset: int, view: memoryview, up_to_eof: bool) -> _Answer:
        from huggingface_hub import constants
        from huggingface_hub.utils import get_session, hf_raise_for_status

        last = offset + len(view) - 1
        headers = {**self.hub._headers, "Range": f"bytes={offset}-{last}"}
        self.requests += 1
        with get_session().stream(
            "GET", self.file.url, headers=headers, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT
        ) as response:
            if response.status_code == 416 and up_to_eof:  # asked from past the end
                _, _, total = _content_range(response.headers.get("Content-Range"), "*/")
                return _Answer(0, total)
            if response.status_code >= 400:
                response.read()
                hf_raise_for_status(response)
            if response.status_code != 206:
                raise RangeNotSupported(
                    f"{self.file.name}: the server answered HTTP {response.status_code} "
                    "to a range request"
                )
            encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
            if encoding not in ("", "identity"):  # the bytes would not be the file's
                raise RangeNotSupported(
                    f"{self.file.name}: the server compressed a range answer ({encoding})"
                )
            first, stop, total = _content_range(response.headers.get("Content-Range"))
            expected = len(view)
            if total is not None and up_to_eof:
                expected = min(expected, total - offset)
            if first != offset or stop != offset + expected - 1:
                raise TruncatedBody(
                    f"{self.file.name}: asked for bytes {offset}-{last}, the server sent "
                    f"{first}-{stop}"
                )
            pos = 0
            for chunk in response.iter_raw():
                n = len(chunk)
                if pos + n > expected:
                    raise TruncatedBody(f"{self.file.name}: more bytes than the range asked for")
                view[pos : pos + n] = chunk
                pos += n
            self.bytes_received += pos
            if pos != expected:
                raise TruncatedBody(
                    f"{self.file.name}: the range {offset}-{last} came back with {pos} of "
                    f"{expected} bytes"
                )
            return _Answer(pos, total)

    def _failure(self, exc: Exception, offset: int, length: int) -> CrucibleError:
        status = status_code_of(exc)
        detail: dict[str, Any] = {
            "repo": self.hub.repo,
            "commit": self.hub.commit,
            "file": self.file.name,
            "status": status,
        }
        where = (
            f"bytes {offset}-{offset + length - 1} of {self.file.name} in Hub repository "
            f"'{self.hub.repo}' at commit {self.hub.commit[:12]}"
        )
        if status in (401, 403, 404):
            return CrucibleError("source_not_found", f"{where}: HTTP {status}", detail)
        tries = f", after {self.hub.settings.retry_attempts} attempts" if is_transient(exc) else ""
        return CrucibleError(
            "stream_unavailable", f"could not read {where} ({describe_error(exc)}{tries})", detail
        )


def _content_range(value: str | None, unsatisfied: str = "") -> tuple[int, int, int | None]:
    """(first, last, total) of a Content-Range; a 416's `bytes */N` with `unsatisfied`."""
    text = (value or "").strip()
    if unsatisfied and text.startswith("bytes */") and text[8:].isdigit():
        return 0, -1, int(text[8:])
    match = _CONTENT_RANGE.match(text)
    if match is None:
        raise TruncatedBody(f"a range answer without a valid Content-Range ({value!r})")
    first, stop, total = match.groups()
    return int(first), int(stop), None if total == "*" else int(total)
