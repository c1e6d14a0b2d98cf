"""One thread setting for the whole run (torch's intra-op threads), and how many cores there are.

On a small machine that something else is also using, more threads than free cores make torch's
OpenMP workers wait on each other: one fit of the interaction basis ran 60× slower that way. The
command line sets ``--threads`` once (default: the cores this process may use); library calls use
``torch_threads`` around the fits.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity; ``os.cpu_count`` where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """``torch.set_num_threads(n)`` inside the block (None: leave it), restored afterwards."""
    if n is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)
