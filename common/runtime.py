"""Process-wide settings both sides make: torch's thread count, and seeds from which a run repeats."""

from __future__ import annotations

import random

import numpy as np
import torch


def set_threads(num_threads: int) -> None:
    """0 keeps torch's default (one per core)."""
    if num_threads > 0:
        torch.set_num_threads(num_threads)


def seed_everything(*keys: int) -> torch.Generator:
    """Seed torch, numpy and Python from `keys`, e.g. (seed, epoch): each epoch's randomness then depends on
    nothing before it, so a resumed run repeats an uninterrupted one. Returns a CPU generator for data
    order and augmentation. cuDNN's autotuner is switched off (it picks kernels by timing, so runs
    differ); `torch.use_deterministic_algorithms` is not forced: slow or unsupported for some CUDA ops."""
    seed = int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0] >> 1)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = False
    return torch.Generator().manual_seed(seed)
