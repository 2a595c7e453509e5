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



_GLYPHS = {  # 5×3 strokes of the letters a marker burns in
    "L": ["X..", "X..", "X..", "X..", "XXX"], "R": ["XX.", "X.X", "XX.", "X.X", "X.X"],
    "M": ["X.X", "XXX", "X.X", "X.X", "X.X"], "O": ["XXX", "X.X", "X.X", "X.X", "XXX"],
    "C": ["XXX", "X..", "X..", "X..", "XXX"], " ": ["...", "...", "...", "...", "..."],
}


def burn_in(image: np.ndarray, text: str, top: int, left: int, unit: int, value: float = 0.97) -> np.ndarray:
    """Burn `text` ('L MLO', ...) into `image` as a unit burns its laterality and view marker: block letters
    `unit` pixels per stroke, at `value`. Returns the marker's pixels (a boolean mask of `image`)."""
    marker = np.zeros(image.shape, dtype=bool)
    for i, char in enumerate(text):
        for r, line in enumerate(_GLYPHS[char]):
            for c, stroke in enumerate(line):
                if stroke == "X":
                    y, x = top + r * unit, left + (4 * i + c) * unit
                    marker[y:y + unit, x:x + unit] = True
    image[marker] = value
    return marker


def _mirrored_burn_in(image: np.ndarray, laterality: str, text: str, top: float, left: float,
                      unit: int) -> tuple[np.ndarray, np.ndarray]:
    """`image` (chest wall at the left) as DICOM displays `laterality`, with `text` burned in readable
    at (`top`, `left`), fractions of the canonical image. Returns the image and the marker's pixels."""
    rows, cols = image.shape
    if laterality == "R":
        image = image[:, ::-1].copy()
        left = 1.0 - left - (4 * len(text) - 1) * unit / cols
    return image, burn_in(image, text, round(top * rows), round(left * cols), unit)


