"""Resolve a ModelRef to pinned, local, header-checked safetensors files.

- `hf://org/name`: the revision is pinned to a commit sha with `model_info`, then exactly that
  commit's safetensors weights and support files (config, tokenizer) are fetched into the
  Hugging Face cache (HF_HOME / HF_HUB_CACHE). Every Hub call is retried on 429/5xx and
  connection errors (crucible/retry.py; each retry is a job event), never on other 4xx.
  Each downloaded file is checked against the Hub's hash (the cache names a blob by its git
  sha1 or LFS sha256), so a file truncated in transit is downloaded again, never merged.
- Pickled checkpoints (.bin, .pt) are never downloaded or read unless the operator sets
  CRUCIBLE_ALLOW_PICKLE; then weight pickles are converted (weights_only) to safetensors
  by crucible/sources/pickle_reader.py and read like any other weights.
- `file:///abs/path`: only inside `Settings.allowed_local_dirs`, symlinks resolved first so a
  link cannot lead out of an allowed folder.
- `stream=True` (CRUCIBLE_SOURCE_MODE=stream): a Hub model's support files are downloaded but
  its safetensors weights are not; their headers are read with HTTP range requests and
  `ResolvedModel.remote` reads the tensors the same way (crucible/sources/remote.py).
  Adapters, pickles and servers that ignore Range take the download path.

No weights are read here: only headers, so a bad input fails in seconds.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, TypeVar

from crucible.errors import CrucibleError
from crucible.retry import EventSink, describe_error, is_transient, retry_events, retrying
from crucible.retry import status_code_of as _status
from crucible.settings import Settings
from crucible.sources.adapter import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AdapterPlan,
    check_adapter_base,
    plan_adapter,
    read_adapter_config,
)
from crucible.sources.pickle_reader import PICKLE_SUFFIXES, converted_weights, is_weight_pickle
from crucible.sources.safetensors_header import TensorInfo, read_safetensors_header
from crucible.sources.uri import parse_uri

if TYPE_CHECKING:
    from crucible.sources.remote import RemoteWeights
    from crucible.spec import ModelRef

INDEX_FILE = "model.safetensors.index.json"

# Files fetched from the Hub besides the weights: what a merged model needs next to them.
# Top level only: subfolders (onnx/, original/, ...) are other formats or duplicates.
HUB_SUPPORT_PATTERNS = (
    "*.json",
    "*.txt",
    "*.model",
    "*.jinja",
    "*.tiktoken",
    "vocab.*",
    "tokenizer*",
)
# Never downloaded, never read: pickles can execute code, the rest are other formats.
EXCLUDED_SUFFIXES = (
    ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".h5", ".msgpack", ".onnx", ".gguf",
    ".npz", ".npy", ".ot", ".joblib",
)  # fmt: skip
_HEX_REVISION = re.compile(r"^[0-9a-f]{7,40}$")
_GIT_SHA1 = re.compile(r"^[0-9a-f]{40}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_PICKLE_REFUSED = (
    "Pickled checkpoints (.bin, .pt) are not read on this server (CRUCIBLE_ALLOW_PICKLE is "
    "off): use safetensors weights or convert the model."
)

T = TypeVar("T")


@dataclass
class ResolvedModel:
    uri: str
    revision: str  # as requested
    commit: str | None  # pinned Hub commit sha; None for local folders
    root: Path  # folder holding weights and support files
    weight_files: list[Path]
    tensors: dict[str, TensorInfo]
    # Set for a LoRA adapter expert: `tensors` are then the base's (with the adapter's full
    # tensors in place of theirs), and TensorReader adds each module's ΔW = scaling · B A.
    adapter: AdapterPlan | None = None
    # A note for the job's events (e.g. an adapter that does not name its base).
    warning: str | None = None
    # Set when the weights are streamed (not on disk): TensorReader reads `weight_files`
    # through it with HTTP range requests. An adapter of a streamed base carries the base's.
    remote: RemoteWeights | None = None

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def file_bytes(self) -> int:
        """Bytes of the weight files, streamed ones by the size the Hub gave."""
        sizes = self.remote.sizes if self.remote is not None else {}
        return sum(sizes[f] if f in sizes else f.stat().st_size for f in self.weight_files)


def input_bytes(models: list[ResolvedModel]) -> int:
    """Bytes of weights a job reads: each stored tensor once (an adapter expert lists the
    base's tensors as its own; they are the same bytes)."""
    spans = {(t.file, t.start, t.end) for m in models for t in m.tensors.values()}
    return sum(end - start for _, start, end in spans)


def resolve_model(
    ref: ModelRef,
    settings: Settings,
    base: ResolvedModel | None = None,
    allow_base_mismatch: bool = False,
    on_event: EventSink | None = None,
    token: str | None = None,
    stream: bool = False,
) -> ResolvedModel:
    """Pin, fetch (Hub) or locate (file://) a model and read its safetensors headers.

    `base`: the job's resolved base, given for experts. An expert that is a PEFT LoRA
    adapter has its config checked (a plain LoRA, trained on this base) before any of its
    weights are downloaded, then its tensors are mapped onto the base's.
    `on_event`: the job's `Reporter.event`; each retried Hub call is reported there.
    `token`: the request's Hub token (crucible.secrets), else the worker's HF_TOKEN.
    `stream`: read a Hub model's weights with range requests instead of downloading them
    (support files are still downloaded); ignored for file:// models and adapters.
    """
    try:
        parsed = parse_uri(ref.uri)
    except ValueError as exc:
        raise CrucibleError("unsupported_uri", str(exc), {"uri": ref.uri}) from exc
    checked: dict[str, Any] = {}
    remote: RemoteWeights | None = None

    def check_adapter(config_path: Path) -> None:
        if base is None:
            raise CrucibleError(
                "unsupported_adapter",
                f"{ref.uri} is a LoRA adapter ({ADAPTER_CONFIG}); the base must be a full model",
                {"uri": ref.uri},
            )
        config = read_adapter_config(config_path, ref.uri)
        checked["config"] = config
        checked["warning"] = check_adapter_base(config, ref.uri, base.uri, allow_base_mismatch)

    if parsed.scheme == "hf":
        root, commit, remote = _fetch_hub(
            parsed.target, ref.revision, check_adapter, settings, on_event, token, stream
        )
    elif parsed.scheme == "file":
        root = _check_local(parsed.path, settings, ref.uri)
        _check_files_inside(root, settings, ref.uri)
        if (root / ADAPTER_CONFIG).is_file():
            check_adapter(root / ADAPTER_CONFIG)
        commit = None
    else:
        raise CrucibleError(
            "unsupported_uri",
            f"{parsed.scheme}:// is not a model source; use hf://org/name or file:///path",
            {"uri": ref.uri},
        )
    if "config" in checked and base is not None:
        return _open_adapter(root, ref, commit, base, checked["config"], checked["warning"])
    if remote is not None:
        return _open_remote(root, ref, commit, remote)
    return _open_folder(root, ref.uri, ref.revision, commit, settings)


def _open_adapter(
    root: Path,
    ref: ModelRef,
    commit: str | None,
    base: ResolvedModel,
    config: dict[str, Any],
    warning: str | None,
) -> ResolvedModel:
    path = root / ADAPTER_WEIGHTS
    if not path.is_file():
        raise CrucibleError(
            "no_weights",
            f"{ref.uri} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS} (pickled adapters, "
            "adapter_model.bin, are not read)",
            {"uri": ref.uri},
        )
    plan = plan_adapter(config, read_safetensors_header(path), base.tensors, ref.uri)
    return ResolvedModel(
        uri=ref.uri,
        revision=ref.revision,
        commit=commit,
        root=root,
        weight_files=[path],
        tensors={**base.tensors, **plan.full},
        adapter=plan,
        warning=warning,
        remote=base.remote,
    )


def _open_remote(
    root: Path, ref: ModelRef, commit: str | None, remote: RemoteWeights
) -> ResolvedModel:
    """A streamed Hub model: its headers were read over HTTP by _fetch_hub; the shard
    index (a support file, downloaded) is checked against them as for a local folder."""
    names = {path.name for path in remote.files}
    index_path = root / INDEX_FILE
    if index_path.is_file():
        weight_files, expected = _read_index(index_path, root, available=names)
    else:
        weight_files, expected = sorted(remote.files), None
    tensors = _read_headers(weight_files, expected, root, read_header=remote.headers.__getitem__)
    return ResolvedModel(
        uri=ref.uri,
        revision=ref.revision,
        commit=commit,
        root=root,
        weight_files=weight_files,
        tensors=tensors,
        remote=remote,
    )


def open_artifact_folder(root: Path) -> ResolvedModel:
    """A folder of safetensors the service wrote itself (a Gram cache entry, a staged
    output): read without the file:// allow-list, which guards only callers' paths."""
    return _open_folder(root, root.as_uri(), "local", None)


def _open_folder(
    root: Path, uri: str, revision: str, commit: str | None, settings: Settings | None = None
) -> ResolvedModel:
    """`settings`: given for callers' models, whose pickles may be converted when the
    operator allows it; the service's own folders are safetensors only."""
    weight_files, expected = _weight_files(root, uri, settings)
    tensors = _read_headers(weight_files, expected, root)
    return ResolvedModel(
        uri=uri,
        revision=revision,
        commit=commit,
        root=root,
        weight_files=weight_files,
        tensors=tensors,
    )


# ----------------------------------------------------------------------------- local


def _check_local(path: Path, settings: Settings, uri: str) -> Path:
    if not settings.allowed_local_dirs:
        raise CrucibleError(
            "local_path_forbidden",
            "file:// sources are disabled on this server (CRUCIBLE_ALLOWED_LOCAL_DIRS is empty)",
            {"uri": uri},
        )
    # The check comes before the existence test so that the answer does not reveal which
    # paths exist outside the allowed folders.
    real = path.resolve()
    if not settings.allows_local_path(real):
        raise CrucibleError(
            "local_path_forbidden",
            f"{path} is outside the folders this server allows for file:// sources",
            {"uri": uri},
        )
    if not real.exists():
        raise CrucibleError(
            "source_not_found", f"local model folder {path} does not exist", {"uri": uri}
        )
    if not real.is_dir():
        raise CrucibleError(
            "source_not_found",
            f"{path} is not a folder: point at the model's folder",
            {"uri": uri},
        )
    return real


def _check_files_inside(root: Path, settings: Settings, uri: str) -> None:
    # A file inside the folder may itself be a symlink to anywhere; every top-level file is
    # a candidate for reading (weights, config, tokenizer), so each must stay inside.
    for entry in sorted(root.iterdir()):
        target = entry.resolve()
        if not settings.allows_local_path(target):
            raise CrucibleError(
                "local_path_forbidden",
                f"{entry.name} in {root} links to {target}, outside the allowed folders",
                {"uri": uri, "file": entry.name},
            )


# ----------------------------------------------------------------------------- weights


def _weight_files(
    root: Path, uri: str, settings: Settings | None = None
) -> tuple[list[Path], dict[str, str] | None]:
    """The weight files and, for sharded models, the index's tensor -> file map."""
    index_path = root / INDEX_FILE
    if index_path.is_file():
        return _read_index(index_path, root)
    files = sorted(p for p in root.glob("*.safetensors") if p.is_file())
    if not files:
        pickles = sorted(p.name for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES)
        weights = [root / name for name in pickles if is_weight_pickle(name)]
        if settings is not None and settings.allow_pickle and weights:
            # Shards of a sharded checkpoint hold disjoint tensors; their union is checked
            # for duplicates like safetensors shards (no index needed).
            return converted_weights(weights, settings), None
        found = f"; found {', '.join(pickles)}" if pickles else ""
        raise CrucibleError(
            "no_weights",
            f"{uri} has no *.safetensors weights{found}. {_PICKLE_REFUSED}",
            {"uri": uri, "pickles": pickles},
        )
    return files, None


def _read_index(
    index_path: Path, root: Path, available: set[str] | None = None
) -> tuple[list[Path], dict[str, str]]:
    """`available`: the shard names a streamed model has (its files are not on disk)."""

    def bad(what: str) -> CrucibleError:
        return CrucibleError(
            "corrupt_safetensors", f"{INDEX_FILE}: {what}", {"file": str(index_path)}
        )

    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise bad(f"not valid JSON ({exc})") from exc
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise bad("no weight_map object")
    files: list[Path] = []
    seen: set[str] = set()
    for tensor, fname in weight_map.items():
        if not isinstance(fname, str) or not fname.endswith(".safetensors"):
            raise bad(f"tensor {tensor!r} maps to {fname!r}, not a .safetensors file")
        rel = PurePosixPath(fname)
        # Shard names are plain file names next to the index; anything else could point
        # outside the model folder.
        if rel.is_absolute() or len(rel.parts) != 1 or fname in (".", ".."):
            raise bad(f"shard name {fname!r} must be a plain file name")
        if fname not in seen:
            seen.add(fname)
            path = root / fname
            if not (path.is_file() if available is None else fname in available):
                raise bad(f"lists shard {fname!r}, which is missing")
            files.append(path)
    return files, weight_map


def _read_headers(
    files: list[Path],
    expected: dict[str, str] | None,
    root: Path,
    read_header: Callable[[Path], dict[str, TensorInfo]] = read_safetensors_header,
) -> dict[str, TensorInfo]:
    tensors: dict[str, TensorInfo] = {}
    for path in files:
        for name, info in read_header(path).items():
            if name in tensors:
                raise CrucibleError(
                    "corrupt_safetensors",
                    f"tensor {name!r} appears in both {tensors[name].file.name} and {path.name}",
                    {"tensor": name, "files": [tensors[name].file.name, path.name]},
                )
            tensors[name] = info
    if expected is not None:
        for name, fname in expected.items():
            info = tensors.get(name)
            if info is None or info.file.name != fname:
                raise CrucibleError(
                    "corrupt_safetensors",
                    f"{INDEX_FILE} maps tensor {name!r} to {fname}, which does not hold it",
                    {"tensor": name, "file": fname},
                )
        extra = sorted(set(tensors) - set(expected))
        if extra:
            raise CrucibleError(
                "corrupt_safetensors",
                f"{INDEX_FILE} does not list tensor {extra[0]!r} found in "
                f"{tensors[extra[0]].file.name}",
                {"unlisted": extra[:20]},
            )
    return tensors


# ----------------------------------------------------------------------------- hub


def _hub_cache_dir() -> str | None:
    # huggingface_hub reads HF_HOME/HF_HUB_CACHE once at import; read them per call so a
    # long-lived worker (and tests) follow the current environment.
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]).expanduser() / "hub")
    return None


