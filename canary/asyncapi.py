"""The AsyncAPI 3.0 description of the WebSocket protocol (docs/asyncapi.yaml), rendered from canary/protocol.py.

Every message and field comes from protocol.py (`VOCABULARIES`, `CLIENT_MESSAGES`); only the sockets' routes
(`CHANNELS`) are written here. `python -m canary.asyncapi > docs/asyncapi.yaml` regenerates the file, and
tests/test_asyncapi.py validates the document against the official AsyncAPI 3.0.0 JSON schema and fails when
the file drifts from protocol.py.

The document describes the service, so its operations follow AsyncAPI 3's `action` from the service's side:
`receive` is what a client sends (`setImageID`, `ping`), `send` is what a client is told.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, NamedTuple

from . import protocol
from .config import Config
from .protocol import CLIENT_MESSAGES, VOCABULARIES, ClientMessage, ServerMessage, Vocabulary
from .records import MEMBER, OWNER

ASYNCAPI_VERSION = "3.0.0"
PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"

_AUTH = {
    "type": "string",
    "description": "Canary's login token (an HS256 JWT) of the same user. Required when the service has a JWT "
                   "secret, unless sent as `Authorization: Bearer <token>` (browsers cannot set headers on a "
                   "WebSocket, so the web app sends it here); ignored by a service without one (development).",
}
_SESSION_ID = ("The session's ID (the `sessionID` answered by `POST /sessions/<batchID>`, or listed by "
               "`GET /sessions/active`).")


def _query(name: str, description: str) -> dict[str, Any]:
    """The JSON schema of a socket's query string: its one required parameter, and the login token."""
    return {"type": "object", "required": [name], "properties": {
        name: {"type": "string", "minLength": 1, "description": description},
        "auth": _AUTH,
    }}


class Channel(NamedTuple):
    """One socket route of an API: its AsyncAPI channel."""

    key: str
    address: str
    title: str
    description: str
    parameters: dict[str, str]  # path variable → description
    query: dict[str, Any]  # the JSON schema of the query string (`bindings.ws.query`)


#: The sockets of each vocabulary (by `Vocabulary.name`): the routes are the only thing written here.
CHANNELS: dict[str, tuple[Channel, ...]] = {
    protocol.SEED.name: (
        Channel(
            "seedCreate", "/sessions/{batchID}", "The seed's owner socket",
            "The upgrade itself creates the batch's session (or resumes it, same `sessionID`); the socket is the "
            "owner's and its first message is `session_created`. Opened with `GET` (a `POST` carrying the "
            "upgrade headers is accepted too).",
            {"batchID": "The batch to open (or resume) a session for."},
            _query("userID", "The owner's user ID."),
        ),
        Channel(
            "seedJoin", "/sessions/{sessionID}/join", "The seed's member socket",
            "The upgrade itself joins the session; the first message is `session_joined`. Opened with `GET` (a "
            "`POST` carrying the upgrade headers is accepted too).",
            {"sessionID": "The session to join (the `sessionID` of the owner's `session_created`)."},
            _query("userID", "The joining member's user ID."),
        ),
    ),
    protocol.WEBAPP.name: (
        Channel(
            "webappCreate", "/sessions/{sessionID}/ws/create", "The web app's owner socket",
            "The owner's socket of a session created over REST (`POST /sessions/<batchID>`), opened with the "
            "session token of `POST /sessions/<sessionID>/join`. No welcome message: the members are told "
            "`owner_joined`. The session outlives the socket; it ends when the owner stops it.",
            {"sessionID": _SESSION_ID},
            _query("token", "The owner's session token from `POST /sessions/<sessionID>/join` "
                            "(an HS256 JWT for this session, valid for `SESSION_TOKEN_SECONDS`)."),
        ),
        Channel(
            "webappJoin", "/sessions/{sessionID}/ws/join", "The web app's member socket",
            "A member's socket, opened with the session token of its REST join (`POST "
            "/sessions/<sessionID>/join`, which lists the member in the session). No welcome message: the others "
            "were told `member_joined` at the REST join.",
            {"sessionID": _SESSION_ID},
            _query("token", "The member's session token from `POST /sessions/<sessionID>/join` "
                            "(an HS256 JWT for this session, valid for `SESSION_TOKEN_SECONDS`)."),
        ),
    ),
}

