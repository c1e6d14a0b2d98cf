"""Subprocess worker for the kill/resume and torchrun tests.

usage: collect_worker.py OUT [--slow SECONDS] [--checkpoint PATH] [--resume]
Collects on the tiny model over 16 batches; with torchrun, every rank joins and rank 0
saves the all-reduced Stats to OUT.
"""
import argparse
import os
import time

import torch

import tl_degeneracy as tld
from tl_degeneracy.testing import tiny_model

HOOKS = ["blocks.0.hook_resid_pre", "blocks.1.mlp.hook_post"]


def batches(slow: float):
    tokens = torch.randint(0, 23, (64, 12), generator=torch.Generator().manual_seed(1))
    for i in range(0, 64, 4):
        if slow:
            time.sleep(slow)
        yield tokens[i:i + 4]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--slow", type=float, default=0.0)
    parser.add_argument("--checkpoint")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--jacobians", action="store_true")
    args = parser.parse_args()
    distributed = "RANK" in os.environ
    if distributed:
        torch.distributed.init_process_group("gloo")
    stats = tld.collect(tiny_model(seed=0), batches(args.slow), HOOKS, checkpoint=args.checkpoint,
                        checkpoint_every=1, resume=args.resume, progress=False,
                        jacobians=tld.JacobianConfig(n_probes=2) if args.jacobians else False)
    if not distributed or torch.distributed.get_rank() == 0:
        stats.save(args.out)
    if distributed:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
