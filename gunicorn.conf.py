"""gunicorn settings: gevent workers bound to $PORT.

The configuration is validated and the JWT secret read here, in the master,
so a bad setting or an unreadable secret stops start-up with one clear line
before any worker boots.

gunicorn's own lines (error and access logs) are written by `logger_class`,
canary.logs.GunicornLogger: secrets redacted, LOG_FORMAT, repeated errors collapsed.
"""

import gc
import glob
import os
import shutil
import sys
import tempfile

from canary import jwt_secret, logs
from canary.config import Config, ConfigError, raise_open_files_limit

try:
    _config = Config.from_env()
    raise_open_files_limit(_config.worker_connections)
    logs.log_format(os.environ)
    logs.log_level(os.environ)
    # Read once here, before the fork; workers inherit it as JWT_SECRET (like the Go service).
    _secret = jwt_secret.load(os.environ)
    if _secret is not None:
        os.environ["JWT_SECRET"] = _secret
except ConfigError as e:
    sys.stderr.write(f"canary: configuration error: {e}\n")
    sys.exit(2)

# Metrics from every worker, summed (canary.metrics, prometheus_client's multiprocess mode): set up
# here, in the master, before any worker imports prometheus_client.
_metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "").strip()
_own_metrics_dir = not _metrics_dir
if _own_metrics_dir:
    _metrics_dir = tempfile.mkdtemp(prefix="canary-metrics-")
else:
    os.makedirs(_metrics_dir, exist_ok=True)
    for _stale in glob.glob(os.path.join(_metrics_dir, "*.db")):  # a previous run's: not this one's counts
        os.remove(_stale)
os.environ["PROMETHEUS_MULTIPROC_DIR"] = _metrics_dir

#: gc.set_threshold in each worker (see post_worker_init).
GC_THRESHOLD = (10_000, 10, 10)

worker_class = "gevent"
bind = f"0.0.0.0:{_config.port}"
workers = _config.web_concurrency
# Each WebSocket holds a connection for its whole life: gunicorn's default cap
# (1000 per worker) would refuse clients long before the machine is busy.
worker_connections = _config.worker_connections
# Hosts kill 30 s after SIGTERM; finish well before.
graceful_timeout = 25
# Two instances on one machine must not share ~/.gunicorn/gunicorn.ctl.
control_socket_disable = True
accesslog = os.environ.get("ACCESS_LOG") or None
# Redacts tokens from every line (request URLs carry them), formats LOG_FORMAT, collapses repeats.
logger_class = logs.GunicornLogger


def child_exit(server, worker):  # noqa: ANN001, ANN201 - gunicorn's hook signature
    """A worker is gone: its gauges no longer count (its counters and histograms still do)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):  # noqa: ANN001, ANN201 - gunicorn's hook signature
    if _own_metrics_dir:
        shutil.rmtree(_metrics_dir, ignore_errors=True)


def post_worker_init(worker):  # noqa: ANN001, ANN201 - gunicorn's hook signature
    """On SIGTERM, close every client with 1012 at once instead of waiting for them to leave.

    gunicorn then stops accepting, sees no connection left and exits; a restart is
    not a leave, so sessions and members stay in the store for the clients to
    come back to (on this host's next process or on another).
    """
    import signal
    import time

    import gevent

    from canary.app import shutdown

    # gevent's hub prints accept failures (EMFILE) and crashed greenlets to stderr: log them instead.
    logs.route_gevent_errors(worker.log)

    # Python's default (a young-object collection every 700 allocations) collects in the middle of each
    # broadcast to a large session and promotes its short-lived objects, so full collections, during
    # which no client is served (70-140 ms with 1,000 clients), ran about once a second under load and
    # took a quarter of the fan-out's CPU. Every 10,000 allocations lets those objects die first; what
    # start-up allocated is frozen out of every later full collection. Figures: docs/benchmarks.md.
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)

    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum, frame):  # noqa: ANN001, ANN202
        worker.canary_drain_until = time.monotonic() + graceful_timeout - 1
        gevent.spawn(shutdown, worker.wsgi)
        if callable(previous):  # gunicorn's own: stop accepting, wait for connections, exit
            previous(signum, frame)

    signal.signal(signal.SIGTERM, on_sigterm)


def worker_exit(server, worker):  # noqa: ANN001, ANN201 - gunicorn's hook signature
    """A worker stopping on SIGTERM waits for its WebSockets to finish closing (1012, see `post_worker_init`):
    gunicorn waits only for its own request greenlets, and a WebSocket's request ends once it is upgraded
    (`canary.websocket.Connection.detach`)."""
    import time

    until = getattr(worker, "canary_drain_until", None)
    if until is not None:
        from canary.websocket import drain

        left = drain(until - time.monotonic())
        if left:
            worker.log.warning("stopping with %d WebSockets still open", left)
