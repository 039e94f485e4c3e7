"""canary.protocol: server message shapes, client frame validation, and the message reference in docs/protocol.md."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from canary import protocol
from canary.protocol import (
    SEED,
    SERVER_MESSAGES,
    VOCABULARIES,
    WEBAPP,
    Event,
    Kind,
    ProtocolError,
    Request,
    ServerMessage,
    parse_client_frame,
)

ROOT = Path(__file__).resolve().parent.parent
RFC3339_Z = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")
COALESCING = {"labels_snapshot", "key_points_snapshot", "bounding_boxes_snapshot"}

by_type = pytest.mark.parametrize("spec", SERVER_MESSAGES, ids=[f"{s.type}-{'-'.join(s.fields)}"
                                                                 for s in SERVER_MESSAGES])


def values_for(spec: ServerMessage) -> dict[str, Any]:
    """A distinct value for every field (`time` included)."""
    return {name: f"value-of-{name}" for name in spec.fields}


@pytest.mark.parametrize("vocabulary", VOCABULARIES, ids=[v.name for v in VOCABULARIES])
def test_server_message_types_are_unique_within_a_vocabulary(vocabulary: protocol.Vocabulary) -> None:
    types = [s.type for s in vocabulary.messages.values()]
    assert len(types) == len(set(types))


def test_an_event_is_encoded_once_per_vocabulary_each_with_its_fields() -> None:
    event = Event(Kind.MEMBER_JOINED, sessionID="s", memberID="ann", memberEmail="ann@example.com")
    seed, webapp = event.frame(SEED), event.frame(WEBAPP)
    assert event.frame(SEED) is seed
    assert json.loads(seed.text) == {"type": "member_joined", "sessionID": "s", "memberID": "ann",
                                     "time": event.values["time"]}
    assert json.loads(webapp.text) == {"type": "member_joined", "sessionID": "s", "memberID": "ann",
                                       "memberEmail": "ann@example.com", "time": event.values["time"]}
    snapshot = Event(Kind.KEY_POINTS, sessionID="s", changes=None)
    assert (snapshot.frame(SEED).type, snapshot.frame(WEBAPP).type) == ("labels_snapshot", "key_points_snapshot")
    assert Event(Kind.SESSION_JOINED, sessionID="s", role="member", ownerID="o", members=[]).frame(WEBAPP) is None


@pytest.mark.parametrize("kind", list(Kind), ids=[k.value for k in Kind])
def test_every_kind_is_told_in_the_seed_vocabulary(kind: Kind) -> None:
    assert kind in SEED.messages


@by_type
def test_builds_json_with_exactly_type_and_fields(spec: ServerMessage) -> None:
    values = values_for(spec)
    frame = spec(**values)
    body = json.loads(frame.text)
    assert list(body) == ["type", *spec.fields]
    assert body == {"type": spec.type, **values}
    assert frame.type == spec.type


@by_type
def test_refuses_an_extra_field(spec: ServerMessage) -> None:
    with pytest.raises(TypeError, match=spec.type):
        spec(**values_for(spec), bogus="x")


@pytest.mark.parametrize(
    ("spec", "missing"),
    [(s, f) for s in SERVER_MESSAGES for f in s.fields if f != "time"],
    ids=[f"{s.type}-{f}" for s in SERVER_MESSAGES for f in s.fields if f != "time"],
)
def test_refuses_a_missing_field(spec: ServerMessage, missing: str) -> None:
    values = values_for(spec)
    del values[missing]
    with pytest.raises(TypeError, match=spec.type):
        spec(**values)


@pytest.mark.parametrize("spec", [s for s in SERVER_MESSAGES if "time" in s.fields],
                         ids=[s.type for s in SERVER_MESSAGES if "time" in s.fields])
def test_time_defaults_to_rfc3339_utc_with_z(spec: ServerMessage) -> None:
    values = values_for(spec)
    del values["time"]
    body = json.loads(spec(**values).text)
    assert RFC3339_Z.match(body["time"]), body["time"]
    assert body["time"].endswith("Z")


def test_utc_now_is_rfc3339_utc_with_z() -> None:
    assert RFC3339_Z.match(protocol.utc_now())


@by_type
def test_only_snapshots_coalesce(spec: ServerMessage) -> None:
    assert spec.coalesce is (spec.type in COALESCING)
    assert spec(**values_for(spec)).coalesce is (spec.type in COALESCING)


def test_coalescing_messages_exist() -> None:
    assert {s.type for s in SERVER_MESSAGES if s.coalesce} == COALESCING


# -- client frames ---------------------------------------------------------------

def test_parses_set_image_id() -> None:
    frame = json.dumps({"type": "setImageID", "payload": {"imageID": "img-1", "other": 3}})
    assert parse_client_frame(frame) == Request("setImageID", {"imageID": "img-1"})


def test_parses_ping() -> None:
    assert parse_client_frame('{"type":"ping"}') == Request("ping", {})


def _set_image(payload: Any) -> str:
    return json.dumps({"type": "setImageID", "payload": payload})


@pytest.mark.parametrize(
    ("data", "code"),
    [
        pytest.param(b'{"type":"ping"}', "binary_frame", id="bytes"),
        pytest.param("{not json", "invalid_json", id="bad-json"),
        pytest.param("", "invalid_json", id="empty"),
        pytest.param("[]", "invalid_message", id="array"),
        pytest.param("3", "invalid_message", id="number"),
        pytest.param('"x"', "invalid_message", id="string"),
        pytest.param("null", "invalid_message", id="null"),
        pytest.param("{}", "invalid_message", id="no-type"),
        pytest.param('{"type":3}', "invalid_message", id="number-type"),
        pytest.param('{"type":null}', "invalid_message", id="null-type"),
        pytest.param('{"type":"dance"}', "unknown_type", id="unknown"),
        pytest.param('{"type":"setImageID"}', "invalid_payload", id="no-payload"),
        pytest.param(_set_image(["img"]), "invalid_payload", id="array-payload"),
        pytest.param(_set_image("img"), "invalid_payload", id="string-payload"),
        pytest.param(_set_image(None), "invalid_payload", id="null-payload"),
        pytest.param(_set_image({}), "invalid_payload", id="no-imageID"),
        pytest.param(_set_image({"imageID": ""}), "invalid_payload", id="empty-imageID"),
        pytest.param(_set_image({"imageID": " \t\n"}), "invalid_payload", id="blank-imageID"),
        pytest.param(_set_image({"imageID": 7}), "invalid_payload", id="number-imageID"),
        pytest.param(_set_image({"imageID": None}), "invalid_payload", id="null-imageID"),
    ],
)
def test_refuses_bad_frames_with_a_code(data: str | bytes, code: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        parse_client_frame(data)
    assert caught.value.code == code
    body = json.loads(caught.value.event().frame(SEED).text)
    assert body == {"type": "error", "code": code, "message": caught.value.message}
    assert body["message"]


# -- the message reference ---------------------------------------------------------

def test_docs_hold_the_message_reference() -> None:
    path = ROOT / "docs" / "protocol.md"
    assert path.is_file(), "docs/protocol.md is missing"
    text = path.read_text(encoding="utf-8")
    start, end = "<!-- messages:start -->", "<!-- messages:end -->"
    assert text.count(start) == 1, f"{start} must appear once in docs/protocol.md"
    assert text.count(end) == 1, f"{end} must appear once in docs/protocol.md"
    between = text.split(start, 1)[1].split(end, 1)[0]
    assert between.strip() == protocol.message_reference().strip(), \
        "docs/protocol.md is out of date: paste the output of `python -m canary.protocol` between the markers"
