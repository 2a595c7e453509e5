"""common.preprocess: breast mask, crop, aspect-kept resize and padding."""

from __future__ import annotations

import numpy as np
import pytest
from dicom_factory import phantom

from common.preprocess import breast_mask, chest_wall_side, crop_to_breast, fit, preprocess_view, resize


def _breast(rows: int = 400, cols: int = 300) -> np.ndarray:
    """Background 0.02, a fatty rim (0.2) around dense tissue (0.7), chest wall at the left."""
    y, x = np.mgrid[0:rows, 0:cols] / np.array([rows, cols])[:, None, None]
    radius2 = ((y - 0.5) / 0.4) ** 2 + (x / 0.6) ** 2
    image = np.where(radius2 < 1, 0.2, 0.02) + np.where(radius2 < 0.5, 0.5, 0.0)
    return (image + np.random.default_rng(0).normal(0, 0.01, image.shape)).astype(np.float32)


def test_mask_keeps_the_fatty_periphery_and_drops_markers() -> None:
    image = _breast()
    image[20:40, 250:280] = 1.0  # a burned-in marker in the background
    mask, stride = breast_mask(image)
    full = np.kron(mask, np.ones((stride, stride), bool))[: image.shape[0], : image.shape[1]]
    y, x = np.mgrid[0:400, 0:300] / np.array([400, 300])[:, None, None]
    breast = ((y - 0.5) / 0.4) ** 2 + (x / 0.6) ** 2 < 1
    assert (full == breast).mean() > 0.98
    assert not full[20:40, 250:280].any()


def test_chest_wall_side() -> None:
    image = _breast()
    assert chest_wall_side(image) == "left"
    assert chest_wall_side(image[:, ::-1]) == "right"
    assert chest_wall_side(np.full((100, 80), 0.5, np.float32)) is None
    assert chest_wall_side(np.zeros((100, 80), np.float32)) is None


def test_crop_to_breast() -> None:
    crop = crop_to_breast(_breast())
    assert crop.shape[1] == pytest.approx(0.6 * 300, abs=6)  # chest wall to nipple
    assert crop.shape[0] == pytest.approx(0.8 * 400, abs=6)


def test_fit_keeps_aspect_chest_wall_left_and_pads() -> None:
    image = np.ones((200, 50), np.float32)
    out = fit(image, (128, 96))
    assert out.shape == (128, 96) and out.dtype == np.float32
    assert out[:, :32].min() > 0.999 and out[:, 32:].max() == 0.0  # 200×50 → 128×32, left-aligned
    out = fit(np.ones((50, 200), np.float32), (128, 96))
    rows = np.flatnonzero(out[:, 0])
    assert (rows[0], rows[-1] + 1) == (52, 76)  # 50×200 → 24×96, centred vertically


def test_resize_is_anti_aliased() -> None:
    checkerboard = (np.indices((512, 512)).sum(axis=0) % 2).astype(np.float32)
    small = resize(checkerboard, (64, 64))
    assert np.abs(small - 0.5).max() < 0.01


def test_preprocess_view() -> None:
    out = preprocess_view(phantom(300, 240, "L", "MLO").astype(np.float32), (128, 96))
    assert out.shape == (128, 96) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert out[:, 0].mean() > 0.5  # the chest wall (pectoral muscle, tissue) at column 0
