"""Small but real mammography DICOM files for tests: written by pydicom, compressed by its encoders or dcmtk.

`phantom` draws a breast (skin line, thickness fall-off, texture, a lesion; pectoral muscle in MLO) as
DICOM displays it: chest wall at the left for a left breast, at the right for a right one. `mg_dataset`
wraps stored values in a Digital Mammography X-Ray Image data set whose laterality, view, orientation and
VOI tags can each be left out or changed; `save` writes it in any transfer syntax; `write_site` writes a
site folder (exams + labels.csv).
"""

from __future__ import annotations

import csv
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID,
    DigitalMammographyXRayImageStorageForPresentation,
    DigitalMammographyXRayImageStorageForProcessing,
    ExplicitVRLittleEndian,
    generate_uid,
)
from scipy import ndimage

ORIENTATION = {  # the standard PatientOrientation of each breast and view
    ("L", "CC"): ["A", "R"], ("R", "CC"): ["P", "L"], ("L", "MLO"): ["A", "F"], ("R", "MLO"): ["P", "F"],
}
VIEW_CODES = {  # (SNOMED CT, SNOMED RT, meaning)
    "CC": ("399162004", "R-10242", "cranio-caudal"),
    "MLO": ("399368009", "R-10226", "medio-lateral oblique"),
    "ML": ("399260004", "R-10224", "medio-lateral"),
    "XCCL": ("399192008", "R-1024A", "cranio-caudal exaggerated laterally"),
}
LABEL_COLUMNS = ["patient_id", "study_uid", "laterality", "pathology", "birads", "density", "symptomatic",
                 "split", "reader_senior1"]


def uid(*parts: object) -> UID:
    """A valid UID derived from `parts`: the same parts give the same UID."""
    return generate_uid(entropy_srcs=[str(p) for p in parts])


def phantom(rows: int = 64, cols: int = 48, laterality: str = "L", view: str = "CC",
            seed: int = 0) -> np.ndarray:
    """A breast-like image in [0, 1] (higher = denser), stored as DICOM displays it."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float32)
    y, x = y / rows, x / cols
    center = 0.55 if view == "CC" else 0.6
    radius2 = ((y - center) / 0.42) ** 2 + (x / 0.78) ** 2
    thickness = np.sqrt(np.clip(1.0 - radius2, 0.0, 1.0))
    texture = ndimage.zoom(rng.random((8, 6)).astype(np.float32), (rows / 8, cols / 6), order=1)
    tissue = 0.3 + 0.35 * thickness + 0.2 * texture[:rows, :cols]
    lesion = np.exp(-(((y - center + 0.1) / 0.06) ** 2 + ((x - 0.35) / 0.08) ** 2))
    image = np.where(radius2 < 1.0, tissue + 0.25 * lesion, 0.03)
    if view == "MLO":
        image = np.where(x < 0.35 * (1.0 - y / 0.55), np.maximum(image, 0.85), image)
    image = np.clip(image + rng.normal(0.0, 0.01, image.shape), 0.0, 1.0)
    return image[:, ::-1].copy() if laterality == "R" else image


def blob(rows: int = 64, cols: int = 48) -> np.ndarray:
    """A breast-sized blob touching no image edge: its pixels cannot tell the chest-wall side."""
    y, x = np.mgrid[0:rows, 0:cols] / np.array([rows, cols])[:, None, None]
    return np.where(((y - 0.5) / 0.3) ** 2 + ((x - 0.5) / 0.3) ** 2 < 1.0, 0.6, 0.03)


def to_stored(image: np.ndarray, bits: int = 12, photometric: str = "MONOCHROME2") -> np.ndarray:
    """Display values in [0, 1] → stored values: 0…2^bits−1, reversed for MONOCHROME1."""
    top = 2**bits - 1
    stored = np.round(np.clip(image, 0.0, 1.0) * top).astype(np.uint16)
    return top - stored if photometric == "MONOCHROME1" else stored


def mg_dataset(
    stored: np.ndarray,
    *,
    study: str = "1.2.826.0.1.3680043.10.1.1",
    patient: str = "P1",
    laterality: str = "L",
    view: str = "CC",
    bits: int = 12,
    photometric: str = "MONOCHROME2",
    laterality_tag: str | None = "ImageLaterality",
    view_tag: str | None = "ViewPosition",
    orientation: Sequence[str] | None = (),
    window: tuple[float, float] | None = None,
    voi_lut: np.ndarray | None = None,
    modality: str = "MG",
    for_processing: bool = False,
    sop: str | None = None,
    code_scheme: str = "SCT",
    view_modifier: tuple[str, str, str] | None = None,
) -> Dataset:
    """A Digital Mammography X-Ray Image data set holding `stored`.

    `laterality_tag` / `view_tag` name the one tag that carries laterality / view (None: none does;
    `view_tag` may be 'ViewPosition', 'ViewCodeSequence' or 'both'); `orientation` () writes the standard
    PatientOrientation of `laterality` and `view`, None writes none; `window` (center, width) and
    `voi_lut` (the LUT's entries, first stored value 0) add a VOI; `view_modifier` is (SCT code,
    SRT code, meaning) of a CID 4015 modifier.
    """
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sop_class = (DigitalMammographyXRayImageStorageForProcessing if for_processing
                 else DigitalMammographyXRayImageStorageForPresentation)
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = sop or uid(study, laterality, view, patient)
    ds.PatientID, ds.PatientName = patient, f"Test^{patient}"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, uid(study, "series")
    ds.Modality = modality
    ds.PresentationIntentType = "FOR PROCESSING" if for_processing else "FOR PRESENTATION"
    ds.Manufacturer = "fedmammo tests"
    if laterality_tag:
        setattr(ds, laterality_tag, laterality)
    if view_tag in ("ViewPosition", "both"):
        ds.ViewPosition = view
    if view_tag in ("ViewCodeSequence", "both"):
        sct, srt, meaning = VIEW_CODES[view]
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = (
            (sct, "SCT", meaning) if code_scheme == "SCT" else (srt, "SRT", meaning))
        if view_modifier:
            modifier = Dataset()
            modifier.CodeValue, modifier.CodingSchemeDesignator, modifier.CodeMeaning = (
                view_modifier[0], "SCT", view_modifier[2])
            item.ViewModifierCodeSequence = DicomSequence([modifier])
        ds.ViewCodeSequence = DicomSequence([item])
    if orientation is not None:
        slot = "CC" if view in ("CC", "XCCL", "XCCM", "FB") else "MLO"
        ds.PatientOrientation = list(orientation) or ORIENTATION[(laterality, slot)]
    ds.ImagerPixelSpacing = [0.1, 0.1]
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 0
    ds.PixelIntensityRelationship = "LOG"
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if voi_lut is not None:
        item = Dataset()
        item.LUTDescriptor = [len(voi_lut), 0, 16]
        item.add_new(0x00283006, "US", [int(v) for v in voi_lut])  # LUTData: US, not the ambiguous OW
        ds.VOILUTSequence = DicomSequence([item])
    ds.PixelData = np.ascontiguousarray(stored, dtype=np.uint16).tobytes()
    return ds


def save(ds: Dataset, path: Path, syntax: str | None = None) -> Path:
    """Write `ds` as a DICOM file, compressed with pydicom's encoders into `syntax` if given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if syntax is not None and syntax != ExplicitVRLittleEndian:
        ds = ds.copy()
        ds.compress(syntax)
    ds.save_as(path, enforce_file_format=True)
    return path


