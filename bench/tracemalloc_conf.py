"""gunicorn settings for ``bench/idle.py --tracemalloc``: the project's own, plus tracemalloc in the worker.

Not for production: tracemalloc roughly doubles the worker's memory and slows every allocation. The project's
``gunicorn.conf.py`` (in the working directory gunicorn is started from) is executed here first, so every setting
and hook is the service's; ``post_worker_init`` is wrapped to start tracemalloc once the worker is set up. The
driver asks for a snapshot by creating ``$TRACEMALLOC_DIR/<name>.want``; the worker answers, after a full
collection, with ``<name>.snapshot`` (a pickled ``tracemalloc.Snapshot``).
"""

import os

_project_config = os.path.join(os.getcwd(), "gunicorn.conf.py")
with open(_project_config) as _f:
    exec(compile(_f.read(), _project_config, "exec"))  # the project's settings and hooks, as gunicorn would

_project_post_worker_init = post_worker_init  # noqa: F821 - defined by the project's settings


def post_worker_init(worker: object) -> None:  # gunicorn's hook
    _project_post_worker_init(worker)
    import gc
    import pickle
    import tracemalloc
    from pathlib import Path

    import gevent

    folder = Path(os.environ["TRACEMALLOC_DIR"])
    tracemalloc.start(int(os.environ.get("TRACEMALLOC_FRAMES", "12")))

    def answer() -> None:
        while True:
            for want in folder.glob("*.want"):
                gc.collect()
                snapshot = tracemalloc.take_snapshot()
                partial = want.with_suffix(".partial")
                partial.write_bytes(pickle.dumps(snapshot))
                partial.rename(want.with_suffix(".snapshot"))
                want.unlink()
            gevent.sleep(0.2)

    gevent.spawn(answer)
