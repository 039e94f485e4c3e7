"""The upgrade path: the session routes are flask-sock's, and what its wrapper does after the view is harmless."""

from __future__ import annotations

import json
import socket
import struct

import pytest
from conftest import Client, Server, client_frame, close_code, join_url, owner_url, raw_websocket, read_frame
from flask_sock import Sock

from canary import sockets
from canary.app import create_app
from canary.config import Config
from canary.memory_store import MemoryStore


def test_every_session_socket_route_is_a_flask_sock_wrapper_of_the_one_view() -> None:
    app = create_app(Config(), MemoryStore())
    rules = {rule.endpoint: rule for rule in app.url_map.iter_rules()}
    sock_module = Sock.__module__
    for endpoint, path in (("canary.create_session", "/sessions/<batch_id>"),
                           ("canary.join_session", "/sessions/<session_id>/join"),
                           ("webapp.ws_create", "/sessions/<session_id>/ws/create"),
                           ("webapp.ws_join", "/sessions/<session_id>/ws/join")):
        view = app.view_functions[endpoint]
        assert view.__code__.co_filename.endswith(f"{sock_module}/__init__.py"), view.__code__.co_filename
        assert view.__wrapped__ is sockets.serve
        assert rules[endpoint].rule == path
        assert rules[endpoint].websocket


def test_an_os_error_of_a_rest_call_is_not_taken_for_a_failed_handshake(monkeypatch: pytest.MonkeyPatch) -> None:
    app = create_app(Config(), MemoryStore())
    sessions = app.extensions["canary"].sessions

    def reset(*_args: object) -> None:
        raise ConnectionResetError("the store's connection was reset")

    monkeypatch.setattr(sessions, "stop", reset)
    response = app.test_client().delete("/sessions/some-session?userID=alice")
    assert response.status_code == 500, response.data  # an error like any other, not "400 handshake failed"


# -- a raw client: exact frames on the wire ------------------------------------------------------------

def _frames_until_eof(sock: socket.socket) -> list[tuple[int, bytes]]:
    """Every frame the server sends until it closes the TCP connection, answering its close once."""
    frames: list[tuple[int, bytes]] = []
    while (frame := read_frame(sock)) is not None:
        frames.append(frame)
        if frame[0] == 0x8 and _closes(frames) == [close_code(frame[1])]:
            sock.sendall(client_frame(0x8, frame[1][:2]))  # answer the close, as a browser does
    return frames


def _closes(frames: list[tuple[int, bytes]]) -> list[int]:
    return [close_code(payload) for opcode, payload in frames if opcode == 0x8]


def test_a_server_chosen_close_is_the_only_close_frame(server: Server) -> None:
    batch, owner = server.batch()
    host = Client.connect(owner_url(server, batch, owner))
    sid = host.welcome["sessionID"]
    member = raw_websocket(server, f"/sessions/{sid}/join?userID=raw")
    assert host.recv()["type"] == "member_joined"
    host.close()  # the session ends: the member gets session_closed, then a close frame with 4000
    frames = _frames_until_eof(member)
    texts = [json.loads(payload)["type"] for opcode, payload in frames if opcode == 0x1]
    assert texts[0] == "session_joined"
    assert texts[-1] == "session_closed"
    assert _closes(frames) == [4000]
    assert frames[-1][0] == 0x8  # nothing after it
    member.close()


@pytest.mark.parametrize("code", [1000, 4321])
def test_a_client_chosen_close_is_echoed_once(server: Server, code: int) -> None:
    batch, owner = server.batch()
    host = raw_websocket(server, f"/sessions/{batch}?userID={owner}")
    opcode, welcome = read_frame(host)
    assert (opcode, json.loads(welcome)["type"]) == (0x1, "session_created")
    host.sendall(client_frame(0x8, struct.pack("!H", code)))
    frames = _frames_until_eof(host)
    assert [op for op, _ in frames] == [0x8]
    assert _closes(frames) == [code]
    host.close()


def test_a_client_that_just_disconnects_gets_no_close_frame_later(server: Server) -> None:
    batch, owner = server.batch()
    host = Client.connect(owner_url(server, batch, owner))
    sid = host.welcome["sessionID"]
    member = Client.connect(join_url(server, sid, "vanishing"))
    assert host.recv()["type"] == "member_joined"
    member.ws.sock.shutdown(socket.SHUT_WR)  # TCP end, no close frame: the server ends the connection
    frames = _frames_until_eof(member.ws.sock)
    assert _closes(frames) == []
    left = host.recv()
    assert (left["type"], left["memberID"]) == ("member_left", "vanishing")
    member.ws.sock.close()
    host.close()
