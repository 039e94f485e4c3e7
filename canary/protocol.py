"""The WebSocket protocol: every message's `type` and exact fields, defined once.

Server messages are built by calling their spec (``MEMBER_JOINED(sessionID=…,
memberID=…)``), which checks the field set and encodes the JSON once; the
result is a `Frame` that can be queued to any number of clients. Client frames
are parsed by `parse_client_frame`. The message reference in docs/protocol.md
is rendered from these specs (`python -m canary.protocol`) and a test keeps the
two identical.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, NamedTuple

#: Close codes the service uses besides the standard ones.
CLOSE_SESSION_CLOSED = 4000
CLOSE_MEMBER_KICKED = 4001
CLOSE_POLICY_VIOLATION = 1008
CLOSE_SERVICE_RESTART = 1012
CLOSE_TRY_AGAIN_LATER = 1013
CLOSE_MESSAGE_TOO_BIG = 1009


_now_cache: tuple[int, str] = (0, "")


def rfc3339(moment: datetime, timespec: str = "milliseconds") -> str:
    """`moment` as RFC 3339 UTC with a `Z` (the form of every time this service writes)."""
    return moment.astimezone(UTC).isoformat(timespec=timespec).replace("+00:00", "Z")


def utc_now() -> str:
    """The current time as RFC 3339 UTC with a `Z`, millisecond precision."""
    global _now_cache
    millis = time.time_ns() // 1_000_000
    if _now_cache[0] != millis:  # formatted once per millisecond, however many messages it stamps
        _now_cache = (millis, rfc3339(datetime.fromtimestamp(millis / 1000, UTC)))
    return _now_cache[1]


class Coalescible:
    """A field value encoded beforehand (`json`, once for every message that carries it), which merges with
    the value of a newer message of the same type (`then`) when the two coalesce: a snapshot's `changes`
    (`changes.Delta`). It is a message's last field."""

    __slots__ = ("json",)
    json: str

    def then(self, newer: Any) -> Any:
        raise NotImplementedError


class Frame(NamedTuple):
    """One encoded server message, ready to be written to any number of sockets."""

    type: str
    text: str
    coalesce: bool
    data: bytes  # `text` in UTF-8: what goes on the wire
    born: float = 0.0  # a notification's: when the store change was seen (time.monotonic), for its latency
    changes: Coalescible | None = None  # a snapshot's `changes`, the end of `text`: merged when frames coalesce


def coalesce(pending: Frame, newer: Frame) -> Frame:
    """The frame that replaces `pending` (queued for a client, not yet written) when `newer`, of the same type,
    comes: `newer`, its `changes` merged with the pending frame's. Only that merged frame is encoded again (the
    slow client's case); its text is `newer`'s with the merged `changes` in place of its own."""
    if pending.changes is None or newer.changes is None:
        return newer
    merged = pending.changes.then(newer.changes)
    if merged is newer.changes:
        return newer
    text = newer.text[:len(newer.text) - len(newer.changes.json) - 1] + merged.json + "}"
    return newer._replace(text=text, data=text.encode(), changes=merged)


@dataclass(frozen=True)
class ServerMessage:
    """A server → client message: its type, exact fields, audience and meaning."""

    type: str
    fields: tuple[str, ...]
    audience: str
    meaning: str
    #: At most one pending per client: a newer one replaces the queued one.
    coalesce: bool = False

    def __call__(self, **values: Any) -> Frame:
        if "time" in self.fields and "time" not in values:
            values["time"] = utc_now()
        if values.keys() != set(self.fields):
            raise TypeError(f"{self.type} takes exactly {self.fields}, got {tuple(values)}")
        last = values[self.fields[-1]]
        if isinstance(last, Coalescible):  # encoded already: spliced in as it is, kept to be merged
            body = {"type": self.type, **{name: values[name] for name in self.fields[:-1]}}
            text = f'{json.dumps(body, separators=(",", ":"))[:-1]},"{self.fields[-1]}":{last.json}}}'
            return Frame(self.type, text, self.coalesce, text.encode(), changes=last)
        body = {"type": self.type, **{name: values[name] for name in self.fields}}
        text = json.dumps(body, separators=(",", ":"))
        return Frame(self.type, text, self.coalesce, text.encode())


@dataclass(frozen=True)
class ClientMessage:
    """A client → server message: its type and the fields of its `payload`."""

    type: str
    payload: tuple[str, ...]
    meaning: str


