"""One mammography DICOM file read into a view: its header, then its pixels display-ready and canonically
oriented.

Accepted: Modality MG stored as Digital Mammography X-Ray Image (For Presentation or For Processing), one
greyscale frame; and any single-frame greyscale image that a site's manifest lists (`common.manifest`:
digitized film, Secondary Capture, stripped headers), which takes the manifest's study, laterality and
view. Everything else raises `DicomError(path, reason)`; a reason starts with its kind ('not DICOM',
'not MG', 'no laterality', 'no view', 'unsupported view', 'unsupported image', 'codec missing', 'pixel data
unreadable', ...), then a colon and the detail, so that reports can group them. The other objects of a
mammography study are told by their SOP class (`NOT_2D_KINDS`): 'tomosynthesis' (Breast Tomosynthesis
Image, Breast Projection X-Ray Image), 'CAD result' (Mammography CAD SR and the other CAD SRs), 'structured
report', 'presentation state'.

A generated 2D image (Image Type value 4 GENERATED_2D: a 2D view synthesized from the tomosynthesis, e.g.
C-View) is a 2D mammogram like an acquired one; `Header.generated` says which it is, and
`common.exams.pair_exams` chooses between them (`[data] generated_2d`).

Pixels (`read_view`), in DICOM's order:

1. the modality LUT (rescale or Modality LUT Sequence; pydicom's `apply_modality_lut`);
2. the VOI (pydicom's `apply_voi_lut`, which honours VOILUTFunction): the first VOI LUT of the VOI LUT
   Sequence, else the first window; with neither, a linear window over the values the image holds. The
   result is divided by the VOI's output range, so values lie in [0, 1];
3. MONOCHROME1 inverted (1 − x): higher = denser = brighter, whatever the file's polarity.

For Processing images carry detector values roughly proportional to exposure and no display window, so
they get one: the log of the modality output (∝ attenuation), windowed to its 0.5–99.5th percentiles, and
the polarity read from the pixels (the direct-exposure background, the commonest grey level, must be dark)
since raw data's photometric interpretation differs between vendors.

The LUTs are evaluated once per stored value in the image's range (≤ 2^16 values) into a table that the
image then indexes: pydicom's results, rounded to float32, at a fraction of their time and memory (they
work per pixel in float64).

Orientation (`View.pixels`): chest wall at column 0, nipple pointing right, as DICOM displays a left breast
(PatientOrientation L CC = A\\R, L MLO = A\\F); right breasts are flipped. The chest-wall side is read from
the pixels (the breast touches the image edge there); PatientOrientation, else the laterality, decides
only when the pixels are unclear, since the tag is sometimes wrong.

Laterality: ImageLaterality, else Laterality (L or R), else the chest-wall side in the stored image under
the standard display (chest wall at the left = a left breast). The pixels never override a tag: they
cannot tell a left breast from a mirrored right one.

View: ViewPosition, else ViewCodeSequence (DICOM CID 4014, SRT or SNOMED CT codes), else PatientOrientation
(column direction F/H = an oblique or lateral projection, L/R = a cranio-caudal one). Substitute
projections fill a slot when its standard projection is missing (see `PROJECTIONS`). Spot compression,
magnification and the other partial views of CID 4015 are rejected, except implant-displaced views, which
image the whole breast; so is a ViewPosition that names no known projection (unless ViewCodeSequence
names one).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi_lut, get_decoder
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import UID
from pydicom.uid import (
    DigitalMammographyXRayImageStorageForPresentation as MG_FOR_PRESENTATION,
)
from pydicom.uid import (
    DigitalMammographyXRayImageStorageForProcessing as MG_FOR_PROCESSING,
)

from common.manifest import Listed
from common.preprocess import chest_wall_side

NOT_2D_KINDS: tuple[tuple[str, str], ...] = (
    ("1.2.840.10008.5.1.4.1.1.13.1.", "tomosynthesis"),
    ("1.2.840.10008.5.1.4.1.1.88.", "structured report"),
    ("1.2.840.10008.5.1.4.1.1.11.", "presentation state"),
)
"""SOP class UID prefix → rejection kind of the objects that share a mammography study's folders but are no
2D image: Breast Tomosynthesis Image (.13.1.3) and Breast Projection X-Ray Image (.13.1.4 / .13.1.5)
storage; structured reports ('CAD result' for CAD SRs: Mammography CAD SR .88.50, ...); Grayscale Softcopy
and the other presentation states."""

MAX_SIDE = 10_000
"""Largest accepted Rows or Columns: real detectors reach ~6000 (50 µm over 30 cm)."""
MAX_PIXELS = 40_000_000
"""Largest accepted Rows × Columns, checked before decoding so that a corrupt header cannot exhaust
memory (one view of this size takes ~0.5 GB while it is read)."""

PROJECTIONS: dict[str, tuple[str, int]] = {
    "CC": ("CC", 0), "XCCL": ("CC", 1), "XCCM": ("CC", 1), "FB": ("CC", 2),
    "MLO": ("MLO", 0), "LMO": ("MLO", 1), "ML": ("MLO", 2), "LM": ("MLO", 2),
    "SIO": ("MLO", 3), "ISO": ("MLO", 3),
}
"""ACR MQCM projection → (slot, rank). Rank 0 is the standard projection; a higher rank is a substitute,
chosen only when no lower-ranked image fills the slot: exaggerated CCs and the caudo-cranial (from below)
view for CC; the reverse oblique, then the true laterals, then the other obliques for MLO."""

_VIEW_CODES = {
    "CC": codes.CID4014.CranioCaudal, "XCCL": codes.CID4014.CranioCaudalExaggeratedLaterally,
    "XCCM": codes.CID4014.CranioCaudalExaggeratedMedially, "FB": codes.CID4014.CaudoCranial,
    "MLO": codes.CID4014.MedioLateralObliqueProjection, "LMO": codes.CID4014.LateroMedialOblique,
    "ML": codes.CID4014.MedioLateralProjection, "LM": codes.CID4014.LateroMedial,
    "SIO": codes.CID4014.SuperolateralToInferomedialOblique,
    "ISO": codes.CID4014.InferomedialToSuperolateralOblique,
}
_WHOLE_BREAST_MODIFIERS = (codes.CID4015.ImplantDisplaced,)


class DicomError(Exception):
    """A file that cannot be used, and why (`reason`: its kind, a colon, the detail)."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


