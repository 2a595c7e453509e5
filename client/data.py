"""Prepared sites → a dataset of view files → shuffled, class-balanced, augmented batches on the device.

The views stay on disk, one `.npy` per view (`client.prepare`); `ExamSet` is a torch Dataset over them and
`stream` reads a plan of index batches through a DataLoader (worker processes, pinned memory, prefetch),
so host memory holds a few batches whatever the site's size. Each batch is moved to the device and
augmented there, as a whole. The order is drawn up front from a seeded generator, so the batches are the
same whether they were read in this process or in workers, and a resumed run is bit-identical.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from client.prepare import PreparedSite, ViewFiles
from common.config import DataConfig
from common.labels import SPLITS
from common.model import BIRADS_CLASSES, IGNORE

PREFETCH = 4
"""Batches each loader worker reads ahead."""


class Batch(NamedTuple):
    views: Tensor
    malignant: Tensor
    birads_class: Tensor


@dataclass
class ExamSet(Dataset):
    """Exams whose views are files: a map-style Dataset whose `__getitems__` reads a whole batch."""

    exam_ids: list[str]
    views: list[ViewFiles]
    """Each exam's view files, (H, W) float16 in [0, 1] each."""
    malignant: Tensor
    """(N,) float32, 1 = malignant, 0 = benign, NaN = no pathology (`common.model.MultiTaskLoss` skips it)."""
    birads_class: Tensor
    """(N,) int64 index into `common.model.BIRADS_CLASSES`, or `IGNORE` where the exam has no 2–5 read."""
    shape: tuple[int, int, int]
    """(V, H, W) of every exam."""
    scratch: list[Any] = field(default_factory=list, repr=False)
    """The temporary folders holding the files (`PreparedSite.scratch`), kept while this set lives."""

    def __len__(self) -> int:
        return len(self.exam_ids)

    def __getstate__(self) -> dict[str, Any]:
        """What a loader worker or another process gets: the files' names, not the folders' owners (they
        stay with this process, which outlives its workers)."""
        return {**self.__dict__, "scratch": []}

    @property
    def has_pathology(self) -> Tensor:
        return ~torch.isnan(self.malignant)

    def __getitems__(self, indices: Sequence[int]) -> Batch:
        """Exams `indices` as one batch: views (B, V, H, W) float16, on the CPU."""
        views = np.empty((len(indices), *self.shape), np.float16)
        for row, index in enumerate(indices):
            for column, file in enumerate(self.views[index]):
                views[row, column] = np.load(file, mmap_mode="r")  # one copy, file → batch
        index = torch.as_tensor(list(indices), dtype=torch.int64)
        return Batch(torch.from_numpy(views), self.malignant[index], self.birads_class[index])

    def __getitem__(self, index: int) -> Batch:
        return self.__getitems__([index])


def exam_set(sites: Sequence[PreparedSite], split: str = "all") -> ExamSet:
    """Pool the exams of one split ('train', 'val', 'test' or 'all') of one or more sites."""
    if split != "all" and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)} or 'all'")
    parts = [site if split == "all" else site.split(split) for site in sites]
    shapes = {part.name: _shape(part.views[0]) for part in parts if part.views}
    if len(set(shapes.values())) > 1:
        described = ", ".join(f"{name}: {shape}" for name, shape in shapes.items())
        raise ValueError(f"sites have different view shapes (same config needed for all): {described}")
    labels = [label for part in parts for label in part.labels]
    return ExamSet(
        exam_ids=[exam for part in parts for exam in part.exam_ids],
        views=[files for part in parts for files in part.views],
        malignant=torch.tensor([np.nan if x.malignant is None else float(x.malignant) for x in labels],
                               dtype=torch.float32),
        birads_class=torch.tensor([IGNORE if (b := x.birads_target) is None else BIRADS_CLASSES.index(b)
                                   for x in labels], dtype=torch.int64),
        shape=next(iter(shapes.values()), (0, 0, 0)),
        scratch=[part.scratch for part in parts if part.scratch is not None],
    )


def _shape(files: ViewFiles) -> tuple[int, int, int]:
    return (len(files), *np.load(files[0], mmap_mode="r").shape)


