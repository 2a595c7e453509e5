"""Prepared sites → in-memory tensors → shuffled, class-balanced, augmented batches on the model's device.

The views are small and already preprocessed, so they live in memory as one float16 tensor; a batch is an
index into it, moved to the device and augmented there, batched, so the pipeline never starves the model.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from client.prepare import PreparedSite
from common.labels import SPLITS
from common.model import BIRADS_CLASSES, IGNORE

BALANCES = ("pos_weight", "sampler", "none")


@dataclass
class ExamTensors:
    exam_ids: list[str]
    views: Tensor
    """(N, V, H, W) float16 in [0, 1], on the CPU."""
    malignant: Tensor
    """(N,) float32, 1 = malignant, 0 = benign, NaN = no pathology (`common.model.MultiTaskLoss` skips it)."""
    birads_class: Tensor
    """(N,) int64 index into `common.model.BIRADS_CLASSES`, or `IGNORE` where the exam has no 2–5 read."""

    def __len__(self) -> int:
        return len(self.exam_ids)

    @property
    def has_pathology(self) -> Tensor:
        return ~torch.isnan(self.malignant)


class Batch(NamedTuple):
    views: Tensor
    malignant: Tensor
    birads_class: Tensor


def exam_tensors(sites: Sequence[PreparedSite], split: str = "all") -> ExamTensors:
    """Pool the exams of one split ('train', 'val', 'test' or 'all') of one or more sites."""
    if split != "all" and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)} or 'all'")
    parts = [site if split == "all" else site.split(split) for site in sites]
    shapes = {part.views.shape[1:] for part in parts if len(part.exam_ids)}
    if len(shapes) > 1:
        described = ", ".join(f"{p.name}: {p.views.shape[1:]}" for p in parts)
        raise ValueError(f"sites have different view shapes (same config needed for all): {described}")
    views = np.concatenate([part.views for part in parts]).astype(np.float16, copy=False)
    labels = [label for part in parts for label in part.labels]
    return ExamTensors(
        exam_ids=[exam for part in parts for exam in part.exam_ids],
        views=torch.from_numpy(views),
        malignant=torch.tensor([np.nan if x.malignant is None else float(x.malignant) for x in labels],
                               dtype=torch.float32),
        birads_class=torch.tensor([IGNORE if (b := x.birads_target) is None else BIRADS_CLASSES.index(b)
                                   for x in labels], dtype=torch.int64),
    )


def pos_weight(data: ExamTensors, balance: str) -> float | None:
    """The malignancy loss's weight of positives: n_benign / n_malignant with `balance='pos_weight'`
    (counted over the exams with a pathology, the only ones the malignancy loss sees)."""
    n_pos = float(data.malignant.nansum())
    n_neg = float(data.has_pathology.sum()) - n_pos
    if balance != "pos_weight" or n_pos == 0 or n_neg == 0:
        return None
    return n_neg / n_pos


def epoch_order(data: ExamTensors, balance: str, generator: torch.Generator) -> Tensor:
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


def batches(
    data: ExamTensors,
    order: Tensor,
    batch_size: int,
    device: torch.device,
    augment_generator: torch.Generator | None = None,
) -> Iterator[Batch]:
    """Batches in `order`, as float32 on `device`; augmented when a generator (on `device`) is given."""
    for start in range(0, len(order), batch_size):
        yield batch_of(data, order[start : start + batch_size], device, augment_generator)


def batch_of(data: ExamTensors, index: Tensor, device: torch.device,
             augment_generator: torch.Generator | None = None) -> Batch:
    """The exams `index` as one batch (DP-SGD's Poisson-sampled batches may be empty)."""
    views = data.views[index].to(device, non_blocking=True).float()
    if augment_generator is not None and len(index):
        views = augment(views, augment_generator)
    return Batch(views, data.malignant[index].to(device), data.birads_class[index].to(device))


def device_generator(device: torch.device, generator: torch.Generator) -> torch.Generator:
    """A generator on `device` seeded from `generator`, so augmentation draws its noise where it runs."""
    seed = int(torch.randint(2**62, (1,), generator=generator))
    return torch.Generator(device).manual_seed(seed)


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
