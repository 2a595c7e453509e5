"""common.dicom.read_view / read_header on real files written by pydicom (and dcmtk)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_factory import mg_dataset, phantom, save, to_stored, view_file
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from common.dicom import DicomError, read_header, read_view
from common.preprocess import chest_wall_side

SYNTAXES = [ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless]


def _write(tmp_path: Path, name: str, stored: np.ndarray, syntax: str | None = None,
           **options: object) -> Path:
    return save(mg_dataset(stored, **options), tmp_path / name, syntax)


@pytest.mark.parametrize("bits", [12, 16])
def test_compressed_and_uncompressed_read_to_identical_pixels(tmp_path: Path, bits: int) -> None:
    stored = to_stored(phantom(72, 56, seed=bits), bits)
    options = {"bits": bits, "window": (2 ** (bits - 1), 2**bits * 0.8)}
    paths = [_write(tmp_path, f"{i}.dcm", stored, syntax, **options) for i, syntax in enumerate(SYNTAXES)]
    if shutil.which("dcmcjpeg"):
        from dicom_factory import dcmtk_jpeg_lossless

        paths.append(dcmtk_jpeg_lossless(paths[0], tmp_path / "sv1.dcm"))
    syntaxes = [str(pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID) for p in paths]
    assert len(set(syntaxes)) == len(paths), syntaxes  # really stored differently
    reference = read_view(paths[0]).pixels
    assert reference.dtype == np.float32 and reference.shape == stored.shape
    for path, syntax in zip(paths[1:], syntaxes[1:], strict=True):
        np.testing.assert_array_equal(read_view(path).pixels, reference, err_msg=syntax)


def test_dcmtk_jpeg_lossless_sv1_is_read(tmp_path: Path) -> None:
    if shutil.which("dcmcjpeg") is None:
        pytest.skip("dcmtk's dcmcjpeg is not installed")
    from dicom_factory import dcmtk_jpeg_lossless

    source = _write(tmp_path, "a.dcm", to_stored(phantom()))
    target = dcmtk_jpeg_lossless(source, tmp_path / "b.dcm")
    assert pydicom.dcmread(target).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.70"
    np.testing.assert_array_equal(read_view(target).pixels, read_view(source).pixels)


def test_table_lookup_equals_pydicom_per_pixel(tmp_path: Path) -> None:
    """The LUT table gives exactly what pydicom's functions give pixel by pixel (here a sigmoid window after
    a rescale), divided by the window's output range."""
    stored = to_stored(phantom(seed=3), 14)
    path = _write(tmp_path, "a.dcm", stored, bits=14, window=(9000.0, 12000.0))
    ds = pydicom.dcmread(path)
    ds.RescaleSlope, ds.RescaleIntercept, ds.VOILUTFunction = 2, -1000, "SIGMOID"
    ds.save_as(path)
    ds = pydicom.dcmread(path)
    expected = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)
    low, high = -1000, (2**14 - 1) * 2 - 1000  # pydicom's window output range after this rescale
    np.testing.assert_allclose(read_view(path).pixels, (expected - low) / (high - low), atol=1e-6)


def test_voi_lut_sequence_is_applied_and_scaled_by_its_entries(tmp_path: Path) -> None:
    stored = to_stored(phantom(seed=4), 12)
    lut = np.round(4000 * (np.arange(4096) / 4095) ** 0.5).astype(np.uint16)
    path = _write(tmp_path, "a.dcm", stored, voi_lut=lut, window=(100, 50))  # the LUT wins over the window
    np.testing.assert_allclose(read_view(path).pixels, lut[stored] / 4000, atol=1e-6)


def test_without_voi_the_stored_range_is_the_window(tmp_path: Path) -> None:
    stored = to_stored(phantom(seed=5), 12)
    pixels = read_view(_write(tmp_path, "a.dcm", stored)).pixels
    expected = (stored - stored.min()) / (stored.max() - stored.min())
    np.testing.assert_allclose(pixels, expected, atol=1e-6)
    assert pixels.min() == 0.0 and pixels.max() == 1.0


@pytest.mark.parametrize("voi", ["none", "window", "lut"])
def test_monochrome1_and_monochrome2_read_alike(tmp_path: Path, voi: str) -> None:
    image, top = phantom(seed=6), 4095
    m2, m1 = to_stored(image, 12, "MONOCHROME2"), to_stored(image, 12, "MONOCHROME1")
    assert not np.array_equal(m1, m2)
    options2: dict[str, object] = {}
    options1: dict[str, object] = {}
    if voi == "window":  # the same window mirrored: LINEAR centres are at c − 0.5
        options2["window"], options1["window"] = (1500.0, 2500.0), (top - 1500.0 + 1, 2500.0)
    if voi == "lut":  # a MONOCHROME1 LUT outputs what will be displayed inverted
        lut = np.round(4095 * (np.arange(4096) / 4095) ** 0.7).astype(np.uint16)
        options2["voi_lut"], options1["voi_lut"] = lut, 4095 - lut[::-1]
    a = read_view(_write(tmp_path, "m2.dcm", m2, photometric="MONOCHROME2", **options2)).pixels
    b = read_view(_write(tmp_path, "m1.dcm", m1, photometric="MONOCHROME1", **options1)).pixels
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert a[:, :5].mean() > a[:, -5:].mean()  # breast bright, background dark


