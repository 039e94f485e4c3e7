"""Logging: no secret in any line, text or JSON lines, repeated errors collapsed.

Browsers can pass login tokens only in the query string, so request URLs carry
them (``?auth=…``, ``?token=…``), as the ``Authorization`` header does. Every
line the process writes goes through one of three doors, and each is guarded
where it opens:

- gunicorn's error and access logs are written by gunicorn's own ``Logger``
  object, which builds the access line from the raw request (``RAW_URI``,
  headers, environ) after the application has returned, on loggers that do not
  propagate to the application's handlers. Its documented extension point, the
  ``logger_class`` setting, is the one place that sees all of those lines:
  `GunicornLogger` (set in gunicorn.conf.py) redacts the access atoms, formats
  lines as text or JSON and collapses repeated errors.
- The application's (and libraries') records reach the root logger's handler,
  set up by `configure` (called by wsgi.py) with `RedactFilter` on the handler:
  a filter on a handler sees every record that reaches it, including those
  propagated from child loggers (a filter on a logger sees only records logged
  on that very logger).
- gevent's hub prints the failures of its accept loop (EMFILE at the open-files
  limit: a traceback per retry) and of crashed greenlets straight to stderr,
  past every logger: `route_gevent_errors` (called from gunicorn.conf.py's
  ``post_worker_init``) sends them through `GunicornLogger` instead.

JSON lines are built by a small formatter on ``json.dumps`` (`JsonFormatter`):
the schema is a fixed whitelist of fields with an RFC 3339 ``Z`` time, which a
library such as python-json-logger would need overriding for (its time format,
its pass-through of every ``extra`` attribute) for no gain over the standard
library, and at the cost of one more production dependency.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from gunicorn import glogging

from canary.config import choice
from canary.protocol import rfc3339

REDACTED = "[redacted]"
#: The query parameters that carry login tokens (routes read `auth`; `token` is accepted by clients too).
SECRET_PARAMS = ("auth", "token")
FORMATS = ("text", "json")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
TEXT_FORMAT = "%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"
#: Fields a record may carry (``extra=`` or a LoggerAdapter) that JSON lines include.
CONTEXT_FIELDS = ("sessionID", "userID", "role", "closeCode")
#: Fields of access-log lines (gunicorn's and `log_upgrade`'s).
ACCESS_FIELDS = ("remote", "method", "path", "status", "bytes", "durationMs", "userAgent", "route")
#: Set on the summary of collapsed repeats.
REPEAT_FIELDS = ("suppressed",)
#: Access-log atoms (lower case, as gunicorn keys them) that are credentials as a whole.
SECRET_ATOMS = frozenset({
    "{authorization}i", "{proxy-authorization}i", "{http_authorization}e", "{http_proxy_authorization}e",
})
ACCESS_LOGGER = "canary.access"

_names = "|".join(SECRET_PARAMS)
_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    # ?auth=… / &token=… / a bare query string "auth=…": the value up to the next separator.
    (re.compile(rf"(?i)(?<![\w.%-])((?:{_names})=)(?!\[redacted\])[^&\s\"'#;,)\]>]*"), rf"\1{REDACTED}"),
    # The same inside a percent-encoded URL (a URL passed as a query value).
    (re.compile(rf"(?i)((?:%3F|%26)(?:{_names})%3D)(?:(?!%26)[^&\s\"'#])*"), rf"\1{REDACTED}"),
    # Authorization: <scheme> <credentials> (as a header, an environ key or a repr of either).
    (re.compile(r"(?i)(\b(?:http_)?(?:proxy[-_])?authorization[\"']?\s*[:=]\s*[\"']?)"
                r"(?:([A-Za-z][\w-]*)(\s+))?(?!(?:bearer|basic)\b)[A-Za-z0-9\-._~+/\[\]]+=*"),
     rf"\1\2\3{REDACTED}"),
    (re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9\-._~+/\[\]]+=*"), rf"\1{REDACTED}"),
    # Anything shaped like a JWT, wherever it appears (a path segment, an error message).
    (re.compile(r"\beyJ[\w-]{2,}\.[\w-]{2,}\.[\w-]*"), REDACTED),
)


def redact(text: str) -> str:
    """`text` with the values of login tokens (query parameters, Authorization, bearer tokens, JWTs) replaced."""
    for pattern, replacement in _RULES:
        text = pattern.sub(replacement, text)
    return text


# -- settings -------------------------------------------------------------------------------------

def log_format(env: Mapping[str, str] | None = None) -> str:
    """LOG_FORMAT: ``text`` (default) or ``json``, any case; raise `ConfigError` otherwise."""
    return choice(os.environ if env is None else env, "LOG_FORMAT", "text", FORMATS, str.lower)


def log_level(env: Mapping[str, str] | None = None) -> str:
    """LOG_LEVEL (default INFO): one of `LEVELS`, any case; raise `ConfigError` otherwise."""
    return choice(os.environ if env is None else env, "LOG_LEVEL", "INFO", LEVELS, str.upper)


# -- filter and formatters ------------------------------------------------------------------------

_traceback_formatter = logging.Formatter()


class RedactFilter(logging.Filter):
    """Redacts a record in place: its message (arguments merged in), traceback, stack and string fields.

    Put on handlers (not loggers), so that records propagated from any logger pass through it.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Redact `record`; never drops it."""
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: keep everything, as text, rather than fail the line
            message = f"{record.msg!s} {record.args!r}"
        record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = _traceback_formatter.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        for name in (*CONTEXT_FIELDS, *ACCESS_FIELDS):
            value = record.__dict__.get(name)
            if isinstance(value, str):
                record.__dict__[name] = redact(value)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: ``time``, ``level``, ``logger``, ``event``, ``process``, then
    whichever of the context, access and repeat fields the record carries, then ``exc`` / ``stack``."""

    FIELDS = (*CONTEXT_FIELDS, *ACCESS_FIELDS, *REPEAT_FIELDS)

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON (newlines in the message or traceback are escaped)."""
        data: dict[str, Any] = {
            "time": rfc3339(datetime.fromtimestamp(record.created, UTC)),
            "level": record.levelname,
            "logger": record.name,
            "event": record.getMessage(),
            "process": record.process,
        }
        for name in self.FIELDS:
            if name in record.__dict__:
                data[name] = record.__dict__[name]
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            data["exc"] = record.exc_text
        if record.stack_info:
            data["stack"] = self.formatStack(record.stack_info)
        return json.dumps(data, default=str)


def make_formatter(fmt: str, text: logging.Formatter) -> logging.Formatter:
    """The formatter of LOG_FORMAT `fmt`: `JsonFormatter`, or `text` (the line's own text formatter)."""
    return JsonFormatter() if fmt == "json" else text


# -- the application's logging (wsgi.py) ----------------------------------------------------------

def configure(env: Mapping[str, str] | None = None) -> None:
    """Set up the application's logging per LOG_LEVEL and LOG_FORMAT, redacted.

    The root logger gets one handler on stderr; `ACCESS_LOGGER` (`log_upgrade`'s lines) writes where
    gunicorn's access log does (ACCESS_LOG: ``-`` is stdout, as gunicorn has it; unset: nowhere),
    formatted like gunicorn's access lines. Python's warnings are logged too. Calling it again
    replaces what it set up before.
    """
    env = os.environ if env is None else env
    fmt, level = log_format(env), log_level(env)
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(make_formatter(fmt, logging.Formatter(TEXT_FORMAT)))
    _install(root, handler)
    root.setLevel(level)

    access = logging.getLogger(ACCESS_LOGGER)
    access.propagate = False
    target = env.get("ACCESS_LOG") or None
    # Without a target nothing is logged there, and `log_upgrade` does not even build its line.
    access.setLevel(logging.INFO if target else logging.CRITICAL + 1)
    if target is None:
        _install(access, logging.NullHandler())
    else:
        access_handler = logging.StreamHandler(sys.stdout) if target == "-" else logging.FileHandler(target)
        access_handler.setFormatter(make_formatter(fmt, logging.Formatter("%(message)s")))
        _install(access, access_handler)
    grpc_common = logging.getLogger("grpc._common")
    if not any(isinstance(f, UndecodableResponseFilter) for f in grpc_common.filters):
        grpc_common.addFilter(UndecodableResponseFilter())
    logging.captureWarnings(True)


class UndecodableResponseFilter(logging.Filter):
    """grpc's "Exception deserializing message!" as one warning line, not a traceback.

    grpc logs it, with the decoder's traceback, when a response cannot be decoded (seen now and then on
    Google's Firestore emulator: "Wire format was corrupt"); the call then fails with INTERNAL, and the
    service handles that failure as any other (the Listen stream is reopened with its resume tokens, a
    unary call is retried or refused), logging it itself.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.msg == "Exception deserializing message!":
            error = record.exc_info[1]
            record.msg, record.args = "a gRPC response could not be decoded (%s: %s); its call fails", (
                type(error).__name__, error)
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info, record.exc_text = None, None
        return True


def _install(logger: logging.Logger, handler: logging.Handler) -> None:
    """Replace the handler `configure` put on `logger` before (others are left alone) by `handler`."""
    for old in [h for h in logger.handlers if getattr(h, "_canary", False)]:
        logger.removeHandler(old)
        old.close()
    handler.addFilter(RedactFilter())
    handler._canary = True  # type: ignore[attr-defined]
    logger.addHandler(handler)


# -- access lines of WebSocket upgrades ----------------------------------------------------------

def request_path(environ: Mapping[str, Any]) -> str:
    """The request target as sent (``RAW_URI``, else path and query), redacted."""
    raw = environ.get("RAW_URI")
    if not raw:
        raw = environ.get("PATH_INFO") or "-"
        if environ.get("QUERY_STRING"):
            raw = f"{raw}?{environ['QUERY_STRING']}"
    return redact(raw)


def peer_address(environ: Mapping[str, Any], trusted_proxies: int = 0) -> str:
    """The client's address: REMOTE_ADDR, or, behind `trusted_proxies` proxies that each append to
    X-Forwarded-For, the address the outermost of them saw (hops further left are the client's to forge)."""
    if trusted_proxies:
        hops = [h.strip() for h in str(environ.get("HTTP_X_FORWARDED_FOR", "")).split(",") if h.strip()]
        if len(hops) >= trusted_proxies:
            return hops[-trusted_proxies]
    return str(environ.get("REMOTE_ADDR") or "-")


def is_loopback(address: str | None) -> bool:
    """Whether `address` (as `peer_address` gives it) is on this machine."""
    try:
        return address is not None and ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def log_upgrade(environ: Mapping[str, Any], status: int, route: str, *, trusted_proxies: int = 0,
                **fields: Any) -> None:
    """Log an accepted WebSocket upgrade on `ACCESS_LOGGER`, as one access line (gunicorn logs no 101 that
    the application takes over).

    `route` is the route's pattern (e.g. ``/sessions/<sessionID>/join``); `fields` may be any of
    `CONTEXT_FIELDS` (``userID`` also fills the line's user column). The path's query is redacted.
    """
    unknown = sorted(set(fields) - set(CONTEXT_FIELDS))
    if unknown:
        raise TypeError(f"log_upgrade: unknown fields {unknown}; use {', '.join(CONTEXT_FIELDS)}")
    logger = logging.getLogger(ACCESS_LOGGER)
    if not logger.isEnabledFor(logging.INFO):
        return
    remote, method, path = peer_address(environ, trusted_proxies), environ.get("REQUEST_METHOD", "-"), \
        request_path(environ)
    agent = environ.get("HTTP_USER_AGENT")

    def quoted(value: Any) -> str:  # as gunicorn's atoms are, inside the line's quotes
        return str(value or "-").replace('"', '\\"')

    line = (f'{remote} - {fields.get("userID") or "-"} {time.strftime("[%d/%b/%Y:%H:%M:%S %z]")} '
            f'"{quoted(method)} {quoted(path)} {quoted(environ.get("SERVER_PROTOCOL", "HTTP/1.1"))}" {status} - '
            f'"{quoted(environ.get("HTTP_REFERER"))}" "{quoted(agent)}"')
    extra = {"remote": remote, "method": method, "path": path, "status": status, "bytes": None,
             "durationMs": None, "userAgent": agent, "route": route, **fields}
    logger.info(line, extra=extra)


# -- repeated errors -------------------------------------------------------------------------------

@dataclass
class _Window:
    start: float
    level: int
    sample: str
    suppressed: int = 0


@dataclass(frozen=True)
class Repeats:
    """How many repeats of one kind of line were suppressed over `seconds`."""

    level: int
    sample: str
    count: int
    seconds: float


class RepeatLimiter:
    """At most one line per `window` seconds per kind; the rest are counted, to be reported later."""

    def __init__(self, window: float = 10.0, clock: Callable[[], float] = time.monotonic,
                 max_kinds: int = 512) -> None:
        self.window = window
        self._clock = clock
        self._max_kinds = max_kinds
        self._windows: dict[Any, _Window] = {}
        self._pending = 0  # windows with suppressed repeats
        self._lock = threading.Lock()

    def allow(self, key: Any, level: int, sample: Callable[[], str]) -> tuple[bool, Repeats | None]:
        """Whether to write this line, and the repeats of its kind to report first (a window that ended).

        `sample()` describes the line, for that report; it is called only for lines that are written.
        """
        now = self._clock()
        with self._lock:
            current = self._windows.get(key)
            if current is not None and now - current.start < self.window:
                if not current.suppressed:
                    self._pending += 1
                current.suppressed += 1
                return False, None
            report = self._close(current, now) if current is not None else None
            if len(self._windows) >= self._max_kinds:
                self._prune(now)
            opened = self._windows[key] = _Window(now, level, "")
        opened.sample = sample()  # outside the lock: formatting a message may run arbitrary code
        return True, report

    def due(self) -> list[Repeats]:
        """The repeats of windows that have ended, to report now (cheap when there are none)."""
        if not self._pending:
            return []
        now = self._clock()
        with self._lock:
            return [report for w in self._windows.values()
                    if w.suppressed and now - w.start >= self.window and (report := self._close(w, now))]

    def _close(self, window: _Window, now: float) -> Repeats | None:
        if not window.suppressed:
            return None
        report = Repeats(window.level, window.sample, window.suppressed, now - window.start)
        window.suppressed = 0
        self._pending -= 1
        return report

    def _prune(self, now: float) -> None:
        for key in [k for k, w in self._windows.items() if not w.suppressed and now - w.start >= self.window]:
            del self._windows[key]
        if len(self._windows) >= self._max_kinds:  # all live: forget the oldest, quiet ones first
            oldest = min(self._windows, key=lambda k: (bool(self._windows[k].suppressed), self._windows[k].start))
            if self._windows.pop(oldest).suppressed:
                self._pending -= 1


_NUMBERS = re.compile(r"0x[0-9a-fA-F]+|\d+")


def repeat_key(level: int, msg: Any, exc_info: Any) -> tuple[Any, ...]:
    """What makes two lines "the same": level, message template (numbers ignored), exception type and
    where it was raised (so one failure repeating collapses, distinct bugs do not)."""
    if exc_info is True:
        exc_info = sys.exc_info()
    elif isinstance(exc_info, BaseException):
        exc_info = (type(exc_info), exc_info, exc_info.__traceback__)
    exc_type, origin = None, None
    if isinstance(exc_info, tuple) and exc_info and exc_info[0] is not None:
        exc_type = exc_info[0].__name__
        tb = exc_info[2]
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        if tb is not None:
            origin = (tb.tb_frame.f_code.co_filename, tb.tb_lineno)
    template = msg if isinstance(msg, str) else type(msg).__name__
    return level, _NUMBERS.sub("#", template)[:300], exc_type, origin


# -- gunicorn ----------------------------------------------------------------------------------------

class _RedactedAtoms(glogging.SafeAtoms):
    """gunicorn's access-log atoms, redacted as they are read (only the ones the format uses)."""

    def __getitem__(self, k: str) -> Any:
        value = super().__getitem__(k)
        if k.lower() in SECRET_ATOMS and value != "-":
            return REDACTED
        return redact(value) if isinstance(value, str) else value


class GunicornLogger(glogging.Logger):
    """gunicorn's logger (``logger_class`` in gunicorn.conf.py): redacted, LOG_FORMAT, repeats collapsed.

    - Every line of the error and access logs passes `RedactFilter`; access atoms are redacted as read.
    - LOG_FORMAT=json: gunicorn's lines are `JsonFormatter` lines; access lines carry `ACCESS_FIELDS`.
    - Warnings and errors of one kind (`repeat_key`) are written at most once per `repeat_window`
      seconds; the number suppressed is written when the window has ended, at the next line of that
      kind or at the next call into this logger (every request calls `access`).
    """

    repeat_window = 10.0

    def __init__(self, cfg: Any) -> None:
        self.repeats = RepeatLimiter(self.repeat_window)
        self.log_format = log_format()
        super().__init__(cfg)

    def setup(self, cfg: Any) -> None:
        """gunicorn's set-up (also run on reload), then JSON formatters and the redaction filter."""
        super().setup(cfg)
        self.log_format = log_format()
        for log in (self.error_log, self.access_log):
            for handler in log.handlers:
                if not getattr(handler, "_gunicorn", False):
                    continue
                if self.log_format == "json":
                    handler.setFormatter(JsonFormatter())
                if not any(isinstance(f, RedactFilter) for f in handler.filters):
                    handler.addFilter(RedactFilter())

    atoms_wrapper_class = _RedactedAtoms

    # -- the error log, repeats collapsed --------------------------------------------------------
    def critical(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        self._log(logging.CRITICAL, msg, args, kwargs)

    def error(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        self._log(logging.ERROR, msg, args, kwargs)

    def warning(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        self._log(logging.WARNING, msg, args, kwargs)

    def info(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        self._log(logging.INFO, msg, args, kwargs)

    def debug(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        self._log(logging.DEBUG, msg, args, kwargs)

    def exception(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("exc_info", True)
        self._log(logging.ERROR, msg, args, kwargs)

    def log(self, lvl: int | str, msg: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(lvl, str):
            lvl = self.LOG_LEVELS.get(lvl.lower(), logging.INFO)
        self._log(lvl, msg, args, kwargs)

    def _log(self, level: int, msg: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.report_repeats()
        if not self.error_log.isEnabledFor(level):
            return
        if level >= logging.WARNING:
            if kwargs.get("exc_info") is True:
                kwargs["exc_info"] = sys.exc_info()  # read once, here, where it is current
            exc_info = kwargs.get("exc_info")
            allowed, report = self.repeats.allow(repeat_key(level, msg, exc_info), level,
                                                 lambda: _sample(msg, args, exc_info))
            if report is not None:
                self._write_repeats(report)
            if not allowed:
                return
        self.error_log.log(level, msg, *args, **kwargs)

    def report_repeats(self) -> None:
        """Write how many lines were suppressed in windows that have ended."""
        for report in self.repeats.due():
            self._write_repeats(report)

    def _write_repeats(self, report: Repeats) -> None:
        repeats = f"{report.count} repeat{'s' if report.count != 1 else ''}"
        self.error_log.log(report.level, "suppressed %s in the last %.0f s of: %s", repeats, report.seconds,
                           report.sample, extra={"suppressed": report.count})

    # -- the access log ----------------------------------------------------------------------------
    def access(self, resp: Any, req: Any, environ: dict[str, Any], request_time: timedelta) -> None:
        """One access line (gunicorn's format, redacted), with `ACCESS_FIELDS` for JSON lines."""
        self.report_repeats()
        if not self.access_log_enabled:
            return
        try:
            atoms = self.atoms(resp, req, environ, request_time)
            line = self.cfg.access_log_format % self.atoms_wrapper_class(atoms)
            status = str(atoms.get("s", "-"))
            agent = environ.get("HTTP_USER_AGENT")
            sent = getattr(resp, "sent", None)
            self.access_log.info(line, extra={
                "remote": environ.get("REMOTE_ADDR") or "-",
                "method": environ.get("REQUEST_METHOD"),
                "path": request_path(environ),
                "status": int(status) if status.isdigit() else status,
                "bytes": sent if isinstance(sent, int) else None,
                "durationMs": round(request_time.total_seconds() * 1000, 3),
                "userAgent": redact(agent) if isinstance(agent, str) else None,
            })
        except Exception:
            self.error(traceback.format_exc())


def _sample(msg: Any, args: tuple[Any, ...], exc_info: Any) -> str:
    """The first line of a message (redacted, shortened) and its exception, for the summary of its repeats."""
    try:
        text = str(msg) % args if args else str(msg)
    except Exception:
        text = str(msg)
    text = redact(text.splitlines()[0] if text else text)[:200]
    if isinstance(exc_info, tuple) and exc_info and exc_info[0] is not None:
        text = f"{text} [{exc_info[0].__name__}: {redact(str(exc_info[1]))[:200]}]"
    return text


# -- gevent -----------------------------------------------------------------------------------------

def route_gevent_errors(log: GunicornLogger, hub: Any = None, report_every: float | None = 1.0) -> None:
    """Send the errors gevent's hub would print to stderr (a failed ``accept`` of the server loop, e.g.
    EMFILE at the open-files limit; a greenlet that died of an exception) through gunicorn's `log`
    instead: redacted, formatted, and collapsed when they repeat. System errors (SystemExit,
    KeyboardInterrupt, the hub's own exits) keep gevent's handling.

    With `report_every`, a greenlet writes the counts of suppressed repeats that often, so a burst
    that has ended is reported even if nothing else is logged after it.
    """
    import gevent

    hub = gevent.get_hub() if hub is None else hub
    original = hub.handle_error

    def handle_error(context: Any, type_: Any, value: Any, tb: Any) -> None:
        if (context is not None and isinstance(type_, type) and issubclass(type_, Exception)
                and isinstance(value, type_)):
            try:
                log.error("%s failed with %s", _describe(context), type_.__name__, exc_info=(type_, value, tb))
                return
            except Exception:  # this handler must never raise: fall back to gevent's
                pass
        original(context, type_, value, tb)

    hub.handle_error = handle_error
    if report_every is not None:
        def report() -> None:
            while True:
                gevent.sleep(report_every)
                log.report_repeats()

        gevent.spawn(report)


def _describe(context: Any) -> str:
    """A short name for what failed: a server by its address, anything else (a greenlet) by its ``str``."""
    try:
        address = getattr(context, "address", None)
        if isinstance(address, tuple) and len(address) >= 2:
            return f"<{type(context).__name__} {address[0]}:{address[1]}>"
        text = str(context)
    except Exception:
        text = type(context).__name__
    return text if len(text) <= 300 else text[:297] + "..."
