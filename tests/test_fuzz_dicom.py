"""Corrupted DICOM thrown at a site's real read path (`client.prepare.decode_files`: worker processes with
time-outs and a memory cap, `common.dicom.read_view`, preprocessing): every file ends as a decoded view or a
reported rejection of a known kind, within bounded time, and never stops the site.

Hypothesis draws batches of corruptions of valid mammograms (uncompressed, JPEG 2000, RLE): truncation,
flipped bytes, missing or wrong tags (absurd Rows/Columns, bit depths, photometric interpretations),
pixel data shorter than declared, unsupported or unknown transfer syntaxes, and non-DICOM files named .dcm.
The examples are derandomised so that CI sees the same ones each run.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_factory import mg_dataset, phantom, save, to_stored
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless

from client.prepare import decode_files
from common.dicom import DicomError, read_header, read_view

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about every odd value

SIZE = (32, 24)
TIMEOUT_S = 20.0
KINDS = {"not DICOM", "not MG", "no laterality", "no view", "unsupported view", "unsupported image",
         "codec missing", "pixel data unreadable", "unreadable file", "invalid VOI", "missing tag",
         "decoding timed out"}
"""Every reason a file may be rejected for (`common.dicom`'s kinds, and the worker pool's time-out)."""
SYNTAXES = [None, JPEG2000Lossless, RLELossless]
TAGS = ["Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "SamplesPerPixel",
        "PhotometricInterpretation", "Modality", "ImageLaterality", "ViewPosition", "PatientOrientation",
        "RescaleSlope", "RescaleIntercept", "PixelData", "SOPClassUID", "StudyInstanceUID", "WindowCenter",
        "WindowWidth", "PresentationIntentType"]
UNSUPPORTED_SYNTAXES = ["1.2.840.10008.1.2.4.100", "1.2.840.10008.1.2.4.102", "1.2.840.10008.1.2.4.107",
                        "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.1.99", "1.2.3.4.5.6",
                        "1.2.840.10008.1.2", "1.2.840.10008.1.2.2"]
"""MPEG-2, MPEG-4, HEVC, HTJ2K, deflated, made up, implicit VR, big endian: some unsupported, some merely
inconsistent with how the pixel data is really stored."""


def dataset() -> Dataset:
    return mg_dataset(to_stored(phantom(48, 40)), window=(2048, 3000))


def encoded(syntax: str | None) -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        return save(dataset(), Path(folder) / "a.dcm", syntax).read_bytes()


BASES = {syntax: encoded(syntax) for syntax in SYNTAXES}


def dumped(ds: Dataset, strict: bool = False) -> bytes:
    """`ds` as a file. pydicom refuses to write pixel data that a compressed syntax would need
    encapsulated; unless `strict`, such a data set is written declaring Explicit VR Little Endian."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "a.dcm"
        try:
            ds.save_as(path, enforce_file_format=False)
        except ValueError:
            if strict:
                raise
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.save_as(path, enforce_file_format=False)
        return path.read_bytes()


def parsed(syntax: str | None) -> Dataset:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "a.dcm"
        path.write_bytes(BASES[syntax])
        return pydicom.dcmread(path)


@st.composite
def truncated(draw: st.DrawFn) -> bytes:
    data = BASES[draw(st.sampled_from(SYNTAXES))]
    return data[:draw(st.integers(0, len(data) - 1))]


@st.composite
def flipped(draw: st.DrawFn) -> bytes:
    data = bytearray(BASES[draw(st.sampled_from(SYNTAXES))])
    for _ in range(draw(st.integers(1, 24))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data)


@st.composite
def missing_tag(draw: st.DrawFn) -> bytes:
    ds = parsed(draw(st.sampled_from(SYNTAXES)))
    for keyword in draw(st.sets(st.sampled_from(TAGS), min_size=1, max_size=3)):
        if keyword in ds:
            delattr(ds, keyword)
    return dumped(ds)


@st.composite
def wrong_value(draw: st.DrawFn) -> bytes:
    ds = parsed(draw(st.sampled_from(SYNTAXES)))
    keyword = draw(st.sampled_from(["Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit",
                                    "PixelRepresentation", "SamplesPerPixel", "NumberOfFrames",
                                    "PhotometricInterpretation", "Modality", "ImageLaterality",
                                    "ViewPosition", "RescaleSlope", "WindowWidth", "PlanarConfiguration"]))
    if keyword in ("PhotometricInterpretation", "Modality", "ImageLaterality", "ViewPosition"):
        value: object = draw(st.sampled_from(["", "RGB", "PALETTE COLOR", "YBR_FULL", "CT", "B", "LR", "SPOT",
                                              "MONOCHROME3", "X" * 16]))
    elif keyword in ("RescaleSlope", "WindowWidth"):
        value = draw(st.sampled_from(["0", "-1", "1e308", "NaN", "1e-30"]))
    elif keyword == "NumberOfFrames":
        value = draw(st.sampled_from(["0", "2", "100000", "-1"]))
    else:  # US
        value = draw(st.one_of(st.integers(0, 65535), st.sampled_from([0, 1, 7, 9, 17, 32, 64, 10_000])))
    setattr(ds, keyword, value)
    return dumped(ds)


