"""common.preprocess: breast mask, crop, aspect-kept resize and padding, grey-level harmonisation (also
across the synthetic vendors, through their real DICOM files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from dicom_factory import phantom

from common.dicom import read_view
from common.preprocess import (
    LANDMARKS,
    breast_mask,
    chest_wall_side,
    crop_to_breast,
    fit,
    harmonize,
    preprocess_view,
    resize,
)
from common.synth.generate import CohortSpec, plan, write_study
from common.synth.vendors import PROFILES


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
    image = _breast()
    crop = crop_to_breast(image, *breast_mask(image))
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


def _tone_curves() -> dict[str, np.ndarray]:
    """One breast under three monotone tone curves (a gamma, its inverse, a sigmoid window), each with
    the background at another grey level, as the vendors' VOI leave it."""
    image = phantom(200, 160)  # under MASK_SIDE: the mask at full resolution
    mask, _ = breast_mask(image)
    tissue = np.where(mask, image, 0.0)
    sigmoid = 1 / (1 + np.exp(-4 * (2 * tissue - 1)))
    return {"gamma 0.5": np.where(mask, tissue ** 0.5, 0.0),
            "gamma 2": np.where(mask, 0.05 + 0.9 * tissue ** 2, 0.05),
            "sigmoid": np.where(mask, sigmoid, sigmoid.min())}


def _harmonized(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mask, stride = breast_mask(image)
    return harmonize(image, image[::stride, ::stride][mask]), mask


def test_harmonize_puts_the_landmarks_in_place() -> None:
    outputs = {}
    for name, image in _tone_curves().items():
        out, mask = _harmonized(image)
        assert out.dtype == np.float32 and out.min() >= 0.0, name
        assert np.all(out[~mask] == 0.0), name  # the background at 0, whatever its level was
        for percentile, level in LANDMARKS:
            assert np.percentile(out[mask], percentile) == pytest.approx(level, abs=0.01), (name, percentile)
        order = np.argsort(image[mask], kind="stable")
        assert np.all(np.diff(out[mask][order]) >= 0), name  # monotone: brighter stays brighter
        outputs[name] = out
    curves = _tone_curves()
    before = max(np.abs(a - b).mean() for a in curves.values() for b in curves.values())
    after = max(np.abs(a - b).mean() for a in outputs.values() for b in outputs.values())
    assert after < before / 3, (before, after)


def test_harmonize_undoes_a_window_and_keeps_a_lesions_contrast() -> None:
    """A bright lesion that stretched the image's window darkens all other tissue: an image-wide cue of
    malignancy that no radiologist uses. Harmonised, the tissue is as without the stretch, and the lesion
    keeps its contrast over the densest tissue, scaled as the tissue above the median is."""
    image = phantom(200, 160)
    image[90:100, 60:70] = 0.98  # the lesion: brighter than any tissue
    stretched = np.where(image > 0.03, 0.03 + (image - 0.03) / 1.4, image)  # the window widened by 40 %
    out, mask = _harmonized(image)
    out_stretched, _ = _harmonized(stretched)
    assert np.abs(out - out_stretched)[mask].max() < 0.01
    tissue = np.percentile(image[mask], 99)
    slope = (LANDMARKS[-1][1] - LANDMARKS[-2][1]) / (tissue - np.percentile(image[mask], 50))
    contrast = out[90:100, 60:70].mean() - LANDMARKS[-1][1]
    assert contrast == pytest.approx(slope * (0.98 - tissue), rel=0.05)


def test_harmonize_leaves_an_image_without_breast_alone() -> None:
    flat = np.full((40, 30), 0.4, np.float32)
    assert harmonize(flat, flat[:0]) is flat
    clipped = np.ones((40, 30), np.float32)  # every landmark tied at 1: still defined, still in [0, 1]
    out = harmonize(clipped, clipped.ravel())
    assert np.all(np.isfinite(out)) and out.max() <= 1.0


def _breast_levels(views: list[np.ndarray]) -> np.ndarray:
    return np.percentile(np.concatenate([v[v > 0] for v in views]), [10, 25, 50, 75, 90])


def test_preprocess_puts_every_vendor_on_one_grey_scale(tmp_path: Path) -> None:
    """One patient's four views through each synthetic vendor's processing, written as DICOM and read by
    the product's reader: before harmonisation the vendors' in-breast grey levels differ (Kestrel's sigmoid
    VOI darkens the fat), after it they are closer."""
    spec = CohortSpec(train=(1, 1, 1), val=(1, 1, 1), test=(1, 1, 1), seed=7, scale=0.08)
    case = plan(spec)[0].cases[0]
    raw, model_input = {}, {}
    for profile in PROFILES[:3]:
        write_study(case, profile, tmp_path / profile.key, spec.scale, spec.seed, conspicuity=0.6)
        views = [read_view(path).pixels for path in sorted((tmp_path / profile.key).rglob("*.dcm"))]
        assert len(views) == 4
        raw[profile.key] = []
        for pixels in views:
            mask, stride = breast_mask(pixels)
            raw[profile.key].append(np.where(mask, pixels[::stride, ::stride], 0.0))
        model_input[profile.key] = [preprocess_view(pixels, (128, 96)) for pixels in views]

    def spread(levels: dict[str, list[np.ndarray]]) -> float:
        per_vendor = np.stack([_breast_levels(views) for views in levels.values()])
        return float((per_vendor.max(axis=0) - per_vendor.min(axis=0)).max())

    # 0.10 → 0.06 in this draw: the levels between the landmarks still follow each vendor's curve
    assert spread(raw) > 0.08 and spread(model_input) < 0.65 * spread(raw), (spread(raw), spread(model_input))
