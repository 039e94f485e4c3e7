"""Fixtures: the real service under gunicorn's gevent worker, and real WebSocket clients."""

from __future__ import annotations

import atexit
import base64
import contextlib
import itertools
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import emulators
import pytest
import websocket
from grpc_proxy import Proxy
from prometheus_client.parser import text_string_to_metric_families

from canary.dev import as_json

ROOT = Path(__file__).resolve().parent.parent
RFC3339_Z = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")
TIMEOUT = 10.0

_ids = itertools.count()
#: /dev/stats of a process holding nothing.
IDLE = {"sessions": 0, "participants": 0, "image_watches": 0, "image_listeners": 0, "session_listeners": 0,
        "member_image_listeners": 0, "session_writers": 0, "store_watches": 0}


def unique(prefix: str) -> str:
    """An ID no other test uses (servers are shared between tests)."""
    return f"{prefix}-{os.getpid()}-{next(_ids)}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition: Callable[[], Any], timeout: float = TIMEOUT, what: str = "condition",
             detail: Callable[[], Any] | None = None) -> Any:
    """Poll `condition` until it returns something truthy, or fail after `timeout` (saying `detail()`)."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            now = f"; now {detail()!r}" if detail else ""
            raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {result!r}{now})")
        time.sleep(0.02)


def stop_process(process: subprocess.Popen[str], grace: float) -> None:
    """SIGTERM `process`, and SIGKILL it if it has not exited `grace` seconds later."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


EMULATOR_DIR = emulators.EMULATOR_DIR
#: Why read-modify-write races are not tested on the npm fallback emulator.
EMULATOR_GAP = ("@firestore-emulator/server (the npm fallback) does not isolate transactions (concurrent "
                "read-modify-write transactions lose updates, with no retry); install Google's Cloud Firestore "
                "emulator, or set FIRESTORE_EMULATOR_HOST to an emulator that does, to run this test on Firestore")


