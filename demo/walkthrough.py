"""A session from start to end against `make run` (demo data, dev API on).

    .venv/bin/python demo/walkthrough.py [http://127.0.0.1:8080]    # or: make demo [PORT=8080]

alice (the owner of project-1) opens a session on batch-1, bob and carol join,
bob watches image-1 (alice and carol are told: member_image), a keypoint is
added to image-1, carol leaves, alice leaves. Every message each client receives is printed. It can be run again and
again against the same server: each run adds, moves and deletes a keypoint of its own, and bob is told
exactly what changed (`changes` of each labels_snapshot).
"""

from __future__ import annotations

import json
import sys
import threading
import urllib.request

try:
    import simple_websocket
    from simple_websocket import ConnectionClosed
except ImportError:  # run by a Python without the service's packages
    raise SystemExit("demo/walkthrough.py needs the packages `make run` installs into .venv/: run it as "
                     "`.venv/bin/python demo/walkthrough.py [URL]` or `make demo`") from None

BASE = (sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8080").rstrip("/")
WS = "ws" + BASE.removeprefix("http")


class _ReaderThread(threading.Thread):
    """simple-websocket's reader thread, as a daemon: a run that fails exits instead of waiting forever on
    the sockets it left open."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs["daemon"] = True
        super().__init__(*args, **kwargs)


class Client(simple_websocket.Client):
    @classmethod
    def open(cls, path: str) -> Client:
        return cls.connect(f"{WS}{path}", thread_class=_ReaderThread)

    def handshake(self) -> None:
        super().handshake()
        # simple-websocket's client leaves frames that arrived with the 101 (here the
        # welcome message) unread until more data comes; read them now.
        self._handle_events()


def receive(name: str, client: Client) -> dict:
    data = client.receive(timeout=5)
    if data is None:
        raise SystemExit(f"{name}: no message within 5 s")
    message = json.loads(data)
    print(f"{name:>6} <- {json.dumps(message)}")
    return message


def dev(method: str, path: str, body: dict | None = None) -> None:
    """A call of the dev API's documents (another Canary service writing labels, in production)."""
    request = urllib.request.Request(f"{BASE}/dev/documents/{path}", method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=5).close()


def main() -> None:
    alice = Client.open("/sessions/batch-1?userID=alice")
    session = receive("alice", alice)["sessionID"]

    bob = Client.open(f"/sessions/{session}/join?userID=bob")
    receive("bob", bob)
    receive("alice", alice)  # member_joined bob

    carol = Client.open(f"/sessions/{session}/join?userID=carol")
    receive("carol", carol)
    receive("alice", alice)  # member_joined carol
    receive("bob", bob)

    print("   bob -> setImageID image-1")
    bob.send(json.dumps({"type": "setImageID", "payload": {"imageID": "image-1"}}))
    receive("bob", bob)  # the first labels_snapshot …
    receive("bob", bob)  # … and bounding_boxes_snapshot: the watch is ready
    receive("alice", alice)  # member_image: bob looks at image-1 now
    receive("carol", carol)

    # A keypoint of this run's own: writing again what an earlier run wrote would change nothing, and
    # nobody is told of a change that is none. Each labels_snapshot's `changes` say what changed since the
    # previous one (the first listed every keypoint as added, `reset`): bob applies them to his copy.
    keypoint = f"kp-{session}"
    fields = {"imageID": "image-1", "keypointID": keypoint, "position": {"x": 3, "y": 4}, "boundingBoxID": "bb-1",
              "keypointLabelID": "eye"}
    print(f"  (dev) PUT keypoints/{keypoint} on image-1")
    dev("PUT", f"keypoints/{keypoint}", fields)
    receive("bob", bob)  # labels_snapshot: added
    print(f"  (dev) PUT keypoints/{keypoint}: moved")
    dev("PUT", f"keypoints/{keypoint}", {**fields, "position": {"x": 5, "y": 6}})
    receive("bob", bob)  # labels_snapshot: modified
    print(f"  (dev) DELETE keypoints/{keypoint}")
    dev("DELETE", f"keypoints/{keypoint}")
    receive("bob", bob)  # labels_snapshot: removed

    print(" carol leaves")
    carol.close()
    receive("alice", alice)  # member_left carol
    receive("bob", bob)

    print(" alice leaves: the session ends")
    alice.close()
    receive("bob", bob)  # session_closed
    try:
        bob.receive(timeout=5)
    except ConnectionClosed:
        pass
    print(f"   bob: closed with code {bob.close_reason}")


if __name__ == "__main__":
    main()
