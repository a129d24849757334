"""Print the settings table of docs/operations.md from crucible/settings.py.

Names, types and defaults come from the `Settings` model; the meaning from each field's
`description` and from the comment block above it in the source. Consecutive fields under
one comment (no blank line, no comment or description of their own) share a row; a comment
opening with `--- Title.` starts a section.

    .venv/bin/python scripts/settings_table.py            # print the table
    .venv/bin/python scripts/settings_table.py --write    # update docs/operations.md
    .venv/bin/python scripts/settings_table.py --check    # exit 1 if the doc is stale
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import SecretStr
from pydantic_core import PydanticUndefined

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from crucible import settings as settings_module  # noqa: E402
from crucible.settings import Settings  # noqa: E402

DOC = ROOT / "docs" / "operations.md"
BEGIN = "<!-- settings-table:begin (scripts/settings_table.py --write) -->"
END = "<!-- settings-table:end -->"
SECTION = re.compile(r"^---\s*(?P<title>[^.;:]+)[.;:]?\s*(?P<rest>.*)$")
ISSUE_TAG = re.compile(r"\s*\(issue[^)]*\)")


@dataclass
class Row:
    names: list[str] = field(default_factory=list)
    comment: str = ""
    descriptions: dict[str, str] = field(default_factory=dict)
    # Opened by a `--- Title.` comment, whose text speaks for the fields under it.
    opens_section: bool = False

    def shares(self, name: str) -> bool:
        """Whether an undocumented field right below this row belongs to it: the row opens
        a section, or the field has the first field's prefix (retry_*), or the comment
        names it."""
        prefix = self.names[0].split("_")[0]
        return self.opens_section or name.split("_")[0] == prefix or name in self.comment

    def meaning(self) -> str:
        text = self.comment
        if re.match(r"[a-z]+ ", text):  # a section's rest of sentence ("each exceeded ...")
            text = text[:1].upper() + text[1:]
        parts = [text] if text else []
        for name, text in self.descriptions.items():
            parts.append(text if len(self.names) == 1 else f"`{env(name)}`: {text}")
        return " ".join(parts)


@dataclass
class Section:
    title: str
    intro: str = ""
    rows: list[Row] = field(default_factory=list)


def comment_above(lines: list[str], lineno: int) -> list[str]:
    """The contiguous `#` lines right above 1-based line `lineno`, text only."""
    out: list[str] = []
    i = lineno - 2
    while i >= 0 and lines[i].strip().startswith("#"):
        out.insert(0, lines[i].strip().lstrip("#").strip())
        i -= 1
    return out


def parse_sections() -> list[Section]:
    source = inspect.getsource(settings_module)
    lines = source.splitlines()
    cls = next(
        n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == "Settings"
    )
    sections = [Section("General")]
    prev_end: int | None = None
    for stmt in cls.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            prev_end = None
            continue
        name = stmt.target.id
        if name not in Settings.model_fields:
            continue
        comment = " ".join(comment_above(lines, stmt.lineno))
        description = Settings.model_fields[name].description or ""
        header = comment.startswith("---")
        if header:
            match = SECTION.match(comment)
            title = ISSUE_TAG.sub("", match["title"]).strip() if match else comment
            sections.append(Section(title))
            comment = match["rest"].strip() if match else ""
        section = sections[-1]
        adjacent = prev_end is not None and stmt.lineno == prev_end + 1
        joins = (
            adjacent
            and not (header or comment or description)
            and bool(section.rows)
            and section.rows[-1].shares(name)
        )
        if not joins:
            section.rows.append(Row(comment=comment, opens_section=header))
        row = section.rows[-1]
        row.names.append(name)
        if description:
            row.descriptions[name] = description
        prev_end = stmt.end_lineno
    return [s for s in sections if s.rows]


def env(name: str) -> str:
    return f"{Settings.model_config.get('env_prefix', '')}{name}".upper()


def human_bytes(n: int) -> str:
    for unit, size in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} B"


def human_seconds(s: float) -> str:
    for unit, size in (("h", 3600), ("min", 60)):
        if s >= size and s % size == 0:
            return f"{int(s // size)} {unit}"
    return ""


def default_text(name: str) -> str:
    info = Settings.model_fields[name]
    value: Any = info.default
    if value is PydanticUndefined and info.default_factory is not None:
        value = info.default_factory()  # type: ignore[call-arg]
    if value is None or isinstance(value, SecretStr):
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, list):
        return f"`{json.dumps([str(v) for v in value])}`"
    if isinstance(value, Path):
        return f"`{value}`"
    if isinstance(value, int | float):
        text = f"{value:g}" if isinstance(value, float) else str(value)
        extra = ""
        if "_bytes" in name and isinstance(value, int):
            extra = human_bytes(value)
        elif name.endswith("_seconds"):
            extra = human_seconds(value)
        return f"`{text}`" + (f" ({extra})" if extra and extra != f"{text} B" else "")
    return f"`{value}`"


def type_text(name: str) -> str:
    annotation = Settings.model_fields[name].annotation
    text = getattr(annotation, "__name__", None) or str(annotation)
    text = str(annotation) if "[" in str(annotation) or "|" in str(annotation) else text
    text = text.replace("typing.", "").replace("pathlib.", "").replace("pydantic.types.", "")
    text = re.sub(r"\s*\|\s*None$", "", text)
    literal = re.fullmatch(r"Literal\[(.*)\]", text)
    if literal:
        text = " / ".join(v.strip().strip("'\"") for v in literal.group(1).split(","))
    if text.startswith("list["):
        text = f"JSON {text}"
    return text


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;").strip()


def render() -> str:
    out: list[str] = []
    for section in parse_sections():
        out.append(f"#### {section.title}\n")
        out.append("| variable | type | default | meaning |")
        out.append("|---|---|---|---|")
        for row in section.rows:
            names = "<br>".join(f"`{env(n)}`" for n in row.names)
            types = "<br>".join(cell(type_text(n)) for n in row.names)
            defaults = "<br>".join(cell(default_text(n)) for n in row.names)
            meaning = cell(row.meaning()) or "(no description in crucible/settings.py)"
            out.append(f"| {names} | {types} | {defaults} | {meaning} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def splice(doc: str, table: str) -> str:
    start, end = doc.index(BEGIN) + len(BEGIN), doc.index(END)
    return doc[:start] + "\n" + table + doc[end:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help=f"update {DOC.relative_to(ROOT)}")
    mode.add_argument("--check", action="store_true", help="exit 1 if the doc is stale")
    args = parser.parse_args()
    table = render()
    if not (args.write or args.check):
        sys.stdout.write(table)
        return 0
    doc = DOC.read_text()
    fresh = splice(doc, table)
    if args.check:
        if fresh != doc:
            print(
                f"{DOC.relative_to(ROOT)}: settings table is stale; run "
                "`.venv/bin/python scripts/settings_table.py --write`",
                file=sys.stderr,
            )
            return 1
        return 0
    DOC.write_text(fresh)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