@dataclass
class Emulator:
    """A Firestore emulator: one started here (Google's, or the npm fallback) or an external one."""

    host: str
    process: subprocess.Popen[str] | None = None
    #: "google" (Google's Cloud Firestore emulator), "npm" (@firestore-emulator/server through
    #: tests/emulator/start.js) or "external" (FIRESTORE_EMULATOR_HOST's, unless it answers as Google's does).
    kind: str = "external"
    log_path: Path | None = None

    @property
    def bundled(self) -> bool:
        """Whether it is the npm fallback, with its gaps: transactions not isolated, commits not all-or-nothing,
        `set()` merging; and start.js's own Listen (tests/test_emulator.py)."""
        return self.kind == "npm"

    @property
    def started(self) -> bool:
        """Whether the tests started it (and so may start another like it)."""
        return self.process is not None

    @classmethod
    def external(cls, host: str) -> Emulator:
        """FIRESTORE_EMULATOR_HOST's emulator: "google" if it answers `GET /` with `Ok` as Google's does."""
        return cls(host, kind="google" if emulators.answers_ok(host) else "external")

    @classmethod
    def start(cls, tmp: Path, port: int | None = None, kind: str | None = None) -> Emulator:
        """Start an emulator of `kind` (None: Google's where installed, else the npm one; see tests/emulators.py)
        on `port` (None: a free one, another if it is taken before the emulator binds it)."""
        kind = kind or emulators.kind()
        for attempt in range(3):
            try:
                return cls._start(tmp, port or free_port(), kind)
            except _PortTaken:
                if port is not None or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    @classmethod
    def _start(cls, tmp: Path, port: int, kind: str) -> Emulator:
        log_path = tmp / f"emulator-{port}.log"
        with log_path.open("w") as log:
            # Its own process group: stop() signals the group, so nothing it started outlives it.
            process = subprocess.Popen(emulators.command(kind, port), cwd=EMULATOR_DIR if kind == "npm" else tmp,
                                       stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        emulator = cls(f"127.0.0.1:{port}", process, kind, log_path)
        _emulators.append(emulator)

        def ready() -> bool:
            if process.poll() is not None:
                output = log_path.read_text()
                if "Address already in use" in output or "EADDRINUSE" in output:
                    raise _PortTaken(port)
                raise AssertionError(f"the {kind} Firestore emulator exited with {process.returncode}:\n{output}")
            return emulators.ready(kind, emulator.host)

        try:
            # A JVM starting on a busy machine (the suite runs servers and other emulators meanwhile) can take
            # many times its usual 1-3 s.
            wait_for(ready, timeout=60, what=f"the {kind} Firestore emulator on port {port}",
                     detail=lambda: log_path.read_text()[-2000:])
            if kind == "google":
                emulator.warm_up()
        except BaseException:
            emulator.stop()
            raise
        return emulator

    def warm_up(self) -> None:
        """One read through gRPC: a fresh JVM answers its first call in about a second (several on a busy
        machine), which must not count against a test's short FIRESTORE_TIMEOUT_SECONDS."""
        client = self.client()
        try:
            client.collection("warm-up").document("warm-up").get(timeout=60)
        finally:
            client.close()

    def stop(self) -> None:
        """SIGTERM its process group (SIGKILL if it is still there 10 s later). It holds nothing to flush, but
        a busy emulator (every listener's query re-run per write) can take longer than that to reach its
        handler."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def client(self, project: str | None = None) -> Any:
        """A google-cloud-firestore client on this emulator (`project`: the tests' own by default)."""
        return firestore_client(self.host, project)


class _PortTaken(Exception):
    """The emulator could not bind its port (taken between `free_port()` and its start)."""


#: Every emulator started by this run: whatever a failed test left running is stopped when the run ends.
_emulators: list[Emulator] = []


@atexit.register
def _stop_emulators() -> None:
    for emulator in _emulators:
        emulator.stop()


FIRESTORE_PROJECT = "demo-canary-tests"


def firestore_client(host: str, project: str | None = None) -> Any:
    """A google-cloud-firestore client on `host` (an emulator or a `Proxy`), for `project` (the tests' own by
    default); FIRESTORE_EMULATOR_HOST is restored."""
    from google.cloud import firestore

    before = os.environ.get("FIRESTORE_EMULATOR_HOST")
    os.environ["FIRESTORE_EMULATOR_HOST"] = host  # read once, by the constructor
    try:
        return firestore.Client(project=project or FIRESTORE_PROJECT)
    finally:
        if before is None:
            del os.environ["FIRESTORE_EMULATOR_HOST"]
        else:
            os.environ["FIRESTORE_EMULATOR_HOST"] = before


@dataclass
class Server:
    """A running `gunicorn -c gunicorn.conf.py wsgi:app`."""

    port: int
    process: subprocess.Popen[str]
    log_path: Path
    kind: str = "memory"
    firestore: Any = None  # the tests' own Firestore client, when kind == "firestore"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text()

    def request(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None, *,
                raw: bytes | None = None, timeout: float = TIMEOUT) -> tuple[int, dict[str, str], bytes]:
        """`body` is sent as JSON; `raw`, as it is."""
        data = json.dumps(body).encode() if body is not None else raw
        req = urllib.request.Request(self.http + path, data=data, method=method, headers=headers or {})
        if data is not None and "Content-Type" not in (headers or {}):
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    # -- the store: Firestore itself, or the memory store through the dev API --------
    def doc(self, collection: str, doc_id: str) -> dict[str, Any] | None:
        if self.firestore is not None:
            snapshot = self.firestore.collection(collection).document(doc_id).get()
            return as_json(snapshot.to_dict())  # as the dev API renders it if snapshot.exists else None
        status, _, body = self.request("GET", f"/dev/documents/{collection}/{doc_id}")
        if status == 404:
            return None
        assert status == 200, body
        return json.loads(body)

    def put(self, collection: str, doc_id: str, data: dict[str, Any]) -> None:
        if self.firestore is not None:  # as another Canary service would write it
            self.firestore.collection(collection).document(doc_id).set(data)
            return
        status, _, body = self.request("PUT", f"/dev/documents/{collection}/{doc_id}", data)
        assert status == 204, body

    def stats(self, greenlets: bool | str = False, watch: bool = False) -> dict[str, Any]:
        """/dev/stats; with `greenlets`, the live greenlets (`"where"`: and where each waits); with `watch`, the
        store's streams and targets."""
        wants = ((f"greenlets={greenlets if isinstance(greenlets, str) else 1}", greenlets), ("watch=1", watch))
        query = "&".join(name for name, wanted in wants if wanted)
        status, _, body = self.request("GET", "/dev/stats" + (f"?{query}" if query else ""))
        assert status == 200, body
        return json.loads(body)

    def batch(self, owner: str | None = None) -> tuple[str, str]:
        """A new project owned by `owner` and a batch in it: (batch ID, owner ID)."""
        owner = owner or unique("owner")
        project, batch = unique("project"), unique("batch")
        self.put("users", owner, {"email": f"{owner}@example.com"})
        self.put("projects", project, {"userID": owner, "projectName": "P", "lastUpdated": "2026-01-01"})
        self.put("batches", batch, {"projectID": project, "batchName": "B"})
        return batch, owner

    def worker_pids(self) -> list[int]:
        """The gunicorn workers (children of the master)."""
        pids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == self.process.pid:
                pids.append(int(stat.parent.name))
        return pids

    def stop(self) -> None:
        """Stop it; fails if gunicorn ever killed a worker whose hub stopped answering (a blocked process)."""
        stop_process(self.process, grace=30)
        timeouts = self.log().count("WORKER TIMEOUT")
        assert not timeouts, f"gunicorn killed {timeouts} unresponsive worker(s) of the server on {self.port}"


@contextmanager
def servers(start_one: Callable[..., Server]) -> Iterator[Callable[..., Server]]:
    """`start_one(**env)`, keeping what it starts; at the end every server is stopped, all at once (each waits
    for its own drain)."""
    started: list[Server] = []

    def start(**env: str) -> Server:
        server = start_one(**env)
        started.append(server)
        return server

    try:
        yield start
    finally:
        with ThreadPoolExecutor(max(len(started), 1)) as pool:
            list(pool.map(Server.stop, started))


def start_server(tmp: Path, emulator: Emulator | None = None, *, via: Proxy | None = None,
                 project: str = FIRESTORE_PROJECT, **env: str) -> Server:
    """Start the service on `emulator` (None: the memory store), reaching it through the proxy `via` if given.

    `Server.firestore`, the tests' own client, always talks to the emulator directly (not counted by `via`).
    `project` keeps a test's processes apart from every other test's: each process cleans up after the
    dead processes of its project, with its own graces.
    """
    if via is not None and emulator is None:
        raise ValueError("a proxy needs an emulator behind it")
    port = free_port()
    log_path = tmp / f"server-{port}.log"
    full_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("CANARY_", "JWT_", "CORS_"))},
        "PORT": str(port),
        "CANARY_STORE": "memory" if emulator is None else "firestore",
        "CANARY_DEV_API": "1",
        "WEB_CONCURRENCY": "1",
        "LOG_LEVEL": "DEBUG",
        # Tests make changes one after another and wait for each: the session document may be written
        # ten times a second here (production: once; tests/test_cross_process.py runs at that pace).
        "SESSION_WRITE_SECONDS": "0.1",
        **env,
    }
    full_env.pop("FIRESTORE_EMULATOR_HOST", None)
    if emulator is not None:
        full_env.update(FIRESTORE_EMULATOR_HOST=(via or emulator).host, GCP_PROJECT_ID=project)
    log = log_path.open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
        cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT, text=True,
    )
    server = Server(port, process, log_path, "memory" if emulator is None else "firestore",
                    emulator.client(project) if emulator is not None else None)

    def healthy() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode}:\n{server.log()}")
        try:
            return server.request("GET", "/health")[0] == 200
        except OSError:
            return False

    wait_for(healthy, timeout=30, what="the server to answer /health")
    return server