class Kind(StrEnum):
    """What happened, whatever a client's vocabulary calls it."""

    SESSION_CREATED = "session_created"
    SESSION_JOINED = "session_joined"
    MEMBER_JOINED = "member_joined"
    MEMBER_LEFT = "member_left"
    OWNER_LEFT = "owner_left"
    OWNER_JOINED = "owner_joined"
    MEMBER_IMAGE = "member_image"
    KEY_POINTS = "key_points"
    BOUNDING_BOXES = "bounding_boxes"
    KEEPALIVE = "keepalive"
    SESSION_CLOSED = "session_closed"
    MEMBER_KICKED = "member_kicked"
    PONG = "pong"
    ERROR = "error"


@dataclass(frozen=True)
class Vocabulary:
    """The messages one API speaks: a `ServerMessage` per `Kind` it tells its clients about."""

    name: str
    title: str
    messages: dict[Kind, ServerMessage]


class Event:
    """One thing to tell clients, each in its vocabulary: encoded at most once per vocabulary.

    `values` hold every field any vocabulary's message for `kind` takes; `time`
    defaults to now, once for all of them.
    """

    __slots__ = ("_frames", "born", "kind", "values")

    def __init__(self, kind: Kind, **values: Any) -> None:
        if "time" not in values:
            values["time"] = utc_now()
        self.kind = kind
        self.values = values
        self.born = time.monotonic()
        self._frames: dict[str, Frame | None] = {}

    def frame(self, vocabulary: Vocabulary) -> Frame | None:
        """The message in `vocabulary`, or None if that vocabulary has none for this kind."""
        try:
            return self._frames[vocabulary.name]
        except KeyError:
            pass
        message = vocabulary.messages.get(self.kind)
        frame = None if message is None else message(**{name: self.values[name] for name in message.fields})
        if frame is not None and frame.coalesce:  # a notification: its latency is measured when it is written
            frame = frame._replace(born=self.born)
        self._frames[vocabulary.name] = frame
        return frame


_pong: Event | None = None


def pong() -> Event:
    """This millisecond's `pong`: one event (encoded once per vocabulary) for every client that pings in it."""
    global _pong
    now = utc_now()
    if _pong is None or _pong.values["time"] != now:
        _pong = Event(Kind.PONG, time=now)
    return _pong


ERROR_CODES = ("binary_frame", "invalid_json", "invalid_message", "unknown_type", "invalid_payload",
               "watch_failed", "rate_limited")

# -- the seed's API: /sessions/<batchID> and /sessions/<sessionID>/join ------------------------------
_IMAGES = ("`images` maps the user ID of each other connected participant (owner or member) that looks at an "
           "image to that `imageID` (`{}` when none does); `member_image` tells every change from then on.")
_MEMBER_IMAGE_AUDIENCE = ("everyone in the session but that member, when its image changes (`setImageID`, at most "
                          "about once a second; or its socket closes: `null`)")
_MEMBER_IMAGE_MEANING = ("The image the member (or the owner) looks at now; `imageID` is `null` when none (its "
                         "socket closed). Keep a map of participant → image and replace its entry: the last one "
                         "told is the current one (rapid switches are coalesced, the last always wins). A "
                         "participant that leaves has no image.")
SESSION_CREATED = ServerMessage(
    "session_created",
    ("sessionID", "batchID", "role", "images", "time"),
    "the owner, first message after the upgrade",
    "The session exists (or was resumed, same `sessionID`); `role` is `owner`. " + _IMAGES,
)
SESSION_JOINED = ServerMessage(
    "session_joined",
    ("sessionID", "role", "ownerID", "members", "images", "time"),
    "a member, first message after the upgrade",
    "The member is in; `role` is `member`, `members` lists every member's ID (this one included). " + _IMAGES,
)
MEMBER_JOINED = ServerMessage(
    "member_joined",
    ("sessionID", "memberID", "time"),
    "everyone in the session but that member",
    "A member joined.",
)
MEMBER_IMAGE = ServerMessage(
    "member_image",
    ("sessionID", "memberID", "imageID", "time"),
    _MEMBER_IMAGE_AUDIENCE,
    _MEMBER_IMAGE_MEANING,
)
MEMBER_LEFT = ServerMessage(
    "member_left",
    ("sessionID", "memberID", "time"),
    "everyone in the session but that member",
    "A member left (disconnected, timed out, was dropped as a slow consumer, or was removed by the owner).",
)
OWNER_LEFT = ServerMessage(
    "owner_left",
    ("sessionID", "ownerID", "time"),
    "every member, when the owner disconnects from a session that waits for it (`OWNER_GRACE_SECONDS` > 0, "
    "or a web-app session) or the owner's process stops",
    "The owner is gone; the session waits for them to come back (the grace), then ends (a web-app session "
    "waits until it is stopped).",
)
OWNER_JOINED = ServerMessage(
    "owner_joined",
    ("sessionID", "ownerID", "time"),
    "every member, when the owner comes back",
    "The owner resumed the session.",
)
#: What the snapshot messages' `changes` say, and what a client does with them.
_CHANGES = ("`changes` says how, since the previous one of this type the client was sent: `added` and `modified` "
            "documents (`{id, data}`: the document ID and its fields), `removed` document IDs. `reset` is true on "
            "the first one of a watch (its `added` lists every document): replace your copy of the image's "
            "documents with it; otherwise apply the changes to your copy. `null` (larger than "
            "`MAX_SNAPSHOT_CHANGES_BYTES`): re-fetch over REST.")
