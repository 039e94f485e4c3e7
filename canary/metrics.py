"""Prometheus metrics (`/metrics`), summed truthfully over gunicorn's workers.

Each worker is a process of its own, so the official `prometheus_client` runs
in its multiprocess mode: every process writes its values to memory-mapped
files in `PROMETHEUS_MULTIPROC_DIR`, and whichever worker answers a scrape
sums them (`MultiProcessCollector`): counters and histograms over every
process that ever ran, gauges over the live ones (`livesum`). gunicorn.conf.py
sets the directory up in the master before any worker starts (a fresh one,
or `PROMETHEUS_MULTIPROC_DIR` emptied), marks a worker's gauges dead when it
exits, and removes a directory of its own at exit. On Heroku that is a
directory under the dyno's /tmp, new at each boot. Without the variable (a
process not run by gunicorn) the metrics are this process's own.

`/metrics` is not open to the world: with `METRICS_TOKEN` set it answers only
`Authorization: Bearer $METRICS_TOKEN`; without it, only loopback clients.
"""

from __future__ import annotations

import collections
import hmac
import os
import time

from flask import Blueprint, Response, current_app, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from .auth import bearer_token
from .logs import is_loopback, peer_address
from .protocol import Frame
from .sessions import SessionManager
from .store import Store
from .throttle import ADDRESS, USER

CLIENTS = Gauge("canary_clients", "Connected WebSocket clients, by role and API", ["role", "api"],
                multiprocess_mode="livesum")
SESSIONS = Gauge("canary_sessions", "Sessions with clients on a process (one on two processes counts twice)",
                 multiprocess_mode="livesum")
IMAGE_TARGETS = Gauge("canary_image_targets", "Store targets watching an image's keypoints or bounding boxes",
                      multiprocess_mode="livesum")
SESSION_TARGETS = Gauge("canary_session_targets", "Store targets following a session document",
                        multiprocess_mode="livesum")
WATCH_STREAMS = Gauge("canary_watch_streams", "Open Firestore Listen streams (at most one per process)",
                      multiprocess_mode="livesum")
LEASE_HELD = Gauge("canary_process_lease_held", "Processes holding a live lease (not stopping, last renewal ok)",
                   multiprocess_mode="livesum")
MESSAGES_SENT = Counter("canary_messages_sent", "Messages written to clients, by type", ["type"])
FRAMES_RECEIVED = Counter("canary_frames_received", "Client frames handled, by message type or refusal",
                          ["type"])
REFUSALS = Counter("canary_refusals", "HTTP answers of status 400 and above, by status", ["status"])
CLOSES = Counter("canary_closes", "WebSocket connections ended, by close code (1006: none)", ["code"])
STORE_ERRORS = Counter("canary_store_errors", "Failed store calls, by kind", ["kind"])
PASSWORD_FAILURES = Counter("canary_password_failures", "Web-app joins refused for a wrong session password")
PASSWORD_THROTTLED = Counter("canary_password_throttled", "Web-app password joins refused 429 by the password "
                             "throttle, by the counter that refused them (user, address)", ["counter"])
for _counter in (USER, ADDRESS):  # shown at 0 from the start: an alert on their rate needs the series
    PASSWORD_THROTTLED.labels(_counter)
COMMITS = Counter("canary_membership_commits", "Membership transactions committed (presence documents)")
SESSION_WRITES = Counter("canary_session_writes", "Session documents written by their writer (this process)")
IMAGE_WRITES = Counter("canary_member_image_writes", "Member-image documents written or deleted (at most about "
                       "one a second per participant switching images)")
CHANGES = Counter("canary_membership_changes", "Membership changes those transactions carried")
WRITES_PER_COMMIT = Histogram("canary_commit_writes", "Documents written per membership commit",
                              buckets=(1, 2, 3, 5, 10, 20, 50, 100, 200, 500))
ADMISSION = Histogram("canary_admission_seconds", "From a socket request to its 101 or its refusal",
                      buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
NOTIFICATION = Histogram("canary_notification_latency_seconds",
                         "From a store change seen by the process to the notification written to a client",
                         buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))

