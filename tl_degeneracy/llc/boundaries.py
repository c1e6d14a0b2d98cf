"""Where a sampling run may stop: between units of work, with nothing lost.

A unit is one SGLD step, one Hessian–vector product of a power iteration, or one output probe.
Inside ``with Boundaries(save) as b:`` Ctrl-C and SIGTERM that arrive during a unit are held
until it is whole (``tl_degeneracy.interrupts.DeferredInterrupts``; a second one stops at once),
then raised by ``b.check()``; ``b.due()`` says when a periodic checkpoint is owed (every ``every``
units or ``seconds`` seconds). Whoever catches the interrupt saves only when ``b.clean`` (it came
between units): the state on disk is then exactly where the run stopped, and a resume continues it.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from ..interrupts import DeferredInterrupts


class Boundaries:
    """Unit boundaries of a run: interrupts held during units, checkpoints when due (see the module docstring)."""

    def __init__(self, save: Callable[[], None] | None = None, every: int = 200, seconds: float = 300.0):
        self.save_fn = save
        self.every = every
        self.seconds = seconds
        self.units = 0
        self.clean = True  # False while a unit runs (and after one that raised)
        self.last_save = time.monotonic()
        self.interrupts: DeferredInterrupts | None = None

    def __enter__(self) -> Boundaries:
        self.interrupts = DeferredInterrupts().__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.interrupts is not None:
            self.interrupts.__exit__(*exc)
            self.interrupts = None

    @contextmanager
    def unit(self) -> Iterator[None]:
        """One unit of work: a signal that arrives now waits for its end (raised by ``check``)."""
        self.clean = False
        if self.interrupts is not None:
            self.interrupts.holding = True
        yield  # an exception here leaves ``clean`` False: the state is mid-unit, nothing may be saved
        if self.interrupts is not None:
            self.interrupts.holding = False
        self.clean = True
        self.units += 1

    def due(self) -> bool:
        return self.save_fn is not None and (self.units % self.every == 0
                                             or time.monotonic() - self.last_save >= self.seconds)

    def save(self) -> None:
        if self.save_fn is not None:
            self.save_fn()
            self.last_save = time.monotonic()

    def check(self) -> None:
        """Raise the Ctrl-C / SIGTERM that arrived during the last unit, if any."""
        if self.interrupts is not None:
            self.interrupts.check()
