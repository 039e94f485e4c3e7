"""canary.logs: no token in any line (gunicorn's and the application's), LOG_FORMAT=json, repeated errors
collapsed, and the access line of an accepted WebSocket upgrade.

Real servers run on the memory store only: what is logged does not depend on the store.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import resource
import shlex
import socket
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import gevent
import pytest
import websocket
from conftest import RFC3339_Z, TIMEOUT, FakeClock, Server, refused_start, start_server, wait_for
from gevent.server import StreamServer
from gunicorn.config import Config as GunicornConfig

from canary import logs
from canary.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent
SECRETS = ("SECRET-TOKEN-123", "SECRET-TOKEN-456", "SECRET-TOKEN-789")
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJ1c2VySUQiOiJib2IifQ.c2lnbmF0dXJlLXNlY3JldA"
STABLE = ("time", "level", "logger", "event", "process")
#: gunicorn's default access format, plus the two places a token can hide: the header and the query.
ACCESS_FORMAT = '%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s" authz="%({authorization}i)s" q="%(q)s"'


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every non-empty line of `text` as a JSON object with the stable fields (failing on any other line)."""
    records = []
    for line in text.splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        assert isinstance(record, dict), line
        assert all(name in record for name in STABLE), line
        assert RFC3339_Z.match(record["time"]), line
        assert isinstance(record["process"], int), line
        records.append(record)
    return records


# -- redaction ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("GET /sessions/s1/join?userID=bob&auth=SECRET-TOKEN-123 HTTP/1.1",
     "GET /sessions/s1/join?userID=bob&auth=[redacted] HTTP/1.1"),
    ("/sessions/s1/ws/join?token=SECRET-TOKEN-456&auth=SECRET-TOKEN-123",
     "/sessions/s1/ws/join?token=[redacted]&auth=[redacted]"),
    ("auth=SECRET-TOKEN-123&userID=bob", "auth=[redacted]&userID=bob"),  # a bare QUERY_STRING
    ("Authorization: Bearer SECRET-TOKEN-789", "Authorization: Bearer [redacted]"),
    ("{'HTTP_AUTHORIZATION': 'Basic dXNlcjpwYXNz'}", "{'HTTP_AUTHORIZATION': 'Basic [redacted]'}"),
    ("next=%2Fjoin%3FuserID%3Dbob%26auth%3DSECRET-TOKEN-123%26x%3D1",  # a URL inside a query value
     "next=%2Fjoin%3FuserID%3Dbob%26auth%3D[redacted]%26x%3D1"),
    (f"the token {JWT} is invalid", "the token [redacted] is invalid"),
    # Left alone: other parameters, words, and the service's own refusal message.
    ("/sessions/s1/join?userID=bob&oauth=x", "/sessions/s1/join?userID=bob&oauth=x"),
    ("a login token is required (Authorization: Bearer, or the auth query parameter)",
     "a login token is required (Authorization: Bearer, or the auth query parameter)"),
])
def test_redact(text: str, expected: str) -> None:
    assert logs.redact(text) == expected
    assert logs.redact(expected) == expected  # idempotent: redacting twice changes nothing


def test_the_filter_redacts_message_arguments_traceback_and_fields() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(logs.RedactFilter())
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("canary.test-logs.filter")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    try:
        logger.warning("refused %s %s", "GET", "/sessions/s1/join?userID=bob&auth=SECRET-TOKEN-123")
        logger.info("headers: %r", {"Authorization": "Bearer SECRET-TOKEN-789"})
        try:
            raise ValueError("bad url /x?token=SECRET-TOKEN-456")
        except ValueError:
            logger.exception("failed")
        record = logger.makeRecord(logger.name, logging.INFO, __file__, 1, "upgrade", None, None,
                                   extra={"path": "/x?auth=SECRET-TOKEN-123"})
        handler.filter(record)
        assert record.path == "/x?auth=[redacted]"
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert not any(secret in text for secret in SECRETS), text
    assert "refused GET /sessions/s1/join?userID=bob&auth=[redacted]" in text
    assert "'Bearer [redacted]'" in text
    assert "ValueError: bad url /x?token=[redacted]" in text  # the traceback too


