"""The crop keeps the breast only: burned-in markers, labels, rulers and a scanner's border are gone from the
model input, on a digital image (black background) and on a digitized film (grey, uneven background, a
scanner bed and the film's clear edge), for both breasts, chest wall at column 0; read from DICOM as a site
stores them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from dicom_factory import film, marked_phantom, mg_dataset, phantom, save, to_stored, uid, write_site

from common.dicom import read_view
from common.preprocess import (
    chest_wall_side,
    crop_box,
    crop_to_breast,
    frame,
    locate_breast,
    preprocess_view,
)

SIZE = (128, 96)


def _read(tmp_path: Path, image: np.ndarray, laterality: str, view: str = "MLO") -> np.ndarray:
    """`image` as DICOM displays `laterality`, written and read back by the product's reader (canonical:
    chest wall at column 0)."""
    ds = mg_dataset(to_stored(image), laterality=laterality, view=view, study=uid("crop", laterality, view))
    return read_view(save(ds, tmp_path / f"{laterality}_{view}.dcm")).pixels


def _canonical(regions: dict[str, np.ndarray], laterality: str) -> dict[str, np.ndarray]:
    return {k: v[:, ::-1] for k, v in regions.items()} if laterality == "R" else regions


def _check_crop(pixels: np.ndarray, regions: dict[str, np.ndarray]) -> tuple[int, int, int, int]:
    """The breast whole and untouched in the crop, chest wall at its column 0; every marker, ruler and
    border pixel outside the crop box or set to 0 (background) in it. Returns the box."""
    mask, stride, inside = locate_breast(pixels)
    box = crop_box(pixels.shape, mask, stride, inside)
    assert box is not None
    top, bottom, left, right = box
    crop = crop_to_breast(pixels, mask, stride, inside)
    assert crop.shape == (bottom - top, right - left)
    breast = regions["breast"]
    inner = breast[top:bottom, left:right]
    assert inner.sum() >= 0.99 * breast.sum()  # at most a grazed line of the skin
    np.testing.assert_array_equal(crop[inner], pixels[top:bottom, left:right][inner])
    assert inner[:, :stride + 1].any(axis=1).mean() > 0.5  # the chest wall at column 0
    for name in ("marker", "ruler", "border"):
        if name in regions:
            assert not np.any(crop[regions[name][top:bottom, left:right]]), name
    return box


@pytest.mark.parametrize("laterality", ["L", "R"])
def test_film_crop_drops_marker_ruler_and_scanner_border(tmp_path: Path, laterality: str) -> None:
    image, regions = film(laterality=laterality)
    assert chest_wall_side(image) == ("left" if laterality == "L" else "right")
    pixels = _read(tmp_path, image, laterality)
    regions = _canonical(regions, laterality)
    assert pixels[regions["breast"]].mean() > 0.5 and pixels[:, 0].max() < 0.05  # canonical: scanner bed at 0
    top, bottom, left, right = _check_crop(pixels, regions)
    assert regions["marker"][top:bottom, left:right].sum() == regions["marker"].sum()  # in the box, zeroed
    assert not regions["ruler"][top:bottom, left:right].any()  # the box ends before the ruler
    assert not regions["border"][top:bottom, left:right].any()

    # The model input is that of the same film with no marker and no ruler.
    clean, _ = film(laterality=laterality, marker=False, ruler=False)
    out, expected = preprocess_view(pixels, SIZE), preprocess_view(_read(tmp_path, clean, laterality), SIZE)
    assert np.abs(out - expected).mean() < 0.005 and np.abs(out - expected).max() < 0.1
    assert out[:, 0].mean() > 0.3 and out[:, -1].max() == 0.0  # chest wall at column 0, padding at the right


@pytest.mark.parametrize(("laterality", "view"), [("L", "MLO"), ("R", "MLO"), ("L", "CC"), ("R", "CC")])
def test_digital_crop_drops_a_burned_in_marker(tmp_path: Path, laterality: str, view: str) -> None:
    image, marker = marked_phantom(laterality=laterality, view=view)
    pixels = _read(tmp_path, image, laterality, view)
    regions = _canonical({"marker": marker}, laterality)
    regions["breast"] = phantom(*image.shape, "L", view) > 0.1  # canonical, without the marker
    top, bottom, left, right = _check_crop(pixels, regions)
    assert regions["marker"][top:bottom, left:right].sum() > 0.9 * regions["marker"].sum()
    out = preprocess_view(pixels, SIZE)
    assert out[:, 0].mean() > 0.3


def test_frame_takes_a_border_of_several_bands_but_not_the_breast() -> None:
    image, regions = film(300, 240)
    top, bottom, left, right = frame(image)
    assert not regions["border"][top:bottom, left:right].any()
    assert regions["breast"][:, :left].sum() <= 300  # the chest-wall edge: at most one grazed column
    plain = np.zeros((100, 80), np.float32)
    plain[20:80, :50] = 0.6  # a breast on black: no frame to cut on the chest-wall side
    assert frame(plain)[2] == 0


@pytest.mark.parametrize("bilateral", [False, True])
def test_check_writes_what_the_model_sees(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          bilateral: bool) -> None:
    from PIL import Image

    from client.check import safe_name
    from common.cli import main

    root, out, report = tmp_path / "site", tmp_path / "views", tmp_path / "check.json"
    rows = write_site(root, 3, bilateral=bilateral)
    config = tmp_path / "check.toml"
    config.write_text(f"[data]\nimage_size = [64, 40]\nworkers = 1\nbilateral = {str(bilateral).lower()}\n")
    args = ["check", str(root), "--config", str(config), "--views", str(out), "--json", str(report)]
    assert main(args) == 0
    views = ("CC", "MLO", "CONTRA_CC", "CONTRA_MLO") if bilateral else ("CC", "MLO")
    expected = {f"{row['study_uid']}_{row['laterality']}_{view}.png" for row in rows for view in views}
    assert {p.name for p in out.iterdir()} == expected
    for path in out.iterdir():
        with Image.open(path) as png:
            assert (png.format, png.mode, png.size) == ("PNG", "L", (40, 64))  # 8-bit grey, width × height
            pixels = np.asarray(png)
        assert pixels[:, 0].mean() > 60 and pixels.max() > 200  # the chest wall at column 0, harmonised
    assert f"Model inputs: {len(expected)} PNG files in {out.resolve()}" in capsys.readouterr().out
    data = json.loads(report.read_text())
    assert sorted(name for names in data["views"]["files"].values() for name in names) == sorted(expected)

    assert safe_name("CASE 7/a b_L") == "CASE_7_a_b_L" and safe_name("../x_R") == "_._x_R"
