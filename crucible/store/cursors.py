"""Record ids that sort in creation order, and the opaque cursors of paged listings."""

from __future__ import annotations

import base64
import re
import secrets
import threading
import time

JOB_ID = re.compile(r"job_[0-9a-f]{24}")


class _SortableIds:
    """12 hex of Unix milliseconds + 12 hex of randomness.

    Ids sort in creation order across processes to the millisecond; within one process the
    random part counts up inside a millisecond so that ids made back to back still sort.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = (0, 0)

    def new(self) -> str:
        with self._lock:
            ms = time.time_ns() // 1_000_000
            last_ms, last_rand = self._last
            if ms <= last_ms:
                ms, rand = last_ms, last_rand + 1
                if rand >= 1 << 48:
                    ms, rand = ms + 1, secrets.randbits(47)
            else:
                # 47 bits leave headroom to count up within the millisecond.
                rand = secrets.randbits(47)
            self._last = (ms, rand)
        return f"{ms:012x}{rand:012x}"


_ids = _SortableIds()


def new_sortable_id() -> str:
    """24 lowercase hex characters; prefix it with the record kind."""
    return _ids.new()


def new_job_id() -> str:
    return "job_" + new_sortable_id()


def encode_cursor(record_id: str) -> str:
    return base64.urlsafe_b64encode(record_id.encode()).rstrip(b"=").decode()


def decode_cursor(cursor: str, pattern: re.Pattern[str] = JOB_ID) -> str:
    """The id inside a cursor; ValueError for anything we did not hand out."""
    try:
        raw = cursor.encode("ascii")
        record_id = base64.b64decode(raw + b"=" * (-len(raw) % 4), altchars=b"-_", validate=True)
        decoded = record_id.decode("ascii")
    except ValueError as exc:  # binascii.Error and Unicode errors are ValueErrors
        raise ValueError("malformed cursor") from exc
    if not pattern.fullmatch(decoded):
        raise ValueError("malformed cursor")
    return decoded
