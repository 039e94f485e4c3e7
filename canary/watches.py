"""A participant's watches on the labels of the image it is looking at."""

from __future__ import annotations

from collections.abc import Callable

from .protocol import BOUNDING_BOXES_SNAPSHOT, LABELS_SNAPSHOT, Frame, ServerMessage
from .store import BOUNDING_BOXES, KEYPOINTS, Document, Store, Watch


class ImageWatches:
    """One `keypoints` and one `boundingBoxes` watch on one image, for one client.

    `switch` replaces both (never leaving one behind if the other fails);
    notifications from a replaced watch that arrive late are dropped.
    """

    def __init__(self, store: Store, session_id: str, send: Callable[[Frame], object]) -> None:
        self._store = store
        self._session_id = session_id
        self._send = send
        self._watches: tuple[Watch, ...] = ()
        self._generation = 0

    @property
    def active(self) -> int:
        """How many watches are open."""
        return len(self._watches)

    def switch(self, image_id: str) -> None:
        """Watch `image_id` instead; raises `StoreError` (with nothing left open) on failure."""
        self.stop()
        generation = self._generation
        started: list[Watch] = []
        try:
            for collection, message in ((KEYPOINTS, LABELS_SNAPSHOT),
                                        (BOUNDING_BOXES, BOUNDING_BOXES_SNAPSHOT)):
                started.append(self._store.watch_query(
                    collection, "imageID", image_id, self._notifier(message, generation)))
        except BaseException:
            for watch in started:
                watch.stop()
            raise
        self._watches = tuple(started)

    def stop(self) -> None:
        """Stop the current watches (idempotent)."""
        self._generation += 1
        watches, self._watches = self._watches, ()
        for watch in watches:
            watch.stop()

    def _notifier(self, message: ServerMessage, generation: int) -> Callable[[list[Document]], None]:
        def notify(_documents: list[Document]) -> None:
            if generation == self._generation:
                self._send(message(sessionID=self._session_id))
        return notify
