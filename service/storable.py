"""Request strings the job store can hold.

PostgreSQL text and JSONB cannot hold a NUL character, and a lone surrogate (which a JSON
"\\ud800" escape decodes to) cannot be encoded as UTF-8: either one reaching the database is
a DataError, i.e. a 500. Requests carrying them are refused here with a 4xx instead.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Path

# Ids never contain NUL; a path parameter with one is a 422, not a database error.
NO_NUL = r"^[^\x00]*$"
PathId = Annotated[str, Path(pattern=NO_NUL)]


def storable(text: str) -> bool:
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate
        return False
    return True


def first_unstorable(doc: Any, field: str) -> str | None:
    """The dotted field of the first string in `doc` (a key or a value, at any depth) that
    the store cannot hold, or None."""
    if isinstance(doc, str):
        return None if storable(doc) else field
    items: Any = ()
    if isinstance(doc, dict):
        items = doc.items()
    elif isinstance(doc, list | tuple):
        items = enumerate(doc)
    for key, value in items:
        sub = f"{field}.{key}"
        if isinstance(key, str) and not storable(key):
            return sub
        found = first_unstorable(value, sub)
        if found is not None:
            return found
    return None


UNSTORABLE_MESSAGE = "NUL characters and unpaired surrogates are not allowed"
