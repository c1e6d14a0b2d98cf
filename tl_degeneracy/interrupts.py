"""Ctrl-C and SIGTERM as one exception, so that a long run checkpoints on either.

``sigterm_as_interrupt()`` turns SIGTERM (a scheduler's stop, ``kill``) into ``Terminated``, a
``KeyboardInterrupt``: every streaming pass writes its checkpoint on the way out, and the command line
exits with 143 (130 for Ctrl-C). Nothing here imports torch.
"""
from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived during a pass; like Ctrl-C, the checkpoint was written first."""


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into ``Terminated`` (a KeyboardInterrupt) so it checkpoints like Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Terminated(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class DeferredInterrupts:
    """Ctrl-C and SIGTERM during a unit of work (a batch), held until it is whole.

    Inside ``with DeferredInterrupts() as interrupts:`` a SIGINT or SIGTERM raises ``KeyboardInterrupt``
    / ``Terminated`` at once, except while ``holding`` (set around a batch that adds to the running
    sums in place): then the first one is remembered and ``interrupts.check()`` raises it at the next
    boundary, so that what is saved on the way out is a whole number of batches; a second one is
    raised at once (the caller then must not save). Outside the main thread signals cannot be handled
    and this does nothing.
    """

    def __init__(self) -> None:
        self.pending: KeyboardInterrupt | None = None
        self.holding = False
        self.previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        error = Terminated(f"signal {signum}") if signum == signal.SIGTERM else KeyboardInterrupt()
        if not self.holding or self.pending is not None:  # between batches, or asked twice: stop now
            raise error
        self.pending = error

    def __enter__(self) -> DeferredInterrupts:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous.clear()

    def check(self) -> None:
        """Raise the interrupt that arrived since the last boundary, if any."""
        if self.pending is not None:
            error, self.pending = self.pending, None
            raise error