bp = Blueprint("metrics", __name__)


@bp.get("/metrics")
def metrics() -> Response:
    from .routes import error  # the service's refusal shape

    config = current_app.extensions["canary"].config
    if config.metrics_token:
        given = bearer_token(request.headers.get("Authorization"), None) or ""
        if not hmac.compare_digest(given.encode(), config.metrics_token.encode()):
            return error(401, "metrics need Authorization: Bearer <METRICS_TOKEN>")
    elif not is_loopback(peer_address(request.environ, config.trusted_proxies)):  # a local proxy's client is not
        return error(403, "metrics answer loopback clients only (set METRICS_TOKEN to scrape from elsewhere)")
    return Response(generate_latest(_registry()), mimetype=CONTENT_TYPE_LATEST)


@bp.after_app_request
def _count_refusal(response: Response) -> Response:
    """Every refusal of every route, counted once, whoever rendered it."""
    if response.status_code >= 400:
        REFUSALS.labels(str(response.status_code)).inc()
    return response


def _registry() -> CollectorRegistry:
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        return REGISTRY
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return registry


def commit(changes: int, writes: int) -> None:
    """A membership transaction committed (records.SessionRecords' `on_commit`)."""
    COMMITS.inc()
    CHANGES.inc(changes)
    WRITES_PER_COMMIT.observe(writes)


def session_write() -> None:
    """A session document written by its writer (records.SessionRecords' `on_session_commit`)."""
    SESSION_WRITES.inc()


def password_failure() -> None:
    """A wrong session password (throttle.PasswordThrottle's `on_failure`)."""
    PASSWORD_FAILURES.inc()


def password_throttled(counter: str) -> None:
    """A password join refused 429 by `counter` (throttle.PasswordThrottle's `on_throttled`)."""
    PASSWORD_THROTTLED.labels(counter).inc()


_published_errors: dict[str, int] = {}
_published_image_writes = 0


def refresh(sessions: SessionManager, store: Store) -> None:
    """Set the gauges from what this process holds now, and publish the counts gathered since the last
    refresh (messages, frames, the store's failures)."""
    for (role, api), count in sessions.client_counts().items():
        CLIENTS.labels(role, api).set(count)
    SESSIONS.set(sessions.session_count)
    watch = store.watch_stats()
    IMAGE_TARGETS.set(watch["query_targets"])
    SESSION_TARGETS.set(watch["document_targets"])
    WATCH_STREAMS.set(watch["streams"])
    LEASE_HELD.set(1 if sessions.lease_held else 0)
    global _published_image_writes
    if sessions.image_writes > _published_image_writes:
        IMAGE_WRITES.inc(sessions.image_writes - _published_image_writes)
        _published_image_writes = sessions.image_writes
    for kind, total in store.error_counts().items():
        if total > _published_errors.get(kind, 0):
            STORE_ERRORS.labels(kind).inc(total - _published_errors.get(kind, 0))
            _published_errors[kind] = total
    _publish(_sent_by_type, MESSAGES_SENT)
    _publish(_received_by_type, FRAMES_RECEIVED)


#: Counts of this process not yet added to their Prometheus counters: the per-message paths add to plain
#: dicts (a Prometheus increment in multiprocess mode is a locked write to a memory-mapped file, a tenth of
#: the CPU of a ping round trip), and `refresh` publishes them every second.
_sent_by_type: collections.Counter[str] = collections.Counter()
_received_by_type: collections.Counter[str] = collections.Counter()


def sent(frames: list[Frame]) -> None:
    """These frames were written to one client (counted by type; notifications' latency observed)."""
    for frame in frames:
        _sent_by_type[frame.type] += 1
        if frame.born:
            NOTIFICATION.observe(time.monotonic() - frame.born)


def received(kind: str) -> None:
    """A client frame was handled: its message type, or why it was refused."""
    _received_by_type[kind] += 1


def _publish(pending: collections.Counter[str], counter: Counter) -> None:
    for kind, count in list(pending.items()):
        counter.labels(kind).inc(count)
        pending[kind] -= count
        if not pending[kind]:
            del pending[kind]
