"""Write docs/api.md from openapi/openapi.json: endpoints, parameters, bodies, responses, a
curl example per endpoint, every schema, and the error codes (found in the source: the
literal codes of `ApiError(status, code, ...)` in service/ and of `CrucibleError(code, ...)`
and `code="..."` arguments in crucible/).

Deterministic (same JSON in, same bytes out), so tests/test_docs.py can check the doc is
up to date. Regenerate after `crucible openapi`:

    .venv/bin/python scripts/api_doc.py --write     # update docs/api.md
    .venv/bin/python scripts/api_doc.py --check     # exit 1 if docs/api.md is stale
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "openapi" / "openapi.json"
DOC = ROOT / "docs" / "api.md"
METHODS = ("get", "post", "put", "patch", "delete")
REF = "#/components/schemas/"
CODE = re.compile(r"[a-z][a-z0-9_]*")

# Request bodies shown in the curl examples, by schema name. Hand-written so the example is
# a request a person would send (a schema-derived one is valid but meaningless);
# tests/test_docs.py validates each against the pydantic model of that name.
EXAMPLE_BODIES: dict[str, Any] = {
    "MergeSpec": {
        "base": {"uri": "hf://org/base-model", "revision": "main"},
        "experts": [
            {"uri": "hf://org/legal-ft", "name": "legal"},
            {"uri": "hf://org/medical-ft", "revision": "v3", "weight": 0.7},
        ],
        "method": {"name": "ties", "params": {"density": 0.2}},
        "output": {"dtype": "bfloat16", "shard_size": "5GB"},
    },
}
# multipart/form-data fields shown in the curl examples, by path.
EXAMPLE_FORMS: dict[str, list[str]] = {
    "/v1/datasets": ["file=@legal-train.jsonl", "name=legal-train"],
}
# Shell variables standing for path parameters; `path` must not become $PATH.
PATH_VARS: dict[str, str] = {"path": "FILE_PATH"}


def cell(text: Any) -> str:
    """Text safe inside a Markdown table cell."""
    out = str(text).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")
    return re.sub(r"\s*\n\s*", " ", out).strip()


def ref_name(ref: str) -> str:
    return ref.removeprefix(REF)


def anchor(name: str) -> str:
    """GitHub's heading anchor for a schema heading `### Name`."""
    return re.sub(r"[^a-z0-9_-]", "", name.lower().replace(" ", "-"))


def link(name: str) -> str:
    return f"[{name}](#{anchor(name)})"


def type_of(schema: dict[str, Any]) -> str:
    """A short readable type for a JSON schema (Markdown; escape with cell() for tables)."""
    if "$ref" in schema:
        return link(ref_name(schema["$ref"]))
    for key in ("anyOf", "oneOf"):
        if key in schema:
            options = [o for o in schema[key] if o.get("type") != "null"]
            text = " or ".join(type_of(o) for o in options)
            return text + (" or null" if len(options) < len(schema[key]) else "")
    if "const" in schema:
        return f"`{json.dumps(schema['const'])}`"
    if "enum" in schema:
        return "one of " + ", ".join(f"`{v}`" for v in schema["enum"])
    kind = schema.get("type")
    if kind == "array":
        return "array of " + type_of(schema.get("items", {}))
    if kind == "object":
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict) and extra:
            return "object of " + type_of(extra)
        return "object"
    if isinstance(kind, list):
        return " or ".join(kind)
    if kind == "string" and "format" in schema:
        return f"string ({schema['format']})"
    return kind or "any"


def constraints(schema: dict[str, Any]) -> str:
    marks = {
        "minimum": "≥ {}",
        "exclusiveMinimum": "> {}",
        "maximum": "≤ {}",
        "exclusiveMaximum": "< {}",
        "minLength": "length ≥ {}",
        "maxLength": "length ≤ {}",
        "minItems": "≥ {} items",
        "maxItems": "≤ {} items",
        "pattern": "matches `{}`",
    }
    found = [fmt.format(schema[k]) for k, fmt in marks.items() if k in schema]
    for option in schema.get("anyOf", []):
        found += [fmt.format(option[k]) for k, fmt in marks.items() if k in option]
    return ", ".join(found)


