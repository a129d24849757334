"""A recorded-protocol fake of the Hugging Face Hub's write API, as a real HTTP server.

No Hub server here accepts uploads (olah, the stand-in the download tests use, is
read-only), so the Hub sink is tested against this: a `ThreadingHTTPServer` in a thread that
answers the requests huggingface_hub 2.4 sends for `create_repo` and `create_commit` over
the LFS protocol, with the request and response shapes read from its source
(hf_api.create_repo / _validate_yaml / model_info, _commit_api._fetch_upload_modes /
_prepare_commit_payload / _send_commit, lfs.post_lfs_batch_info / lfs_upload):

  POST /api/repos/create                              {name, organization, visibility, type}
  GET  /api/models/{repo}[/revision/{rev}]            model info (sha, private, siblings)
  POST /api/validate-yaml                             README.md front matter check
  POST /api/models/{repo}/preupload/{rev}             {files: [{path, sample, size}]}
  POST /{repo}.git/info/lfs/objects/batch             LFS batch (basic transfer)
  PUT  /lfs/{oid}                                     the LFS object's bytes (sha256 checked)
  POST /lfs/verify                                    {oid, size}
  POST /api/models/{repo}/commit/{rev}                NDJSON: header, file, lfsFile lines

Xet (the Hub's chunked content-addressed protocol, which huggingface_hub prefers when hf_xet
is installed) is not implemented; tests turn it off (`huggingface_hub.constants.
HF_HUB_DISABLE_XET`), and the client falls back to LFS as it does against any Hub that
offers no Xet. Committed files are stored whole, so a test can compare their hashes, and
every request is recorded (method, path) so a test can check the protocol's sequence.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlparse

import yaml

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".h5", ".msgpack", ".model")
LFS_MIN_BYTES = 10 * 1024 * 1024  # the Hub stores larger files through LFS


@dataclass
class FakeRepo:
    repo_id: str
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    lfs_paths: set[str] = field(default_factory=set)
    commits: list[dict[str, Any]] = field(default_factory=list)

    @property
    def sha(self) -> str:
        return self.commits[-1]["oid"] if self.commits else "0" * 40


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """Start with `with FakeHub(token=...) as hub:`; point HfApi at `hub.endpoint`."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.repos: dict[str, FakeRepo] = {}
        self.lfs: dict[str, bytes] = {}  # oid (sha256) -> bytes
        self.requests: list[tuple[str, str]] = []
        self.fail_commits = 0  # answer this many commit requests with 503 first
        self.lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def paths(self, method: str | None = None) -> list[str]:
        return [p for m, p in self.requests if method is None or m == method]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self._dispatch("GET")

            def do_POST(self) -> None:
                self._dispatch("POST")

            def do_PUT(self) -> None:
                self._dispatch("PUT")

            def _dispatch(self, method: str) -> None:
                path = unquote(urlparse(self.path).path)
                body = self._body()
                with hub.lock:
                    hub.requests.append((method, path))
                try:
                    status, payload, headers = hub._route(method, path, body, self.headers)
                except Exception as exc:  # a bug in the fake: say so instead of hanging
                    status, payload, headers = 500, {"error": repr(exc)}, {}
                raw = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(raw)

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            self.rfile.readline()
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        return Handler

    # --- routing -------------------------------------------------------------------------

    def _authorized(self, headers: Any) -> bool:
        return headers.get("Authorization") == f"Bearer {self.token}"

    def _route(
        self, method: str, path: str, body: bytes, headers: Any
    ) -> tuple[int, Any, dict[str, str]]:
        if method == "PUT" and path.startswith("/lfs/"):
            return self._lfs_put(path.removeprefix("/lfs/"), body)
        if method == "POST" and path == "/lfs/verify":
            doc = json.loads(body)
            ok = self.lfs.get(doc["oid"]) is not None and len(self.lfs[doc["oid"]]) == doc["size"]
            return (200, {}, {}) if ok else (404, {"error": "object not found"}, {})
        if not self._authorized(headers):
            return 401, {"error": "Invalid credentials in Authorization header"}, {}
        if method == "POST" and path == "/api/repos/create":
            return self._create_repo(json.loads(body))
        if method == "POST" and path == "/api/validate-yaml":
            return self._validate_yaml(json.loads(body))
        if method == "POST" and path.endswith(".git/info/lfs/objects/batch"):
            return self._lfs_batch(
                path.removeprefix("/").removesuffix(".git/info/lfs/objects/batch"), json.loads(body)
            )
        if path.startswith("/api/models/"):
            rest = path.removeprefix("/api/models/")
            for verb in ("preupload", "commit", "revision"):
                marker = f"/{verb}/"
                if marker in rest:
                    repo_id, rev = rest.split(marker, 1)
                    repo = self.repos.get(repo_id)
                    if repo is None:
                        return (
                            404,
                            {"error": "Repository not found"},
                            {"X-Error-Code": "RepoNotFound"},
                        )
                    if verb == "preupload" and method == "POST":
                        return self._preupload(repo, json.loads(body))
                    if verb == "commit" and method == "POST":
                        return self._commit(repo, rev, body)
                    if verb == "revision" and method == "GET":
                        return self._info(repo)
            repo = self.repos.get(rest)
            if repo is not None and method == "GET":
                return self._info(repo)
            return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
        return 404, {"error": f"no route {method} {path}"}, {}

    def _create_repo(self, doc: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        repo_id = f"{doc['organization']}/{doc['name']}" if doc.get("organization") else doc["name"]
        if doc.get("type", "model") != "model":
            return 400, {"error": "only model repos in this fake"}, {}
        with self.lock:
            if repo_id in self.repos:
                return (
                    409,
                    {
                        "error": "You already created this model repo",
                        "url": f"{self.endpoint}/{repo_id}",
                    },
                    {},
                )
            self.repos[repo_id] = FakeRepo(repo_id, private=doc.get("visibility") == "private")
        return 200, {"url": f"{self.endpoint}/{repo_id}", "name": repo_id}, {}

    def _info(self, repo: FakeRepo) -> tuple[int, Any, dict[str, str]]:
        return (
            200,
            {
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "sha": repo.sha,
                "private": repo.private,
                "siblings": [{"rfilename": p} for p in sorted(repo.files)],
            },
            {},
        )

    def _validate_yaml(self, doc: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        content = doc["content"]
        if content.startswith("---\n"):
            front = content[4:].split("\n---\n", 1)[0]
            try:
                meta = yaml.safe_load(front)
            except yaml.YAMLError as exc:
                return 400, {"errors": [{"message": f"invalid YAML: {exc}"}]}, {}
            if meta is not None and not isinstance(meta, dict):
                return 400, {"errors": [{"message": "metadata must be a mapping"}]}, {}
        return 200, {"errors": [], "warnings": []}, {}

    def _preupload(self, repo: FakeRepo, doc: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        out = []
        for f in doc["files"]:
            sample = base64.b64decode(f["sample"])
            lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] >= LFS_MIN_BYTES or b"\0" in sample
            existing = repo.files.get(f["path"])
            oid = None
            if existing is not None:
                in_lfs = f["path"] in repo.lfs_paths
                oid = hashlib.sha256(existing).hexdigest() if in_lfs else git_blob_sha1(existing)
            out.append(
                {
                    "path": f["path"],
                    "uploadMode": "lfs" if lfs else "regular",
                    "shouldIgnore": False,
                    "oid": oid,
                }
            )
        return 200, {"files": out}, {}

    def _lfs_batch(self, repo_id: str, doc: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        if repo_id not in self.repos:
            return 404, {"message": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
        objects = []
        for obj in doc["objects"]:
            entry: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.lfs:  # already stored: no actions, the client skips it
                entry["actions"] = {
                    "upload": {"href": f"{self.endpoint}/lfs/{obj['oid']}", "header": {}},
                    "verify": {"href": f"{self.endpoint}/lfs/verify", "header": {}},
                }
            objects.append(entry)
        return 200, {"transfer": "basic", "objects": objects}, {}

    def _lfs_put(self, oid: str, body: bytes) -> tuple[int, Any, dict[str, str]]:
        if hashlib.sha256(body).hexdigest() != oid:
            return 400, {"error": "sha256 does not match the oid"}, {}
        with self.lock:
            self.lfs[oid] = body
        return 200, {}, {}

    def _commit(self, repo: FakeRepo, rev: str, body: bytes) -> tuple[int, Any, dict[str, str]]:
        with self.lock:
            if self.fail_commits > 0:
                self.fail_commits -= 1
                return 503, {"error": "Service Unavailable"}, {}
        if rev != "main":
            return 400, {"error": "this fake commits to main only"}, {}
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0]["key"] != "header":
            return 400, {"error": "the first line must be the header"}, {}
        header = lines[0]["value"]
        changes: dict[str, tuple[bytes, bool]] = {}
        for item in lines[1:]:
            value = item["value"]
            if item["key"] == "file":
                changes[value["path"]] = (base64.b64decode(value["content"]), False)
            elif item["key"] == "lfsFile":
                data = self.lfs.get(value["oid"])
                if data is None or len(data) != value["size"]:
                    return 422, {"error": f"LFS object {value['oid']} was not uploaded"}, {}
                changes[value["path"]] = (data, True)
            else:
                return 400, {"error": f"unsupported operation {item['key']}"}, {}
        with self.lock:
            oid = hashlib.sha1(
                f"{repo.sha}{len(repo.commits)}{sorted(changes)}".encode()
            ).hexdigest()
            for p, (data, lfs) in changes.items():
                repo.files[p] = data
                (repo.lfs_paths.add if lfs else repo.lfs_paths.discard)(p)
            repo.commits.append(
                {"oid": oid, "summary": header.get("summary"), "paths": sorted(changes)}
            )
        return (
            200,
            {"commitUrl": f"{self.endpoint}/{repo.repo_id}/commit/{oid}", "commitOid": oid},
            {},
        )
