"""Client frames exactly as they arrive on the wire: split, merged, fragmented, malformed.

The service reads whole, final, masked text frames, pings and pongs itself and hands the connection to
wsproto at the first frame of any other kind (websocket.Connection.serve): every case here goes through
one path, the other, or the hand-over between them.
"""

from __future__ import annotations

import json
import socket
import struct

import pytest
from conftest import Server, client_frame, close_code, raw_websocket, read_frame

PING = b'{"type":"ping"}'


@pytest.fixture
def sock(server: Server) -> socket.socket:
    """The owner's raw socket of a new session, its welcome read."""
    batch, owner = server.batch()
    connection = raw_websocket(server, f"/sessions/{batch}?userID={owner}")
    assert json.loads(read_frame(connection)[1])["type"] == "session_created"
    yield connection
    connection.close()


def messages(sock: socket.socket, count: int) -> list[tuple[int, dict | bytes]]:
    """The next `count` frames: text ones parsed (keepalives skipped), others as bytes."""
    got: list[tuple[int, dict | bytes]] = []
    while len(got) < count:
        opcode, payload = read_frame(sock)
        if opcode == 0x1:
            body = json.loads(payload)
            if body["type"] != "keepalive":
                got.append((opcode, body))
        else:
            got.append((opcode, payload))
    return got


def types(frames: list[tuple[int, dict | bytes]]) -> list[object]:
    """Text messages' types in order, then the control frames in order (the service answers a client's ping
    at once, while messages go through the client's writer: a pong may overtake them)."""
    texts = [payload["type"] for opcode, payload in frames if opcode == 0x1]
    return texts + [(opcode, payload) for opcode, payload in frames if opcode != 0x1]


def test_a_frame_sent_one_byte_at_a_time(sock: socket.socket) -> None:
    for byte in client_frame(0x1, PING):
        sock.sendall(bytes((byte,)))
    assert types(messages(sock, 1)) == ["pong"]


def test_several_frames_of_kinds_in_one_write(sock: socket.socket) -> None:
    sock.sendall(client_frame(0x1, PING) + client_frame(0x9, b"hello") + client_frame(0x2, b"\x00\x01")
                 + client_frame(0x1, PING))
    got = messages(sock, 4)
    assert types(got) == ["pong", "error", "pong", (0xA, b"hello")]
    assert [p["code"] for op, p in got if op == 0x1 and p["type"] == "error"] == ["binary_frame"]


def test_a_two_byte_length_and_a_frame_cut_in_its_header(sock: socket.socket) -> None:
    image = "i" * 300  # 300 characters: a 126 (two-byte) length
    frame = client_frame(0x1, json.dumps({"type": "setImageID", "payload": {"imageID": image}}).encode())
    assert frame[1] & 0x7F == 126
    ping = client_frame(0x1, PING)
    sock.sendall(frame[:3])  # the first byte of the length only
    sock.sendall(frame[3:] + ping[:5])  # then the rest, and the next frame cut in its mask
    sock.sendall(ping[5:])
    assert sorted(types(messages(sock, 3))) == ["bounding_boxes_snapshot", "labels_snapshot", "pong"]


def test_a_fragmented_message_is_read_whole_and_so_is_what_follows(sock: socket.socket) -> None:
    sock.sendall(client_frame(0x1, PING[:5], fin=False) + client_frame(0x0, PING[5:10], fin=False)
                 + client_frame(0x9, b"between") + client_frame(0x0, PING[10:]) + client_frame(0x1, PING))
    assert types(messages(sock, 3)) == ["pong", "pong", (0xA, b"between")]


@pytest.mark.parametrize(("frame", "code"), [
    (client_frame(0x1, PING, mask=False), 1002),
    (client_frame(0x1, PING, rsv=4), 1002),
    (client_frame(0x1, b'{"type":"\xff\xfe"}'), 1007),
    (client_frame(0x3, b"x"), 1002),
], ids=["unmasked", "reserved-bit", "not-utf8", "reserved-opcode"])
def test_a_protocol_violation_closes_with_its_code(sock: socket.socket, frame: bytes, code: int) -> None:
    sock.sendall(client_frame(0x1, PING))
    assert types(messages(sock, 1)) == ["pong"]  # read by the service's own reader
    sock.sendall(frame + client_frame(0x1, PING))  # wsproto reads from the violation on, and closes
    opcode, payload = read_frame(sock)
    assert (opcode, close_code(payload)) == (0x8, code)


def test_a_close_in_the_same_write_as_messages_ends_the_connection(sock: socket.socket) -> None:
    sock.sendall(client_frame(0x1, PING) + client_frame(0x8, struct.pack("!H", 1000)) + client_frame(0x1, PING))
    frames = []
    while (frame := read_frame(sock)) is not None:
        frames.append(frame)
    # The close is echoed (the pong answering the first frame may have been dropped: the client closed).
    assert [(op, close_code(p)) for op, p in frames if op == 0x8] == [(0x8, 1000)]
    assert frames[-1][0] == 0x8
    assert all(json.loads(p)["type"] == "pong" for op, p in frames if op == 0x1)


def test_a_ping_of_the_client_is_answered_with_its_payload(sock: socket.socket) -> None:
    for payload in (b"", b"x", b"y" * 125):
        sock.sendall(client_frame(0x9, payload))
        assert messages(sock, 1) == [(0xA, payload)]
