"""The `changes` of the snapshot messages: which of an image's keypoints (or bounding boxes) were added,
modified and removed since the previous snapshot a client was sent.

Pure functions (`diff`, `merge`, `apply`) and `Delta`, what a message carries. A shared image listener
(`watches.SharedListeners`) computes one `Delta` per store snapshot, encoded once however many sessions
and clients it goes to; when a slow client's snapshots coalesce (`clients.Client`), the pending message's
delta and the newer one are merged (`Delta.then`) and only that message is encoded again. A delta whose
JSON is larger than its cap (`MAX_SNAPSHOT_CHANGES_BYTES`) is sent as `null`: "re-fetch".
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any, NamedTuple

from .protocol import Coalescible, rfc3339

Data = dict[str, Any]


class Changes(NamedTuple):
    """Documents added and modified (ID → fields) and removed (IDs) between two snapshots of one query.

    A document ID is in at most one of the three.
    """

    added: Mapping[str, Data]
    modified: Mapping[str, Data]
    removed: tuple[str, ...]

    def __bool__(self) -> bool:
        return bool(self.added or self.modified or self.removed)


NO_CHANGES = Changes({}, {}, ())


def diff(before: Mapping[str, Data], after: Mapping[str, Data]) -> Changes:
    """What turns the documents `before` into `after`. A document delivered again unchanged is usually the
    same object (the Firestore store decodes only what changed), so identity is checked before equality."""
    added: dict[str, Data] = {}
    modified: dict[str, Data] = {}
    for doc_id, data in after.items():
        old = before.get(doc_id)
        if old is None:
            added[doc_id] = data
        elif old is not data and old != data:
            modified[doc_id] = data
    removed = tuple(doc_id for doc_id in before if doc_id not in after) if len(after) - len(added) < len(before) \
        else ()
    return Changes(added, modified, removed)


def everything(documents: Mapping[str, Data]) -> Changes:
    """Every document as added: what a client that has none is sent."""
    return Changes(dict(documents), {}, ())


def merge(first: Changes, then: Changes) -> Changes:
    """The changes of `first` followed by `then`, as one: a document added then removed is not mentioned,
    added then modified is added (with its last fields), modified then removed is removed, removed then added
    is modified; otherwise the later change of a document wins."""
    if not first:
        return then
    if not then:
        return first
    added = dict(first.added)
    modified = dict(first.modified)
    removed = dict.fromkeys(first.removed)
    for doc_id, data in then.added.items():
        if doc_id in removed:  # removed, then added again
            del removed[doc_id]
            modified[doc_id] = data
        elif doc_id in modified:  # (not from a consistent sequence) the document is there: modified
            modified[doc_id] = data
        else:
            added[doc_id] = data
    for doc_id, data in then.modified.items():
        if doc_id in added:
            added[doc_id] = data
        else:
            removed.pop(doc_id, None)
            modified[doc_id] = data
    for doc_id in then.removed:
        if added.pop(doc_id, None) is None:  # added, then removed: never there as far as the client knows
            modified.pop(doc_id, None)
            removed[doc_id] = None
    return Changes(added, modified, tuple(removed))


def apply(documents: Mapping[str, Data], changes: Changes) -> dict[str, Data]:
    """`documents` with `changes` applied: what a client does with its copy of the image's documents."""
    result = dict(documents)
    for doc_id in changes.removed:
        result.pop(doc_id, None)
    result.update(changes.added)
    result.update(changes.modified)
    return result


def _jsonable(value: Any) -> Any:
    """A Firestore value that JSON has no type for: timestamps as the service writes times for REST
    (RFC 3339 UTC with a `Z`, microseconds), bytes in base64, geopoints as latitude and longitude, references
    as their path."""
    if isinstance(value, datetime):
        return rfc3339(value, "microseconds")
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if hasattr(value, "latitude") and hasattr(value, "longitude"):
        return {"latitude": value.latitude, "longitude": value.longitude}
    path = getattr(value, "path", None)
    if isinstance(path, str):
        return path
    raise TypeError(f"{type(value).__name__} is not JSON")


def _documents(documents: Mapping[str, Data]) -> list[dict[str, Any]]:
    return [{"id": doc_id, "data": data} for doc_id, data in documents.items()]


def encode(changes: Changes, reset: bool = False) -> str | None:
    """The JSON of `changes` (`{"reset", "added", "modified", "removed"}`, documents as `{"id", "data"}`), or
    None if a value cannot be JSON (NaN, which browsers' JSON.parse refuses, or an unknown type)."""
    body = {"reset": reset, "added": _documents(changes.added), "modified": _documents(changes.modified),
            "removed": list(changes.removed)}
    try:
        return json.dumps(body, separators=(",", ":"), default=_jsonable, allow_nan=False)
    except (TypeError, ValueError):
        return None


class Delta(Coalescible):
    """The `changes` field of one snapshot message, encoded once (`json`).

    `changes` is None when the message says `null` (larger than `limit` bytes as JSON, or not JSON): the
    client re-fetches. `reset` marks the first message of a watch: its `added` lists every document and the
    client replaces its copy (set at `setImageID`; a newer reset replaces a pending message instead of being
    merged into it, so an earlier image's changes never reach a client with the next image's).
    """

    __slots__ = ("changes", "limit", "reset")

    def __init__(self, changes: Changes | None, limit: int, reset: bool = False) -> None:
        text = None if changes is None else encode(changes, reset)
        if text is None or len(text) > limit:  # ASCII (json.dumps escapes the rest): characters are bytes
            changes, text = None, "null"
        self.changes = changes
        self.limit = limit
        self.reset = reset
        self.json = text

    def then(self, newer: Delta) -> Delta:
        """This delta followed by `newer`, as one message says it (encoded again, capped by `newer.limit`)."""
        if newer.reset:
            return newer
        if self.changes is None or newer.changes is None:  # merging with a null is null
            return newer if newer.changes is None else Delta(None, newer.limit)
        return Delta(merge(self.changes, newer.changes), newer.limit, self.reset)

    def __repr__(self) -> str:
        return f"Delta({self.json})"