# -- LOG_FORMAT / LOG_LEVEL ---------------------------------------------------------------------------

def test_log_format_and_level_are_validated() -> None:
    assert logs.log_format({}) == "text"
    assert logs.log_format({"LOG_FORMAT": " JSON "}) == "json"
    assert logs.log_format({"LOG_FORMAT": ""}) == "text"
    with pytest.raises(ConfigError, match=r"^LOG_FORMAT='xml' is not one of: text, json$"):
        logs.log_format({"LOG_FORMAT": "xml"})
    assert logs.log_level({}) == "INFO"
    assert logs.log_level({"LOG_LEVEL": "debug"}) == "DEBUG"
    with pytest.raises(ConfigError, match=r"^LOG_LEVEL='loud' is not one of"):
        logs.log_level({"LOG_LEVEL": "loud"})


@pytest.mark.parametrize(("variable", "value"), [("LOG_FORMAT", "xml"), ("LOG_LEVEL", "loud")])
def test_gunicorn_stops_with_one_clear_line_on_a_bad_log_setting(variable: str, value: str) -> None:
    output = refused_start(variable, {variable: value})
    assert output.splitlines() == [f"canary: configuration error: {variable}={value!r} is not one of: "
                                   + ("text, json" if variable == "LOG_FORMAT"
                                      else "DEBUG, INFO, WARNING, ERROR, CRITICAL")], output


