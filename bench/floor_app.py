"""The floor of our stack, for bench/fanout.py: minimal Flask + flask-sock + gevent, deflate refused.

This is the "minimal Flask + flask-sock + gevent, deflate refused" row of
docs/performance-baseline.md rebuilt so it can be measured on the machine the
service is measured on: the same subset of the protocol (an owner creates a
session, members join, each join/leave is fanned out as member_joined /
member_left to every other client, ping/pong), one writer greenlet per client
fed by a bounded queue of 64 with non-blocking enqueue, JSON encoded once per
broadcast, and no session logic at all: no store, no validation, no
keepalives, no write timeouts. Never deploy it.

The routes are flask-sock's (`Sock.route`), as in the table's row; the
only addition is the one `before_request` that hides the deflate offer.

Run by fanout.py from bench/ as ``gunicorn -k gevent floor_app:app``.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

import gevent
import gevent.queue
from flask import Flask, Response, request
from flask_sock import Sock
from simple_websocket import Server

app = Flask(__name__)
sock = Sock(app)
sessions: dict[str, dict[str, Any]] = {}  # session ID -> {"owner": Writer, "members": {user ID: Writer}}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _frame(**body: Any) -> str:
    return json.dumps(body, separators=(",", ":"))


class Writer:
    """One client's outbound side: a bounded queue and the greenlet that drains it."""

    def __init__(self, ws: Server) -> None:
        self.ws = ws
        self.queue: gevent.queue.Queue[str | None] = gevent.queue.Queue(64)
        self.greenlet = gevent.spawn(self._run)

    def _run(self) -> None:
        try:
            while (item := self.queue.get()) is not None:
                self.ws.send(item)
        except Exception:  # the peer is gone
            pass

    def enqueue(self, text: str | None) -> None:
        try:
            self.queue.put_nowait(text)
        except gevent.queue.Full:  # not reading: drop the client
            self.ws.close(1013, "client too slow")


@app.before_request
def _refuse_deflate() -> None:
    # simple-websocket accepts permessage-deflate whenever offered; hide the offer.
    request.environ.pop("HTTP_SEC_WEBSOCKET_EXTENSIONS", None)


@app.get("/health")
def health() -> str:
    return "OK"


@app.put("/dev/documents/<collection>/<doc_id>")
def put_document(collection: str, doc_id: str) -> Response:
    """fanout.py creates users, projects and batches; this server needs none."""
    return Response(status=204)


def _serve(ws: Server, writer: Writer) -> None:
    while True:
        message = json.loads(ws.receive())
        if message.get("type") == "ping":
            writer.enqueue(_frame(type="pong", time=_now()))


@sock.route("/sessions/<batch_id>")
def create_session(ws: Server, batch_id: str) -> None:
    session_id = uuid.uuid4().hex
    writer = Writer(ws)
    session = sessions[session_id] = {"owner": writer, "members": {}}
    writer.enqueue(_frame(type="session_created", sessionID=session_id, batchID=batch_id, role="owner",
                          time=_now()))
    try:
        _serve(ws, writer)
    finally:
        sessions.pop(session_id, None)
        closed = _frame(type="session_closed", sessionID=session_id, time=_now())
        for member in session["members"].values():
            member.enqueue(closed)
            member.ws.close(4000, "session closed")
        writer.enqueue(None)
        writer.greenlet.join(2)


@sock.route("/sessions/<session_id>/join")
def join_session(ws: Server, session_id: str) -> None:
    user_id = request.args["userID"]
    session = sessions[session_id]
    writer = Writer(ws)
    session["members"][user_id] = writer
    writer.enqueue(_frame(type="session_joined", sessionID=session_id, role="member", ownerID="owner",
                          members=list(session["members"]), time=_now()))
    joined = _frame(type="member_joined", sessionID=session_id, memberID=user_id, time=_now())
    for other in [session["owner"], *session["members"].values()]:
        if other is not writer:
            other.enqueue(joined)
    try:
        _serve(ws, writer)
    finally:
        if session["members"].pop(user_id, None) is not None and sessions.get(session_id) is session:
            left = _frame(type="member_left", sessionID=session_id, memberID=user_id, time=_now())
            for other in [session["owner"], *session["members"].values()]:
                other.enqueue(left)
        writer.enqueue(None)
        writer.greenlet.join(2)
