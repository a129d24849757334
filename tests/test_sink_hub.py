"""The hf:// sink against a FAKE of the Hub's write API (tests/support/fake_hub.py).

No Hub server can accept uploads here (olah, the Hub stand-in for downloads, is read-only),
so this is a contract test against a recorded-protocol fake: a real HTTP server implementing
the requests huggingface_hub 2.4 sends for create_repo, the README metadata check, preupload,
the LFS batch/upload/verify and the NDJSON commit, read from its source. Xet uploads are
turned off (huggingface_hub.constants.HF_HUB_DISABLE_XET), so the client uses LFS, which the
fake implements. The output is a real merge of tiny GPT-2 models; the fake stores what was
committed, so the test compares every file's sha256 with the local output.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from crucible.errors import CrucibleError
from crucible.pipeline import MergeOutcome, run_merge_job
from crucible.publish.hub_sink import publish_to_hub
from crucible.settings import Settings
from crucible.spec import MergeSpec
from tests.support.fake_hub import FakeHub
from tests.support.reporters import QuietReporter
from tests.support.tiny_models import make_gpt2_family

TOKEN = "hf_fake_write_token_0123456789"
REPO = "crucible-test/merged"


class Events(QuietReporter):
    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any] | None]] = []

    def event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        self.events.append((kind, message, data))


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, MergeOutcome]:
    root = tmp_path_factory.mktemp("hubsink")
    base, experts = make_gpt2_family(root / "models", n_experts=2, seed=3)
    spec = MergeSpec.model_validate(
        {
            "base": {"uri": base.as_uri()},
            "experts": [{"uri": e.as_uri(), "name": f"e{i}"} for i, e in enumerate(experts)],
            "method": {"name": "ties", "params": {"density": 0.5}},
            "output": {"uri": f"hf://{REPO}", "dtype": "float32"},
        }
    )
    settings = Settings(data_dir=root / "data", allowed_local_dirs=[root / "models"])
    outcome = run_merge_job(spec, root / "out", settings, QuietReporter())
    return root / "out", outcome


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    import huggingface_hub.constants

    with FakeHub(token=TOKEN) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
        yield server


def _settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", retry_attempts=3, retry_base_seconds=0.01)


def test_one_commit_with_every_file(
    hub: FakeHub, merged: tuple[Path, MergeOutcome], tmp_path: Path
) -> None:
    out, outcome = merged
    reporter = Events()
    uri = publish_to_hub(
        out,
        outcome.files,
        REPO,
        private=True,
        token=TOKEN,
        job_id="job_h1",
        settings=_settings(tmp_path),
        reporter=reporter,
    )
    assert uri == f"hf://{REPO}"
    repo = hub.repos[REPO]
    assert repo.private is True
    assert len(repo.commits) == 1
    assert hub.paths("POST").count(f"/api/models/{REPO}/commit/main") == 1
    assert sorted(repo.files) == sorted(f["path"] for f in outcome.files)
    for f in outcome.files:
        data = repo.files[f["path"]]
        assert hashlib.sha256(data).hexdigest() == f["sha256"]
        assert hashlib.sha256((out / f["path"]).read_bytes()).hexdigest() == f["sha256"]
    # Weights went through LFS (uploaded, then verified), small text files inline.
    weights = [f["path"] for f in outcome.files if f["path"].endswith(".safetensors")]
    assert weights and set(weights) <= repo.lfs_paths
    assert "config.json" in repo.files and "config.json" not in repo.lfs_paths
    assert any(p.startswith("/lfs/") for p in hub.paths("PUT"))
    assert "/lfs/verify" in hub.paths("POST")
    # The protocol's order: repo, metadata check, preupload, LFS, one commit.
    order = [p for p in hub.paths() if not p.startswith("/lfs/")]
    assert order[0] == "/api/repos/create"
    assert order[-1] == f"/api/models/{REPO}/commit/main"
    commit_event = [d for k, _, d in reporter.events if k == "published"]
    assert commit_event and commit_event[0]["commit"] == repo.commits[0]["oid"]

    # The model card's front matter and body, as committed.
    card = repo.files["README.md"].decode()
    front = yaml.safe_load(card[4:].split("\n---\n", 1)[0])
    assert front["tags"] == ["merge", "crucible", "ties"]
    assert front["library_name"] == "transformers"
    assert "base_model" not in front  # file:// inputs have no Hub id to name
    assert "## Method" in card and "| density | `0.5` |" in card
    assert "## Metrics" in card and "| merged_tensors |" in card
    assert "## Merge spec" in card and "hf://crucible-test/merged" in card


def test_republish_adds_no_commit(
    hub: FakeHub, merged: tuple[Path, MergeOutcome], tmp_path: Path
) -> None:
    out, outcome = merged
    kwargs: dict[str, Any] = {
        "private": True,
        "token": TOKEN,
        "job_id": "job_h2",
        "settings": _settings(tmp_path),
        "reporter": Events(),
    }
    publish_to_hub(out, outcome.files, REPO, **kwargs)
    first = hub.repos[REPO].commits[-1]["oid"]
    assert publish_to_hub(out, outcome.files, REPO, **kwargs) == f"hf://{REPO}"
    assert len(hub.repos[REPO].commits) == 1
    assert hub.repos[REPO].sha == first


def test_transient_commit_failure_is_retried(
    hub: FakeHub, merged: tuple[Path, MergeOutcome], tmp_path: Path
) -> None:
    out, outcome = merged
    hub.fail_commits = 1  # the first commit request answers 503
    publish_to_hub(
        out,
        outcome.files,
        "crucible-test/public",
        private=False,
        token=TOKEN,
        job_id="job_h3",
        settings=_settings(tmp_path),
        reporter=Events(),
    )
    repo = hub.repos["crucible-test/public"]
    assert repo.private is False
    assert len(repo.commits) == 1
    assert hub.paths("POST").count("/api/models/crucible-test/public/commit/main") == 2
    assert sorted(repo.files) == sorted(f["path"] for f in outcome.files)


@pytest.mark.parametrize("token", [None, "hf_wrong_token_value"])
def test_missing_or_wrong_token_fails_clearly(
    hub: FakeHub, merged: tuple[Path, MergeOutcome], tmp_path: Path, token: str | None
) -> None:
    out, outcome = merged
    with pytest.raises(CrucibleError) as err:
        publish_to_hub(
            out,
            outcome.files,
            "crucible-test/denied",
            private=True,
            token=token,
            job_id="job_h4",
            settings=_settings(tmp_path),
            reporter=Events(),
        )
    assert err.value.code == "publish_failed"
    assert "hf://crucible-test/denied" in err.value.message
    if token is None:
        assert "hub_token" in err.value.message
        assert hub.requests == []
    else:
        assert "HTTP 401" in err.value.message
        assert token not in json.dumps(err.value.as_dict())
    assert "crucible-test/denied" not in hub.repos


def test_publish_output_dispatches_hf_with_the_specs_privacy(
    hub: FakeHub, merged: tuple[Path, MergeOutcome], tmp_path: Path
) -> None:
    """The runner's one call: hf:// goes to the Hub sink with the job's token and the
    spec's output.private."""
    from crucible.publish.sinks import publish_output

    out, outcome = merged
    spec = MergeSpec.model_validate(
        {
            "base": {"uri": "hf://crucible-test/base"},
            "experts": [{"uri": "hf://crucible-test/expert"}],
            "method": {"name": "linear"},
            "output": {"uri": "hf://crucible-test/via-runner", "private": False},
        }
    )
    uri = publish_output(
        out, spec, "job_h5", _settings(tmp_path), Events(), hub_token=TOKEN, files=outcome.files
    )
    assert uri == "hf://crucible-test/via-runner"
    repo = hub.repos["crucible-test/via-runner"]
    assert repo.private is False and len(repo.commits) == 1
    assert {p: hashlib.sha256(d).hexdigest() for p, d in repo.files.items()} == {
        f["path"]: f["sha256"] for f in outcome.files
    }
