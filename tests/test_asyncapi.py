"""canary.asyncapi: docs/asyncapi.yaml is a valid AsyncAPI 3.0.0 document, rendered from canary/protocol.py.

The document is validated against the official AsyncAPI 3.0.0 JSON schema pinned in tests/schemas/ (see its
README), and each message's payload schema against the frames protocol.py really builds.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft7Validator, FormatChecker
from referencing import Registry
from referencing.jsonschema import DRAFT7

from canary import asyncapi, protocol
from canary.changes import Changes, Delta
from canary.protocol import CLIENT_MESSAGES, VOCABULARIES, ClientMessage, Kind, ServerMessage, Vocabulary

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = ROOT / "tests" / "schemas" / "asyncapi-3.0.0.json"
DOC = ROOT / "docs" / "asyncapi.yaml"
REGENERATE = "python -m canary.asyncapi > docs/asyncapi.yaml"
URI = "urn:canary:asyncapi"  # the document's base URI when its `$ref`s are resolved here
RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")

#: The sockets of each API (docs/protocol.md), and their query parameters: all of them, the required ones.
ADDRESSES = {
    "seed": {"/sessions/{batchID}", "/sessions/{sessionID}/join"},
    "webapp": {"/sessions/{sessionID}/ws/create", "/sessions/{sessionID}/ws/join"},
}
QUERY = {"seed": ({"userID", "auth"}, ["userID"]), "webapp": ({"token", "auth"}, ["token"])}

by_vocabulary = pytest.mark.parametrize("vocabulary", VOCABULARIES, ids=[v.name for v in VOCABULARIES])
by_server_message = pytest.mark.parametrize(
    ("vocabulary", "kind"),
    [(v, k) for v in VOCABULARIES for k in v.messages],
    ids=[f"{v.name}-{v.messages[k].type}" for v in VOCABULARIES for k in v.messages],
)
by_client_message = pytest.mark.parametrize("message", CLIENT_MESSAGES.values(), ids=list(CLIENT_MESSAGES))

format_checker = FormatChecker()


@format_checker.checks("date-time")
def _is_date_time(value: object) -> bool:
    """RFC 3339 date-time (jsonschema checks it only with an optional package, so it is done here)."""
    return not isinstance(value, str) or bool(RFC3339.match(value))


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return asyncapi.document()


@pytest.fixture(scope="module")
def validator() -> Draft7Validator:
    """The official AsyncAPI 3.0.0 schema, as pinned."""
    schema = json.loads(SCHEMA.read_text())
    Draft7Validator.check_schema(schema)
    assert schema["properties"]["asyncapi"] == {"type": "string", "const": "3.0.0",
                                                "description": "The AsyncAPI specification version of this document."}
    return Draft7Validator(schema)


def resolve(doc: dict[str, Any], ref: str) -> Any:
    """What a local `$ref` (`#/a/b`) points at in the document."""
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def channels_of(doc: dict[str, Any], vocabulary: Vocabulary) -> dict[str, dict[str, Any]]:
    """The document's channels for the sockets of `vocabulary`, by key."""
    found = {key: c for key, c in doc["channels"].items() if c["address"] in ADDRESSES[vocabulary.name]}
    assert {c["address"] for c in found.values()} == ADDRESSES[vocabulary.name]
    return found


def message_of(doc: dict[str, Any], channel: dict[str, Any], type_: str) -> dict[str, Any]:
    """The message a channel lists under `type_`, its `$ref` followed."""
    message = channel["messages"][type_]
    return resolve(doc, message["$ref"]) if "$ref" in message else message


def payload_validator(doc: dict[str, Any], channel_key: str, type_: str) -> Draft7Validator:
    """A validator for the payload of message `type_` on a channel, `$ref`s resolved in the document."""
    ref = doc["channels"][channel_key]["messages"][type_]["$ref"]
    registry = Registry().with_resource(URI, DRAFT7.create_resource(doc))
    return Draft7Validator({"$ref": f"{URI}{ref}/payload"}, registry=registry, format_checker=format_checker)