def describe(schema: dict[str, Any]) -> str:
    parts = [schema.get("description", "")]
    limits = constraints(schema)
    if limits:
        parts.append(f"({limits})")
    return " ".join(p for p in parts if p)


def default_of(schema: dict[str, Any]) -> str:
    return f"`{json.dumps(schema['default'])}`" if "default" in schema else ""


class Spec:
    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data
        self.schemas: dict[str, Any] = data.get("components", {}).get("schemas", {})

    def resolve(self, schema: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in schema:
            schema = self.schemas[ref_name(schema["$ref"])]
        return schema

    def example(self, schema: dict[str, Any], depth: int = 0) -> Any:
        """A deterministic example value: the curated one, else built from the schema."""
        if "$ref" in schema and ref_name(schema["$ref"]) in EXAMPLE_BODIES:
            return EXAMPLE_BODIES[ref_name(schema["$ref"])]
        schema = self.resolve(schema)
        if depth > 6:
            return None
        if "default" in schema:
            return schema["default"]
        if "const" in schema:
            return schema["const"]
        if "enum" in schema:
            return schema["enum"][0]
        for key in ("anyOf", "oneOf"):
            if key in schema:
                options = [o for o in schema[key] if o.get("type") != "null"]
                return self.example(options[0], depth + 1) if options else None
        kind = schema.get("type")
        if kind == "object":
            props = schema.get("properties", {})
            return {k: self.example(props[k], depth + 1) for k in schema.get("required", [])}
        if kind == "array":
            count = max(1, schema.get("minItems", 1))
            return [self.example(schema.get("items", {}), depth + 1)] * count
        if kind == "integer":
            return schema.get("minimum", 0)
        if kind == "number":
            return schema.get("minimum", 0.0)
        if kind == "boolean":
            return False
        return "string"


def _calls(folder: str) -> list[tuple[ast.Call, str, set[str]]]:
    """Every call in folder's modules, with the module path and the names of the classes
    in that module that derive from CrucibleError."""
    out = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        tree = ast.parse(path.read_text())
        rel = path.relative_to(ROOT).as_posix()
        subclasses = {
            node.name
            for node in ast.walk(tree)
            if isinstance(node, ast.ClassDef)
            and any(_name(b) == "CrucibleError" for b in node.bases)
        }
        out += [(n, rel, subclasses) for n in ast.walk(tree) if isinstance(n, ast.Call)]
        for node in ast.walk(tree):
            # super().__init__("code", ...) inside a CrucibleError subclass.
            if isinstance(node, ast.ClassDef) and node.name in subclasses:
                out += [
                    (n, rel, {"__init__"})
                    for n in ast.walk(node)
                    if isinstance(n, ast.Call) and _name(n.func) == "__init__"
                ]
    return out


def _name(node: ast.AST) -> str | None:
    return getattr(node, "id", None) or getattr(node, "attr", None)


def _literal(node: ast.AST, kind: type) -> Any:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, kind) else None


def error_codes() -> tuple[dict[tuple[int, str], set[str]], dict[str, set[str]]]:
    """({(status, code): modules} of API answers, {code: modules} of failed jobs)."""
    api: dict[tuple[int, str], set[str]] = {}
    for call, module, _ in _calls("service"):
        if _name(call.func) == "ApiError" and len(call.args) >= 2:
            status, code = _literal(call.args[0], int), _literal(call.args[1], str)
            if status is not None and code:
                api.setdefault((status, code), set()).add(module)
    jobs: dict[str, set[str]] = {}
    for call, module, extra in _calls("crucible"):
        codes = []
        if _name(call.func) in {"CrucibleError", *extra} and call.args:
            codes.append(_literal(call.args[0], str))
        codes += [_literal(k.value, str) for k in call.keywords if k.arg == "code"]
        for code in codes:
            if code and CODE.fullmatch(code):
                jobs.setdefault(code, set()).add(module)
    return api, jobs