def pytest_configure(config: pytest.Config) -> None:
    try:
        emulators.kind()
    except emulators.ChoiceError as e:
        raise pytest.UsageError(str(e)) from None


def pytest_report_header(config: pytest.Config) -> str:
    """Which Firestore emulator the Firestore tests run on."""
    external = os.environ.get("FIRESTORE_EMULATOR_HOST")
    if external:
        kind = Emulator.external(external).kind
        return f"firestore emulator: {kind}, FIRESTORE_EMULATOR_HOST={external} (not started by the tests)"
    return f"firestore emulator: {emulators.describe(emulators.kind())}"


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """With -q (no header), the same line at the end."""
    if config.get_verbosity() < 0:
        terminalreporter.write_line(pytest_report_header(config))


@pytest.fixture(scope="session")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    """FIRESTORE_EMULATOR_HOST's emulator if set, else one started for this run (Google's where installed, else
    the npm fallback: see tests/emulators.py)."""
    external = os.environ.get("FIRESTORE_EMULATOR_HOST")
    if external:
        yield Emulator.external(external)
        return
    started = Emulator.start(tmp_path_factory.mktemp("emulator"))
    yield started
    started.stop()


@pytest.fixture
def firestore_proxy(emulator: Emulator) -> Iterator[Proxy]:
    """A started `Proxy` in front of the emulator: Google's front-end limit of 100 concurrent streams per
    connection, calls counted per method; `stop()`/`start()` crash and restart it on the same port.
    Stopped at the end of the test."""
    with Proxy(emulator.host) as proxy:
        yield proxy


