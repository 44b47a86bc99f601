"""The in-memory run queue: highest priority first, then arrival order. The durable truth lives in the store.

Unlike `queue.PriorityQueue`, it can be closed: `get` then returns None at once, which is how a stopping service wakes
a worker blocked on an empty queue (the sentinel pattern of rq/dramatiq without a magic item). It can also be
paused (`i2vd pause`): `get` holds items back until resumed, so the worker finishes its job and then waits.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(order=True)
class _Entry(Generic[T]):
    sort_key: tuple[int, int]
    enqueued_at: float = field(compare=False)
    item: T = field(compare=False)


class JobQueue(Generic[T]):
    """Thread-safe priority queue with `close()`; ordering key is (-priority, sequence)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._heap: list[_Entry[T]] = []
        self._condition = threading.Condition()
        self._closed = False
        self._paused = False
        self._clock = clock

    def put(self, item: T, *, priority: int, sequence: int) -> None:
        with self._condition:
            heapq.heappush(self._heap, _Entry((-priority, sequence), self._clock(), item))
            self._condition.notify()

    def get(self, timeout: float | None = None) -> T | None:
        """The next item, or None when closed or when `timeout` passes with nothing to take."""
        with self._condition:

            def ready() -> bool:
                return bool(self._heap and not self._paused) or self._closed

            if not self._condition.wait_for(ready, timeout=timeout):
                return None
            if self._closed or not self._heap or self._paused:
                return None
            return heapq.heappop(self._heap).item

    def close(self) -> None:
        """Stop handing out items; wakes every blocked `get`. Items stay queued (they are durable on disk)."""
        with self._condition:
            self._closed = True
            self._condition.notify_all()

    def set_paused(self, paused: bool) -> None:
        """Hold items back (True) or hand them out again (False); a worker blocked in `get` wakes on resume."""
        with self._condition:
            self._paused = paused
            self._condition.notify_all()

    @property
    def paused(self) -> bool:
        return self._paused

    def remove(self, predicate: Callable[[T], bool]) -> list[T]:
        """Take every queued item matching `predicate` out of the queue (used to cancel pending jobs)."""
        with self._condition:
            taken = [entry.item for entry in self._heap if predicate(entry.item)]
            self._heap = [entry for entry in self._heap if not predicate(entry.item)]
            heapq.heapify(self._heap)
            return taken

    def take(self, predicate: Callable[[T], bool], limit: int) -> list[T]:
        """Up to `limit` queued items matching `predicate`, in the order they would be handed out (batching)."""
        if limit <= 0:
            return []
        with self._condition:
            if self._paused or self._closed:
                return []
            chosen = [entry for entry in sorted(self._heap) if predicate(entry.item)][:limit]
            ids = {id(entry) for entry in chosen}
            self._heap = [entry for entry in self._heap if id(entry) not in ids]
            heapq.heapify(self._heap)
            return [entry.item for entry in chosen]

    def __len__(self) -> int:
        with self._condition:
            return len(self._heap)

    def oldest_age(self) -> float:
        """Seconds the longest-waiting item has been queued (0 when empty)."""
        with self._condition:
            if not self._heap:
                return 0.0
            return max(0.0, self._clock() - min(entry.enqueued_at for entry in self._heap))

    def snapshot(self) -> list[T]:
        """Items in the order they would be handed out."""
        with self._condition:
            return [entry.item for entry in sorted(self._heap)]