def test_the_json_formatter_writes_one_object_per_line_with_the_stable_fields() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(logs.RedactFilter())
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger("canary.test-logs.json")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    try:
        adapter = logging.LoggerAdapter(logger, {"sessionID": "s1", "userID": "bob", "role": "member"})
        adapter.info("closing %s\nwith %d", "bob", 1013, extra={"closeCode": 1013})  # extra: the adapter's wins
        logger.info("closed", extra={"sessionID": "s1", "closeCode": 4000, "other": "not in the schema"})
        try:
            raise RuntimeError("boom /x?auth=SECRET-TOKEN-123")
        except RuntimeError:
            logger.exception("failed for %s", "bob", extra={"userID": "bob"})
    finally:
        logger.removeHandler(handler)
    assert len(stream.getvalue().splitlines()) == 3  # the message's newline and the traceback are escaped
    first, second, third = json_lines(stream.getvalue())
    assert first == {"time": first["time"], "level": "INFO", "logger": "canary.test-logs.json",
                     "event": "closing bob\nwith 1013", "process": os.getpid(),
                     "sessionID": "s1", "userID": "bob", "role": "member"}
    written = datetime.strptime(first["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert abs((datetime.now(UTC) - written).total_seconds()) < 60
    assert (second["event"], second["sessionID"], second["closeCode"]) == ("closed", "s1", 4000)
    assert "other" not in second
    assert (third["level"], third["event"], third["userID"]) == ("ERROR", "failed for bob", "bob")
    assert third["exc"].startswith("Traceback (most recent call last):")
    assert third["exc"].endswith("RuntimeError: boom /x?auth=[redacted]")


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Put the root and `canary.access` loggers back as they were after a test that calls `configure`."""
    root, access = logging.getLogger(), logging.getLogger(logs.ACCESS_LOGGER)
    saved = [(lg, lg.handlers[:], lg.level, lg.propagate) for lg in (root, access)]
    yield
    for lg, handlers, level, propagate in saved:
        for handler in lg.handlers[:]:
            if handler not in handlers:
                lg.removeHandler(handler)
                handler.close()
        lg.setLevel(level)
        lg.propagate = propagate
    logging.captureWarnings(False)


def test_configure_sets_up_the_application_s_logging(restore_logging: None, capsys: pytest.CaptureFixture[str],
                                                     tmp_path: Path) -> None:
    logs.configure({"LOG_FORMAT": "json", "LOG_LEVEL": "warning", "ACCESS_LOG": "-"})
    logs.configure({"LOG_FORMAT": "json", "LOG_LEVEL": "warning", "ACCESS_LOG": "-"})  # again: replaced
    root = logging.getLogger()
    ours = [h for h in root.handlers if getattr(h, "_canary", False)]
    assert len(ours) == 1
    assert isinstance(ours[0].formatter, logs.JsonFormatter)
    assert root.level == logging.WARNING
    logging.getLogger("canary.test-logs.configure").warning("GET /x?auth=%s", "SECRET-TOKEN-123")
    logging.getLogger("canary.test-logs.configure").info("not at WARNING")
    logs.log_upgrade({"REQUEST_METHOD": "GET", "RAW_URI": "/sessions/s1/join?auth=SECRET-TOKEN-123",
                      "REMOTE_ADDR": "10.1.2.3"}, 101, "/sessions/<session_id>/join")
    captured = capsys.readouterr()
    (app,) = json_lines(captured.err)
    assert (app["level"], app["event"]) == ("WARNING", "GET /x?auth=[redacted]")
    (upgrade,) = json_lines(captured.out)  # ACCESS_LOG=-: where gunicorn writes its access lines
    assert (upgrade["logger"], upgrade["status"], upgrade["path"]) == \
        ("canary.access", 101, "/sessions/s1/join?auth=[redacted]")

    access_log = tmp_path / "access.log"
    logs.configure({"ACCESS_LOG": str(access_log)})  # text, to a file
    logs.log_upgrade({"REQUEST_METHOD": "GET", "RAW_URI": "/sessions/s1/join", "REMOTE_ADDR": "10.1.2.3"}, 101,
                     "/sessions/<session_id>/join")
    assert '"GET /sessions/s1/join HTTP/1.1" 101 -' in access_log.read_text()
    logs.configure({})  # no ACCESS_LOG: no access lines, as gunicorn has it
    logs.log_upgrade({"REQUEST_METHOD": "GET", "RAW_URI": "/quiet"}, 101, "/quiet")
    assert "/quiet" not in capsys.readouterr().out + access_log.read_text()



def test_a_grpc_response_that_cannot_be_decoded_is_one_warning_line(restore_logging: None,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """grpc logs it with the decoder's traceback (grpc/_common.py `_transform`); the call fails and the
    service handles that, so the log gets one line."""
    logs.configure({})
    try:
        raise ValueError("Wire format was corrupt")
    except ValueError:
        logging.getLogger("grpc._common").exception("Exception deserializing message!")
        logging.getLogger("grpc._common").exception("Exception serializing message!")  # ours to fix: kept
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert "WARNING grpc._common: a gRPC response could not be decoded (ValueError: Wire format was corrupt); " \
           "its call fails" in lines[0]
    assert "ERROR grpc._common: Exception serializing message!" in lines[1]
    assert err.count("Traceback") == 1  # the serializing one's

# -- log_upgrade ----------------------------------------------------------------------------------------

@pytest.fixture
def access_lines() -> Iterator[Callable[[], list[dict[str, Any]]]]:
    """`canary.access` writing JSON lines to a buffer: a function returning them."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(logs.RedactFilter())
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger(logs.ACCESS_LOGGER)
    saved = logger.handlers[:], logger.level, logger.propagate
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield lambda: json_lines(stream.getvalue())
    logger.handlers[:], logger.level, logger.propagate = saved


UPGRADE_ENVIRON = {
    "REQUEST_METHOD": "GET", "RAW_URI": "/sessions/s1/ws/join?token=SECRET-TOKEN-456&auth=SECRET-TOKEN-123",
    "PATH_INFO": "/sessions/s1/ws/join", "QUERY_STRING": "token=SECRET-TOKEN-456&auth=SECRET-TOKEN-123",
    "SERVER_PROTOCOL": "HTTP/1.1", "REMOTE_ADDR": "10.0.0.9", "HTTP_USER_AGENT": "test-agent/1",
    "HTTP_X_FORWARDED_FOR": "203.0.113.7, 10.0.0.1", "HTTP_AUTHORIZATION": "Bearer SECRET-TOKEN-789",
}


def test_log_upgrade_writes_one_access_line_redacted(access_lines: Callable[[], list[dict[str, Any]]]) -> None:
    logs.log_upgrade(UPGRADE_ENVIRON, 101, "/sessions/<session_id>/ws/join", sessionID="s1", userID="bob",
                     role="member")
    (line,) = access_lines()
    assert (line["level"], line["logger"]) == ("INFO", "canary.access")
    assert {k: line[k] for k in (*logs.ACCESS_FIELDS, "sessionID", "userID", "role")} == {
        "remote": "10.0.0.9", "method": "GET", "path": "/sessions/s1/ws/join?token=[redacted]&auth=[redacted]",
        "status": 101, "bytes": None, "durationMs": None, "userAgent": "test-agent/1",
        "route": "/sessions/<session_id>/ws/join", "sessionID": "s1", "userID": "bob", "role": "member",
    }
    # The event is the line gunicorn's access log would have written (combined format), with the user.
    assert line["event"].startswith('10.0.0.9 - bob [')
    assert line["event"].endswith(
        '] "GET /sessions/s1/ws/join?token=[redacted]&auth=[redacted] HTTP/1.1" 101 - "-" "test-agent/1"')
    assert not any(secret in json.dumps(line) for secret in SECRETS)


def test_log_upgrade_trusts_x_forwarded_for_only_when_told(access_lines: Callable[[], list[dict[str, Any]]]) -> None:
    logs.log_upgrade(UPGRADE_ENVIRON, 101, "r", trusted_proxies=2)
    logs.log_upgrade(UPGRADE_ENVIRON, 101, "r", trusted_proxies=1)
    logs.log_upgrade(UPGRADE_ENVIRON, 101, "r")
    logs.log_upgrade({"REQUEST_METHOD": "GET", "PATH_INFO": "/p", "QUERY_STRING": "auth=SECRET-TOKEN-123"}, 101, "r",
                     trusted_proxies=1)
    two, one, untrusted, bare = access_lines()
    # "203.0.113.7, 10.0.0.1": the last hop is what the one trusted proxy saw; the client may have forged the rest.
    assert (two["remote"], one["remote"], untrusted["remote"], bare["remote"]) == \
        ("203.0.113.7", "10.0.0.1", "10.0.0.9", "-")
    assert bare["path"] == "/p?auth=[redacted]"  # without RAW_URI: PATH_INFO and QUERY_STRING


def test_log_upgrade_refuses_unknown_fields() -> None:
    with pytest.raises(TypeError, match="unknown fields"):
        logs.log_upgrade(UPGRADE_ENVIRON, 101, "r", message="would clash with the record's own attributes")


# -- gunicorn's logger ---------------------------------------------------------------------------------

@pytest.fixture
def gunicorn_logger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Any]]:
    """Make a `GunicornLogger` as gunicorn does (from its Config), writing to files in tmp_path, with a fake clock."""
    made: list[logs.GunicornLogger] = []

    def make(fmt: str = "text", access_format: str | None = None) -> logs.GunicornLogger:
        monkeypatch.setenv("LOG_FORMAT", fmt)
        cfg = GunicornConfig()
        cfg.set("errorlog", str(tmp_path / "error.log"))
        cfg.set("accesslog", str(tmp_path / "access.log"))
        if access_format:
            cfg.set("access_log_format", access_format)
        log = logs.GunicornLogger(cfg)
        log.clock = FakeClock()
        log.repeats = logs.RepeatLimiter(10.0, clock=log.clock)
        made.append(log)
        return log

    yield make
    for log in made:
        for logger in (log.error_log, log.access_log):
            for handler in [h for h in logger.handlers if getattr(h, "_gunicorn", False)]:
                logger.removeHandler(handler)
                handler.close()