def film(rows: int = 600, cols: int = 480, laterality: str = "L", seed: int = 0, marker: bool = True,
         ruler: bool = True) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A digitized screen-film mammogram (an MLO, higher = denser) as a scanner stores it: a black scanner
    bed around the film, the film's clear (bright) edge, a grey, uneven exposed background (0.3–0.5: a
    gradient and blotches), the breast against the film's edge on the chest-wall side, a burned-in bright
    'L MLO' marker in the background beside the breast, inside its bounding box, and a ruler (bright, with
    ticks) along the far side. Mirrored for a right breast, as DICOM displays it.

    Returns the image in [0, 1] and the regions' pixels: 'breast', 'marker', 'ruler', 'border' (the bed and
    the film's edge)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float32)
    bed = (y < 0.02 * rows) | (y >= 0.97 * rows) | (x < 0.02 * cols) | (x >= 0.97 * cols)
    edge = ~bed & ((y < 0.035 * rows) | (y >= 0.955 * rows) | (x < 0.035 * cols) | (x >= 0.955 * cols))
    blotches = ndimage.zoom(rng.random((4, 4)).astype(np.float32), (rows / 4, cols / 4), order=3)
    background = 0.3 + 0.12 * (y / rows + x / cols) / 2 + 0.08 * np.clip(blotches[:rows, :cols], 0.0, 1.0)
    image = np.where(bed, 0.0, np.where(edge, 0.92, background))
    x0 = 0.035 * cols  # the film's edge: the chest wall
    radius2 = ((y / rows - 0.52) / 0.36) ** 2 + ((x - x0) / cols / 0.55) ** 2
    breast = (radius2 < 1.0) & (x >= x0)
    thickness = np.sqrt(np.clip(1.0 - radius2, 0.0, 1.0))
    texture = ndimage.zoom(rng.random((12, 10)).astype(np.float32), (rows / 12, cols / 10), order=1)
    image = np.where(breast, background + 0.18 + 0.2 * thickness + 0.12 * texture[:rows, :cols], image)
    image = np.clip(image + rng.normal(0.0, 0.008, image.shape), 0.0, 1.0).astype(np.float32)
    regions = {"breast": breast, "border": bed | edge, "ruler": np.zeros(image.shape, dtype=bool)}
    unit = max(2, rows // 150)
    if ruler:
        top, bottom = round(0.3 * rows), round(0.85 * rows)
        left, right = round(0.86 * cols), round(0.9 * cols)
        regions["ruler"][top:bottom, left:right] = True
        image[top:bottom, left:right] = 0.8
        image[top:bottom:max(2, rows // 60), left:right - unit] = 1.0  # the ticks
    if laterality == "R":
        regions = {k: v[:, ::-1].copy() for k, v in regions.items()}
    image, regions["marker"] = _mirrored_burn_in(image, laterality, f"{laterality} MLO" if marker else "",
                                                 0.19, 0.42, unit)
    return image, regions


def marked_phantom(rows: int = 300, cols: int = 240, laterality: str = "L", view: str = "MLO",
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`phantom` as a digital unit stores it: a bright burned-in marker ('L MLO', 'R CC', ...) in the black
    background beside the breast, inside its bounding box. Returns the image and the marker's pixels."""
    unit = max(2, rows // 100)
    return _mirrored_burn_in(phantom(rows, cols, "L", view, seed), laterality, f"{laterality} {view}",
                             0.2 if view == "MLO" else 0.16, 0.5 if view == "MLO" else 0.55, unit)


TOMOSYNTHESIS = "1.2.840.10008.5.1.4.1.1.13.1.3"
BREAST_PROJECTION = "1.2.840.10008.5.1.4.1.1.13.1.4"
MAMMOGRAPHY_CAD_SR = "1.2.840.10008.5.1.4.1.1.88.50"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
GSPS = "1.2.840.10008.5.1.4.1.1.11.1"


def study_object(sop_class: str, *, study: str, patient: str = "P1", laterality: str = "L",
                 name: str = "") -> Dataset:
    """A non-image object of a mammography study, header only, as pydicom writes it: a Breast Tomosynthesis
    Image (multi-frame, Modality MG) or Breast Projection X-Ray Image, an SR (Modality SR: Mammography CAD
    SR, Basic Text SR) or a presentation state (Modality PR)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = UID(sop_class)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = uid(study, sop_class, laterality, name)
    ds.PatientID, ds.PatientName = patient, f"Test^{patient}"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, uid(study, "series", sop_class)
    if sop_class.startswith("1.2.840.10008.5.1.4.1.1.13.1."):
        ds.Modality, ds.ImageLaterality = "MG", laterality
        ds.ImageType = ["ORIGINAL", "PRIMARY", "TOMOSYNTHESIS", "NONE"]
        frames = np.stack([to_stored(phantom(32, 24, laterality, "CC", seed=i)) for i in range(5)])
        ds.NumberOfFrames, (ds.Rows, ds.Columns) = len(frames), frames.shape[1:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = frames.astype(np.uint16).tobytes()
    elif sop_class.startswith("1.2.840.10008.5.1.4.1.1.88."):
        ds.Modality, ds.ValueType = "SR", "CONTAINER"
        concept = Dataset()
        concept.CodeValue, concept.CodingSchemeDesignator, concept.CodeMeaning = (
            "111036", "DCM", "Mammography CAD Report")
        ds.ConceptNameCodeSequence = DicomSequence([concept])
    else:
        ds.Modality = "PR"
        ds.ContentLabel, ds.PresentationLUTShape = "CVIEW", "IDENTITY"
    return ds


def combination_study(root: Path, study: str, laterality: str, *, patient: str = "P1", seed: int = 0,
                      generated: bool = True, acquired: bool = True) -> dict[str, list[Path]]:
    """One breast of a combination study as a unit stores it: the acquired CC and MLO (Image Type ORIGINAL,
    PRIMARY), the generated 2D CC and MLO synthesized from the tomosynthesis (Image Type DERIVED, PRIMARY,
    '', GENERATED_2D, as C-View), the tomosynthesis itself (multi-frame), a Mammography CAD SR and a
    Grayscale Softcopy Presentation State. Returns the paths by kind: 'acquired', 'generated' (CC, MLO
    each), 'tomosynthesis', 'cad', 'presentation state'."""
    paths: dict[str, list[Path]] = {"acquired": [], "generated": []}
    folder = root / patient / study
    for i, view in enumerate(("CC", "MLO")):
        for kind, image_type, offset in (("acquired", ["ORIGINAL", "PRIMARY", ""], 0),
                                         ("generated", ["DERIVED", "PRIMARY", "", "GENERATED_2D"], 100)):
            if not (acquired if kind == "acquired" else generated):
                continue
            stored = to_stored(phantom(64, 48, laterality, view, seed + i + offset))
            ds = mg_dataset(stored, study=study, patient=patient, laterality=laterality, view=view,
                            sop=uid(study, laterality, view, kind))
            ds.ImageType = image_type
            paths[kind].append(save(ds, folder / f"{laterality}_{view}_{kind}.dcm"))
    for kind, sop_class in (("tomosynthesis", TOMOSYNTHESIS), ("cad", MAMMOGRAPHY_CAD_SR),
                            ("presentation state", GSPS)):
        ds = study_object(sop_class, study=study, patient=patient, laterality=laterality)
        paths[kind] = [save(ds, folder / f"{laterality}_{kind.replace(' ', '_')}.dcm")]
    return paths


def views_array(site: object) -> np.ndarray:
    """A prepared site's views (N, V, H, W), read from its view files (`client.prepare.PreparedSite`)."""
    return np.stack([site.read(i) for i in range(len(site.exam_ids))])  # type: ignore[attr-defined]
