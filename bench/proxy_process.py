"""The tests' counting gRPC proxy (tests/grpc_proxy.py: 100 concurrent streams per connection, calls counted
per method) in a process of its own, for the benchmarks.

In the benchmark's own process it would share the GIL with hundreds of client threads or an asyncio loop
busy with a storm, and its forwarding delays would be the benchmark's, not the service's. Here it has its
own interpreter; the benchmark asks it for counts over a pipe:

    proxy = ProxyProcess(emulator_host, log_dir)   # FIRESTORE_EMULATOR_HOST=proxy.host for the service
    proxy.by_method(), proxy.peak("Listen"), proxy.reset()
    proxy.stop()

Run directly (``python bench/proxy_process.py UPSTREAM``) it prints ``ready <port>`` and answers one command a
line on stdin (``methods``, ``peak M``, ``reset``, ``quit``; ``M`` a method name or ``*``); it exits at the end
of stdin, so it never outlives the benchmark that started it.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

#: Longest wait for the proxy to start or to answer a command.
TIMEOUT = 30.0


class ProxyError(Exception):
    pass


class ProxyProcess:
    """A `Proxy` in a child process (its own process group): `host` for FIRESTORE_EMULATOR_HOST, counts."""

    def __init__(self, upstream: str, log_dir: Path) -> None:
        self._stderr = (log_dir / "proxy.log").open("ab")
        args = [sys.executable, str(Path(__file__).resolve()), upstream]
        self.process = subprocess.Popen(args, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self._stderr, text=True, start_new_session=True)
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        try:
            ready = self._line()
            if not ready.startswith("ready "):
                raise ProxyError(f"the proxy said {ready!r}")
            self.port = int(ready.split()[1])
        except BaseException:
            self.stop()
            raise

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line.strip())
        self._lines.put(None)

    def _line(self) -> str:
        try:
            line = self._lines.get(timeout=TIMEOUT)
        except queue.Empty:
            raise ProxyError(f"the proxy did not answer in {TIMEOUT:g} s") from None
        if line is None:
            raise ProxyError(f"the proxy exited ({self.process.poll()}); see proxy.log")
        return line

    def _ask(self, command: str) -> str:
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(command + "\n")
            self.process.stdin.flush()
        except OSError as e:
            raise ProxyError(f"the proxy is gone: {e}") from None
        return self._line()

    def peak(self, method: str = "*") -> int:
        """The most calls of `method` ("Listen", ...; "*": all) forwarded at once."""
        return int(self._ask(f"peak {method}"))

    def by_method(self) -> dict[str, int]:
        """Every method called since the last `reset`, with its count."""
        reply = self._ask("methods")
        return {name: int(n) for name, n in (item.split("=") for item in reply.split())} if reply != "-" else {}

    def reset(self) -> None:
        self._ask("reset")

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                assert self.process.stdin is not None
                self.process.stdin.write("quit\n")
                self.process.stdin.flush()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        self._stderr.close()


def serve(upstream: str) -> int:
    sys.path.insert(0, str(ROOT / "tests"))
    from grpc_proxy import Proxy

    proxy = Proxy(upstream).start()  # Google's front end: 100 concurrent streams per connection
    print(f"ready {proxy.port}", flush=True)

    def answer(words: list[str]) -> Any:
        method = None if len(words) < 2 or words[1] == "*" else words[1]
        if words[0] == "peak":
            return proxy.peak_streams(method)
        if words[0] == "methods":
            return " ".join(f"{m}={n}" for m, n in proxy.calls_by_method().items()) or "-"
        if words[0] == "reset":
            proxy.reset_counts()
            return "ok"
        return f"error unknown command {words[0]!r}"

    try:
        for line in sys.stdin:
            words = line.split()
            if not words:
                continue
            if words[0] == "quit":
                break
            print(answer(words), flush=True)
    finally:
        proxy.stop()
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    argv = sys.argv[1:]
    if len(argv) != 1 or argv[0].startswith("-"):
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(serve(argv[0]))