def render_error_codes() -> list[str]:
    api, jobs = error_codes()
    out = [
        "## Error codes",
        "",
        "Collected from the source by scripts/api_doc.py (literal codes only).",
        "",
        "### Answers of the API",
        "",
        "| status | `error.code` | raised in |",
        "|---|---|---|",
    ]
    for (status, code), modules in sorted(api.items()):
        out.append(f"| {status} | `{code}` | {', '.join(sorted(modules))} |")
    out += [
        "",
        "Other statuses use a generic code (`not_found`, `method_not_allowed`, ...), and a",
        "request that fails validation is `invalid_request` with `detail` listing each field.",
        "",
        "### Failed jobs",
        "",
        "A job that fails has `status: failed` and `error: {code, message, detail}`; the",
        "message names the repository, revision, tensor or limit at fault.",
        "",
        "| `error.code` | raised in |",
        "|---|---|",
    ]
    for code, modules in sorted(jobs.items()):
        out.append(f"| `{code}` | {', '.join(sorted(modules))} |")
    out.append("")
    return out


def operations(spec: Spec) -> list[tuple[str, str, str, dict[str, Any]]]:
    """(tag, method, path, operation), by tag, then path, then method."""
    ops = []
    for path, item in spec.data.get("paths", {}).items():
        for method in METHODS:
            if method in item:
                op = item[method]
                ops.append(((op.get("tags") or ["other"])[0], method, path, op))
    return sorted(ops, key=lambda o: (o[0], o[2], METHODS.index(o[1])))


def curl(spec: Spec, method: str, path: str, op: dict[str, Any]) -> str:
    url_path = re.sub(r"\{([^}]+)\}", lambda m: "$" + PATH_VARS.get(m[1], m[1].upper()), path)
    query = []
    headers = []
    for param in op.get("parameters", []):
        schema = param.get("schema", {})
        if param["in"] == "query":
            value = spec.example(schema)
            if param.get("required") or "default" in schema:
                query.append(f"{param['name']}={value}")
        elif param["in"] == "header":
            name = "-".join(w.capitalize() for w in param["name"].split("-"))
            headers.append(f"{name}: ${param['name'].upper().replace('-', '_')}")
    url = f"$URL{url_path}" + ("?" + "&".join(query) if query else "")
    lines = ["curl -sS" + ("" if method == "get" else f" -X {method.upper()}") + f' "{url}"']
    if op.get("security"):
        lines.append('-H "Authorization: Bearer $KEY"')
    lines += [f'-H "{h}"' for h in headers]
    streams = any(
        "text/event-stream" in r.get("content", {}) for r in op.get("responses", {}).values()
    )
    if streams:
        lines[0] = lines[0].replace("curl -sS", "curl -sSN")
        lines.append('-H "Accept: text/event-stream"')
    content = op.get("requestBody", {}).get("content", {})
    if "application/json" in content:
        body = spec.example(content["application/json"].get("schema", {}))
        lines.append('-H "Content-Type: application/json"')
        lines.append(f"-d '{json.dumps(body)}'")
    elif "multipart/form-data" in content:
        form = EXAMPLE_FORMS.get(path)
        if form is None:
            schema = spec.resolve(content["multipart/form-data"].get("schema", {}))
            props = schema.get("properties", {})
            form = [
                f"{k}=@{k}"
                if props[k].get("format") == "binary"
                else f"{k}={spec.example(props[k])}"
                for k in schema.get("required", [])
            ]
        lines += [f"-F {f}" for f in form]
    return " \\\n  ".join(lines)


def body_of(content: dict[str, Any]) -> str:
    if not content:
        return ""
    parts = []
    for media, spec in sorted(content.items()):
        schema = spec.get("schema", {})
        parts.append(f"`{media}`" + (f" {type_of(schema)}" if schema else ""))
    return "; ".join(parts)