@dataclass(frozen=True)
class Header:
    """What the header says about a view; enough to pair it into an exam without decoding pixels."""

    path: Path
    sop_instance_uid: str
    study_instance_uid: str
    patient_id: str
    laterality: str | None
    """'L' or 'R'; None when no tag gives it (`read_view` reads it from the pixels)."""
    view: str
    """'CC' or 'MLO'."""
    projection: str
    """The projection that fills the slot: 'CC', 'MLO' or a substitute (a key of `PROJECTIONS`)."""
    for_processing: bool
    pixel_spacing: tuple[float, float] | None
    """(row, column) spacing in mm: PixelSpacing, else ImagerPixelSpacing."""
    generated: bool = False
    """A generated 2D image (Image Type value 4 GENERATED_2D, synthesized from a tomosynthesis acquisition),
    not an acquired one."""

    @property
    def rank(self) -> int:
        """0 for the standard projection of its slot, higher for substitutes."""
        return PROJECTIONS[self.projection][1]


@dataclass(frozen=True, eq=False)
class View(Header):
    """A decoded view. `laterality` is always set; `pixels` is float32 (rows, columns) in [0, 1], higher =
    denser, chest wall at column 0, at the file's full resolution and precision."""

    pixels: np.ndarray = dataclasses.field(kw_only=True)
    flipped: bool = dataclasses.field(default=False, kw_only=True)
    """Whether `pixels` are the stored image mirrored left–right (chest wall on the right as stored)."""