class _HashMismatch(OSError):
    """Downloaded files whose content does not match the Hub's hash: truncated or damaged
    in transit. Their cached copies are removed, so the next attempt downloads them again."""

    def __init__(self, files: list[str]) -> None:
        super().__init__(f"downloaded files do not match the Hub's hash: {', '.join(files)}")
        self.files = files


def _fetch_hub(
    repo: str,
    revision: str,
    check_adapter: Callable[[Path], None],
    settings: Settings,
    on_event: EventSink | None,
    token: str | None = None,
    stream: bool = False,
) -> tuple[Path, str, RemoteWeights | None]:
    """Download a repo's weights and support files at one pinned commit. An adapter repo's
    config is fetched alone first and given to `check_adapter`, which may refuse it before
    its weights are downloaded. With `stream`, safetensors weights are not downloaded:
    their headers are read with range requests and the RemoteWeights returned."""
    from huggingface_hub import HfApi, snapshot_download

    # Same reason as the cache: pass endpoint and token explicitly, read at call time.
    endpoint = os.environ.get("HF_ENDPOINT") or None
    # The request's token, else the worker's; never logged, never put in messages.
    token = token or os.environ.get("HF_TOKEN") or None
    api = HfApi(endpoint=endpoint, token=token)

    info = _hub_call(
        lambda: api.model_info(repo, revision=revision),
        api,
        repo,
        revision,
        settings,
        f"model_info {repo}@{revision}",
        on_event,
        probe_missing_commit=True,
    )
    commit = info.sha
    if not commit:
        raise CrucibleError(
            "source_unavailable",
            f"the Hub did not return a commit for '{repo}' at revision '{revision}'",
            {"repo": repo, "revision": revision},
        )
    top_level = [s.rfilename for s in (info.siblings or []) if "/" not in s.rfilename]
    weights = [f for f in top_level if f.endswith(".safetensors")]
    if not weights:
        pickles = sorted(f for f in top_level if f.endswith(PICKLE_SUFFIXES))
        weights = [f for f in pickles if is_weight_pickle(f)] if settings.allow_pickle else []
        if not weights:
            found = f"; it holds {', '.join(pickles)}" if pickles else ""
            raise CrucibleError(
                "no_weights",
                f"Hub repository '{repo}' at revision '{revision}' has no *.safetensors "
                f"weights{found}. {_PICKLE_REFUSED}",
                {"repo": repo, "revision": revision, "commit": commit, "pickles": pickles},
            )
    wanted = weights + [
        f
        for f in top_level
        if not f.endswith(EXCLUDED_SUFFIXES)
        and any(fnmatch.fnmatch(f, p) for p in HUB_SUPPORT_PATTERNS)
    ]

    def download(names: list[str], what: str) -> Path:
        def fetch() -> Path:
            # By the pinned sha, not the branch: a push between calls cannot mix two commits.
            folder = Path(
                snapshot_download(
                    repo,
                    revision=commit,
                    allow_patterns=names,
                    cache_dir=_hub_cache_dir(),
                    endpoint=endpoint,
                    token=token,
                )
            )
            _verify_downloads(folder, names, settings)
            return folder

        return _hub_call(fetch, api, repo, commit, settings, what, on_event)

    if ADAPTER_CONFIG in top_level:
        config = download([ADAPTER_CONFIG], f"download {repo}@{commit[:12]} {ADAPTER_CONFIG}")
        check_adapter(config / ADAPTER_CONFIG)
    elif stream and all(f.endswith(".safetensors") for f in weights):
        support = sorted(set(wanted) - set(weights))
        folder = download(support, f"download {repo}@{commit[:12]} support files")
        folder.mkdir(parents=True, exist_ok=True)  # a repo of weights alone has none
        remote = _stream_headers(repo, commit, folder, weights, endpoint, token, settings, on_event)
        if remote is not None:
            return folder, commit, remote
    folder = download(sorted(set(wanted)), f"download {repo}@{commit[:12]}")
    return folder, commit, None