@pytest.fixture
def proxied_server_factory(tmp_path: Path, emulator: Emulator,
                           firestore_proxy: Proxy) -> Iterator[Callable[..., Server]]:
    """Start Firestore-backed servers (with extra environment) that reach the emulator through
    `firestore_proxy`; all are stopped at the end of the test, before the proxy."""
    with servers(lambda **env: start_server(tmp_path, emulator, via=firestore_proxy, **env)) as start:
        yield start


@pytest.fixture(scope="session", params=["memory", "firestore"])
def store_kind(request: pytest.FixtureRequest) -> str:
    """Every behavioural test runs on both stores."""
    return request.param


@pytest.fixture
def isolating_store(request: pytest.FixtureRequest, store_kind: str) -> None:
    """Skip a race test where the store does not isolate transactions (the npm fallback emulator)."""
    if store_kind == "firestore" and request.getfixturevalue("emulator").bundled:
        pytest.skip(EMULATOR_GAP)


@pytest.fixture(scope="session")
def server_factory(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest,
                   store_kind: str) -> Iterator[Callable[..., Server]]:
    """Start servers on this run's store with extra environment; all are stopped at the end."""
    tmp = tmp_path_factory.mktemp(f"servers-{store_kind}")
    emulator = request.getfixturevalue("emulator") if store_kind == "firestore" else None
    with servers(lambda **env: start_server(tmp, emulator, **env)) as start:
        yield start


@pytest.fixture(scope="session")
def server(server_factory: Callable[..., Server]) -> Server:
    """The shared server with default settings (tests use their own batch IDs)."""
    return server_factory()


class Refused(Exception):
    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"{status} {body}")
        self.status = status
        self.body = body


