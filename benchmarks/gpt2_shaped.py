"""A GPT-2-small-shaped random model and random token batches, with no hub access.

Shared by the scripts in ``benchmarks/``. The weights come from
``tl_degeneracy.testing.random_tl_state_dict`` (a seeded HookedTransformer-format state
dict) and are loaded into the *installed* TransformerLens generation by
``tl_degeneracy.generations.model_from_tl_state_dict``: a ``HookedTransformer`` under TL 3.x,
a ``TransformerBridge`` (``boot_native``) under TL 4.x. Same seed, same function.

Presets:
    gpt2   12 layers, d_model 768, d_mlp 3072, 12 heads of 64, vocab 50257, n_ctx 1024,
           LayerNorm, gelu_new (GPT-2 small's shapes; ~124M parameters).
    small  2 layers, d_model 128, 4 heads of 32, d_mlp 512, vocab 1000, n_ctx 256
           (``--quick`` runs and tests).
    tiny   2 layers, d_model 32, 4 heads of 8, d_mlp 64, vocab 101, n_ctx 64.

Run it directly to print the model it builds:  ``python benchmarks/gpt2_shaped.py --layers 2``
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported lazily so that driver processes (run_all, memory_growth) stay light
    import torch

PRESETS: dict[str, dict[str, Any]] = {
    "gpt2": dict(n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, d_vocab=50257, n_ctx=1024,
                 act_fn="gelu_new", normalization_type="LN"),
    "small": dict(n_layers=2, d_model=128, n_heads=4, d_head=32, d_mlp=512, d_vocab=1000, n_ctx=256,
                  act_fn="gelu_new", normalization_type="LN"),
    "tiny": dict(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, d_vocab=101, n_ctx=64,
                 act_fn="gelu_new", normalization_type="LN"),
}

RESULT_PREFIX = "RESULT "  # run_all.py parses the line starting with this


def model_config(preset: str = "gpt2", n_layers: int | None = None) -> dict[str, Any]:
    cfg = dict(PRESETS[preset])
    if n_layers is not None:
        cfg["n_layers"] = int(n_layers)
    return cfg


def build_model(preset: str = "gpt2", n_layers: int | None = None, seed: int = 0,
                dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The random model in the installed TL generation (float32 by default), in eval mode."""
    import torch

    from tl_degeneracy.generations import model_from_tl_state_dict
    from tl_degeneracy.testing import random_tl_state_dict

    cfg = model_config(preset, n_layers)
    state_dict = random_tl_state_dict(cfg, seed=seed)
    model = model_from_tl_state_dict(cfg, state_dict, dtype=torch.float32 if dtype is None else dtype)
    del state_dict
    model.eval()
    return model


def random_tokens(n_seq: int, context: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """``[n_seq, context]`` int64 token ids, uniform over the vocabulary, seeded."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n_seq, context), generator=g)


def token_batches(n_batches: int, batch_size: int, context: int, vocab: int, seed: int = 0
                  ) -> Iterator[torch.Tensor]:
    """Stream ``n_batches`` random ``[batch_size, context]`` batches (never one big tensor)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    for _ in range(n_batches):
        yield torch.randint(0, vocab, (batch_size, context), generator=g)


def resid_pre_hooks(n_layers: int) -> list[str]:
    return [f"blocks.{i}.hook_resid_pre" for i in range(n_layers)]


# --- command line -------------------------------------------------------------------------------

def add_common_args(parser: argparse.ArgumentParser, *, batch_size: int, context: int, batches: int,
                    repeats: int) -> None:
    """Options every benchmark shares; ``--quick`` swaps in a 2-layer small model and tiny sizes."""
    parser.add_argument("--quick", action="store_true",
                        help="small 2-layer model and tiny sizes (seconds; checks the script runs)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="model shape (default gpt2; small with --quick)")
    parser.add_argument("--layers", type=int, default=None, help="override the number of layers")
    parser.add_argument("--batch-size", type=int, default=None, help=f"sequences per batch (default {batch_size})")
    parser.add_argument("--context", type=int, default=None, help=f"tokens per sequence (default {context})")
    parser.add_argument("--batches", type=int, default=None, help=f"timed batches per repeat (default {batches})")
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"interleaved repeats; medians are reported (default {repeats})")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: min(2, torch default))")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="where the model runs (cpu, cuda); timings sync the GPU")
    parser.add_argument("--json", type=str, default=None, help="also write the result dict to this file")
    parser.set_defaults(_defaults=dict(batch_size=batch_size, context=context, batches=batches, repeats=repeats))


