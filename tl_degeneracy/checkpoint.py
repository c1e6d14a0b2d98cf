"""Refusing to resume a checkpoint that came from a different run."""
from __future__ import annotations

import json
import os
from typing import Any


class CheckpointMismatchError(ValueError):
    pass


def _norm(value: Any) -> Any:
    return json.loads(json.dumps(value))  # tuples → lists, as they come back from disk


def check_resumable(saved: dict[str, Any], current: dict[str, Any], path: str | os.PathLike) -> None:
    """Raise if the checkpoint's model, hooks or settings differ from this run's."""
    problems = []
    for key, now in current.items():
        then = saved.get(key)
        if _norm(then) == _norm(now):
            continue
        if key == "model" and isinstance(then, dict):
            fields = sorted(k for k in set(then) | set(now) if then.get(k) != now.get(k))
            old_cfg, new_cfg = then.get("cfg", {}), now.get("cfg", {})
            cfg_fields = [f"{k}: {old_cfg.get(k)!r} → {new_cfg.get(k)!r}" for k in sorted(set(old_cfg) | set(new_cfg))
                          if old_cfg.get(k) != new_cfg.get(k)]
            problems.append(f"model differs in {fields}" + (f" ({', '.join(cfg_fields)})" if cfg_fields else "")
                            + (" (different weights)" if "weights_sha256" in fields else ""))
        elif key == "hooks":
            problems.append(f"hooks differ: checkpoint has {then}, this run asks for {now}")
        else:
            problems.append(f"{key}: checkpoint has {then!r}, this run has {now!r}")
    if problems:
        raise CheckpointMismatchError(
            f"cannot resume from {path}: it was written by a different run: " + "; ".join(problems)
            + ". Delete it or pass a new checkpoint path to start afresh."
        )