def _stream_headers(
    repo: str,
    commit: str,
    folder: Path,
    weights: list[str],
    endpoint: str | None,
    token: str | None,
    settings: Settings,
    on_event: EventSink | None,
) -> RemoteWeights | None:
    """Every weight file's header read with range requests, or None (after a job event)
    when the server ignores Range: the caller then downloads the weights."""
    from crucible.sources.remote import RangeNotSupported, RemoteWeights

    remote = RemoteWeights(repo, commit, folder, endpoint, token, settings, on_event)
    try:
        for name in sorted(weights):
            remote.read_header(name)
    except RangeNotSupported as exc:
        if on_event is not None:
            on_event(
                "stream_fallback",
                f"{repo}: {exc}; its weights are downloaded instead of streamed",
                {"repo": repo, "commit": commit},
            )
        return None
    return remote


def _verify_downloads(folder: Path, names: list[str], settings: Settings) -> None:
    """Check each downloaded file against the hash the Hub gave it: the cache names a blob
    by its git blob sha1 (plain files) or its sha256 (LFS files). A mismatch (a body cut
    short behind a matching Content-Length, a damaged byte) removes the cached copy and
    raises _HashMismatch, a transient failure; the next attempt downloads it again."""
    bad: list[str] = []
    for name in names:
        link = folder / name
        if not link.is_file():
            continue  # not in this commit (an allow pattern that matched nothing)
        blob = link.resolve()
        if not _blob_matches(blob, settings):
            bad.append(name)
            blob.unlink(missing_ok=True)
            link.unlink(missing_ok=True)
    if bad:
        raise _HashMismatch(bad)