def _dcmread(path: Path, header_only: bool) -> Dataset:
    try:
        return pydicom.dcmread(path, stop_before_pixels=header_only)
    except InvalidDicomError:
        raise DicomError(path, "not DICOM: no DICOM file preamble and 'DICM' prefix") from None
    except OSError as exc:
        raise DicomError(path, f"unreadable file: {exc.strerror or exc}") from None
    except Exception as exc:
        # A DICOM prefix followed by garbage: pydicom fails in many ways (struct, EOF, value errors).
        raise DicomError(path, f"not DICOM: malformed data set ({type(exc).__name__}: {exc})") from None


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, list | MultiValue):
        return "\\".join(str(v) for v in value).strip().upper()
    return str(value).strip().upper()


def _laterality(ds: Dataset) -> str | None:
    for keyword in ("ImageLaterality", "Laterality"):
        value = _text(ds, keyword)
        if value in ("L", "R"):
            return value
    return None


def _patient_orientation(ds: Dataset) -> tuple[str, str] | None:
    value = ds.get("PatientOrientation")
    if value is None or isinstance(value, str) or len(value) != 2:
        return None
    return str(value[0]).upper(), str(value[1]).upper()


def _projection_of_position(text: str) -> str | None:
    """ViewPosition as an MQCM projection: 'MLO', 'LMLO', 'R CC', 'CCID' (implant displaced), ...."""
    letters = "".join(c for c in text if c.isalpha())
    candidates = [letters]
    if letters.endswith("ID"):
        candidates.append(letters[:-2])
    candidates += [c[1:] for c in list(candidates) if c[:1] in ("L", "R")]
    return next((c for c in candidates if c in PROJECTIONS), None)


def _projection_of_codes(ds: Dataset, path: Path) -> str | None:
    """ViewCodeSequence as an MQCM projection; rejects partial views given by view modifiers."""
    items = ds.get("ViewCodeSequence") or []
    if not items:
        return None
    item = items[0]
    if "CodeValue" not in item or "CodingSchemeDesignator" not in item:
        return None
    meaning = str(item.get("CodeMeaning", item.CodeValue))
    code = Code(str(item.CodeValue), str(item.CodingSchemeDesignator), meaning)
    projection = next((name for name, known in _VIEW_CODES.items() if code == known), None)
    if projection is None:
        raise DicomError(path, f"unsupported view: ViewCodeSequence {meaning!r} is not a CC or MLO "
                               "projection")
    return projection


def _check_modifiers(ds: Dataset, path: Path, projection: str) -> None:
    code_items = ds.get("ViewCodeSequence") or []
    modifiers = list(ds.get("ViewModifierCodeSequence") or [])
    for item in code_items:
        modifiers += list(item.get("ViewModifierCodeSequence") or [])
    for item in modifiers:
        if "CodeValue" not in item or "CodingSchemeDesignator" not in item:
            continue
        meaning = str(item.get("CodeMeaning", item.CodeValue))
        code = Code(str(item.CodeValue), str(item.CodingSchemeDesignator), meaning)
        if not any(code == known for known in _WHOLE_BREAST_MODIFIERS):
            raise DicomError(path, f"unsupported view: {projection} with view modifier {meaning!r} "
                                   "(a partial view)")


def _projection(ds: Dataset, path: Path) -> str:
    position = _text(ds, "ViewPosition")
    projection = _projection_of_position(position) if position else None
    if projection is None:
        projection = _projection_of_codes(ds, path)
    if projection is None and position:
        raise DicomError(path, f"unsupported view: ViewPosition {position!r} is not a known CC or MLO "
                               "projection")
    if projection is None:
        orientation = _patient_orientation(ds)
        if orientation is not None and any(c in orientation[1] for c in "FH"):
            projection = "MLO"
        elif orientation is not None and orientation[1] in ("L", "R"):
            projection = "CC"
    if projection is None:
        raise DicomError(path, "no view: no ViewPosition, ViewCodeSequence or usable PatientOrientation")
    _check_modifiers(ds, path, projection)
    return projection


