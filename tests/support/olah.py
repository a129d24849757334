"""A real Hub-compatible server for tests: olah serving plain git repos from a temp folder.

olah lives in its own venv (it pins an older psutil). Install it once with
    python3.11 -m venv .venv-olah && .venv-olah/bin/pip install olah
or point CRUCIBLE_OLAH_BIN at an `olah-cli` binary.

Behaviours of olah 0.5.4 worth knowing (observed, see the sources report):
- Always pass `revision=`: without one, `model_info` answers 401 RepoNotFound.
- A missing repo and a missing branch/tag both answer 401 RepoNotFound; `GET
  /api/models/<repo>/refs` answers 200 for an existing repo and 404 for a missing one.
- An unknown full commit sha answers 500, and the next request on the same keep-alive
  connection is reset by the server.
- Binary files of 121..149 bytes crash it (it sniffs that size range for LFS pointers as
  UTF-8); `add_repo` refuses them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from tests.support.ports import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
INSTALL_HINT = (
    "python3.11 -m venv .venv-olah && .venv-olah/bin/pip install olah "
    "(or set CRUCIBLE_OLAH_BIN to an olah-cli binary)"
)
# Removed from client environments: a real token must never reach the test server, a cache
# override would bypass HF_HOME, offline mode would refuse every call.
HUB_ENV_REMOVE = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_CACHE", "HF_HUB_OFFLINE")

_GIT_ENV = {
    "GIT_AUTHOR_NAME": "crucible-tests",
    "GIT_AUTHOR_EMAIL": "tests@crucible.invalid",
    "GIT_COMMITTER_NAME": "crucible-tests",
    "GIT_COMMITTER_EMAIL": "tests@crucible.invalid",
    "GIT_CONFIG_GLOBAL": os.devnull,  # no user hooks, signing or LFS filters
    "GIT_CONFIG_NOSYSTEM": "1",
}


def olah_binary() -> Path:
    configured = os.environ.get("CRUCIBLE_OLAH_BIN")
    path = Path(configured) if configured else REPO_ROOT / ".venv-olah" / "bin" / "olah-cli"
    if not path.exists():
        raise RuntimeError(f"olah-cli not found at {path}; install it: {INSTALL_HINT}")
    return path


def hub_env(
    endpoint: str, hf_home: Path | str, base: dict[str, str] | None = None
) -> dict[str, str]:
    """An environment for a process (or monkeypatch) that talks to `endpoint` as its Hub."""
    env = dict(os.environ if base is None else base)
    for key in HUB_ENV_REMOVE:
        env.pop(key, None)
    no_proxy = ",".join(
        p for p in (env.get("NO_PROXY", ""), "127.0.0.1", "localhost") if p
    )  # a configured HTTP proxy must not swallow loopback requests
    env.update(
        {
            "HF_ENDPOINT": endpoint,
            "HF_HOME": str(hf_home),
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
            "HF_HUB_DISABLE_XET": "1",
            "NO_PROXY": no_proxy,
            "no_proxy": no_proxy,
        }
    )
    return env


def _git(cwd: Path, *args: str) -> str:
    env = {**os.environ, **_GIT_ENV}
    proc = subprocess.run(
        ["git", *args], cwd=cwd, env=env, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed in {cwd}: {proc.stderr.strip()}")
    return proc.stdout.strip()


class OlahServer:
    """`with OlahServer() as hub: sha = hub.add_repo("org/name", folder)`; then point
    huggingface_hub at `hub.endpoint` (see hub_env)."""

    def __init__(self, workdir: Path | None = None, start_timeout: float = 30.0) -> None:
        self._given_workdir = workdir
        self.start_timeout = start_timeout
        self.workdir: Path | None = None
        self.port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: Path | None = None

    # -------------------------------------------------------------- lifecycle

    @property
    def endpoint(self) -> str:
        if self.port is None:
            raise RuntimeError("OlahServer is not started")
        return f"http://127.0.0.1:{self.port}"

    @property
    def mirrors(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "mirrors"

    def log(self) -> str:
        if self._log_file is None or not self._log_file.exists():
            return ""
        return self._log_file.read_text(errors="replace")

    def _write_config(self, port: int) -> Path:
        assert self.workdir is not None
        config = self.workdir / "olah.toml"
        config.write_text(
            "[basic]\n"
            'host = "127.0.0.1"\n'
            f"port = {port}\n"
            'repos-path = "./repos"\n'
            'mirrors-path = ["./mirrors"]\n'
            'mirror-scheme = "http"\n'
            f'mirror-netloc = "127.0.0.1:{port}"\n'
            f'mirror-lfs-netloc = "127.0.0.1:{port}"\n'
            "[accessibility]\n"
            "offline = true\n"
        )
        return config

    def _answers(self) -> bool:
        # Any HTTP answer means the app is up (a probe for a missing repo answers 401).
        try:
            urllib.request.urlopen(f"{self.endpoint}/api/models/_/_/revision/main", timeout=2)
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False
        return True

    def start(self) -> OlahServer:
        binary = olah_binary()
        self.workdir = self._given_workdir or Path(tempfile.mkdtemp(prefix="crucible-olah-"))
        (self.workdir / "repos").mkdir(parents=True, exist_ok=True)
        (self.mirrors / "models").mkdir(parents=True, exist_ok=True)
        self._log_file = self.workdir / "olah.log"
        last_error = ""
        for _ in range(3):  # a port taken between probing and binding: try another
            self.port = free_port()
            config = self._write_config(self.port)
            with self._log_file.open("ab") as log:
                # cwd: olah resolves ./repos, ./mirrors and its ./logs against it.
                self._proc = subprocess.Popen(
                    [str(binary), "-c", str(config)],
                    cwd=self.workdir,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env={**os.environ, "NO_PROXY": "127.0.0.1,localhost"},
                    start_new_session=True,  # so stop() can end olah and its workers
                )
            deadline = time.monotonic() + self.start_timeout
            while time.monotonic() < deadline:
                if self._answers():
                    return self
                if self._proc.poll() is not None:
                    break
                time.sleep(0.2)
            last_error = self.log()[-4000:]
            exited = self._proc.poll() is not None
            self.stop(remove=False)
            if not exited:  # it ran but never answered: trying again will not help
                break
        self.stop()
        raise RuntimeError(
            f"olah did not answer within {self.start_timeout:.0f}s; its log:\n{last_error}"
        )

    def stop(self, remove: bool = True) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        if remove and self._given_workdir is None and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> OlahServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -------------------------------------------------------------- repos

    def repo_dir(self, repo_id: str) -> Path:
        org, sep, name = repo_id.partition("/")
        if not sep or not org or not name or "/" in name:
            raise ValueError(f"repo_id must be 'org/name', got {repo_id!r}")
        return self.mirrors / "models" / org / name

    def add_repo(self, repo_id: str, folder: Path, message: str = "upload") -> str:
        """Commit `folder`'s files as the new content of repo `repo_id` (created on first
        use, branch main, plain git, no LFS). Returns the commit sha."""
        folder = Path(folder)
        for path in folder.rglob("*"):
            size = path.stat().st_size if path.is_file() else 0
            if 120 < size < 150 and not _is_utf8(path):
                raise ValueError(
                    f"{path} is a {size}-byte binary file: olah 0.5.4 fails on binary files "
                    "of 121..149 bytes (it reads that size range as LFS pointers); pad it"
                )
        dest = self.repo_dir(repo_id)
        if not (dest / ".git").exists():
            dest.mkdir(parents=True, exist_ok=True)
            _git(dest, "init", "-q", "-b", "main")
        else:  # a new commit replaces the whole tree
            for entry in dest.iterdir():
                if entry.name != ".git":
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        shutil.copytree(folder, dest, dirs_exist_ok=True, symlinks=False)
        _git(dest, "add", "-A")
        _git(dest, "commit", "-q", "--allow-empty", "-m", message)
        return _git(dest, "rev-parse", "HEAD")

    def tag(self, repo_id: str, tag: str, commit: str = "HEAD") -> None:
        _git(self.repo_dir(repo_id), "tag", tag, commit)

    def branch(self, repo_id: str, branch: str, commit: str = "HEAD") -> None:
        _git(self.repo_dir(repo_id), "branch", branch, commit)


def _is_utf8(path: Path) -> bool:
    try:
        path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
