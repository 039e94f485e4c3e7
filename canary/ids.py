"""The IDs a request names (users, sessions, batches), checked before the store is asked anything.

Every ID a client sends ends up in a Firestore document key: `users/{userID}`,
`batches/{batchID}`, `sessionLocks/{batchID}`, `sessions/{sessionID}`, and
`sessionPresence/{sessionID}_{userID}` (records.presence_id: the user ID
percent-encoded). Firestore refuses a document ID that is not valid UTF-8, is
longer than 1,500 bytes, contains `/`, is `.` or `..`, or matches `__.*__`; a
request naming such an ID would fail in the store (a 503, counted as a store
error) or, on the memory store, be accepted where Firestore would not. The
edges (routes.py, webapp.py) therefore check every ID a request names, from
its path, its query or its session token, with these functions, and refuse it
with a 400 that names the field before anything is read or written: on both
stores alike.
"""

from __future__ import annotations

import re

from .errors import Refusal

#: Firestore's limit on a document ID, in bytes of UTF-8.
FIRESTORE_ID_MAX_BYTES = 1500

#: Session IDs are Firestore auto IDs (20 letters and digits), the service's as the Go service's; batch and
#: project IDs are Canary's own document IDs (auto IDs too). 128 bytes leaves them ample room.
SESSION_ID_MAX_BYTES = 128
BATCH_ID_MAX_BYTES = 128
PROJECT_ID_MAX_BYTES = 128

#: User IDs are Canary's account IDs (Firebase Auth UIDs are at most 128 characters), and are carried in
#: every membership message: 256 bytes is twice what they need. The presence key `{sessionID}_{userID}`
#: percent-encodes the user ID, up to 3 bytes for each of its bytes, so its longest is
#: 128 + 1 + 3 × 256 = 897 bytes: within Firestore's 1,500 with room to spare.
USER_ID_MAX_BYTES = 256

#: The longest presence key, as session_writer.presence_id composes it (throttle.user_key prefixes it with
#: "user_").
_PRESENCE_ID_MAX_BYTES = SESSION_ID_MAX_BYTES + 1 + 3 * USER_ID_MAX_BYTES
assert len("user_") + _PRESENCE_ID_MAX_BYTES <= FIRESTORE_ID_MAX_BYTES

#: Firestore reserves these document IDs.
_RESERVED = re.compile(r"__.*__", re.DOTALL)


def check(field: str, value: str, max_bytes: int) -> str:
    """`value` if it can be a Firestore document ID of at most `max_bytes` bytes; else `Refusal` 400 naming
    `field` (as the request names it: `userID`, `sessionID`, ...) and saying what is wrong."""
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate (a JSON "\ud800" in a token's claim)
        raise Refusal(400, f"invalid {field}: it is not valid UTF-8") from None
    if size == 0:
        reason = "it is empty"
    elif size > max_bytes:
        reason = f"it is {size} bytes long in UTF-8, at most {max_bytes} are allowed"
    elif "/" in value:
        reason = "it contains '/'"
    elif value in (".", ".."):
        reason = "it cannot be '.' or '..'"
    elif _RESERVED.fullmatch(value):
        reason = "it cannot both begin and end with '__'"
    else:
        return value
    raise Refusal(400, f"invalid {field}: {reason}")


def user_id(value: str, field: str = "userID") -> str:
    return check(field, value, USER_ID_MAX_BYTES)


def session_id(value: str, field: str = "sessionID") -> str:
    """A session ID: also no leading `_`. It begins the presence key `{sessionID}_{userID}`, which would
    otherwise begin with `__` (`__x` or `_` as the session ID) and match `__.*__` for a user ID ending with
    `__`. No session ID does: they are auto IDs."""
    check(field, value, SESSION_ID_MAX_BYTES)
    if value.startswith("_"):
        raise Refusal(400, f"invalid {field}: it cannot begin with '_'")
    return value


def batch_id(value: str, field: str = "batchID") -> str:
    return check(field, value, BATCH_ID_MAX_BYTES)


def project_id(value: str, field: str = "projectID") -> str:
    return check(field, value, PROJECT_ID_MAX_BYTES)