class Response:
    """What gunicorn's workers pass to `access` as `resp`."""

    status = "404 Not Found"
    headers = (("Content-Type", "application/json"),)
    sent = 65


ACCESS_ENVIRON = {
    "REQUEST_METHOD": "GET", "RAW_URI": "/sessions/s1/join?userID=bob&auth=SECRET-TOKEN-123&token=SECRET-TOKEN-456",
    "PATH_INFO": "/sessions/s1/join", "QUERY_STRING": "userID=bob&auth=SECRET-TOKEN-123&token=SECRET-TOKEN-456",
    "SERVER_PROTOCOL": "HTTP/1.1", "REMOTE_ADDR": "127.0.0.1", "HTTP_USER_AGENT": "agent",
    "HTTP_AUTHORIZATION": "Bearer SECRET-TOKEN-789",
}
ACCESS_HEADERS = [("HOST", "x"), ("AUTHORIZATION", "Bearer SECRET-TOKEN-789"), ("USER-AGENT", "agent")]


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_gunicorn_access_lines_are_redacted(gunicorn_logger: Callable[..., Any], tmp_path: Path, fmt: str) -> None:
    fmt_with_environ = ACCESS_FORMAT + ' e="%({query_string}e)s %({http_authorization}e)s %({raw_uri}e)s"'
    log = gunicorn_logger(fmt, fmt_with_environ)
    log.access(Response(), ACCESS_HEADERS, ACCESS_ENVIRON, timedelta(milliseconds=12.5))  # as the workers call it
    text = (tmp_path / "access.log").read_text()
    assert not any(secret in text for secret in SECRETS), text
    expected = ('127.0.0.1 - - [', '] "GET /sessions/s1/join?userID=bob&auth=[redacted]&token=[redacted] HTTP/1.1" '
                '404 65 "-" "agent" authz="[redacted]" q="userID=bob&auth=[redacted]&token=[redacted]" '
                'e="userID=bob&auth=[redacted]&token=[redacted] [redacted] '
                '/sessions/s1/join?userID=bob&auth=[redacted]&token=[redacted]"')
    if fmt == "json":
        (line,) = json_lines(text)
        assert line["logger"] == "gunicorn.access"
        assert {k: line[k] for k in logs.ACCESS_FIELDS if k != "route"} == {
            "remote": "127.0.0.1", "method": "GET", "status": 404, "bytes": 65, "durationMs": 12.5,
            "path": "/sessions/s1/join?userID=bob&auth=[redacted]&token=[redacted]", "userAgent": "agent",
        }
        text = line["event"]
    assert text.startswith(expected[0]), text
    assert text.rstrip("\n").endswith(expected[1]), text


