"""Where the model looks (`fedmammo predict --heatmaps`): the preprocessing geometry maps a box back onto the
DICOM's own pixels, Grad-CAM finds what the logit depends on, the CLI writes one overlay per view and the
boxes, and the synthetic cohort says where its lesions are."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
import torch.nn.functional as F
from dicom_factory import mg_dataset, save, to_stored, write_site
from PIL import Image

from client.heatmaps import grad_cam, heatmaps, salient, to_pixels
from client.prepare import site_from_arrays
from common.checkpoint import model_metadata, save_checkpoint
from common.cli import main
from common.config import load_config
from common.dicom import read_view
from common.labels import ExamLabel
from common.model import GRAY_MEAN, GRAY_STD, DualViewDenseNet, build_model
from common.preprocess import preprocess
from common.synth.generate import CohortSpec, generate

SIZE = (64, 64)
SQUARE = (100, 124, 40, 64)
"""(top, bottom, left, right) of the bright square, in the canonical image (chest wall at the left)."""


def _square_file(tmp_path: Path, laterality: str) -> tuple[Path, tuple[int, int, int, int]]:
    """A breast that leaves the image's top, bottom and nipple side empty (so the crop has an offset), with
    a bright square; a right breast is stored mirrored. Returns the file and the square in its pixels."""
    rows, cols = 240, 200
    y, x = np.mgrid[0:rows, 0:cols]
    rng = np.random.default_rng(1)
    image = np.where(((y - 120) / 90) ** 2 + (x / 130) ** 2 < 1, 0.45 + 0.05 * rng.random((rows, cols)), 0.02)
    top, bottom, left, right = SQUARE
    image[top:bottom, left:right] = 0.95
    if laterality == "R":
        image, left, right = image[:, ::-1], cols - right, cols - left
    path = save(mg_dataset(to_stored(image), laterality=laterality, orientation=None),
                tmp_path / f"{laterality}.dcm")
    return path, (top, bottom, left, right)


@pytest.mark.parametrize("laterality", ["L", "R"])
def test_a_box_maps_back_to_the_dicom_pixels(tmp_path, laterality) -> None:
    path, (top, bottom, left, right) = _square_file(tmp_path, laterality)
    view = read_view(path)
    assert view.flipped == (laterality == "R")
    model_input, geometry = preprocess(view.pixels, SIZE, view.flipped)
    assert geometry.crop[0] > 0 and geometry.crop[1] < 240 and geometry.crop[3] < 200  # cropped
    truth = {"top": top, "bottom": bottom, "left": left, "right": right}

    # Exact: the square's box taken to the model's input and back is the square, to the pixel.
    box = geometry.to_model((top, bottom, left, right))
    centre = ((box[0] + box[1]) / 2, (box[2] + box[3]) / 2)
    pixels, peak = to_pixels(geometry, box, centre)
    assert pixels == truth
    assert peak == pytest.approx({"row": (top + bottom - 1) / 2, "col": (left + right - 1) / 2})

    # And what the model sees: the square found in its input maps back onto the square, within the one
    # model pixel (in file pixels) that resampling blurs an edge by.
    bright = model_input > (model_input.max() + np.median(model_input[model_input > 0])) / 2
    rows, cols = np.nonzero(bright)
    found, _ = to_pixels(geometry, (rows.min(), rows.max() + 1, cols.min(), cols.max() + 1), (0.0, 0.0))
    tolerance = max(geometry.scale())
    for key in truth:
        assert abs(found[key] - truth[key]) <= tolerance, (key, found, truth)


def test_grad_cam_peaks_where_the_logit_looks() -> None:
    """A model whose logit reads the features of the CC view's lower-right cell, where a bright square
    lies: Grad-CAM is the map its gradient defines (worked out by hand through the ReLU, the pooling over
    2 × 2 cells and the head), peaks there, and is empty on the MLO view, which the logit does not read."""
    torch.manual_seed(0)
    model = DualViewDenseNet().eval()
    views = torch.full((1, 2, *SIZE), 0.3)
    views[0, 0, 40:56, 40:56] = 1.0
    with torch.no_grad():
        maps = model.features((views[:, 0].unsqueeze(1) - GRAY_MEAN) / GRAY_STD)[0]  # (1024, 2, 2)
        active = F.relu(maps)
        weight = active[:, 1, 1] - torch.stack([active[:, 0, 0], active[:, 0, 1], active[:, 1, 0]]).mean(0)
        model.malignancy.weight.zero_()
        model.malignancy.weight[0, :1024] = weight
    cam = grad_cam(model, views)[0]
    alpha = weight * (maps > 0).float().mean(dim=(1, 2)) / 4  # d logit / d map, averaged over the cells
    expected = F.relu((alpha[:, None, None] * maps).sum(0))
    expected = F.interpolate(expected[None, None], size=SIZE, mode="bilinear", align_corners=False)[0, 0]
    torch.testing.assert_close(cam[0], expected, rtol=1e-4, atol=1e-5)
    assert float(cam[1].abs().max()) == 0.0
    (top, bottom, left, right), (row, col) = salient(cam[0].numpy())
    assert row >= 32 and col >= 32
    assert top <= 48 < bottom and left <= 48 < right
    assert salient(cam[1].numpy()) is None


def _weights(tmp_path: Path, config_path: Path) -> Path:
    """Untrained weights whose malignancy head weighs every feature positively: every view gets a map."""
    config = load_config(config_path)
    torch.manual_seed(0)
    model = build_model(config.model, config.data.bilateral)
    with torch.no_grad():
        model.malignancy.weight.abs_()
    return save_checkpoint(tmp_path / "w.safetensors", model.state_dict(), model_metadata(config))


def test_predict_writes_one_overlay_per_view_and_the_boxes(tmp_path, capsys) -> None:
    root = tmp_path / "site"
    write_site(root, 3)
    config = tmp_path / "c.toml"
    config.write_text(f'[data]\nimage_size = [64, 64]\nworkers = 1\ncache_dir = "{tmp_path / "cache"}"\n'
                      "[train]\nbatch_size = 2\nnum_threads = 1\n")
    weights, out, report = _weights(tmp_path, config), tmp_path / "maps", tmp_path / "p.json"
    command = ["predict", str(root), "--weights", str(weights), "--split", "all", "--json", str(report),
               "--heatmaps", str(out)]
    assert main(command) == 0
    exams = json.loads(report.read_text())["exams"]
    assert len(exams) == 3 and "heatmaps" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{e['exam_id']}_{v}.png" for e in exams
                                                          for v in ("CC", "MLO"))
    for exam in exams:
        assert [v["view"] for v in exam["views"]] == ["CC", "MLO"]
        for entry in exam["views"]:
            ds = pydicom.dcmread(entry["file"])
            assert (ds.ImageLaterality, ds.ViewPosition) == (exam["laterality"], entry["view"])
            png = Image.open(out / f"{exam['exam_id']}_{entry['view']}.png")
            assert png.mode == "RGB" and png.size == (ds.Columns, ds.Rows)  # the file's grid, as displayed
            box, peak = entry["box"], entry["peak"]
            assert 0 <= box["top"] < box["bottom"] <= ds.Rows
            assert 0 <= box["left"] < box["right"] <= ds.Columns
            assert box["top"] - 0.5 <= peak["row"] < box["bottom"] - 0.5
            assert box["left"] - 0.5 <= peak["col"] < box["right"] - 0.5
            # on the breast: brighter than the background, which a right breast has on its left
            stored = ds.pixel_array[box["top"]:box["bottom"], box["left"]:box["right"]]
            assert stored.max() > np.median(ds.pixel_array[:, :4] if exam["laterality"] == "R"
                                            else ds.pixel_array[:, -4:])
        assert max(v["relative_peak"] for v in exam["views"]) == 1.0
    # The second run reads the prepared site from its cache, files included.
    first = [e["views"] for e in exams]
    assert main(command) == 0
    assert [e["views"] for e in json.loads(report.read_text())["exams"]] == first


def test_no_heatmaps_without_the_files(tmp_path) -> None:
    """A site made from arrays has no DICOM files to draw on: a clear error."""
    label = ExamLabel("p", "1.2.3", "L", True, 5, "c", False, "test")
    site = site_from_arrays("arrays", np.zeros((1, 2, *SIZE), np.float32), [label])
    config = load_config(None)
    with pytest.raises(ValueError, match="DICOM files are not known"):
        heatmaps(DualViewDenseNet(), site, config, None, None)  # type: ignore[arg-type]


def test_synthetic_lesions_are_where_lesions_csv_says(tmp_path) -> None:
    """Each lesion's core, at the centre and radius `lesions.csv` gives in the stored pixels (right breasts
    mirrored), is brighter as displayed than the ring around it. Conspicuity 8: benign lesions stand out
    too (conspicuity scales the contrast only, not where the lesions lie)."""
    generate(CohortSpec(train=(4,), val=(0,), test=(4,), seed=3, scale=0.0625, conspicuity=8), tmp_path,
             workers=1, progress=False)
    with (tmp_path / "lesions.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 8 and {r["laterality"] for r in rows} == {"L", "R"}
    for row in rows:
        view = read_view(tmp_path / row["file"])
        assert (view.laterality, view.view) == (row["laterality"], row["view"])
        shown = view.pixels[:, ::-1] if view.flipped else view.pixels
        y, x = np.mgrid[0:shown.shape[0], 0:shown.shape[1]]
        distance = np.hypot(y - float(row["row"]), x - float(row["col"])) / float(row["radius"])
        assert shown[distance <= 1].mean() > shown[(distance > 2) & (distance <= 3)].mean() + 0.1, row
