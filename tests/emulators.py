"""Which Firestore emulator the tests, the benchmarks and `make run-firestore` start, and how.

Google's own Cloud Firestore emulator wherever it is installed (the Cloud SDK's
`cloud-firestore-emulator` component, on Java 11+), as Firestore itself behaves
where it matters (transactions isolated, key limits, Listen multiplexed); else
the npm fallback, `@firestore-emulator/server` through `tests/emulator/start.js`
on Node.js. `CANARY_TEST_EMULATOR=npm` forces the fallback where Google's is
installed; `CANARY_TEST_EMULATOR=google` fails where it is not.

Standard library only (the benchmarks import it too). As a script:

    python tests/emulators.py kind              # prints google or npm, the emulator that would be started
    python tests/emulators.py exec PORT         # becomes it, on 127.0.0.1:PORT (exec: a signal reaches it)
    python tests/emulators.py ready PORT [PID]  # waits until the emulator on 127.0.0.1:PORT answers (60 s at
                                                # most; fails at once if process PID, the emulator, ends)
"""

from __future__ import annotations

import functools
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EMULATOR_DIR = ROOT / "tests" / "emulator"
#: The environment variable that chooses: unset or "auto" (Google's when installed, else npm), "google", "npm".
CHOICE = "CANARY_TEST_EMULATOR"
KINDS = ("google", "npm")
#: Under the Cloud SDK's root: the jar its launcher `platform/cloud-firestore-emulator/cloud_firestore_emulator`
#: runs.
GOOGLE_JAR = Path("platform", "cloud-firestore-emulator", "cloud-firestore-emulator.jar")
GOOGLE_MAIN = "com.google.cloud.datastore.emulator.firestore.CloudFirestore"


class ChoiceError(Exception):
    """CANARY_TEST_EMULATOR asks for something that cannot be had."""


@functools.cache
def google_command() -> tuple[str, ...] | None:
    """The command line that runs Google's Cloud Firestore emulator on 127.0.0.1 (add `--port=PORT`), or None
    where it (or Java) is not installed.

    It is the JVM itself, as the launcher `cloud_firestore_emulator` runs it (`java -Duser.language=en -cp
    <jar> ... start <arguments>`): the launcher is a bash script that does not exec java, so stopping the
    launcher would leave the JVM running. `JAVA` names another java, as for the launcher.

    The SDK's root is that of `gcloud` on the PATH (`<root>/bin/gcloud`, links resolved: what `gcloud info
    --format='value(installation.sdk_root)'` prints, without gcloud's second of start-up); gcloud itself is
    asked only where that root has no emulator."""
    gcloud = shutil.which("gcloud")
    java = shutil.which(os.environ.get("JAVA") or "java")
    if gcloud is None or java is None:
        return None
    root = Path(gcloud).resolve().parent.parent
    if not (root / GOOGLE_JAR).is_file():
        try:
            asked = subprocess.run([gcloud, "info", "--format=value(installation.sdk_root)"], capture_output=True,
                                   text=True, timeout=60, check=False).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return None
        if not asked or not (Path(asked) / GOOGLE_JAR).is_file():
            return None
        root = Path(asked)
    return (java, "-Duser.language=en", "-cp", str(root / GOOGLE_JAR), GOOGLE_MAIN, "start", "--host=127.0.0.1",
            "--database-mode=firestore-native")


def kind() -> str:
    """The emulator to start: "google" or "npm" (CHOICE decides; by default Google's wherever installed)."""
    choice = os.environ.get(CHOICE, "").strip().lower() or "auto"
    if choice not in ("auto", *KINDS):
        raise ChoiceError(f"{CHOICE} must be auto, google or npm, not {choice!r}")
    if choice == "npm":
        return "npm"
    if google_command() is None:
        if choice == "google":
            raise ChoiceError(f"{CHOICE}=google, but Google's Cloud Firestore emulator is not installed (gcloud "
                              "and its cloud-firestore-emulator component, and java, on the PATH)")
        return "npm"
    return "google"


def command(kind: str, port: int) -> list[str]:
    """The command line of an emulator of `kind` on 127.0.0.1:`port` (run it in EMULATOR_DIR for "npm")."""
    if kind == "google":
        google = google_command()
        if google is None:
            raise ChoiceError("Google's Cloud Firestore emulator is not installed")
        return [*google, f"--port={port}"]
    if kind == "npm":
        return ["node", str(EMULATOR_DIR / "start.js"), str(port)]
    raise ValueError(kind)


def describe(kind: str) -> str:
    """One line saying what `kind` is, for the tests' header and the benchmarks' output."""
    forced = f" ({CHOICE}={os.environ[CHOICE]})" if os.environ.get(CHOICE, "").strip() else ""
    if kind == "google":
        google = google_command()
        return f"google: Google's Cloud Firestore emulator, {google[3] if google else '?'}{forced}"
    return f"npm: @firestore-emulator/server through tests/emulator/start.js (the fallback){forced}"


def answers_ok(host: str, timeout: float = 2.0) -> bool:
    """Whether Google's emulator at `host` is ready: `GET /` answers `Ok` (its port opens a little earlier)."""
    try:
        with urllib.request.urlopen(f"http://{host}/", timeout=timeout) as response:
            return response.read().strip() == b"Ok"
    except (OSError, ValueError):
        return False


def listening(host: str) -> bool:
    """Whether something accepts connections at `host` (the npm emulator is ready once it does)."""
    address, port = host.rsplit(":", 1)
    try:
        socket.create_connection((address, int(port)), timeout=1).close()
        return True
    except OSError:
        return False


def ready(kind: str, host: str) -> bool:
    return answers_ok(host) if kind == "google" else listening(host)


def _alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, ended but not yet waited for by its parent, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def main(argv: list[str]) -> int:
    try:
        if argv[1:] == ["kind"]:
            print(kind())
            return 0
        if len(argv) == 3 and argv[1] == "exec" and argv[2].isdigit():
            chosen = kind()
            args = command(chosen, int(argv[2]))
            if chosen == "npm":
                os.chdir(EMULATOR_DIR)
            os.execvp(args[0], args)
        if len(argv) in (3, 4) and argv[1] == "ready" and all(a.isdigit() for a in argv[2:]):
            chosen, host = kind(), f"127.0.0.1:{argv[2]}"
            deadline = time.monotonic() + 60
            while not ready(chosen, host):
                if len(argv) == 4 and not _alive(int(argv[3])):
                    print(f"the {chosen} Firestore emulator (process {argv[3]}) ended", file=sys.stderr)
                    return 1
                if time.monotonic() > deadline:
                    print(f"the {chosen} Firestore emulator on {host} did not answer within 60 s", file=sys.stderr)
                    return 1
                time.sleep(0.1)
            return 0
    except ChoiceError as e:
        print(f"emulators.py: {e}", file=sys.stderr)
        return 2
    print(__doc__.split("\n\n")[-1], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
