"""gunicorn settings: one gevent worker per process, bound to $PORT.

The configuration is validated here, in the master, so a bad setting stops
start-up with one clear line before any worker boots.
"""

import os
import sys

from canary.config import Config, ConfigError

try:
    _config = Config.from_env()
except ConfigError as e:
    sys.stderr.write(f"canary: configuration error: {e}\n")
    sys.exit(2)

worker_class = "gevent"
bind = f"0.0.0.0:{_config.port}"
workers = int(os.environ.get("WEB_CONCURRENCY", "1"))
# Each WebSocket holds a connection for its whole life: gunicorn's default cap
# (1000 per worker) would refuse clients long before the machine is busy.
worker_connections = _config.worker_connections
# Hosts kill 30 s after SIGTERM; finish well before.
graceful_timeout = 25
# Two instances on one machine must not share ~/.gunicorn/gunicorn.ctl.
control_socket_disable = True
accesslog = os.environ.get("ACCESS_LOG") or None