def test_gunicorn_error_lines_are_redacted(gunicorn_logger: Callable[..., Any], tmp_path: Path) -> None:
    log = gunicorn_logger("json")
    try:
        raise ValueError("no route for /x?auth=SECRET-TOKEN-123")
    except ValueError:
        log.exception("Error handling request %s %s", "GET", "/x?auth=SECRET-TOKEN-123&token=SECRET-TOKEN-456")
    log.warning("Invalid request from ip=127.0.0.1: Authorization: Bearer SECRET-TOKEN-789")
    text = (tmp_path / "error.log").read_text()
    assert not any(secret in text for secret in SECRETS), text
    first, second = json_lines(text)
    assert (first["level"], first["logger"]) == ("ERROR", "gunicorn.error")
    assert first["event"] == "Error handling request GET /x?auth=[redacted]&token=[redacted]"
    assert first["exc"].endswith("ValueError: no route for /x?auth=[redacted]")
    assert second["event"] == "Invalid request from ip=127.0.0.1: Authorization: Bearer [redacted]"


def _emfile() -> None:
    raise OSError(errno.EMFILE, "Too many open files")


def test_repeated_errors_are_collapsed_per_kind(gunicorn_logger: Callable[..., Any], tmp_path: Path) -> None:
    log = gunicorn_logger("text")
    # The way gunicorn's async worker logs a socket error it does not expect (base_async.AsyncWorker.handle).
    for _ in range(100):
        try:
            _emfile()
        except OSError:
            log.exception("Socket error processing request.")
    log.warning("Worker graceful timeout (pid:%s)", 41)  # another kind: written
    log.warning("Worker graceful timeout (pid:%s)", 42)  # same kind (numbers aside): counted
    log.info("Booting worker with pid: %s", 43)  # below WARNING: never limited
    log.info("Booting worker with pid: %s", 44)
    text = (tmp_path / "error.log").read_text()
    assert text.count("Socket error processing request.") == 1
    assert text.count("OSError: [Errno 24] Too many open files") == 1  # one traceback
    assert text.count("Worker graceful timeout") == 1
    assert text.count("Booting worker") == 2

    log.clock.now += 9.9
    log.report_repeats()  # the windows have not ended yet
    assert "suppressed" not in (tmp_path / "error.log").read_text()
    log.clock.now += 0.2
    log.info("anything")  # any call reports the windows that have ended
    text = (tmp_path / "error.log").read_text()
    assert "suppressed 99 repeats in the last 10 s of: Socket error processing request. " \
           "[OSError: [Errno 24] Too many open files]" in text
    assert "suppressed 1 repeat in the last 10 s of: Worker graceful timeout (pid:41)" in text

    log.clock.now += 10.1  # a new window: the next one is written again
    try:
        _emfile()
    except OSError:
        log.exception("Socket error processing request.")
    assert (tmp_path / "error.log").read_text().count("Socket error processing request.") == 3