@dataclass
class Client:
    """A real WebSocket client (websocket-client), with helpers to read the protocol."""

    ws: websocket.WebSocket
    welcome: dict[str, Any] = field(default_factory=dict)
    #: Message types every read drops: which image each other participant looks at is told to everyone as
    #: they switch, background to every test but those about it (tests/test_member_images.py clears it).
    ignored: tuple[str, ...] = ("member_image",)

    @classmethod
    def connect(cls, url: str, *, welcome: bool = True, timeout: float = TIMEOUT, **options: Any) -> Client:
        if "origin" not in options:
            options["suppress_origin"] = True  # like a non-browser client
        try:
            ws = websocket.create_connection(url, timeout=timeout, **options)
        except websocket.WebSocketBadStatusException as e:
            try:
                body = json.loads(e.resp_body)
            except ValueError:  # the web app's API refuses in text
                body = e.resp_body.decode()
            raise Refused(e.status_code, body) from None
        client = cls(ws)
        if welcome:
            client.welcome = client.recv()
        return client

    def send(self, message: Any) -> None:
        self.ws.send(message if isinstance(message, str) else json.dumps(message))

    def recv(self, timeout: float = TIMEOUT, skip: tuple[str, ...] = ("keepalive",)) -> dict[str, Any]:
        """The next message (skipping keepalives by default), checked for a well-formed `time`."""
        self.ws.settimeout(timeout)
        while True:
            opcode, data = self.ws.recv_data()
            assert opcode == websocket.ABNF.OPCODE_TEXT, f"unexpected frame {opcode} {data!r}"
            message = json.loads(data)
            if "time" in message:
                assert RFC3339_Z.match(message["time"]), message
            if message.get("type") not in skip and message.get("type") not in self.ignored:
                return message

    def roundtrip(self) -> None:
        """Ping and wait for the pong: every message queued before it has arrived."""
        self.send({"type": "ping"})
        message = self.recv()
        assert message["type"] == "pong", f"expected nothing before the pong, got {message}"

    def roundtrip_after(self, skip: tuple[str, ...]) -> None:
        """Ping and read up to the pong, skipping messages of the `skip` types."""
        self.send({"type": "ping"})
        message = self.recv(skip=("keepalive", *skip))
        assert message["type"] == "pong", f"expected only {skip} before the pong, got {message}"

    def closed_with(self, timeout: float = TIMEOUT, skip: tuple[str, ...] = ("keepalive",),
                    seen: list[dict[str, Any]] | None = None) -> int:
        """Read until the close frame and return its code (1006 if the TCP connection just ended). Messages
        before it must be of a type in `skip`, unless `seen` is given: then they are all collected there."""
        self.ws.settimeout(timeout)
        while True:
            try:
                frame = self.ws.recv_frame()
            except (websocket.WebSocketConnectionClosedException, ConnectionError):
                return 1006
            if frame.opcode == websocket.ABNF.OPCODE_CLOSE:
                return struct.unpack("!H", frame.data[:2])[0] if len(frame.data) >= 2 else 1005
            if frame.opcode == websocket.ABNF.OPCODE_TEXT:
                message = json.loads(frame.data)
                if message.get("type") in self.ignored:
                    continue
                if seen is not None:
                    seen.append(message)
                else:
                    assert message["type"] in skip, f"expected the close, got {message}"

    def close(self) -> None:
        self.ws.close()


def connect_at_once(urls: list[str], timeout: float = TIMEOUT) -> tuple[list[Client], list[int]]:
    """Open all `urls` at the same instant (one thread each): the clients accepted, the statuses refused."""
    barrier = threading.Barrier(len(urls))
    accepted: list[Client] = []
    refused: list[int] = []

    def connect(url: str) -> None:
        barrier.wait()
        try:
            accepted.append(Client.connect(url, timeout=timeout))
        except Refused as e:
            refused.append(e.status)

    threads = [threading.Thread(target=connect, args=(url,)) for url in urls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 20)
    return accepted, sorted(refused)


