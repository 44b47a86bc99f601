"""Queue order (priority, then arrival), close() waking blocked readers, and the oldest-age gauge source."""

from __future__ import annotations

import threading

from daemon.jobqueue import JobQueue


def test_priority_then_arrival_order() -> None:
    queue: JobQueue[str] = JobQueue()
    queue.put("low-early", priority=0, sequence=1)
    queue.put("high-late", priority=5, sequence=4)
    queue.put("low-late", priority=0, sequence=3)
    queue.put("high-early", priority=5, sequence=2)
    queue.put("negative", priority=-3, sequence=0)
    assert queue.snapshot() == ["high-early", "high-late", "low-early", "low-late", "negative"]
    expected = queue.snapshot()
    assert [queue.get(timeout=0) for _ in range(5)] == expected
    assert len(queue) == 0


def test_get_times_out_with_none() -> None:
    assert JobQueue[str]().get(timeout=0.01) is None


def test_close_wakes_a_blocked_reader_and_keeps_items() -> None:
    queue: JobQueue[str] = JobQueue()
    results: list[str | None] = []
    reader = threading.Thread(target=lambda: results.append(queue.get()))
    reader.start()
    queue.close()
    reader.join(timeout=5)
    assert not reader.is_alive()
    assert results == [None]
    queue.put("after-close", priority=0, sequence=1)
    assert queue.get(timeout=0) is None
    assert len(queue) == 1


def test_oldest_age_uses_the_injected_clock() -> None:
    now = [100.0]
    queue: JobQueue[str] = JobQueue(clock=lambda: now[0])
    assert queue.oldest_age() == 0.0
    queue.put("a", priority=0, sequence=1)
    now[0] = 103.0
    queue.put("b", priority=9, sequence=2)
    now[0] = 110.0
    assert queue.oldest_age() == 10.0
    assert queue.get() == "b"
    assert queue.oldest_age() == 10.0