def test_the_limiter_keeps_a_bounded_number_of_kinds() -> None:
    clock = FakeClock()
    limiter = logs.RepeatLimiter(10.0, clock=clock, max_kinds=3)
    assert limiter.allow("counted", logging.ERROR, lambda: "counted") == (True, None)
    assert limiter.allow("counted", logging.ERROR, lambda: "counted") == (False, None)
    for n in range(50):  # many other kinds, each once: quiet ones are forgotten first
        clock.now += 0.1
        assert limiter.allow(n, logging.WARNING, lambda: "other") == (True, None)
        assert len(limiter._windows) <= 3
    clock.now += 10
    assert limiter.due() == [logs.Repeats(logging.ERROR, "counted", 1, pytest.approx(15.0))]


def test_the_repeat_key_separates_distinct_failures() -> None:
    def key_of(raiser: Callable[[], None]) -> tuple[Any, ...]:
        try:
            raiser()
        except Exception:
            return logs.repeat_key(logging.ERROR, "Error handling request %s", True)
        raise AssertionError("did not raise")

    def key_error() -> None:
        raise KeyError("x")

    assert key_of(_emfile) == key_of(_emfile)
    assert key_of(_emfile) != key_of(key_error)  # another exception type, raised elsewhere
    assert logs.repeat_key(logging.WARNING, "pid 12 at 0x7f00ab", None) == \
        logs.repeat_key(logging.WARNING, "pid 345 at 0x7f11cd", None)
    assert logs.repeat_key(logging.WARNING, "a", None) != logs.repeat_key(logging.ERROR, "a", None)


def test_gevent_accept_failures_go_through_the_logger_collapsed(gunicorn_logger: Callable[..., Any],
                                                                 tmp_path: Path) -> None:
    """gevent's StreamServer (gunicorn's gevent worker's server) reports a failed accept to the hub, which
    prints a traceback to stderr each retry; routed, they reach the logger and are collapsed."""
    log = gunicorn_logger("json")
    accepts = []

    class AtTheFileLimit(StreamServer):
        def do_read(self) -> Any:
            accepts.append(time.monotonic())
            _emfile()

    hub = gevent.get_hub()
    logs.route_gevent_errors(log, hub, report_every=None)
    server = AtTheFileLimit(("127.0.0.1", 0), lambda sock, address: None)
    server.start()
    client = socket.create_connection(server.address, timeout=TIMEOUT)  # the listener is now readable
    try:
        wait_for(lambda: gevent.sleep(0.01) or len(accepts) >= 5, what="five failed accepts")
    finally:
        server.stop()
        client.close()
        del hub.handle_error
    log.clock.now += 10.0
    log.report_repeats()
    failed, summary = json_lines((tmp_path / "error.log").read_text())
    assert (failed["level"], failed["event"]) == ("ERROR", f"<AtTheFileLimit 127.0.0.1:{server.address[1]}> "
                                                            "failed with OSError")
    assert failed["exc"].endswith("OSError: [Errno 24] Too many open files")
    assert summary["suppressed"] == len(accepts) - 1
    assert summary["event"].startswith(f"suppressed {len(accepts) - 1} repeats in the last 10 s of: <AtTheFileLimit")


