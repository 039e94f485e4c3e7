"""The WSGI entry point: ``gunicorn -c gunicorn.conf.py wsgi:app``."""

import logging
import os

from canary.app import create_app

logging.basicConfig(
    level=os.environ.get("LOG_LEVEL", "INFO").upper(),
    format="%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s",
)

app = create_app()