def _pixel_spacing(ds: Dataset) -> tuple[float, float] | None:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        if value is not None and len(value) == 2:
            return float(value[0]), float(value[1])
    return None


def _generated(ds: Dataset) -> bool:
    """Image Type value 4 (or, leniently, any value after the second) is GENERATED_2D."""
    return "GENERATED_2D" in _text(ds, "ImageType").split("\\")[2:]


def _not_2d_reason(sop_class: str) -> str | None:
    """The rejection reason of a study's object that is no 2D image (`NOT_2D_KINDS`), from its SOP class."""
    kind = next((kind for prefix, kind in NOT_2D_KINDS if sop_class.startswith(prefix)), None)
    if kind is None:
        return None
    name = UID(sop_class).name
    if kind == "structured report" and "CAD" in name:
        kind = "CAD result"
    detail = {"tomosynthesis": "not a 2D mammogram (a tomosynthesis object)",
              "CAD result": "a computer-aided detection report, not an image",
              "structured report": "a report, not an image",
              "presentation state": "display settings for other images, not an image"}[kind]
    return f"{kind}: SOP class {name}: {detail}"


def _listed_header(ds: Dataset, path: Path, listed: Listed) -> Header:
    """A manifest-listed image: its header need only be one greyscale frame of an image."""
    samples, frames = int(ds.get("SamplesPerPixel") or 1), int(ds.get("NumberOfFrames") or 1)
    if not (ds.get("Rows") and ds.get("Columns")):
        raise DicomError(path, "unsupported image: no Rows and Columns (not an image)")
    if samples != 1 or frames != 1:
        raise DicomError(path, f"unsupported image: {samples} samples per pixel, {frames} frames (need 1, 1)")
    return Header(
        path=path,
        sop_instance_uid=str(ds.get("SOPInstanceUID") or path.resolve()),
        study_instance_uid=listed.study_uid,
        patient_id=listed.patient_id or str(ds.get("PatientID", "")),
        laterality=listed.laterality,
        view=listed.view,
        projection=listed.view,
        for_processing=_text(ds, "PresentationIntentType") == "FOR PROCESSING",
        pixel_spacing=_pixel_spacing(ds),
        generated=_generated(ds),
    )


def _header(ds: Dataset, path: Path, listed: Listed | None = None) -> Header:
    if listed is not None:
        return _listed_header(ds, path, listed)
    sop_class = ds.get("SOPClassUID") or getattr(ds, "file_meta", Dataset()).get("MediaStorageSOPClassUID")
    if sop_class and (reason := _not_2d_reason(str(sop_class))) is not None:
        raise DicomError(path, reason)
    modality = _text(ds, "Modality")
    if modality != "MG":
        raise DicomError(path, f"not MG: Modality is {modality or 'missing'}")
    if sop_class not in (MG_FOR_PRESENTATION, MG_FOR_PROCESSING):
        name = getattr(sop_class, "name", sop_class) or "missing"
        raise DicomError(path, f"not MG: SOP class {name} is not Digital Mammography X-Ray Image Storage")
    for keyword in ("SOPInstanceUID", "StudyInstanceUID"):
        if not ds.get(keyword):
            raise DicomError(path, f"missing tag: {keyword}")
    projection = _projection(ds, path)
    return Header(
        path=path,
        sop_instance_uid=str(ds.SOPInstanceUID),
        study_instance_uid=str(ds.StudyInstanceUID),
        patient_id=str(ds.get("PatientID", "")),
        laterality=_laterality(ds),
        view=PROJECTIONS[projection][0],
        projection=projection,
        for_processing=(sop_class == MG_FOR_PROCESSING
                        or _text(ds, "PresentationIntentType") == "FOR PROCESSING"),
        pixel_spacing=_pixel_spacing(ds),
        generated=_generated(ds),
    )