def errors(validator: Draft7Validator, instance: Any) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(instance)]


# -- (1) the document is valid AsyncAPI 3.0.0, and the validator really refuses a broken one ------------------

def test_document_is_valid_asyncapi_3_0_0(doc: dict[str, Any], validator: Draft7Validator) -> None:
    assert doc["asyncapi"] == "3.0.0"
    assert errors(validator, doc) == []


def _bad_action(doc: dict[str, Any]) -> None:
    next(iter(doc["operations"].values()))["action"] = "publish"  # AsyncAPI 2's word


def _payload_not_a_schema(doc: dict[str, Any]) -> None:
    doc["components"]["messages"]["pong"]["payload"] = "pong"


def _operation_without_channel(doc: dict[str, Any]) -> None:
    del next(iter(doc["operations"].values()))["channel"]


def _channel_with_2_x_field(doc: dict[str, Any]) -> None:
    next(iter(doc["channels"].values()))["subscribe"] = {"message": {"payload": {"type": "object"}}}


def _bad_ws_binding_method(doc: dict[str, Any]) -> None:
    next(iter(doc["channels"].values()))["bindings"]["ws"]["method"] = "PUT"


def _server_without_protocol(doc: dict[str, Any]) -> None:
    del next(iter(doc["servers"].values()))["protocol"]


def _parameter_with_a_schema(doc: dict[str, Any]) -> None:  # AsyncAPI 2 style; 3.0 parameters are strings
    channel = next(iter(doc["channels"].values()))
    next(iter(channel["parameters"].values()))["schema"] = {"type": "string"}


@pytest.mark.parametrize("breaks", [_bad_action, _payload_not_a_schema, _operation_without_channel,
                                    _channel_with_2_x_field, _bad_ws_binding_method, _server_without_protocol,
                                    _parameter_with_a_schema])
def test_a_broken_document_is_refused(doc: dict[str, Any], validator: Draft7Validator,
                                      breaks: Callable[[dict[str, Any]], None]) -> None:
    broken = copy.deepcopy(doc)
    breaks(broken)
    assert errors(validator, broken), f"{breaks.__name__}: the pinned schema accepted a broken document"


def test_every_ref_resolves(doc: dict[str, Any]) -> None:
    refs: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            refs.extend(v for k, v in node.items() if k == "$ref")
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(doc)
    assert refs
    for ref in refs:
        resolve(doc, ref)


# -- (2) docs/asyncapi.yaml is what protocol.py renders -----------------------------------------------------

def test_docs_file_is_rendered_from_protocol() -> None:
    assert DOC.read_text() == asyncapi.render(), \
        f"docs/asyncapi.yaml differs from canary/protocol.py; run `{REGENERATE}`"


def test_render_is_reproducible_yaml_of_the_document(doc: dict[str, Any]) -> None:
    text = asyncapi.render()
    assert text == asyncapi.render()
    assert not re.search(r"[&*]id\d", text)  # no YAML anchors or aliases
    assert yaml.safe_load(text) == doc


def test_module_prints_the_document() -> None:
    result = subprocess.run([sys.executable, "-m", "canary.asyncapi"], cwd=ROOT, capture_output=True,
                            text=True, check=True, timeout=60)
    assert result.stdout == asyncapi.render()


# -- (3) every message and exact field set of protocol.py, on the right channels --------------------------

def test_info_says_which_api_to_use(doc: dict[str, Any]) -> None:
    info = doc["info"]
    assert info["title"] == "Canary Collab"
    assert info["version"]
    assert "share one session core" in info["description"]
    assert "A new client should use the web app's API" in info["description"]
    (server,) = doc["servers"].values()
    assert server["protocol"] == "ws"
    assert set(re.findall(r"{(\w+)}", server["host"])) == set(server["variables"])