def test_for_processing_gets_a_display_window_with_dark_background(tmp_path: Path) -> None:
    density = phantom(seed=7)
    exposure = np.round(16000 * np.exp(-3.0 * density)).astype(np.uint16)  # raw: background brightest
    path = _write(tmp_path, "raw.dcm", exposure, bits=14, for_processing=True, photometric="MONOCHROME2")
    view = read_view(path)
    assert view.for_processing
    assert view.pixels.min() >= 0.0 and view.pixels.max() <= 1.0
    breast = density > 0.2
    assert view.pixels[breast].mean() > view.pixels[~breast].mean() + 0.3
    assert np.corrcoef(view.pixels[breast], density[breast])[0, 1] > 0.95  # denser = brighter


def test_right_breast_is_flipped_to_the_canonical_orientation(tmp_path: Path) -> None:
    left = read_view(view_file(tmp_path, "1.2.3", "L", "MLO", seed=8))
    right = read_view(view_file(tmp_path, "1.2.3", "R", "MLO", seed=8))
    assert (left.laterality, right.laterality) == ("L", "R")
    np.testing.assert_array_equal(left.pixels, right.pixels)
    assert chest_wall_side(right.pixels) == "left"


def test_wrong_patient_orientation_is_corrected_by_the_pixels(tmp_path: Path) -> None:
    # A right breast stored chest wall at the right, but tagged as if it needed no flip.
    view = read_view(view_file(tmp_path, "1.2.3", "R", "CC", orientation=["A", "R"]))
    assert chest_wall_side(view.pixels) == "left"
    # A left breast tagged as stored the other way round is not flipped.
    view = read_view(view_file(tmp_path, "1.2.3", "L", "CC", orientation=["P", "L"]))
    assert chest_wall_side(view.pixels) == "left"


def test_wrong_laterality_tag_keeps_the_tag_but_the_pixels_orient(tmp_path: Path) -> None:
    stored = to_stored(phantom(laterality="R", seed=9))  # a right breast as displayed...
    path = _write(tmp_path, "a.dcm", stored, laterality="L", orientation=None)  # ...tagged left
    view = read_view(path)
    assert view.laterality == "L"
    assert chest_wall_side(view.pixels) == "left"


def test_unclear_pixels_fall_back_to_patient_orientation_then_laterality(tmp_path: Path) -> None:
    from dicom_factory import blob

    image = blob()
    image[28:36, 14:20] += 0.3  # asymmetric, so a flip shows, and touching no edge
    stored = to_stored(image)
    as_stored = read_view(_write(tmp_path, "a.dcm", stored, laterality="R", orientation=["A", "L"])).pixels
    flipped = read_view(_write(tmp_path, "b.dcm", stored, laterality="L", orientation=["P", "R"])).pixels
    by_laterality = read_view(_write(tmp_path, "c.dcm", stored, laterality="R", orientation=None)).pixels
    np.testing.assert_array_equal(flipped, as_stored[:, ::-1])
    np.testing.assert_array_equal(by_laterality, flipped)


@pytest.mark.parametrize("tag", ["ImageLaterality", "Laterality"])
def test_laterality_from_either_tag(tmp_path: Path, tag: str) -> None:
    path = view_file(tmp_path, "1.2.3", "R", "CC", laterality_tag=tag)
    assert read_header(path).laterality == "R"
    assert read_view(path).laterality == "R"


def test_laterality_from_the_pixels_when_no_tag(tmp_path: Path) -> None:
    for laterality in "LR":
        path = view_file(tmp_path, "1.2.3", laterality, "MLO", laterality_tag=None, orientation=None)
        assert read_header(path).laterality is None
        assert read_view(path).laterality == laterality


def test_no_laterality_when_neither_tags_nor_pixels_tell(tmp_path: Path) -> None:
    from dicom_factory import blob

    path = _write(tmp_path, "a.dcm", to_stored(blob()), laterality_tag=None)
    with pytest.raises(DicomError, match=r"^.*: no laterality: "):
        read_view(path)


@pytest.mark.parametrize(
    ("options", "view", "projection"),
    [
        ({"view": "MLO", "view_tag": "ViewPosition"}, "MLO", "MLO"),
        ({"view": "CC", "view_tag": "ViewCodeSequence"}, "CC", "CC"),
        ({"view": "MLO", "view_tag": "ViewCodeSequence", "code_scheme": "SRT"}, "MLO", "MLO"),
        ({"view": "XCCL", "view_tag": "ViewCodeSequence"}, "CC", "XCCL"),
        ({"view": "ML", "view_tag": "ViewCodeSequence", "code_scheme": "SRT"}, "MLO", "ML"),
        ({"view": "CC", "view_tag": None, "orientation": ["A", "R"]}, "CC", "CC"),
        ({"view": "MLO", "view_tag": None, "orientation": ["P", "F"]}, "MLO", "MLO"),
    ],
)
def test_view_fallbacks(tmp_path: Path, options: dict[str, object], view: str, projection: str) -> None:
    path = _write(tmp_path, "a.dcm", to_stored(phantom()), **options)
    header = read_header(path)
    assert (header.view, header.projection) == (view, projection)


