"""Stopping a training run on SIGTERM or SIGINT without losing or skipping anything.

A step is finished, never abandoned: a half-applied step (prompts drawn, optimizer not yet
stepped, or one of two models updated) has no state that a checkpoint could hold exactly, so
the first signal only asks the run to stop; the step in progress completes, and the run
saves a checkpoint at that step (weights, optimizer, RNG and data position all after it) and
returns. A second signal means "now": :class:`Abort` is raised at once and nothing more is
saved (``--resume`` continues from the last checkpoint written).

Signal handlers are process-wide, so :class:`StopSignals` installs them only for the time a
run is inside its step loop, and puts the previous handlers back afterwards.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable

HANDLED = (signal.SIGTERM, signal.SIGINT)

_last_stop: dict[str, str | None] = {"signal": None}


class Abort(BaseException):
    """A second stop signal: leave at once. A ``BaseException`` (like ``KeyboardInterrupt``),
    so that no ``except Exception`` on the way swallows it; ``exit_code`` is 128 + the signal."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def last_stop() -> str | None:
    """The signal (``"SIGTERM"``/``"SIGINT"``) that stopped the latest run of this process
    early, or ``None`` when it ran to its end or its halt."""
    return _last_stop["signal"]


def record_stop(name: str | None) -> None:
    _last_stop["signal"] = name


class StopSignals:
    """While active (``with``), SIGTERM and SIGINT set :attr:`received` (the first) or raise
    :class:`Abort` (the second). ``notice(name)`` and ``abort_message(name)`` give the line
    printed on the first signal and the message of the abort.

    Only the main thread may install handlers; elsewhere this does nothing (the signals keep
    their previous behaviour).
    """

    def __init__(self, notice: Callable[[str], str], abort_message: Callable[[str], str]):
        self.notice, self.abort_message = notice, abort_message
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in HANDLED:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        """Runs in the main thread between two Python bytecodes (so a long C call, one forward
        pass, completes first). Writes with ``os.write``: the interrupted code may be in the
        middle of a buffered write to stderr (the progress bar)."""
        name = signal_name(signum)
        if self.received is None:
            self.received = name
            os.write(2, ("\n" + self.notice(name) + "\n").encode())
            return
        raise Abort(signum, self.abort_message(name))