#: Fields that are not plain strings: field name → (components.schemas key, schema).
FIELD_SCHEMAS: dict[str, tuple[str, dict[str, Any]]] = {
    "time": ("Time", {"type": "string", "format": "date-time",
                      "description": "RFC 3339 UTC with a `Z`, millisecond precision."}),
    "members": ("Members", {"type": "array", "items": {"type": "string"},
                            "description": "Every member's user ID."}),
    "role": ("Role", {"type": "string", "enum": [OWNER, MEMBER]}),
    "code": ("ErrorCode", {"type": "string", "enum": list(protocol.ERROR_CODES)}),
    "imageID": ("ImageID", {"type": ["string", "null"],
                            "description": "The image the participant looks at; `null` when none."}),
    "images": ("Images", {"type": "object", "additionalProperties": {"type": "string"},
                          "description": "User ID → the image that participant looks at, for each other "
                                         "connected participant that looks at one."}),
    "changes": ("Changes", {
        "type": ["object", "null"],
        "description": "What changed since the previous message of this type the client was sent (documents as "
                       "`{id, data}`); `reset` on the first one of a watch, whose `added` lists every document. "
                       "`null` when larger than `MAX_SNAPSHOT_CHANGES_BYTES`: re-fetch over REST.",
        "properties": {
            "reset": {"type": "boolean"},
            "added": {"type": "array", "items": {"$ref": "#/components/schemas/Document"}},
            "modified": {"type": "array", "items": {"$ref": "#/components/schemas/Document"}},
            "removed": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["reset", "added", "modified", "removed"],
        "additionalProperties": False,
    }),
}

#: Schemas that fields' schemas refer to: field name → {components.schemas key: schema}.
REFERENCED_SCHEMAS: dict[str, dict[str, dict[str, Any]]] = {
    "changes": {"Document": {
        "type": "object",
        "description": "A keypoint or bounding box: its document ID and its fields (times as RFC 3339 strings).",
        "properties": {"id": {"type": "string"}, "data": {"type": "object"}},
        "required": ["id", "data"],
        "additionalProperties": False,
    }},
}

COALESCE_NOTE = ("Coalescing: at most one of these is pending per client; a newer one replaces the queued one, so "
                 "a burst of changes costs a slow client one notification.")


def _version() -> str:
    """The service's version (pyproject.toml)."""
    with PYPROJECT.open("rb") as f:
        return str(tomllib.load(f)["project"]["version"])


def _field(name: str) -> dict[str, Any]:
    """The JSON schema of one message field."""
    if name in FIELD_SCHEMAS:
        return {"$ref": f"#/components/schemas/{FIELD_SCHEMAS[name][0]}"}
    return {"type": "string"}


def _object(type_: str, fields: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """An object with `type` (a const) and exactly `fields`, all required."""
    return {
        "type": "object",
        "properties": {"type": {"type": "string", "const": type_}, **fields},
        "required": ["type", *fields],
        "additionalProperties": False,
    }


def client_payload(message: ClientMessage) -> dict[str, Any]:
    """The payload schema of a client message: `{type, payload}`, `payload` holding its fields as strings."""
    payload: dict[str, Any] = {
        "type": "object",
        "properties": {name: {"type": "string", "pattern": r"\S"} for name in message.payload},
        "additionalProperties": False,
    }
    if not message.payload:  # then `payload` is optional (the service ignores it)
        return {**_object(message.type, {"payload": payload}), "required": ["type"]}
    return _object(message.type, {"payload": {**payload, "required": list(message.payload)}})


def server_payload(message: ServerMessage) -> dict[str, Any]:
    """The payload schema of a server message: `type` and exactly its fields."""
    return _object(message.type, {name: _field(name) for name in message.fields})


def server_message_keys() -> dict[ServerMessage, str]:
    """The components.messages key of every distinct server message: its type, suffixed with its (first)
    vocabulary's name when vocabularies send different messages under that type."""
    types: dict[str, set[ServerMessage]] = {}
    for vocabulary in VOCABULARIES:
        for message in vocabulary.messages.values():
            types.setdefault(message.type, set()).add(message)
    keys: dict[ServerMessage, str] = {}
    for vocabulary in VOCABULARIES:
        for message in vocabulary.messages.values():
            if message not in keys:
                keys[message] = message.type if len(types[message.type]) == 1 else f"{message.type}.{vocabulary.name}"
    return keys


def _client_message(message: ClientMessage) -> dict[str, Any]:
    """components.messages entry of a client → server message."""
    fields = ", ".join(f"`{name}`" for name in message.payload) or "no field"
    return {
        "name": message.type,
        "summary": f"Client → server, on every socket of both APIs; payload: {fields}.",
        "description": message.meaning,
        "payload": client_payload(message),
    }


def _server_message(message: ServerMessage) -> dict[str, Any]:
    """components.messages entry of a server → client message."""
    description = message.meaning + (f"\n\n{COALESCE_NOTE}" if message.coalesce else "")
    return {
        "name": message.type,
        "summary": f"Sent to {message.audience}.",
        "description": description,
        "payload": server_payload(message),
    }


def _channel(channel: Channel, vocabulary: Vocabulary, keys: dict[ServerMessage, str]) -> dict[str, Any]:
    """The AsyncAPI channel of one socket: the client messages and its vocabulary's server messages."""
    messages = {m.type: {"$ref": f"#/components/messages/{m.type}"} for m in CLIENT_MESSAGES.values()}
    for message in vocabulary.messages.values():
        if message.type in messages:
            raise ValueError(f"{vocabulary.name}: {message.type} is both a client and a server message")
        messages[message.type] = {"$ref": f"#/components/messages/{keys[message]}"}
    return {
        "address": channel.address,
        "title": channel.title,
        "description": f"{channel.description}\n\nSpeaks {vocabulary.title}.",
        "parameters": {name: {"description": text} for name, text in channel.parameters.items()},
        "messages": messages,
        "bindings": {"ws": {"method": "GET", "query": channel.query, "bindingVersion": "0.1.0"}},
        "tags": [{"name": vocabulary.name}],
    }


def _operations(channel: Channel, vocabulary: Vocabulary) -> dict[str, dict[str, Any]]:
    """The channel's two operations: the service receives the client messages and sends its vocabulary's."""
    ref = f"#/channels/{channel.key}"
    client = [{"$ref": f"{ref}/messages/{m.type}"} for m in CLIENT_MESSAGES.values()]
    server = [{"$ref": f"{ref}/messages/{m.type}"} for m in vocabulary.messages.values()]
    return {
        f"{channel.key}.receive": {
            "action": "receive", "channel": {"$ref": ref}, "title": f"{channel.title}: client → server",
            "summary": "What a client may send (JSON text frames); a bad frame gets `error`, the socket stays open.",
            "messages": client,
            "tags": [{"name": vocabulary.name}],
        },
        f"{channel.key}.send": {
            "action": "send", "channel": {"$ref": ref}, "title": f"{channel.title}: server → client",
            "summary": f"What the service tells a client of {vocabulary.title}.",
            "messages": server,
            "tags": [{"name": vocabulary.name}],
        },
    }


def _description() -> str:
    """info.description: the two APIs, which to use, frames and close codes."""
    p = protocol
    return "\n\n".join([
        "Canary Collab's real-time collaboration sessions over WebSockets. Two APIs share one session core: "
        "**the web app's API** (REST calls, then a socket opened with a short-lived session token: "
        "`/sessions/{sessionID}/ws/create` and `/ws/join`) and **the seed's API** (the socket's upgrade itself "
        "creates or joins the session: `/sessions/{batchID}` and `/sessions/{sessionID}/join`). One session may "
        "have clients of both kinds; each is told everything in its own vocabulary. **A new client should use "
        "the web app's API**: its sessions outlive a dropped socket, it is what Canary ships, and it "
        "authenticates every step.",
        "Frames are JSON text (one message each; times are RFC 3339 UTC with a `Z`). A bad client frame gets an "
        "`error` message and the connection stays open. Operations are described from the service's side "
        "(AsyncAPI 3): `receive` = client → server, `send` = server → client.",
        f"Close codes besides 1000: {p.CLOSE_POLICY_VIOLATION} (the peer did not answer WebSocket pings, or kept "
        f"going over its inbound budget), {p.CLOSE_MESSAGE_TOO_BIG} (a frame over `MAX_MESSAGE_BYTES`), "
        f"{p.CLOSE_SERVICE_RESTART} (the service is restarting: reconnect, the session and the membership are "
        f"kept), {p.CLOSE_TRY_AGAIN_LATER} (the client stopped reading), {p.CLOSE_SESSION_CLOSED} (after "
        f"`session_closed`), {p.CLOSE_MEMBER_KICKED} (after `member_kicked`).",
        "Rendered from `canary/protocol.py` (`python -m canary.asyncapi`); routes, refusals and lifecycles are "
        "in docs/protocol.md.",
    ])


def document() -> dict[str, Any]:
    """The AsyncAPI 3.0.0 document of the WebSocket protocol."""
    keys = server_message_keys()
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    for vocabulary in VOCABULARIES:
        for channel in CHANNELS[vocabulary.name]:
            channels[channel.key] = _channel(channel, vocabulary, keys)
            operations.update(_operations(channel, vocabulary))
    messages = {m.type: _client_message(m) for m in CLIENT_MESSAGES.values()}
    messages.update({key: _server_message(m) for m, key in keys.items()})
    used = {name for m in keys for name in m.fields}
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "Canary Collab",
            "version": _version(),
            "description": _description(),
            "tags": [{"name": v.name, "description": f"Sockets of {v.title}."} for v in VOCABULARIES],
        },
        "defaultContentType": "application/json",
        "servers": {
            "canary": {
                "host": "{host}",
                "protocol": "ws",
                "title": "A Canary Collab process",
                "description": "Plain `ws://` to the process itself; behind a TLS-terminating router the same "
                               "paths are reached with `wss://`.",
                "variables": {"host": {
                    "default": f"localhost:{Config.port}",
                    "description": f"The service's host and port (`PORT`, default {Config.port}).",
                }},
            },
        },
        "channels": channels,
        "operations": operations,
        "components": {
            "schemas": {**{key: schema for name, (key, schema) in FIELD_SCHEMAS.items() if name in used},
                        **{key: schema for name, schemas in REFERENCED_SCHEMAS.items() if name in used
                           for key, schema in schemas.items()}},
            "messages": messages,
        },
    }


def render() -> str:
    """The document as YAML (keys in the order `document` builds them, so the output is reproducible)."""
    import yaml  # a dev/docs dependency (requirements-dev), not the service's

    class Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data: Any) -> bool:  # write every node out, no &anchors
            return True

    def text(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:  # paragraphs as folded blocks
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=">" if "\n" in value else None)

    Dumper.add_representer(str, text)

    body = yaml.dump(document(), Dumper=Dumper, sort_keys=False, allow_unicode=True, width=110)
    return f"# Generated from canary/protocol.py by `python -m canary.asyncapi`: do not edit.\n{body}"


if __name__ == "__main__":
    print(render(), end="")