LABELS_SNAPSHOT = ServerMessage(
    "labels_snapshot",
    ("sessionID", "time", "changes"),
    "the client watching that image",
    "The image's keypoints changed (the first one says the watch is ready). " + _CHANGES,
    coalesce=True,
)
BOUNDING_BOXES_SNAPSHOT = ServerMessage(
    "bounding_boxes_snapshot",
    ("sessionID", "time", "changes"),
    "the client watching that image",
    "The image's bounding boxes changed (the first one says the watch is ready). " + _CHANGES,
    coalesce=True,
)
KEEPALIVE = ServerMessage(
    "keepalive",
    ("role", "sessionID", "time"),
    "each client, every `KEEPALIVE_SECONDS`",
    "Keeps routers from cutting an idle connection.",
)
SESSION_CLOSED = ServerMessage(
    "session_closed",
    ("sessionID", "time"),
    "everyone in the session, when it ends (the owner left or did not come back within the grace, or the "
    "owner stopped it)",
    f"The session is over; the socket then closes with code {CLOSE_SESSION_CLOSED}.",
)
MEMBER_KICKED = ServerMessage(
    "member_kicked",
    ("sessionID", "time"),
    "the member the owner removed (`DELETE /sessions/{id}/members/{memberID}`)",
    f"You were removed from the session; the socket then closes with code {CLOSE_MEMBER_KICKED}.",
)
PONG = ServerMessage("pong", ("time",), "the client that sent `ping`", "Answer to `ping`.")
ERROR = ServerMessage(
    "error",
    ("code", "message"),
    "the client that sent a bad frame",
    "The frame was refused; the connection stays open. Codes: " + ", ".join(f"`{c}`" for c in ERROR_CODES),
)

SEED = Vocabulary("seed", "the seed's API (`/sessions/<batchID>`, `/sessions/<sessionID>/join`)", {
    Kind.SESSION_CREATED: SESSION_CREATED, Kind.SESSION_JOINED: SESSION_JOINED, Kind.MEMBER_JOINED: MEMBER_JOINED,
    Kind.MEMBER_LEFT: MEMBER_LEFT, Kind.OWNER_LEFT: OWNER_LEFT, Kind.OWNER_JOINED: OWNER_JOINED,
    Kind.MEMBER_IMAGE: MEMBER_IMAGE, Kind.KEY_POINTS: LABELS_SNAPSHOT, Kind.BOUNDING_BOXES: BOUNDING_BOXES_SNAPSHOT,
    Kind.KEEPALIVE: KEEPALIVE,
    Kind.SESSION_CLOSED: SESSION_CLOSED, Kind.MEMBER_KICKED: MEMBER_KICKED, Kind.PONG: PONG, Kind.ERROR: ERROR,
})

