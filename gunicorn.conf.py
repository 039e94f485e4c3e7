"""gunicorn settings: gevent workers bound to $PORT.

The configuration is validated and the JWT secret read here, in the master,
so a bad setting or an unreadable secret stops start-up with one clear line
before any worker boots.
"""

import os
import sys

from canary import jwt_secret
from canary.config import Config, ConfigError

try:
    _config = Config.from_env()
    # Read once here, before the fork; workers inherit it as JWT_SECRET (like the Go service).
    _secret = jwt_secret.load(os.environ)
    if _secret is not None:
        os.environ["JWT_SECRET"] = _secret
except ConfigError as e:
    sys.stderr.write(f"canary: configuration error: {e}\n")
    sys.exit(2)

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
