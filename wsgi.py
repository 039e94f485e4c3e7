"""The WSGI entry point: ``gunicorn -c gunicorn.conf.py wsgi:app``."""

import logging
import os
import sys

from gevent import monkey

if monkey.is_module_patched("socket"):
    # gunicorn's gevent worker has patched the standard library; gRPC (Firestore)
    # must be told before any channel exists, or it blocks the event loop.
    import grpc.experimental.gevent

    grpc.experimental.gevent.init_gevent()

from canary.app import create_app
from canary.config import ConfigError
from canary.store import StoreError

logging.basicConfig(
    level=os.environ.get("LOG_LEVEL", "INFO").upper(),
    format="%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s",
)

try:
    app = create_app()
except (ConfigError, StoreError) as e:
    logging.getLogger("canary").critical("canary: cannot start: %s", e)
    sys.exit(3)  # gunicorn's "worker failed to boot": the master stops