@by_vocabulary
def test_channels_of_each_api_describe_path_and_query(doc: dict[str, Any], vocabulary: Vocabulary) -> None:
    names, required = QUERY[vocabulary.name]
    for channel in channels_of(doc, vocabulary).values():
        assert set(channel["parameters"]) == set(re.findall(r"{(\w+)}", channel["address"]))
        assert all(p["description"] for p in channel["parameters"].values())
        query = channel["bindings"]["ws"]["query"]
        assert query["type"] == "object"
        assert set(query["properties"]) == names
        assert query["required"] == required
        assert all(p["type"] == "string" and p["description"] for p in query["properties"].values())


@by_vocabulary
def test_each_channel_lists_the_client_messages_and_its_vocabulary(doc: dict[str, Any],
                                                                   vocabulary: Vocabulary) -> None:
    expected = [*CLIENT_MESSAGES, *(m.type for m in vocabulary.messages.values())]
    for channel in channels_of(doc, vocabulary).values():
        assert list(channel["messages"]) == expected


@by_server_message
def test_server_message_payload_has_exactly_its_fields(doc: dict[str, Any], vocabulary: Vocabulary,
                                                       kind: Kind) -> None:
    spec = vocabulary.messages[kind]
    for channel in channels_of(doc, vocabulary).values():
        message = message_of(doc, channel, spec.type)
        payload = message["payload"]
        assert message["name"] == spec.type
        assert payload["type"] == "object"
        assert payload["properties"]["type"] == {"type": "string", "const": spec.type}
        assert list(payload["properties"]) == ["type", *spec.fields]
        assert payload["required"] == ["type", *spec.fields]
        assert payload["additionalProperties"] is False
        assert spec.meaning in message["description"]
        assert spec.audience in message["summary"]
        assert (asyncapi.COALESCE_NOTE in message["description"]) == spec.coalesce


@by_client_message
def test_client_message_payload_has_exactly_its_fields(doc: dict[str, Any], message: ClientMessage) -> None:
    for channel in doc["channels"].values():
        spec = message_of(doc, channel, message.type)
        payload = spec["payload"]
        assert payload["properties"]["type"] == {"type": "string", "const": message.type}
        assert set(payload["properties"]) == {"type", "payload"}
        assert payload["additionalProperties"] is False
        inner = payload["properties"]["payload"]
        assert inner["type"] == "object"
        assert list(inner["properties"]) == list(message.payload)
        assert inner.get("required", []) == list(message.payload)
        assert payload["required"] == (["type", "payload"] if message.payload else ["type"])
        assert message.meaning == spec["description"]


def test_field_types(doc: dict[str, Any]) -> None:
    schemas = doc["components"]["schemas"]
    assert (schemas["Time"]["type"], schemas["Time"]["format"]) == ("string", "date-time")
    assert (schemas["Members"]["type"], schemas["Members"]["items"]) == ("array", {"type": "string"})
    assert schemas["Role"]["enum"] == ["owner", "member"]
    assert schemas["ErrorCode"]["enum"] == list(protocol.ERROR_CODES)
    named = {"time": "Time", "members": "Members", "role": "Role", "code": "ErrorCode", "changes": "Changes",
             "imageID": "ImageID", "images": "Images"}
    for channel in doc["channels"].values():
        for type_ in channel["messages"]:
            if type_ in CLIENT_MESSAGES:
                continue
            for name, schema in message_of(doc, channel, type_)["payload"]["properties"].items():
                if name in named:
                    assert schema == {"$ref": f"#/components/schemas/{named[name]}"}, (type_, name)
                elif name != "type":
                    assert schema == {"type": "string"}, (type_, name)


@by_vocabulary
def test_operations_receive_client_messages_and_send_the_vocabulary(doc: dict[str, Any],
                                                                    vocabulary: Vocabulary) -> None:
    for key, channel in channels_of(doc, vocabulary).items():
        ops = [o for o in doc["operations"].values() if o["channel"] == {"$ref": f"#/channels/{key}"}]
        assert sorted(o["action"] for o in ops) == ["receive", "send"]
        for op in ops:
            for ref in op["messages"]:  # an operation's messages must be its channel's (AsyncAPI 3)
                assert ref["$ref"].startswith(f"#/channels/{key}/messages/"), ref
            types = [ref["$ref"].rsplit("/", 1)[1] for ref in op["messages"]]
            if op["action"] == "receive":  # the service's side: what a client sends
                assert types == list(CLIENT_MESSAGES)
            else:
                assert types == [m.type for m in vocabulary.messages.values()]
        assert channel["messages"]


