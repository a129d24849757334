"""The generated docs are up to date and say what they should.

docs/api.md comes from openapi/openapi.json (scripts/api_doc.py) and the settings table of
docs/operations.md from crucible/settings.py (scripts/settings_table.py); both scripts are
deterministic, so a stale doc is a byte difference.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from crucible import spec as spec_models
from crucible.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
API_DOC = ROOT / "docs" / "api.md"
OPERATIONS = ROOT / "docs" / "operations.md"


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        f"scripts_{name}", ROOT / "scripts" / f"{name}.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[f"scripts_{name}"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run_check(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, f"scripts/{script}.py", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )


def test_api_doc_is_up_to_date() -> None:
    done = run_check("api_doc")
    assert done.returncode == 0, done.stderr


def test_settings_table_is_up_to_date() -> None:
    done = run_check("settings_table")
    assert done.returncode == 0, done.stderr


def test_every_endpoint_has_a_section_and_a_curl_example() -> None:
    openapi = json.loads((ROOT / "openapi" / "openapi.json").read_text())
    text = API_DOC.read_text()
    sections = re.split(r"^### ", text, flags=re.M)
    by_heading = {s.splitlines()[0]: s for s in sections[1:]}
    count = 0
    for path, item in openapi["paths"].items():
        for method, op in item.items():
            count += 1
            section = by_heading.get(f"`{method.upper()} {path}`")
            assert section, f"no section for {method.upper()} {path}"
            assert re.search(r"```bash\ncurl -sS", section), f"no curl for {method} {path}"
            for status in op["responses"]:
                assert re.search(rf"^\| {status} \|", section, re.M), (method, path, status)
            if op.get("security"):
                assert "Authorization: Bearer $KEY" in section
    assert count >= 10


def test_schema_links_resolve() -> None:
    text = API_DOC.read_text()
    headings = {m.lower() for m in re.findall(r"^### (\w+)$", text, re.M)}
    links = set(re.findall(r"\]\(#([a-z0-9_-]+)\)", text))
    assert links and links <= headings, sorted(links - headings)


def test_curated_request_bodies_are_valid_requests() -> None:
    """The hand-written examples in scripts/api_doc.py validate against the real models, so a
    change to the contract cannot leave a broken example in the doc."""
    api_doc = load_script("api_doc")
    assert api_doc.EXAMPLE_BODIES
    for name, body in api_doc.EXAMPLE_BODIES.items():
        model = getattr(spec_models, name)
        model.model_validate(body)
        assert json.dumps(body) in API_DOC.read_text()


def test_generated_curl_example_has_a_path_variable_per_parameter() -> None:
    api_doc = load_script("api_doc")
    spec = api_doc.Spec({"paths": {}, "components": {"schemas": {}}})
    op = {
        "parameters": [
            {"in": "path", "name": "job_id", "required": True, "schema": {"type": "string"}},
            {"in": "path", "name": "path", "required": True, "schema": {"type": "string"}},
            {"in": "query", "name": "limit", "schema": {"type": "integer", "default": 50}},
        ],
        "security": [{"HTTPBearer": []}],
        "responses": {"200": {}},
    }
    example = api_doc.curl(spec, "get", "/v1/merges/{job_id}/files/{path}", op)
    # `path` must not become $PATH, the shell's search path.
    assert '"$URL/v1/merges/$JOB_ID/files/$FILE_PATH?limit=50"' in example
    assert "Authorization: Bearer $KEY" in example


def test_settings_table_lists_every_setting_once() -> None:
    table = load_script("settings_table")
    names = [n for section in table.parse_sections() for row in section.rows for n in row.names]
    assert sorted(names) == sorted(Settings.model_fields)
    text = OPERATIONS.read_text()
    for name in Settings.model_fields:
        assert text.count(f"`CRUCIBLE_{name.upper()}`") >= 1, name


@pytest.mark.parametrize(
    ("variable", "default", "words"),
    [
        ("CRUCIBLE_VISIBILITY_TIMEOUT_SECONDS", "`43200` (12 h)", "longer than the longest job"),
        ("CRUCIBLE_MAX_DATASET_BYTES", "`104857600` (100 MiB)", "largest upload"),
        ("CRUCIBLE_DEVICE", "`auto`", "merge math"),
    ],
)
def test_settings_table_rows_carry_default_and_meaning(
    variable: str, default: str, words: str
) -> None:
    row = next(
        line
        for line in OPERATIONS.read_text().splitlines()
        if f"`{variable}`" in line and line.startswith("|")
    )
    assert default in row and words in row, row
