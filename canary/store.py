"""The storage interface the session logic talks to, shaped after Firestore.

Documents live in collections and are plain dicts. Uniqueness is decided by
existence preconditions (`create` fails with `AlreadyExists`), and
read-check-write by transactions: both hold on real Firestore and on the
in-memory store. Watches deliver the query's (or document's) current state
first, then every change, possibly from another OS thread.
"""

from __future__ import annotations

import secrets
import string
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

T = TypeVar("T")
Data = dict[str, Any]

# Collections, named as the other Canary services name them.
PROJECTS = "projects"
BATCHES = "batches"
USERS = "users"
SESSIONS = "sessions"
KEYPOINTS = "keypoints"
BOUNDING_BOXES = "boundingBoxes"
#: This service's own: one document per batch with a live session, ID = batch ID.
#: Its `create` is what makes "one live session per batch" atomic.
SESSION_LOCKS = "sessionLocks"
#: This service's own: one document per connected (or recently connected) client,
#: ID `<sessionID>_<userID>`, saying which process holds it or since when it is away.
SESSION_PRESENCE = "sessionPresence"
#: This service's own: one document per running process, with the lease it renews.
PROCESSES = "collabProcesses"
#: This service's own: one document per session, ID = session ID, naming the one process of the
#: deployment that writes the session document (`session_writer.py`).
SESSION_WRITERS = "sessionWriters"
#: This service's own: the image each connected member of a session looks at, one document per user and
#: session, ID `<sessionID>_<userID>` like the presence's, written at most about once a second per member
#: (`member_images.py`), with an `expireAt` after which a TTL policy may delete it.
MEMBER_IMAGES = "memberImages"
#: This service's own: failed session-password joins, one small document per counter (per session and user,
#: per client address), which stop meaning anything at their `expireAt` (`throttle.py`).
PASSWORD_THROTTLES = "passwordThrottles"

_AUTO_ID_ALPHABET = string.ascii_letters + string.digits


def auto_id() -> str:
    """A random 20-character document ID, like Firestore's auto-IDs."""
    return "".join(secrets.choice(_AUTO_ID_ALPHABET) for _ in range(20))


class StoreError(Exception):
    """The store failed (unreachable, refused, …)."""


class AlreadyExists(StoreError):
    """`create` found the document already there."""


class NotFound(StoreError):
    """`update` found no document."""


class Document(NamedTuple):
    id: str
    data: Data


class Watch(ABC):
    """A live listener; `stop` is idempotent and safe from any thread."""

    @abstractmethod
    def stop(self) -> None: ...


class Transaction(ABC):
    """Reads see the store as of the transaction; writes apply together at commit."""

    @abstractmethod
    def get(self, collection: str, doc_id: str) -> Data | None: ...

    def get_many(self, collection: str, doc_ids: list[str]) -> dict[str, Data | None]:
        """Several documents of one collection, by ID (None for a missing one); one round trip where the
        store can."""
        return {doc_id: self.get(collection, doc_id) for doc_id in doc_ids}

    @abstractmethod
    def create(self, collection: str, doc_id: str, data: Data) -> None: ...

    @abstractmethod
    def set(self, collection: str, doc_id: str, data: Data) -> None: ...

    @abstractmethod
    def update(self, collection: str, doc_id: str, fields: Data) -> None: ...

    @abstractmethod
    def delete(self, collection: str, doc_id: str) -> None: ...


QueryCallback = Callable[[list[Document]], None]
DocumentCallback = Callable[[Data | None], None]


class Store(ABC):
    """Documents, transactions and realtime watches."""

    @abstractmethod
    def get(self, collection: str, doc_id: str) -> Data | None:
        """The document's fields, or None."""

    def get_many(self, collection: str, doc_ids: list[str]) -> dict[str, Data | None]:
        """Several documents of one collection, by ID (None for a missing one); one round trip where the
        store can."""
        return {doc_id: self.get(collection, doc_id) for doc_id in doc_ids}

    @abstractmethod
    def query(self, collection: str, field: str, value: Any) -> list[Document]:
        """Documents whose `field == value`."""

    @abstractmethod
    def documents(self, collection: str) -> list[Document]:
        """Every document of a (small) collection."""

    @abstractmethod
    def set(self, collection: str, doc_id: str, data: Data) -> None:
        """Create or replace a document."""

    @abstractmethod
    def delete(self, collection: str, doc_id: str) -> None:
        """Delete a document; deleting a missing one is not an error."""

    @abstractmethod
    def transaction(self, fn: Callable[[Transaction], T]) -> T:
        """Run `fn` in a transaction (retried on contention) and commit its writes.

        Raises `AlreadyExists` / `NotFound` when a write's precondition fails.
        """

    @abstractmethod
    def watch_query(self, collection: str, field: str, value: Any, callback: QueryCallback) -> Watch:
        """Call `callback` with the matching documents now and on every change."""

    @abstractmethod
    def watch_document(self, collection: str, doc_id: str, callback: DocumentCallback) -> Watch:
        """Call `callback` with the document (None when missing) now and on every change."""

    @abstractmethod
    def watch_count(self) -> int:
        """How many watches are open (listeners at the store boundary)."""

    def watch_stats(self) -> dict[str, int]:
        """How the watches are carried: `streams` (connections to the store's change feed), `query_targets`,
        `document_targets`, and the store's own counters."""
        return {"streams": 0, "query_targets": 0, "document_targets": 0}

    def ready(self, timeout: float) -> bool:
        """Whether the store answers a read within `timeout` seconds (the embedded one always does)."""
        return True

    def error_counts(self) -> dict[str, int]:
        """Failed calls so far, by kind (for metrics)."""
        return {}

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections; the default holds none."""