@pytest.mark.parametrize(("position", "projection"), [("LMLO", "MLO"), ("R CC", "CC"), ("XCCL", "XCCL"),
                                                      ("MLOID", "MLO"), ("LM", "LM"), ("R LMO", "LMO")])
def test_view_position_spellings(tmp_path: Path, position: str, projection: str) -> None:
    ds = mg_dataset(to_stored(phantom()))
    ds.ViewPosition = position
    assert read_header(save(ds, tmp_path / "a.dcm")).projection == projection


def test_implant_displaced_is_accepted_but_spot_and_magnification_are_not(tmp_path: Path) -> None:
    stored = to_stored(phantom())
    implant = _write(tmp_path, "a.dcm", stored, view_tag="ViewCodeSequence",
                     view_modifier=("399209000", "R-102D5", "Implant Displaced"))
    assert read_header(implant).view == "CC"
    spot = _write(tmp_path, "b.dcm", stored, view_tag="ViewCodeSequence",
                  view_modifier=("399055006", "R-102D7", "Spot Compression"))
    with pytest.raises(DicomError, match="unsupported view: CC with view modifier 'Spot Compression'"):
        read_header(spot)
    ds = mg_dataset(stored)
    ds.ViewPosition = "MAG"
    with pytest.raises(DicomError, match="unsupported view: ViewPosition 'MAG'"):
        read_header(save(ds, tmp_path / "c.dcm"))


def test_no_view(tmp_path: Path) -> None:
    path = _write(tmp_path, "a.dcm", to_stored(phantom()), view_tag=None, orientation=None)
    with pytest.raises(DicomError, match="no view: "):
        read_header(path)


def test_bad_files_raise_with_their_reason(tmp_path: Path) -> None:
    text = tmp_path / "notes.dcm"
    text.write_text("patient list, not an image\n" * 20)
    garbage = tmp_path / "scan.bin"
    garbage.write_bytes(np.random.default_rng(0).bytes(3000))
    empty = tmp_path / "empty.dcm"
    empty.touch()
    ct = _write(tmp_path, "ct.dcm", to_stored(phantom()), modality="CT")
    for path, reason in [(text, "not DICOM"), (garbage, "not DICOM"), (empty, "not DICOM"), (ct, "not MG")]:
        with pytest.raises(DicomError) as caught:
            read_view(path)
        assert caught.value.reason.startswith(reason + ":")
        assert caught.value.path == path


def test_truncated_pixel_data(tmp_path: Path) -> None:
    path = _write(tmp_path, "a.dcm", to_stored(phantom()))
    path.write_bytes(path.read_bytes()[:-2000])
    assert read_header(path).view == "CC"  # the header is intact
    with pytest.raises(DicomError, match=r"pixel data unreadable: .*Explicit VR Little Endian"):
        read_view(path)


def test_missing_codec_names_the_transfer_syntax(tmp_path: Path) -> None:
    ds = mg_dataset(to_stored(phantom()))
    ds.compress(RLELossless)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: pydicom has no decoder
    path = tmp_path / "a.dcm"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(DicomError, match=r"codec missing: no decoder for transfer syntax MPEG2 Main "
                                         r"Profile / Main Level \(1\.2\.840\.10008\.1\.2\.4\.100\)"):
        read_view(path)


def test_corrupt_codestream_names_the_transfer_syntax(tmp_path: Path) -> None:
    ds = mg_dataset(to_stored(phantom()))
    ds.compress(JPEG2000Lossless)
    data = bytearray(ds.PixelData)
    data[40:400] = bytes(360)
    ds.PixelData = bytes(data)
    path = tmp_path / "a.dcm"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(DicomError, match=r"pixel data unreadable: JPEG 2000"):
        read_view(path)


def test_absurd_matrix_is_rejected_before_decoding(tmp_path: Path) -> None:
    ds = mg_dataset(to_stored(phantom()))
    ds.Rows = 60000
    path = tmp_path / "a.dcm"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(DicomError, match="unsupported image: implausible matrix 60000×48"):
        read_view(path)


def test_header_fields(tmp_path: Path) -> None:
    path = view_file(tmp_path, "1.2.3.4", "R", "MLO", patient="P9", bits=14)
    view = read_view(path)
    assert view.path == path
    assert (view.study_instance_uid, view.patient_id, view.pixel_spacing) == ("1.2.3.4", "P9", (0.1, 0.1))
    assert view.sop_instance_uid == pydicom.dcmread(path).SOPInstanceUID
    assert view.for_processing is False and view.rank == 0