def _blob_matches(blob: Path, settings: Settings) -> bool:
    expected = blob.name
    if not (_GIT_SHA1.match(expected) or _SHA256.match(expected)):
        return True  # no hash to compare with (e.g. a Xet hash): the headers are checked
    stat = blob.stat()
    # A blob verified once is not hashed again while its size and mtime stay the same.
    marker = settings.data_root / "verified-blobs" / expected
    stamp = f"{stat.st_size} {stat.st_mtime_ns}"
    if marker.is_file() and marker.read_text() == stamp:
        return True
    if _SHA256.match(expected):
        digest = hashlib.sha256()
    else:
        digest = hashlib.sha1(usedforsecurity=False)
        digest.update(b"blob %d\0" % stat.st_size)  # git's blob id covers this prefix
    with blob.open("rb") as fh:
        while chunk := fh.read(8 * 1024 * 1024):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        return False
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(stamp)
    return True


def _reset_connections() -> None:
    """Drop pooled connections: a server that reset one will not take it back."""
    from huggingface_hub import utils

    # close_session in huggingface_hub >= 1.0, reset_sessions before.
    reset = getattr(utils, "close_session", None) or getattr(utils, "reset_sessions", None)
    if reset is not None:
        reset()


def _chain(exc: BaseException) -> list[BaseException]:
    """exc and the exceptions it was raised from (snapshot_download wraps the real cause)."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen and len(seen) < 8:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _is_consistency_error(exc: BaseException) -> bool:
    # huggingface_hub's own size check of a download: fewer bytes than announced.
    return isinstance(exc, OSError) and "Consistency check failed" in str(exc)


def _hub_transient(exc: BaseException) -> bool:
    """429/5xx, connection and read failures, truncated downloads: worth another try.
    Offline mode and every other HTTP status are not."""
    from huggingface_hub import errors as hf_errors

    for e in _chain(exc):
        if isinstance(e, hf_errors.OfflineModeIsEnabled):
            return False
        if isinstance(e, _HashMismatch) or _is_consistency_error(e):
            return True
        if _status(e) is not None:
            return is_transient(e)  # the first status in the chain decides
        if is_transient(e):
            return True
    return False


def _hub_call(
    fn: Callable[[], T],
    api: Any,
    repo: str,
    revision: str,
    settings: Settings,
    what: str,
    on_event: EventSink | None,
    probe_missing_commit: bool = False,
) -> T:
    """fn() under the retry policy; a failure that outlasts it becomes a CrucibleError.

    `probe_missing_commit`: olah answers 500 for a commit sha it does not have; when the
    repo's refs answer, that 500 means a missing revision and is not retried."""

    def attempt() -> T:
        try:
            return fn()
        except Exception:
            _reset_connections()  # a server that failed a request may have reset its socket
            raise

    def retry_on(exc: BaseException) -> bool:
        if not _hub_transient(exc):
            return False
        if probe_missing_commit and _status(exc) == 500 and _HEX_REVISION.match(revision):
            return _repo_refs(api, repo) is None
        return True

    policy = retrying(settings, what, retry_events(settings, what, on_event), retry_on)
    try:
        return policy(attempt)
    except CrucibleError:
        raise
    except Exception as exc:
        mapped = _map_hub_failure(exc, api, repo, revision, settings, probe_missing_commit)
        if mapped is None:
            raise  # e.g. a full disk: not the Hub's fault, reported as it is
        raise mapped from exc