def loader_workers(config: DataConfig, device: torch.device) -> int:
    """Processes reading views for the model: `config.loader_workers`, or when it is -1 none on the CPU
    (the model's compute takes every core and a read is a copy from the page cache) and on CUDA up to 8,
    sharing the cores with the site's other processes (`train.processes`)."""
    if config.loader_workers >= 0:
        return config.loader_workers
    if device.type != "cuda":
        return 0
    processes = max(1, torch.cuda.device_count())
    return max(1, min(8, len(os.sched_getaffinity(0)) // processes - 1))


def _whole(batch: Batch) -> Batch:
    return batch  # `ExamSet.__getitems__` already batched: no collation


def stream(
    data: ExamSet,
    plan: Iterable[Sequence[int]],
    device: torch.device,
    *,
    workers: int = 0,
    augment_generator: torch.Generator | None = None,
) -> Iterator[Batch]:
    """The batches of `plan` (lists of exam indices, in order) as float32 on `device`, read by `workers`
    processes (0 = in this process, lazily: Opacus's chunked batches need that) and augmented on the device
    when a generator (on `device`) is given. A batch may be empty (DP-SGD's Poisson sampling)."""
    loader = DataLoader(data, batch_sampler=plan, collate_fn=_whole, num_workers=workers,  # type: ignore[arg-type]
                        pin_memory=device.type == "cuda", prefetch_factor=PREFETCH if workers else None,
                        multiprocessing_context="forkserver" if workers else None)
    for batch in loader:
        views = batch.views.to(device, non_blocking=True).float()
        if augment_generator is not None and len(views):
            views = augment(views, augment_generator)
        yield Batch(views, batch.malignant.to(device, non_blocking=True),
                    batch.birads_class.to(device, non_blocking=True))


def chunks(order: Tensor, size: int) -> list[list[int]]:
    """`order` cut into consecutive batches of `size` (the last may be smaller)."""
    indices = order.tolist()
    return [indices[start : start + size] for start in range(0, len(indices), size)]


def pos_weight(data: ExamSet, balance: str) -> float | None:
    """The malignancy loss's weight of positives: n_benign / n_malignant with `balance='pos_weight'`
    (counted over the exams with a pathology, the only ones the malignancy loss sees)."""
    n_pos = float(data.malignant.nansum())
    n_neg = float(data.has_pathology.sum()) - n_pos
    if balance != "pos_weight" or n_pos == 0 or n_neg == 0:
        return None
    return n_neg / n_pos


def epoch_order(data: ExamSet, balance: str, generator: torch.Generator) -> Tensor:
    """Exam indices for one epoch: a permutation, or with `balance='sampler'` a draw with replacement in
    which, among the exams with a pathology, benign and malignant are equally likely (exams without one
    keep their share)."""
    if balance != "sampler":
        return torch.randperm(len(data), generator=generator)
    n, known = len(data), data.has_pathology
    positive = known & (data.malignant > 0)
    n_pos, n_neg = positive.sum().clamp(min=1), (known & ~positive).sum().clamp(min=1)
    share = known.sum() / n / 2  # of the draws, for each class
    weights = torch.where(positive, share / n_pos, share / n_neg)
    weights = torch.where(known, weights, torch.full_like(weights, 1 / n))
    return torch.multinomial(weights, n, replacement=True, generator=generator)


def device_generator(device: torch.device, generator: torch.Generator, stream: int = 0) -> torch.Generator:
    """A generator on `device` seeded from `generator`, so augmentation draws its noise where it runs;
    `stream` (a process's rank) gives each process of a distributed run its own draws."""
    seed = int(torch.randint(2**62, (1,), generator=generator))
    return torch.Generator(device).manual_seed(seed + stream)


def _uniform(low: float, high: float, n: int, generator: torch.Generator) -> Tensor:
    return torch.rand(n, generator=generator, device=generator.device) * (high - low) + low


def augment(
    views: Tensor,
    generator: torch.Generator,
    *,
    rotation_deg: float = 10.0,
    scale: float = 0.1,
    shift: tuple[float, float] = (0.02, 0.05),
    gamma: float = 1.25,
    contrast: float = 0.1,
    brightness: float = 0.05,
    noise: float = 0.02,
) -> Tensor:
    """Random jitter of a batch of canonical views (B, V, H, W) in [0, 1], fit for mammograms.

    Geometry, drawn per view: rotation ±10°, scale ±10% about the chest-wall midpoint (left edge, middle),
    so the chest wall stays at the left edge, and a shift of up to 2% of the width and 5% of the height.
    Each view gets its own draw: CC and MLO are separate exposures with separate positioning, so their
    jitters need not match. Never a horizontal flip: orientation is canonical (chest wall left).
    Intensity, drawn per exam (one acquisition chain for all its views): gamma in [1/1.25, 1.25], contrast
    ±10%, brightness ±0.05, Gaussian noise of standard deviation up to 0.02; clamped to [0, 1].
    """
    b, v, h, w = views.shape
    n = b * v
    angle = _uniform(-rotation_deg, rotation_deg, n, generator) * (math.pi / 180)
    zoom = _uniform(1 - scale, 1 + scale, n, generator)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    # affine_grid maps output to input coordinates in [-1, 1]; the rotation is done in pixel units
    # (hence the aspect factors) about the pivot p = (-1, 0): input = A (output - p) + p + shift.
    dx = _uniform(-2 * shift[0], 2 * shift[0], n, generator)
    dy = _uniform(-2 * shift[1], 2 * shift[1], n, generator)
    theta = torch.stack([
        torch.stack([cos, -sin * (h / w), cos - 1 + dx], 1),
        torch.stack([sin * (w / h), cos, sin * (w / h) + dy], 1),
    ], 1)
    grid = F.affine_grid(theta, [n, 1, h, w], align_corners=False)
    out = F.grid_sample(views.reshape(n, 1, h, w), grid, align_corners=False).reshape(b, v, h, w)

    exam = (b, 1, 1, 1)
    g = torch.exp(_uniform(-math.log(gamma), math.log(gamma), b, generator)).view(exam)
    c = _uniform(1 - contrast, 1 + contrast, b, generator).view(exam)
    offset = _uniform(-brightness, brightness, b, generator).view(exam)
    sigma = _uniform(0, noise, b, generator).view(exam)
    out = out.clamp(0, 1).pow(g) * c + offset
    out = out + sigma * torch.randn(out.shape, generator=generator, device=out.device, dtype=out.dtype)
    return out.clamp(0, 1)