# -- the web app's API: /sessions/<sessionID>/ws/create and /ws/join ---------------------------------
_WEBAPP_PRESENCE = "The web app shows a notice with the e-mail (or the ID)."
WEBAPP = Vocabulary("webapp", "the web app's API (`/sessions/<sessionID>/ws/create`, `/ws/join`)", {
    Kind.MEMBER_JOINED: ServerMessage(
        "member_joined", ("sessionID", "memberID", "memberEmail", "time"),
        "everyone in the session but that member",
        "A member joined (at its REST join, or coming back). " + _WEBAPP_PRESENCE),
    Kind.MEMBER_LEFT: ServerMessage(
        "member_left", ("sessionID", "memberID", "memberEmail", "time"),
        "everyone in the session but that member",
        "A member left, or was removed by the owner. " + _WEBAPP_PRESENCE),
    Kind.OWNER_LEFT: ServerMessage(
        "owner_left", ("sessionID", "ownerID", "ownerEmail", "time"),
        "every member, when the owner's socket closes",
        "The owner is away; the session goes on until the owner stops it."),
    Kind.OWNER_JOINED: ServerMessage(
        "owner_joined", ("sessionID", "ownerID", "ownerEmail", "time"),
        "every member, when the owner's socket opens (on any process)",
        "The owner is connected."),
    Kind.MEMBER_IMAGE: ServerMessage(
        "member_image", ("sessionID", "memberID", "memberEmail", "imageID", "time"), _MEMBER_IMAGE_AUDIENCE,
        _MEMBER_IMAGE_MEANING + " `GET /sessions/active` lists the images at the time of the call."),
    Kind.KEY_POINTS: ServerMessage(
        "key_points_snapshot", ("sessionID", "time", "changes"), "the client watching that image",
        "The image's keypoints changed (the first one, right after `setImageID`, says the watch is ready). "
        + _CHANGES, coalesce=True),
    Kind.BOUNDING_BOXES: ServerMessage(
        "bounding_boxes_snapshot", ("sessionID", "time", "changes"), "the client watching that image",
        "The image's bounding boxes changed (the first one says the watch is ready). " + _CHANGES,
        coalesce=True),
    Kind.KEEPALIVE: KEEPALIVE,
    Kind.SESSION_CLOSED: ServerMessage(
        "session_closed", ("sessionID", "time"), "everyone in the session, when the owner stops it",
        f"The session is over; the socket then closes with code {CLOSE_SESSION_CLOSED}."),
    Kind.MEMBER_KICKED: MEMBER_KICKED,
    Kind.PONG: PONG,
    Kind.ERROR: ERROR,
})

VOCABULARIES: tuple[Vocabulary, ...] = (SEED, WEBAPP)
SERVER_MESSAGES: tuple[ServerMessage, ...] = tuple(dict.fromkeys(
    m for vocabulary in VOCABULARIES for m in vocabulary.messages.values()))

SET_IMAGE_ID = ClientMessage(
    "setImageID",
    ("imageID",),
    "Watch this image's keypoints and bounding boxes (replacing the previous image's watches).",
)
PING = ClientMessage("ping", (), "Ask for a `pong`.")

CLIENT_MESSAGES: dict[str, ClientMessage] = {m.type: m for m in (SET_IMAGE_ID, PING)}


class ProtocolError(Exception):
    """A client frame that cannot be accepted; answered with an `error` message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def event(self) -> Event:
        """The `error` message that tells the client about it."""
        return Event(Kind.ERROR, code=self.code, message=self.message)


class Request(NamedTuple):
    """A parsed, validated client frame."""

    type: str
    payload: dict[str, str]


def parse_client_frame(data: str | bytes) -> Request:
    """Validate one client frame or raise `ProtocolError`."""
    if not isinstance(data, str):
        raise ProtocolError("binary_frame", "binary frames are not supported; send JSON text")
    try:
        message = json.loads(data)
    except ValueError:
        raise ProtocolError("invalid_json", "the frame is not valid JSON") from None
    except RecursionError:  # the decoder's nesting limit: no message of this protocol nests more than twice
        raise ProtocolError("invalid_json", "the frame's JSON is nested too deeply") from None
    if not isinstance(message, dict):
        raise ProtocolError("invalid_message", "a message must be a JSON object")
    kind = message.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("invalid_message", "a message needs a string `type`")
    spec = CLIENT_MESSAGES.get(kind)
    if spec is None:
        known = ", ".join(sorted(CLIENT_MESSAGES))
        raise ProtocolError("unknown_type", f"unknown message type {kind!r}; expected one of: {known}")
    payload: dict[str, str] = {}
    if spec.payload:
        raw = message.get("payload")
        if not isinstance(raw, dict):
            raise ProtocolError("invalid_payload", f"{kind} needs a `payload` object")
        for name in spec.payload:
            value = raw.get(name)
            if not isinstance(value, str) or not value.strip():
                raise ProtocolError("invalid_payload", f"{kind} needs a non-empty string `payload.{name}`")
            payload[name] = value
    return Request(kind, payload)


def message_reference() -> str:
    """The Markdown message reference (what docs/protocol.md holds)."""
    lines = [
        "### Client → server (both APIs)",
        "",
        "| type | payload fields | meaning |",
        "|---|---|---|",
    ]
    for c in CLIENT_MESSAGES.values():
        fields = ", ".join(f"`{f}`" for f in c.payload) or "none"
        lines.append(f"| `{c.type}` | {fields} | {c.meaning} |")
    for vocabulary in VOCABULARIES:
        lines += [
            "",
            f"### Server → client: {vocabulary.title}",
            "",
            "| type | fields (besides `type`) | sent to | meaning |",
            "|---|---|---|---|",
        ]
        for s in vocabulary.messages.values():
            fields = ", ".join(f"`{f}`" for f in s.fields)
            lines.append(f"| `{s.type}` | {fields} | {s.audience} | {s.meaning} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(message_reference(), end="")
