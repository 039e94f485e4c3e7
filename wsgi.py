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

from canary import logs
from canary.app import create_app
from canary.config import ConfigError
from canary.store import StoreError

logs.configure(os.environ)  # LOG_LEVEL, LOG_FORMAT, tokens redacted

try:
    app = create_app()
except (ConfigError, StoreError) as e:
    logging.getLogger("canary").critical("canary: cannot start: %s", e)
    sys.exit(3)  # gunicorn's "worker failed to boot": the master stops