def close_at_once(clients: list[Client]) -> None:
    """Close all `clients` at the same instant (one thread each), as a crowd leaving together."""
    barrier = threading.Barrier(len(clients))

    def close(client: Client) -> None:
        barrier.wait(TIMEOUT)
        client.close()

    threads = [threading.Thread(target=close, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)


def owner_url(server: Server, batch: str, user: str) -> str:
    return f"{server.ws}/sessions/{batch}?userID={user}"


def join_url(server: Server, session: str, user: str) -> str:
    return f"{server.ws}/sessions/{session}/join?userID={user}"


# -- raw WebSocket frames: exact bytes on the wire ----------------------------------------------------

def client_frame(opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0, mask: bool = True) -> bytes:
    """One client frame (masked, as RFC 6455 requires of clients, unless `mask` is False)."""
    key = os.urandom(4) if mask else b""
    size = len(payload)
    if size < 126:
        head = bytes(((0x80 if fin else 0) | rsv << 4 | opcode, (0x80 if mask else 0) | size))
    elif size < 1 << 16:
        head = bytes(((0x80 if fin else 0) | rsv << 4 | opcode, (0x80 if mask else 0) | 126)) + struct.pack("!H", size)
    else:
        head = bytes(((0x80 if fin else 0) | rsv << 4 | opcode, (0x80 if mask else 0) | 127)) + struct.pack("!Q", size)
    body = bytes(b ^ key[i % 4] for i, b in enumerate(payload)) if mask else payload
    return head + key + body


class FakeClock:
    """A monotonic clock the test moves by setting `now`."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def refused_start(variable: str, env: dict[str, str], preexec: Callable[[], None] | None = None) -> str:
    """Start gunicorn with `env` (a bad `variable`) and check it stops at once, with status 2 and one clear line
    naming `variable`, no traceback; its output."""
    full_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("CANARY_", "JWT_", "CORS_", "GCP_", "FIRESTORE_", "GOOGLE_", "LOG_"))
                and k != "PORT"}
    full_env.update({"PORT": str(free_port()), "WEB_CONCURRENCY": "1", **env})
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
        cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=30,
        preexec_fn=preexec,
    )
    output = result.stdout
    assert result.returncode == 2, output
    assert time.monotonic() - started < 30
    lines = [line for line in output.splitlines() if variable in line]
    assert len(lines) == 1, output
    assert lines[0].startswith("canary: configuration error:"), output
    assert "Traceback" not in output
    return output


def scrape(server: Server, token: str | None = None) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics: {(name, sorted labels): value}."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    status, _, body = server.request("GET", "/metrics", headers=headers)
    assert status == 200, body
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def upgrade_headers(**overrides: str) -> dict[str, str]:
    """A WebSocket handshake's headers; an override of "" leaves that header out."""
    headers = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
               "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode()}
    headers.update(overrides)
    return {k: v for k, v in headers.items() if v}


def raw_request(server: Server, path: str, headers: dict[str, str]) -> tuple[bytes, socket.socket]:
    """Send a GET of `path` with exactly these headers; the response head (status line and headers) and the
    socket, nothing after the head read."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)
    lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items())]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head and (byte := sock.recv(1)):  # one byte at a time: not past the head
        head += byte
    return head, sock


def raw_websocket(server: Server, path: str) -> socket.socket:
    """A socket that completed the handshake of `path` (the 101 read, nothing more)."""
    head, sock = raw_request(server, path, upgrade_headers())
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def _exactly(sock: socket.socket, size: int) -> bytes:
    """`size` bytes, or fewer if the connection ends first."""
    data = b""
    while len(data) < size:
        try:
            chunk = sock.recv(size - len(data))
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            break
        data += chunk
    return data


def read_frame(sock: socket.socket) -> tuple[int, bytes] | None:
    """The next server frame (opcode, payload), or None at the end of the connection."""
    head = _exactly(sock, 2)
    if len(head) < 2:
        return None
    size = head[1] & 0x7F
    if size == 126:
        size = struct.unpack("!H", _exactly(sock, 2))[0]
    elif size == 127:
        size = struct.unpack("!Q", _exactly(sock, 8))[0]
    return head[0] & 0x0F, _exactly(sock, size)


def close_code(payload: bytes) -> int:
    return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005