_T = TypeVar("_T")


def _guarded(path: Path, read: Callable[[], _T]) -> _T:
    """`read()`, with any failure on a corrupt data set as a DicomError: pydicom parses values lazily, so a
    damaged element raises (TypeError, NotImplementedError, ...) only when a check reads it."""
    try:
        return read()
    except (DicomError, KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except BaseException as exc:  # also Rust codecs' panics (pyo3), which are no Exception
        raise DicomError(path, f"not DICOM: malformed data set ({type(exc).__name__}: {exc})") from None


def read_header(path: str | Path, listed: Listed | None = None) -> Header:
    """The header of one file (pixel data not read): fast enough to scan a whole site. `listed`: what the
    site's manifest says of the file, which replaces its study, laterality and view."""
    path = Path(path)
    return _guarded(path, lambda: _header(_dcmread(path, header_only=True), path, listed))


def _stored_pixels(ds: Dataset, path: Path) -> np.ndarray:
    """The stored values, after checks that keep a corrupt header from costing memory or time."""
    rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    if not (16 <= rows <= MAX_SIDE and 16 <= cols <= MAX_SIDE and rows * cols <= MAX_PIXELS):
        raise DicomError(path, f"unsupported image: implausible matrix {rows}×{cols}")
    samples, frames = int(ds.get("SamplesPerPixel") or 1), int(ds.get("NumberOfFrames") or 1)
    if samples != 1 or frames != 1:
        raise DicomError(path, f"unsupported image: {samples} samples per pixel, {frames} frames (need 1, 1)")
    allocated, stored = int(ds.get("BitsAllocated") or 0), int(ds.get("BitsStored") or 0)
    if allocated not in (8, 16) or not 1 <= stored <= allocated:
        raise DicomError(path, f"unsupported image: BitsAllocated {allocated}, BitsStored {stored}")
    photometric = _text(ds, "PhotometricInterpretation")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DicomError(path, f"unsupported image: PhotometricInterpretation {photometric or 'missing'}")
    if "PixelData" not in ds:
        raise DicomError(path, "pixel data unreadable: no Pixel Data element")
    syntax = ds.file_meta.TransferSyntaxUID
    named = f"{syntax.name} ({syntax})" if syntax.name != syntax else str(syntax)
    if not syntax.is_transfer_syntax:
        raise DicomError(path, f"unsupported image: {named} is not a known transfer syntax")
    if syntax.is_compressed:
        try:
            decoder = get_decoder(syntax)
        except NotImplementedError:
            raise DicomError(path, f"codec missing: no decoder for transfer syntax {named}") from None
        if not decoder.is_available:
            missing = "; ".join(decoder.missing_dependencies)
            raise DicomError(path, f"codec missing: transfer syntax {named} needs {missing}")
    else:
        expected, found = rows * cols * allocated // 8, len(ds.PixelData)
        if found < expected:
            raise DicomError(path, f"pixel data unreadable: {found} of {expected} bytes ({named}); "
                                   "truncated?")
    try:
        pixels = ds.pixel_array
    except (KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except BaseException as exc:  # also Rust codecs' panics (pyo3), which are no Exception
        raise DicomError(path, f"pixel data unreadable: {named}: {type(exc).__name__}: {exc}") from None
    if pixels.shape != (rows, cols):
        raise DicomError(path, f"pixel data unreadable: decoded {pixels.shape}, header says {rows}×{cols}")
    return pixels


def _voi_lut(ds: Dataset) -> Dataset | None:
    """The first item of the VOI LUT Sequence when it is usable: what pydicom's `apply_voi_lut` applies."""
    items = ds.get("VOILUTSequence") or []
    return items[0] if items and "LUTDescriptor" in items[0] and "LUTData" in items[0] else None


def _voi_output_range(ds: Dataset) -> tuple[float, float]:
    """What the VOI can output: the entries of its LUT, or a window's output range (far below and above)."""
    lut = _voi_lut(ds)
    if lut is not None:
        entries, first = lut.LUTDescriptor[0] or 2**16, lut.LUTDescriptor[1]
        probe = np.arange(first, first + entries)
    else:
        probe = np.array([-(2.0**40), 2.0**40])
    with np.errstate(over="ignore"):  # a sigmoid VOI far from its center: exp overflows to its limit
        out = apply_voi_lut(probe, ds, index=0)
    return float(out.min()), float(out.max())


def _presentation_table(ds: Dataset, values: np.ndarray, path: Path) -> np.ndarray:
    """Stored values → display values in [0, 1], higher = brighter (modality LUT, VOI, MONOCHROME1)."""
    modality = apply_modality_lut(values, ds)
    if np.issubdtype(modality.dtype, np.floating) and np.all(modality == np.round(modality)):
        modality = modality.astype(np.int64)  # a VOI LUT is indexed by integers
    if _voi_lut(ds) is not None or ("WindowCenter" in ds and "WindowWidth" in ds):
        try:
            out = apply_voi_lut(modality, ds, index=0)
            low, high = _voi_output_range(ds)
        except (ValueError, NotImplementedError, IndexError, TypeError) as exc:
            raise DicomError(path, f"invalid VOI: {exc}") from None
    else:
        out, low, high = modality, float(modality.min()), float(modality.max())
    table = (np.asarray(out, dtype=np.float64) - low) / (high - low) if high > low else np.zeros(len(values))
    if _text(ds, "PhotometricInterpretation") == "MONOCHROME1":
        table = 1.0 - table
    return table


def _processing_table(ds: Dataset, values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Raw (For Processing) values → display values: log, percentile window, background dark."""
    modality = np.asarray(apply_modality_lut(values, ds), dtype=np.float64)
    log = np.log1p(modality - modality.min())
    order = np.argsort(log, kind="stable")
    cdf = np.cumsum(counts[order]) / counts.sum()
    low, high = log[order][np.searchsorted(cdf, [0.005, 0.995])]
    table = np.clip((log - low) / (high - low), 0.0, 1.0) if high > low else np.zeros(len(values))
    histogram, _ = np.histogram(table, bins=16, range=(0.0, 1.0), weights=counts)
    if histogram.argmax() >= len(histogram) // 2:
        table = 1.0 - table
    return table


def read_view(path: str | Path, listed: Listed | None = None) -> View:
    """Read one mammography file: header checks, then pixels after the LUTs, inverted and oriented."""
    path = Path(path)
    return _guarded(path, lambda: _read_view(path, listed))


def _read_view(path: Path, listed: Listed | None) -> View:
    ds = _dcmread(path, header_only=False)
    header = _header(ds, path, listed)
    stored = _stored_pixels(ds, path)
    low = int(stored.min())
    index = stored - stored.dtype.type(low) if stored.dtype.kind == "u" else stored.astype(np.int32) - low
    values = np.arange(low, int(stored.max()) + 1)
    if header.for_processing:
        table = _processing_table(ds, values, np.bincount(index.ravel(), minlength=len(values)))
    else:
        table = _presentation_table(ds, values, path)
    pixels = table.astype(np.float32)[index]

    side = chest_wall_side(pixels)
    laterality = header.laterality or {"left": "L", "right": "R"}.get(side or "")
    if laterality is None:
        raise DicomError(path, "no laterality: no ImageLaterality or Laterality, and the pixels do not show "
                               "the chest-wall side")
    if side is not None:
        flip = side == "right"
    else:
        row = (_patient_orientation(ds) or ("", ""))[0]
        flip = row.startswith("P") if row[:1] in ("A", "P") else laterality == "R"
    if flip:
        pixels = np.ascontiguousarray(pixels[:, ::-1])
    fields = {**vars(header), "laterality": laterality}
    return View(**fields, pixels=pixels, flipped=flip)
