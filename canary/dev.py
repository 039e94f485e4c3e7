"""The development API (`CANARY_DEV_API=1`): read and write the store over HTTP,
and count what the process holds. Used by `make run`'s walk-through and by the
tests; never enable it in production.
"""

from __future__ import annotations

import gc
from datetime import datetime
from typing import Any

import greenlet
from flask import Blueprint, Response, current_app, jsonify, request

from .routes import error
from .sockets import services
from .store import Store

bp = Blueprint("canary_dev", __name__, url_prefix="/dev")


def _store() -> Store:
    return current_app.extensions["canary.store"]


def as_json(value: Any) -> Any:
    """Store values as JSON: timestamps become RFC 3339 strings."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: as_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [as_json(v) for v in value]
    return value


@bp.get("/documents/<collection>/<doc_id>")
def get_document(collection: str, doc_id: str) -> Response:
    data = _store().get(collection, doc_id)
    if data is None:
        return error(404, f"{collection}/{doc_id} not found")
    return jsonify(as_json(data))


@bp.put("/documents/<collection>/<doc_id>")
def put_document(collection: str, doc_id: str) -> Response:
    data = request.get_json(silent=True)
    if not isinstance(data, dict):
        return error(400, "the body must be a JSON object")
    _store().set(collection, doc_id, data)
    return Response(status=204)


@bp.delete("/documents/<collection>/<doc_id>")
def delete_document(collection: str, doc_id: str) -> Response:
    _store().delete(collection, doc_id)
    return Response(status=204)


@bp.get("/documents/<collection>")
def query_documents(collection: str) -> Response:
    """Documents of `collection`, optionally `?field=…&value=…`."""
    field, value = request.args.get("field"), request.args.get("value")
    if field is None or value is None:
        return error(400, "give field and value")
    return jsonify({d.id: as_json(d.data) for d in _store().query(collection, field, value)})


@bp.get("/stats")
def stats() -> Response:
    """Live sessions, participants and watches; with ``?greenlets=1``, live greenlets too; with ``?watch=1``,
    how the store carries the watches (Firestore: its Listen stream and targets); with ``?gc=1``, the
    process's garbage-collector settings."""
    body: dict[str, Any] = {**services().sessions.stats(), "store_watches": _store().watch_count()}
    if request.args.get("gc"):
        body.update(gc_threshold=list(gc.get_threshold()), gc_frozen=gc.get_freeze_count())
    if request.args.get("watch"):
        body.update(_store().watch_stats())
    if request.args.get("greenlets"):
        live = [o for o in gc.get_objects() if isinstance(o, greenlet.greenlet) and not o.dead]
        body["greenlets"] = len(live)
        if request.args.get("greenlets") == "where":  # where each waits: what a test shows when one lingers
            body["greenlets_where"] = sorted(
                " < ".join(f"{f.f_code.co_name}:{f.f_lineno}" for f in _frames(g.gr_frame)) for g in live)
    return jsonify(body)


def _frames(frame: Any) -> list[Any]:
    """A greenlet's innermost frames first, at most six."""
    frames = []
    while frame is not None and len(frames) < 6:
        frames.append(frame)
        frame = frame.f_back
    return frames