def _map_hub_failure(
    exc: Exception,
    api: Any,
    repo: str,
    revision: str,
    settings: Settings,
    probe_missing_commit: bool,
) -> CrucibleError | None:
    from huggingface_hub import errors as hf_errors

    detail: dict[str, Any] = {"repo": repo, "revision": revision}
    tries = f"after {settings.retry_attempts} attempts"
    chain = _chain(exc)
    if any(isinstance(e, hf_errors.OfflineModeIsEnabled) for e in chain):
        return CrucibleError(
            "source_unavailable",
            f"cannot reach the Hub for '{repo}': offline mode is enabled (HF_HUB_OFFLINE)",
            detail,
        )
    for e in chain:
        if isinstance(e, _HashMismatch):
            return CrucibleError(
                "source_unavailable",
                f"{', '.join(e.files)} of Hub repository '{repo}' at revision '{revision}' "
                f"did not match the Hub's hash {tries} (truncated or damaged in transit)",
                {**detail, "files": e.files},
            )
        if _is_consistency_error(e):
            return CrucibleError(
                "source_unavailable",
                f"a download from Hub repository '{repo}' at revision '{revision}' stayed "
                f"incomplete {tries} (fewer bytes than the Hub announced)",
                detail,
            )
        if isinstance(e, hf_errors.HfHubHTTPError):
            return _map_http_error(e, api, repo, revision, tries, probe_missing_commit)
    if _hub_transient(exc):
        return CrucibleError(
            "source_unavailable",
            f"could not reach the Hub for '{repo}' at revision '{revision}' "
            f"({describe_error(exc)}, {tries})",
            detail,
        )
    return None