QUICK = dict(preset="small", batch_size=2, context=64, batches=2, repeats=2)


def finish_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill unset options from ``--quick`` or the script's defaults; set the thread count."""
    import torch

    defaults = dict(args._defaults, preset="gpt2")
    if args.quick:
        defaults.update(QUICK)
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    cfg = model_config(args.preset, args.layers)
    if args.context > cfg["n_ctx"]:
        raise SystemExit(f"--context {args.context} exceeds the model's n_ctx {cfg['n_ctx']}")
    if args.threads is not None:
        threads = args.threads
    else:  # tiny --quick ops only lose to thread synchronisation on a busy machine
        threads = 1 if args.quick else min(2, torch.get_num_threads())
    torch.set_num_threads(threads)
    args.threads = threads
    return args


def environment() -> dict[str, Any]:
    import torch

    from tl_degeneracy.generations import installed_generation, transformer_lens_version

    return {
        "transformer_lens": transformer_lens_version(),
        "generation": installed_generation(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def describe_run(args: argparse.Namespace, model: torch.nn.Module) -> str:
    cfg = model_config(args.preset, args.layers)
    n_params = sum(p.numel() for p in model.parameters())
    env = environment()
    return (f"model: {type(model).__name__} (TL {env['transformer_lens']}), preset {args.preset}, "
            f"{cfg['n_layers']} layers, d_model {cfg['d_model']}, d_mlp {cfg['d_mlp']}, "
            f"{cfg['n_heads']}x{cfg['d_head']} heads, vocab {cfg['d_vocab']}, {n_params / 1e6:.1f}M params, "
            f"float32; torch {env['torch']}, {env['threads']} threads, {env['cpu_count']} CPUs, "
            f"load average {env['loadavg_at_start']}")


def emit_result(result: dict[str, Any], args: argparse.Namespace | None = None) -> None:
    """Print the machine-readable result line (and write ``--json`` if given)."""
    line = json.dumps(result, sort_keys=True, default=str)
    print(RESULT_PREFIX + line, flush=True)
    if args is not None and getattr(args, "json", None):
        Path(args.json).write_text(line + "\n")


# --- timing -----------------------------------------------------------------------------------

def _sync() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():  # GPU work is asynchronous: wait for it
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any]) -> float:
    _sync()
    start = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - start


def interleaved_medians(methods: dict[str, Callable[[], Any]], repeats: int, *, warmup: bool = True,
                        log: Callable[[str], None] | None = print) -> dict[str, dict[str, Any]]:
    """Time every method ``repeats`` times, rotating the order each round; medians per method.

    Interleaving means slow drift of a shared machine's load hits every method alike; the
    median (not the mean) keeps one disturbed round from deciding.
    """
    names = list(methods)
    if warmup:
        for name in names:
            methods[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            times[name].append(timed(methods[name]))
        if log is not None:
            log(f"  round {r + 1}/{repeats}: " + ", ".join(f"{n} {times[n][-1]:.3f}s" for n in names))
    return {name: {"median": statistics.median(ts), "min": min(ts), "max": max(ts), "all": ts}
            for name, ts in times.items()}


def median_time(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    return statistics.median(timed(fn) for _ in range(repeats))


class StopForward(Exception):
    """Raised from a hook to end a forward pass early (works on both TL generations)."""


def forward_through_blocks(model: torch.nn.Module, tokens: torch.Tensor, n_layers: int) -> None:
    """Run embed + all blocks, skipping ``ln_final`` and the unembedding.

    ``stop_at_layer=n_layers`` does that on a HookedTransformer, but a TransformerBridge
    (TL 4.3) ignores a stop index equal to the number of blocks and still runs ln_final and
    the unembedding; a hook that raises after the last block works on both.
    """
    def stop(act: torch.Tensor, hook: Any) -> None:
        raise StopForward

    try:
        with model.hooks(fwd_hooks=[(f"blocks.{n_layers - 1}.hook_resid_post", stop)]):
            model(tokens)
    except StopForward:
        pass


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, batch_size=2, context=64, batches=1, repeats=1)
    args = finish_args(parser.parse_args())
    start = time.perf_counter()
    model = build_model(args.preset, args.layers, seed=args.seed)
    print(f"built in {time.perf_counter() - start:.1f}s")
    print(describe_run(args, model))
    tokens = random_tokens(args.batch_size, args.context, model_config(args.preset)["d_vocab"], seed=args.seed)
    with torch.no_grad():
        logits = model(tokens)
    print("logits", tuple(logits.shape), "finite:", bool(torch.isfinite(logits).all()))


if __name__ == "__main__":
    sys.exit(main())
