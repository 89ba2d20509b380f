"""Tombstones: request ids cancelled before they arrived, so a late arrival is dropped.

A cancelled request's cleanup and its still-in-flight handoff call race (the
router cannot take back a call it already sent). Whichever comes second must
win: a free that finds nothing leaves a tombstone; an arrival that finds a
tombstone frees what it brought and consumes it. The set is bounded (oldest
dropped first): a tombstone only has to outlive the race, a few calls.
"""

from __future__ import annotations

from collections import OrderedDict

MAX_TOMBSTONES = 4096


class Tombstones:
    def __init__(self, limit: int = MAX_TOMBSTONES):
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._limit = limit

    def add(self, request_id: str) -> None:
        self._ids[request_id] = None
        while len(self._ids) > self._limit:
            self._ids.popitem(last=False)

    def consume(self, request_id: str) -> bool:
        """True (and forgotten) when ``request_id`` was cancelled before it arrived."""
        return self._ids.pop(request_id, 0) is None

    def __len__(self) -> int:
        return len(self._ids)