def dcmtk_jpeg_lossless(source: Path, target: Path) -> Path:
    """Recompress with dcmtk's `dcmcjpeg` as JPEG Lossless SV1 (pydicom has no encoder for it)."""
    if shutil.which("dcmcjpeg") is None:
        raise FileNotFoundError("dcmcjpeg (dcmtk) is not installed")
    subprocess.run(["dcmcjpeg", "+e1", str(source), str(target)], check=True, capture_output=True)
    return target


def view_file(root: Path, study: str, laterality: str, view: str, *, patient: str = "P1", seed: int = 0,
              rows: int = 64, cols: int = 48, syntax: str | None = None, name: str | None = None,
              **options: object) -> Path:
    """Write one view of a study under `root` and return its path."""
    stored = to_stored(phantom(rows, cols, laterality, view, seed), options.get("bits", 12),
                       options.get("photometric", "MONOCHROME2"))
    ds = mg_dataset(stored, study=study, patient=patient, laterality=laterality, view=view, **options)
    return save(ds, root / patient / (name or f"{laterality}_{view}_{ds.SOPInstanceUID[-8:]}.dcm"), syntax)


def write_exam(root: Path, study: str, laterality: str, *, patient: str = "P1", seed: int = 0,
               views: Iterable[str] = ("CC", "MLO"), **options: object) -> list[Path]:
    """The CC and MLO views of one breast."""
    return [view_file(root, study, laterality, view, patient=patient, seed=seed + i, **options)
            for i, view in enumerate(views)]


def label_row(study: str, laterality: str, *, patient: str = "P1", malignant: bool = False, birads: str = "3",
              density: str = "c", symptomatic: int = 0, split: str = "train") -> dict[str, str]:
    return {"patient_id": patient, "study_uid": study, "laterality": laterality,
            "pathology": "malignant" if malignant else "benign", "birads": birads, "density": density,
            "symptomatic": str(symptomatic), "split": split, "reader_senior1": birads}


def write_labels(root: Path, rows: Sequence[dict[str, str]], columns: Sequence[str] = LABEL_COLUMNS) -> Path:
    path = root / "labels.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_site(root: Path, n_exams: int = 6, *, bilateral: bool = False,
               **options: object) -> list[dict[str, str]]:
    """A site with `n_exams` labelled exams (one breast each, both breasts imaged when `bilateral`):
    splits train/val/test in turn, every third exam malignant. Returns the label rows (also in labels.csv)."""
    rows = []
    for i in range(n_exams):
        study, patient = uid("site", root.name, i), f"P{i:03d}"
        laterality = "LR"[i % 2]
        write_exam(root, study, laterality, patient=patient, seed=10 * i, **options)
        if bilateral:
            write_exam(root, study, "RL"[i % 2], patient=patient, seed=10 * i + 5, **options)
        rows.append(label_row(study, laterality, patient=patient, malignant=i % 3 == 0,
                              birads="5" if i % 3 == 0 else "3", density="abcd"[i % 4],
                              symptomatic=i % 2, split=("train", "val", "test")[i % 3]))
    write_labels(root, rows)
    return rows

