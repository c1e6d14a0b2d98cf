"""Refusing to resume (or merge) statistics that came from a different run."""
from __future__ import annotations

import json
import os
from typing import Any


class CheckpointMismatchError(ValueError):
    pass


def _norm(value: Any) -> Any:
    return json.loads(json.dumps(value))  # tuples → lists, as they come back from disk


def differences(saved: Any, current: Any, path: str = "") -> list[str]:
    """Every leaf where two JSON-able identities differ, as ``field.sub: then → now``."""
    saved, current = _norm(saved), _norm(current)
    if isinstance(saved, dict) and isinstance(current, dict):
        out: list[str] = []
        for key in list(dict.fromkeys([*saved, *current])):
            out += differences(saved.get(key), current.get(key), f"{path}.{key}" if path else str(key))
        return out
    if saved == current:
        return []
    return [f"{path or 'identity'}: checkpoint has {saved!r}, this run has {current!r}"]


def check_resumable(saved: dict[str, Any], current: dict[str, Any], path: str | os.PathLike) -> None:
    """Raise, naming each differing field, if the checkpoint's identity differs from this run's."""
    problems = differences(saved, current)
    if problems:
        raise CheckpointMismatchError(
            f"cannot resume from {path}: it was written by a different run ("
            + "; ".join(problems)
            + "). Resuming would mix two runs' sums. Delete the checkpoint or pass a new path to start afresh."
        )