def _repo_refs(api: Any, repo: str) -> Any | None:
    """The repo's branches and tags, or None when the repo cannot be seen."""
    _reset_connections()
    for attempt in range(2):
        try:
            return api.list_repo_refs(repo)
        except Exception:  # any failure means: cannot show that the repo exists
            if attempt == 0:
                _reset_connections()
                time.sleep(0.2)
    return None


def _ref_names(refs: Any) -> list[str]:
    return [r.name for r in [*refs.branches, *refs.tags]]


def _revision_missing(repo: str, revision: str, refs: Any, why: str) -> CrucibleError:
    names = _ref_names(refs)[:10]
    return CrucibleError(
        "source_not_found",
        f"revision '{revision}' not found in Hub repository '{repo}'{why}",
        {"repo": repo, "revision": revision, "known_refs": names},
    )


def _map_http_error(
    exc: Exception, api: Any, repo: str, revision: str, tries: str, probe_missing_commit: bool
) -> CrucibleError:
    from huggingface_hub import errors as hf_errors

    status = getattr(getattr(exc, "response", None), "status_code", None)
    detail = {"repo": repo, "revision": revision, "status": status}
    if isinstance(exc, hf_errors.RevisionNotFoundError):
        return CrucibleError(
            "source_not_found",
            f"revision '{revision}' not found in Hub repository '{repo}'",
            detail,
        )
    if isinstance(exc, hf_errors.GatedRepoError):
        # Checked before its base class: a gated repo's refs are public, so the probe below
        # would wrongly blame the revision.
        return CrucibleError(
            "source_not_found",
            f"Hub repository '{repo}' not found or not accessible (gated: accept its terms "
            "and give the worker a token)",
            detail,
        )
    if isinstance(exc, hf_errors.RepositoryNotFoundError):
        # olah answers 401 RepoNotFound for a missing branch of an existing repo too: tell
        # the two apart by asking for the repo's refs.
        refs = _repo_refs(api, repo)
        if refs is not None and revision not in _ref_names(refs):
            return _revision_missing(repo, revision, refs, "")
        return CrucibleError(
            "source_not_found",
            f"Hub repository '{repo}' not found or not accessible",
            detail,
        )
    if isinstance(exc, hf_errors.EntryNotFoundError):  # a 404 for a file
        return CrucibleError(
            "source_not_found",
            f"a file of Hub repository '{repo}' at revision '{revision}' was not found",
            detail,
        )
    if (
        probe_missing_commit
        and status is not None
        and status >= 500
        and _HEX_REVISION.match(revision)
    ):
        # olah answers 500 for a commit sha it does not have. If the repo itself answers,
        # the sha is what is missing; otherwise it is a real outage. (Downloads are by the
        # sha model_info returned, which exists: their 5xx is always an outage.)
        refs = _repo_refs(api, repo)
        if refs is not None:
            return _revision_missing(
                repo, revision, refs, f" (the Hub answered HTTP {status} for that commit)"
            )
    if status is not None and (status >= 500 or status == 429):
        return CrucibleError(
            "source_unavailable",
            f"the Hub answered HTTP {status} for '{repo}' at revision '{revision}' {tries}; "
            "try again later",
            detail,
        )
    if status in (401, 403):
        return CrucibleError(
            "source_not_found",
            f"Hub repository '{repo}' not found or not accessible",
            detail,
        )
    return CrucibleError(
        "source_not_found",
        f"the Hub refused '{repo}' at revision '{revision}' (HTTP {status})",
        detail,
    )
