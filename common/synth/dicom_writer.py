"""Digital Mammography X-Ray Image — For Presentation datasets, with every module the IOD requires.

Modules: Patient, General Study, Patient Study, General Series, DX Series, Frame of Reference, General
Equipment, General Image, Image Pixel, DX Anatomy Imaged, DX Image, DX Detector, Mammography Image, VOI
LUT, Acquisition Context and SOP Common; `dciodvfy` accepts them with no error. Pixels arrive as stored
(right breasts mirrored as a detector sees them) and are encoded in the vendor's transfer syntax by
pydicom's encoders.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import (
    UID,
    DigitalMammographyXRayImageStorageForPresentation,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from common.synth.vendors import VOI_LUT_BITS, Presentation, VendorProfile

PATIENT_ORIENTATION = {
    ("L", "CC"): ["A", "R"], ("R", "CC"): ["P", "L"], ("L", "MLO"): ["A", "F"], ("R", "MLO"): ["P", "F"],
}
"""Row and column directions per breast and view, as DICOM displays mammograms (PS3.3 C.8.11.7.1.1)."""
_VIEW_CODES = {"CC": codes.SCT.CranioCaudal, "MLO": codes.SCT.MedioLateralObliqueProjection}
_ENCODER = {JPEG2000Lossless: "pylibjpeg", JPEGLSLossless: "pyjpegls", RLELossless: "pylibjpeg"}
"""pydicom's encoding plugin per compressed transfer syntax."""


@dataclass(frozen=True)
class StudyInfo:
    """What the four images of one study share."""

    patient_id: str
    patient_name: str
    birth_date: str
    age: int
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    study_date: str
    study_time: str
    accession: str
    institution: str
    device_serial: str


@dataclass(frozen=True)
class ImageInfo:
    sop_uid: str
    instance_number: int
    laterality: str
    view: str
    spacing_mm: float


def _code(code: Code) -> Dataset:
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme_designator
    item.CodeMeaning = code.meaning
    return item


def build_dataset(profile: VendorProfile, study: StudyInfo, image: ImageInfo,
                  presented: Presentation) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = DigitalMammographyXRayImageStorageForPresentation
    ds.file_meta.MediaStorageSOPInstanceUID = image.sop_uid

    # SOP Common
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = DigitalMammographyXRayImageStorageForPresentation
    ds.SOPInstanceUID = image.sop_uid
    ds.InstanceCreationDate = study.study_date
    ds.InstanceCreationTime = study.study_time
    # Patient, Patient Study
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = study.birth_date
    ds.PatientSex = "F"
    ds.PatientAge = f"{study.age:03d}Y"
    # General Study
    ds.StudyInstanceUID = study.study_uid
    ds.StudyDate = study.study_date
    ds.StudyTime = study.study_time
    ds.ReferringPhysicianName = ""
    ds.StudyID = study.accession[-8:]
    ds.AccessionNumber = study.accession
    ds.StudyDescription = "MAMMOGRAPHY BILATERAL"
    # General Series, DX Series, Mammography Series
    ds.Modality = "MG"
    ds.SeriesInstanceUID = study.series_uid
    ds.SeriesNumber = 1
    ds.SeriesDate = study.study_date
    ds.SeriesTime = study.study_time
    ds.SeriesDescription = "Screening views"
    ds.BodyPartExamined = "BREAST"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.FrameOfReferenceUID = study.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    # General Equipment
    ds.Manufacturer = profile.manufacturer
    ds.ManufacturerModelName = profile.model
    ds.SoftwareVersions = profile.software
    ds.DeviceSerialNumber = study.device_serial
    ds.InstitutionName = study.institution
    # General Image, DX Image, Mammography Image
    ds.InstanceNumber = image.instance_number
    ds.PatientOrientation = PATIENT_ORIENTATION[image.laterality, image.view]
    ds.ContentDate = study.study_date
    ds.ContentTime = study.study_time
    ds.AcquisitionDate = study.study_date
    ds.AcquisitionTime = study.study_time
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
    ds.ImageLaterality = image.laterality
    ds.BurnedInAnnotation = "NO"
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    inverse = profile.photometric == "MONOCHROME1"
    ds.PresentationLUTShape = "INVERSE" if inverse else "IDENTITY"
    ds.PixelIntensityRelationship = "LOG"
    # +1: lower values = less X-ray intensity (denser), the MONOCHROME1 way; −1 for MONOCHROME2.
    ds.PixelIntensityRelationshipSign = 1 if inverse else -1
    ds.LossyImageCompression = "00"
    ds.QualityControlImage = "NO"
    ds.PositionerType = "MAMMOGRAPHIC"
    ds.OrganExposed = "BREAST"
    ds.BreastImplantPresent = "NO"
    ds.ViewPosition = image.view
    view_code = _code(_VIEW_CODES[image.view])
    view_code.ViewModifierCodeSequence = Sequence()
    ds.ViewCodeSequence = Sequence([view_code])
    # DX Anatomy Imaged
    ds.AnatomicRegionSequence = Sequence([_code(codes.SCT.Breast)])
    # DX Detector
    ds.DetectorType = profile.detector_type
    ds.DetectorConfiguration = "AREA"
    ds.ImagerPixelSpacing = [image.spacing_mm, image.spacing_mm]
    ds.PixelSpacing = [image.spacing_mm, image.spacing_mm]
    ds.PixelSpacingCalibrationType = "GEOMETRY"
    ds.PixelSpacingCalibrationDescription = "Detector plane, no magnification"
    ds.EstimatedRadiographicMagnificationFactor = 1.0
    # Acquisition Context
    ds.AcquisitionContextSequence = Sequence()
    # VOI LUT
    if presented.window is not None:
        ds.WindowCenter, ds.WindowWidth = presented.window
        ds.VOILUTFunction = "SIGMOID" if profile.voi == "sigmoid" else "LINEAR"
        ds.WindowCenterWidthExplanation = "NORMAL"
    else:
        lut = Dataset()
        # Descriptor: entries (0 means 65536), first stored value mapped, bits per entry.
        lut.add_new("LUTDescriptor", "US", [len(presented.lut) % 65536, 0, VOI_LUT_BITS])
        lut.LUTExplanation = "NORMAL"
        lut.add_new("LUTData", "OW", presented.lut.astype("<u2").tobytes())  # OW: one value, fast to write
        ds.VOILUTSequence = Sequence([lut])
    # Image Pixel
    pixels = presented.pixels
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = profile.photometric
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = profile.bits_stored
    ds.HighBit = profile.bits_stored - 1
    ds.PixelRepresentation = 0
    if profile.transfer_syntax in _ENCODER:
        # Lossless: the same image, so the same SOP Instance UID (pydicom would draw a random one).
        ds.compress(profile.transfer_syntax, pixels, encoding_plugin=_ENCODER[profile.transfer_syntax],
                    generate_instance_uid=False)
    else:
        ds.file_meta.TransferSyntaxUID = UID(profile.transfer_syntax)
        ds.PixelData = pixels.tobytes()
    return ds


def to_bytes(ds: Dataset) -> bytes:
    """The dataset as a DICOM file (preamble, file meta, dataset)."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