@st.composite
def short_pixels(draw: st.DrawFn) -> bytes:
    ds = parsed(draw(st.sampled_from(SYNTAXES)))
    data = ds.PixelData
    ds.PixelData = data[:draw(st.integers(0, len(data) - 1)) & ~1]  # even lengths, as DICOM requires
    return dumped(ds)


@st.composite
def other_syntax(draw: st.DrawFn) -> bytes:
    ds = parsed(draw(st.sampled_from(SYNTAXES)))
    ds.file_meta.TransferSyntaxUID = draw(st.sampled_from(UNSUPPORTED_SYNTAXES))
    try:
        return dumped(ds, strict=True)
    except ValueError:  # pydicom refuses to write this combination: corrupt the written header instead
        data = BASES[None]
        old = b"1.2.840.10008.1.2.1\x00"
        return data.replace(old, draw(st.sampled_from(UNSUPPORTED_SYNTAXES)).encode().ljust(len(old), b"\x00")
                            [:len(old)], 1)


def not_dicom() -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(max_size=4000),
        st.text(max_size=2000).map(str.encode),
        st.binary(max_size=2000).map(lambda tail: bytes(128) + b"DICM" + tail),  # a preamble, then garbage
        st.sampled_from([b"", b"\x89PNG\r\n\x1a\n" + bytes(100), b"PK\x03\x04" + bytes(200),
                         b"%PDF-1.4\n" + b"x" * 300]),
    )


CORRUPTIONS = st.one_of(truncated(), flipped(), missing_tag(), wrong_value(), short_pixels(), other_syntax(),
                        not_dicom())


def check(result: object, data: bytes) -> None:
    if isinstance(result, str):
        kind = result.partition(":")[0]
        assert kind in KINDS, (result, data[:200])
        assert result.partition(":")[2].strip(), result  # a reason, not just a kind
    else:
        laterality, pixels = result
        assert laterality in ("L", "R")
        assert pixels.shape == SIZE and pixels.dtype == np.float16
        assert np.isfinite(pixels).all() and pixels.min() >= 0 and pixels.max() <= 1


@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(CORRUPTIONS, min_size=1, max_size=6))
def test_every_corrupted_file_is_decoded_or_rejected_with_its_reason(files: list[bytes]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        paths = [Path(folder) / f"{i}.dcm" for i in range(len(files))]
        for path, data in zip(paths, files, strict=True):
            path.write_bytes(data)
        started = time.monotonic()
        results = decode_files(paths, SIZE, workers=2, timeout=TIMEOUT_S)
        elapsed = time.monotonic() - started
    assert set(results) == set(paths)  # every file has an outcome
    for path, data in zip(paths, files, strict=True):
        check(results[path], data)
    assert elapsed < TIMEOUT_S * len(files) + 30  # bounded: a hung decoder is cut off at TIMEOUT_S


def test_the_reader_raises_only_dicom_errors_in_process():
    """The same corruptions straight through `read_header` (which scans a site in its own process) and
    `read_view`: only DicomError, with its kind."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "a.dcm"

        @settings(max_examples=150, deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(CORRUPTIONS)
        def read(data: bytes) -> None:
            path.write_bytes(data)
            for reader in (read_header, read_view):
                try:
                    reader(path)
                except DicomError as exc:
                    assert exc.reason.partition(":")[0] in KINDS, exc.reason

        read()


def test_a_decode_over_the_memory_cap_is_a_rejection_not_a_dead_host(tmp_path):
    """A 6000×6000 JPEG 2000 (1 KB on disk) with 64 MiB of address space to spare: the codec's allocation
    fails in the worker, which reports it (or dies) instead of taking the host's memory."""
    ds = mg_dataset(np.full((6000, 6000), 900, np.uint16), view="CC")
    path = save(ds, tmp_path / "big.dcm", JPEG2000Lossless)
    capped = decode_files([path], SIZE, workers=1, timeout=60, memory=64 << 20)[path]
    assert isinstance(capped, str) and capped.startswith("pixel data unreadable: "), capped
    decoded = decode_files([path], SIZE, workers=1, timeout=60)[path]  # the default cap is enough
    assert not isinstance(decoded, str), decoded