# -- (4) each payload schema accepts what protocol.py builds, and nothing else -----------------------------

def sample_values(spec: ServerMessage) -> dict[str, Any]:
    """Values for every field but `time` (left to the spec's default, the real clock)."""
    special: dict[str, Any] = {"members": ["ann", "bob"], "role": "owner", "code": protocol.ERROR_CODES[-1],
                               "images": {"ann": "img-1"},
                               "changes": Delta(Changes({"kp-1": {"imageID": "img", "position": {"x": 1}}},
                                                        {"kp-2": {"imageID": "img"}}, ("kp-3",)), 1 << 16)}
    return {name: special.get(name, f"{name}-1") for name in spec.fields if name != "time"}


@by_server_message
def test_server_payload_schema_accepts_what_protocol_builds(doc: dict[str, Any], vocabulary: Vocabulary,
                                                            kind: Kind) -> None:
    spec = vocabulary.messages[kind]
    body = json.loads(spec(**sample_values(spec)).text)
    for key in channels_of(doc, vocabulary):
        check = payload_validator(doc, key, spec.type)
        assert errors(check, body) == []
        assert errors(check, {**body, "bogus": "x"}), "an extra field was accepted"
        for name in spec.fields:
            assert errors(check, {k: v for k, v in body.items() if k != name}), f"{name} missing was accepted"
        assert errors(check, {**body, "type": "something_else"})
        for name, bad in (("time", "yesterday"), ("role", "admin"), ("code", "oops"), ("members", "ann"),
                          ("sessionID", 7), ("changes", "everything"), ("changes", {"added": []}),
                          ("imageID", 7), ("images", ["img-1"]), ("images", {"ann": 7})):
            if name in spec.fields:
                assert errors(check, {**body, name: bad}), f"{name}={bad!r} was accepted"


@by_server_message
def test_a_message_of_the_other_vocabulary_is_refused_when_fields_differ(doc: dict[str, Any],
                                                                         vocabulary: Vocabulary,
                                                                         kind: Kind) -> None:
    spec = vocabulary.messages[kind]
    for other in VOCABULARIES:
        theirs = other.messages.get(kind)
        if other is vocabulary or theirs is None or theirs.type != spec.type or theirs.fields == spec.fields:
            continue
        body = json.loads(theirs(**sample_values(theirs)).text)
        for key in channels_of(doc, vocabulary):
            assert errors(payload_validator(doc, key, spec.type), body), f"{other.name}'s {spec.type} accepted"


def client_frame(message: ClientMessage) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": message.type}
    if message.payload:
        frame["payload"] = {name: f"{name}-1" for name in message.payload}
    return frame


@by_client_message
def test_client_payload_schema_accepts_what_the_service_parses(doc: dict[str, Any], message: ClientMessage) -> None:
    frame = client_frame(message)
    assert protocol.parse_client_frame(json.dumps(frame)).type == message.type
    for key in doc["channels"]:
        check = payload_validator(doc, key, message.type)
        assert errors(check, frame) == []
        assert errors(check, {**frame, "bogus": "x"}), "an extra field was accepted"
        assert errors(check, {**frame, "payload": {**frame.get("payload", {}), "bogus": "x"}})
        for name in message.payload:
            blank = {**frame, "payload": {**frame["payload"], name: " "}}
            assert errors(check, blank)
            with pytest.raises(protocol.ProtocolError):  # the service refuses it too
                protocol.parse_client_frame(json.dumps(blank))
            missing = {**frame, "payload": {k: v for k, v in frame["payload"].items() if k != name}}
            assert errors(check, missing)
