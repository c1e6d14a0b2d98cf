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