def render_operation(spec: Spec, method: str, path: str, op: dict[str, Any]) -> list[str]:
    out = [f"### `{method.upper()} {path}`", ""]
    summary = op.get("summary", "")
    description = op.get("description", "").strip()
    out.append(f"**{summary}.** {description}".strip() if summary else description)
    out.append("")
    out.append("Auth: `Authorization: Bearer <key>`." if op.get("security") else "Auth: none.")
    out.append("")
    params = op.get("parameters", [])
    if params:
        out += [
            "| parameter | in | type | required | default | description |",
            "|---|---|---|---|---|---|",
        ]
        for p in params:
            schema = p.get("schema", {})
            out.append(
                f"| `{p['name']}` | {p['in']} | {cell(type_of(schema))} | "
                f"{'yes' if p.get('required') else 'no'} | {cell(default_of(schema))} | "
                f"{cell(describe(p) or describe(schema))} |"
            )
        out.append("")
    body = op.get("requestBody")
    if body:
        content = body.get("content", {})
        out.append(
            f"Request body{' (required)' if body.get('required') else ''}: {body_of(content)}"
        )
        out.append("")
        form = content.get("multipart/form-data", {}).get("schema")
        if form:
            out += render_properties(spec.resolve(form))
    out += ["| status | meaning | body |", "|---|---|---|"]
    for status, response in sorted(op.get("responses", {}).items()):
        out.append(
            f"| {status} | {cell(response.get('description', ''))} | "
            f"{cell(body_of(response.get('content', {})))} |"
        )
    out += ["", "```bash", curl(spec, method, path, op), "```", ""]
    return out


def render_properties(schema: dict[str, Any]) -> list[str]:
    props = schema.get("properties", {})
    if not props:
        return []
    required = set(schema.get("required", []))
    out = ["| field | type | required | default | description |", "|---|---|---|---|---|"]
    for name in sorted(props, key=lambda n: (n not in required, n)):
        p = props[name]
        out.append(
            f"| `{name}` | {cell(type_of(p))} | {'yes' if name in required else 'no'} | "
            f"{cell(default_of(p))} | {cell(describe(p))} |"
        )
    out.append("")
    return out


def render_schema(name: str, schema: dict[str, Any]) -> list[str]:
    out = [f"### {name}", ""]
    if schema.get("description"):
        out += [schema["description"].strip(), ""]
    if "oneOf" in schema or "anyOf" in schema:
        out += [f"One of: {type_of(schema)}.", ""]
    elif "enum" in schema:
        out += [f"{type_of(schema).capitalize()}.", ""]
    if schema.get("discriminator"):
        out += [f"Chosen by the `{schema['discriminator']['propertyName']}` field.", ""]
    out += render_properties(schema)
    extra = schema.get("additionalProperties")
    if extra is False:
        out += ["No other fields are accepted.", ""]
    return out


def render(data: dict[str, Any]) -> str:
    spec = Spec(data)
    info = data.get("info", {})
    ops = operations(spec)
    out = [
        f"# {info.get('title', 'API')} HTTP API (version {info.get('version', '?')})",
        "",
        "<!-- Generated by scripts/api_doc.py from openapi/openapi.json; do not edit by hand. -->",
        "",
        info.get("description", "").strip(),
        "",
        "The examples assume `URL=http://localhost:8000` and `KEY` holding an API key",
        "(`crucible keys create --tenant <tenant>` prints one). Identifiers in paths",
        "(`$JOB_ID`, `$DATASET_ID`, ...) come from earlier answers.",
        "",
        'Every answer that is not 2xx has one shape, `{"error": {"code": "...", '
        '"message": "...", "detail": ...}}`;',
        "a request that fails validation is a 422 whose message names the field at fault.",
        "",
        "## Endpoints",
        "",
        "| method | path | summary | auth |",
        "|---|---|---|---|",
    ]
    for _, method, path, op in ops:
        out.append(
            f"| {method.upper()} | `{path}` | {cell(op.get('summary', ''))} | "
            f"{'Bearer' if op.get('security') else 'none'} |"
        )
    out.append("")
    current = None
    for tag, method, path, op in ops:
        if tag != current:
            out += [f"## {tag.capitalize()}", ""]
            current = tag
        out += render_operation(spec, method, path, op)
    out += render_error_codes()
    out += ["## Schemas", ""]
    for name in sorted(spec.schemas):
        out += render_schema(name, spec.schemas[name])
    return "\n".join(out).rstrip() + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help=f"write {DOC.relative_to(ROOT)}")
    mode.add_argument("--check", action="store_true", help="exit 1 if the doc is stale")
    args = parser.parse_args()
    text = render(json.loads(SPEC.read_text()))
    if args.check:
        if not DOC.exists() or DOC.read_text() != text:
            print(
                f"{DOC.relative_to(ROOT)} is stale; "
                "run `.venv/bin/python scripts/api_doc.py --write`",
                file=sys.stderr,
            )
            return 1
        return 0
    if args.write:
        DOC.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
