"""Stop signals (`daemon.signals`): counted into the two events, by real signals, and never deadlocking."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest

from daemon.signals import StopSignals


@pytest.fixture
def signals() -> Iterator[StopSignals]:
    installed = StopSignals()
    installed.install()
    try:
        yield installed
    finally:
        installed.uninstall()


def test_the_first_signal_asks_for_a_graceful_stop_and_the_second_for_an_immediate_one(signals: StopSignals) -> None:
    os.kill(os.getpid(), signal.SIGTERM)
    assert signals.stop_requested.wait(5)
    assert not signals.force_requested.is_set()
    os.kill(os.getpid(), signal.SIGINT)
    assert signals.force_requested.wait(5)


def test_a_hangup_asks_for_a_graceful_stop_too(signals: StopSignals) -> None:
    """A closed terminal (SIGHUP) stops `i2vd run` like SIGTERM instead of ending it mid-job."""
    os.kill(os.getpid(), signal.SIGHUP)
    assert signals.stop_requested.wait(5)
    assert not signals.force_requested.is_set()


def test_under_nohup_a_hangup_stays_ignored_and_uninstall_gives_the_previous_handlers_back() -> None:
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # what `nohup` leaves
    try:
        installed = StopSignals()
        installed.install()
        try:
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGHUP)
            assert not installed.stop_requested.wait(0.3)
        finally:
            installed.uninstall()
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_other_signals_are_not_stop_signals(signals: StopSignals) -> None:
    previous = signal.signal(signal.SIGUSR1, lambda *_: None)
    try:
        os.kill(os.getpid(), signal.SIGUSR1)  # also written to the wakeup pipe, with its own number
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.stop_requested.wait(5)
        assert not signals.force_requested.is_set()
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_uninstall_gives_the_previous_handlers_back() -> None:
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    installed = StopSignals()
    installed.install()
    assert all(signal.getsignal(signum) != handler for signum, handler in before.items())
    installed.uninstall()
    assert {signum: signal.getsignal(signum) for signum in before} == before


def test_a_signal_while_the_main_thread_holds_the_events_lock_does_not_deadlock() -> None:
    """The moment that hung a daemon after READY: the signal arrives while the main thread is inside
    `stop_requested.wait()`, holding the event's condition lock. A handler that set the event itself blocked on
    that lock forever. Reproduced exactly (lock held, signal sent) in a fresh interpreter with a time limit."""
    script = textwrap.dedent(
        """
        import os, signal, time
        from daemon.signals import StopSignals
        signals = StopSignals()
        signals.install()
        with signals.stop_requested._cond:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.3)  # the handler runs here, in this thread, with the lock held
        print("stopped" if signals.stop_requested.wait(5) else "missed")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "stopped"