# -- real servers ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["text", "json"])
def logging_server(request: pytest.FixtureRequest,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Server]]:
    """(LOG_FORMAT, a server with it) writing its access log to stdout, the Authorization header in its format."""
    server = start_server(tmp_path_factory.mktemp(f"logs-{request.param}"), ACCESS_LOG="-", LOG_FORMAT=request.param,
                          GUNICORN_CMD_ARGS=f"--access-logformat {shlex.quote(ACCESS_FORMAT)}")
    yield request.param, server
    server.stop()


def test_no_token_reaches_the_server_s_log(logging_server: tuple[str, Server]) -> None:
    fmt, server = logging_server
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        websocket.create_connection(f"{server.ws}/sessions/nonexistent-session/join?userID=bob&auth=SECRET-TOKEN-123",
                                    suppress_origin=True, timeout=TIMEOUT)
    assert refused.value.status_code == 404
    status, _, _ = server.request("GET", "/health?auth=SECRET-TOKEN-123&token=SECRET-TOKEN-456",
                                  headers={"Authorization": "Bearer SECRET-TOKEN-789"})
    assert status == 200

    def logged() -> bool:
        log = server.log()
        return "/sessions/nonexistent-session/join?userID=bob&auth=[redacted]" in log and \
            "/health?auth=[redacted]&token=[redacted]" in log
    wait_for(logged, what="both access lines", detail=server.log)
    log = server.log()
    assert not any(secret in log for secret in SECRETS), log
    assert ('authz=\\"[redacted]\\"' if fmt == "json" else 'authz="[redacted]"') in log  # the header's atom


@pytest.mark.parametrize("logging_server", ["json"], indirect=True)
def test_with_log_format_json_every_line_is_one_json_object(logging_server: tuple[str, Server]) -> None:
    _, server = logging_server
    server.request("GET", "/health?auth=SECRET-TOKEN-123")
    wait_for(lambda: "/health?auth=[redacted] " in server.log(), what="the access line", detail=server.log)
    records = json_lines(server.log())
    loggers = {record["logger"] for record in records}
    assert {"gunicorn.error", "gunicorn.access", "canary"} <= loggers, loggers  # gunicorn's, access, the app's
    access = [r for r in records if r["logger"] == "gunicorn.access"]
    assert all(set(logs.ACCESS_FIELDS) - {"route"} <= r.keys() for r in access)
    (health,) = [r for r in access if r["path"] == "/health?auth=[redacted]"]
    assert (health["method"], health["status"], health["remote"]) == ("GET", 200, "127.0.0.1")
    assert isinstance(health["durationMs"], float)


def test_accept_failures_at_the_open_files_limit_are_collapsed(tmp_path: Path) -> None:
    """The worker at its open-files limit: gevent retries the accept (and used to print a traceback) every
    second at most; one traceback is written, then the number suppressed, all as JSON lines."""
    server = start_server(tmp_path, LOG_FORMAT="json")
    clients: list[socket.socket] = []
    try:
        (worker,) = server.worker_pids()
        hard = resource.prlimit(worker, resource.RLIMIT_NOFILE)[1]
        resource.prlimit(worker, resource.RLIMIT_NOFILE, (len(os.listdir(f"/proc/{worker}/fd")) + 4, hard))
        for _ in range(16):  # the kernel completes the handshakes; the worker cannot accept them all
            clients.append(socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT))
        wait_for(lambda: "Too many open files" in server.log(), what="an accept failing with EMFILE",
                 detail=server.log)
        wait_for(lambda: '"suppressed"' in server.log(), timeout=logs.GunicornLogger.repeat_window + 10,
                 what="the count of suppressed repeats", detail=server.log)
    finally:
        for client in clients:
            client.close()
        server.stop()
    records = json_lines(server.log())
    failures = [r for r in records if "Too many open files" in r.get("exc", "")]
    summaries = [r for r in records if "suppressed" in r]
    assert 1 <= len(failures) <= 2, failures  # one per window (a second if the storm outlived the first)
    assert failures[0]["event"].endswith("failed with OSError")
    assert sum(s["suppressed"] for s in summaries) >= 1
    assert "Traceback" not in "".join(line for line in server.log().splitlines() if not line.startswith("{"))
