"""``StreamOptions``: how a pass over data is run, as opposed to what it accumulates.

The Gram pass (``collect``), the edge pass (``collect_edges``) and the sampler (``estimate_neff``)
take the same options, defined here once: how far to go, where to checkpoint and how often, whether
to resume, show progress, or split the work over ``torch.distributed`` ranks. None of them changes a
result (the run identity is the plan's ``to_dict()``), so none is part of a checkpoint's identity.
Each entry point accepts ``options=StreamOptions(...)`` or the same fields as keywords.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from typing import Any

from ..validation import optional_positive_int, positive_float, positive_int


@dataclass(frozen=True)
class StreamOptions:
    """How one pass runs.

    Args:
        max_tokens: stop once this many tokens were processed (the last batch is trimmed; for the
            sampler: the tokens its data is read up to). None: all the data.
        checkpoint: file the running state is written to every ``checkpoint_every`` units of work
            (batches of a data pass, steps of a chain) or ``checkpoint_seconds`` seconds, whichever comes
            first, on Ctrl-C, on SIGTERM and at the end (atomically). None: no checkpoint.
        resume: continue an existing checkpoint after checking that it is the same run on the same
            data (the result equals an uninterrupted run); refused, naming the field, otherwise.
        progress: a progress bar on stderr.
        distributed: split the work over ``torch.distributed`` ranks and all-reduce (None: when a
            process group is initialised).
    """

    max_tokens: int | None = None
    checkpoint: str | os.PathLike | None = None
    resume: bool = False
    checkpoint_every: int = 50
    checkpoint_seconds: float = 300.0
    progress: bool = True
    distributed: bool | None = None

    def __post_init__(self) -> None:
        optional_positive_int(self.max_tokens, "max_tokens", "Pass None for all the data.")
        positive_int(self.checkpoint_every, "checkpoint_every")
        positive_float(self.checkpoint_seconds, "checkpoint_seconds")

    @classmethod
    def of(cls, options: StreamOptions | None = None, caller: str = "this function", **overrides: Any) -> StreamOptions:
        """``options`` (or the defaults) with keyword overrides; an unknown keyword is a ``TypeError``."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"{caller} got unexpected keyword argument(s) {unknown}; the streaming options are "
                            f"{sorted(names)} (StreamOptions)")
        return replace(options or cls(), **overrides)
