"""client.prepare.prepare_site: a site folder into arrays, with worker processes, time-outs and a cache."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from dicom_factory import mg_dataset, save, view_file, views_array, write_exam, write_labels, write_site
from pydicom.uid import JPEG2000Lossless

import client.prepare as prepare
from client.prepare import prepare_site
from common.config import Config
from common.dicom import read_view
from common.manifest import Listed
from common.preprocess import preprocess_view

SIZE = (64, 48)


def _config(**data: object) -> Config:
    config = Config()
    config.data.image_size = SIZE
    config.data.workers = 2
    for key, value in data.items():
        setattr(config.data, key, value)
    return config


def _file(root: Path, patient: str, laterality: str, view: str) -> Path:
    (path,) = (root / patient).glob(f"{laterality}_{view}_*.dcm")
    return path


def _spy_on_decoding(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The files `prepare.decode_files` is asked to decode from now on (it still decodes them)."""
    decoded: list[Path] = []
    real = prepare.decode_files

    def spy(paths: list[Path], *args: object, **kwargs: object) -> dict:
        decoded.extend(paths)
        return real(paths, *args, **kwargs)

    monkeypatch.setattr(prepare, "decode_files", spy)
    return decoded


def _view_files(cache: Path) -> list[Path]:
    """The per-file cache entries (one `.npy` per view)."""
    return list(cache.glob("*.npy"))


def _touch(path: Path) -> None:
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))


def _expected(path: Path) -> np.ndarray:
    return preprocess_view(read_view(path).pixels, SIZE).astype(np.float16)


def test_every_exam_in_label_order_with_its_views(tmp_path: Path) -> None:
    root = tmp_path / "hospital"
    rows = write_site(root, 6)
    site = prepare_site(root, _config(), progress=False)
    assert site.name == "hospital"
    assert site.exam_ids == [f"{r['study_uid']}_{r['laterality']}" for r in rows]
    assert views_array(site).shape == (6, 2, *SIZE) and views_array(site).dtype == np.float16
    assert float(views_array(site).min()) >= 0.0 and float(views_array(site).max()) <= 1.0
    np.testing.assert_array_equal(views_array(site)[1, 0], _expected(_file(root, "P001", "R", "CC")))
    np.testing.assert_array_equal(views_array(site)[1, 1], _expected(_file(root, "P001", "R", "MLO")))
    assert [x.malignant for x in site.labels] == [True, False, False, True, False, False]
    assert [x.birads for x in site.labels] == [5, 3, 3, 5, 3, 3]
    assert site.rejections == []
    assert site.counts == {"files": 12, "views": 12, "exams_labelled": 6, "exams_complete": 6,
                           "exams_usable": 6, "views_acquired": 12, "views_generated": 0}
    train = site.split("train")
    assert train.exam_ids == [site.exam_ids[0], site.exam_ids[3]]
    np.testing.assert_array_equal(views_array(train)[1], views_array(site)[3])
    assert [x.malignant for x in train.labels] == [True, True] and len(site.split("all").exam_ids) == 6


def test_bilateral_adds_the_contralateral_views(tmp_path: Path) -> None:
    root = tmp_path / "site"
    write_site(root, 3, bilateral=True)
    site = prepare_site(root, _config(bilateral=True), progress=False)
    assert views_array(site).shape == (3, 4, *SIZE)
    np.testing.assert_array_equal(views_array(site)[0, 2], _expected(_file(root, "P000", "R", "CC")))
    np.testing.assert_array_equal(views_array(site)[0, 3], _expected(_file(root, "P000", "R", "MLO")))
    ipsilateral = prepare_site(root, _config(), progress=False)
    assert views_array(ipsilateral).shape == (3, 2, *SIZE) and ipsilateral.rejections == []


def test_laterality_from_the_pixels_pairs_untagged_views(tmp_path: Path) -> None:
    root = tmp_path / "site"
    write_exam(root, "1.2.3", "R", laterality_tag=None, orientation=None)
    write_labels(root, [{"patient_id": "P1", "study_uid": "1.2.3", "laterality": "R", "pathology": "benign",
                         "birads": "2", "density": "b", "symptomatic": "0", "split": "test"}])
    site = prepare_site(root, _config(), progress=False)
    assert site.exam_ids == ["1.2.3_R"] and site.rejections == []


def test_cache_skips_decoding_and_follows_changed_files(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    root, cache = tmp_path / "site", tmp_path / "cache"
    write_site(root, 3)
    first = prepare_site(root, _config(), cache_dir=cache, progress=False)
    assert len(_view_files(cache)) == 6 and not list(cache.glob(".*"))  # no temp files left

    decoded = _spy_on_decoding(monkeypatch)
    second = prepare_site(root, _config(), cache_dir=cache, progress=False)
    assert decoded == []
    np.testing.assert_array_equal(views_array(second), views_array(first))

    changed = _file(root, "P001", "R", "MLO")
    _touch(changed)
    prepare_site(root, _config(), cache_dir=cache, progress=False)
    assert decoded == [changed]

    elsewhere = tmp_path / "configured"
    prepare_site(root, _config(cache_dir=str(elsewhere)), cache_dir=cache, progress=False)
    assert len(_view_files(elsewhere)) == 6  # config.data.cache_dir wins over the caller's default


def test_an_unchanged_site_is_read_back_whole_without_reading_a_header(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, cache = tmp_path / "site", tmp_path / "cache"
    write_site(root, 3)
    _file(root, "P002", "L", "CC").write_bytes(b"not a DICOM file")
    first = prepare_site(root, _config(), cache_dir=cache, progress=False)
    monkeypatch.setattr(prepare, "scan_files", lambda *a, **k: pytest.fail("the headers were read again"))
    second = prepare_site(root, _config(), cache_dir=cache, progress=False)
    assert (second.name, second.exam_ids, second.labels, second.rejections, second.counts) == \
        (first.name, first.exam_ids, first.labels, first.rejections, first.counts)
    assert [r.kind for r in second.rejections] == ["not DICOM", "incomplete exam"]
    np.testing.assert_array_equal(views_array(second), views_array(first))
    with pytest.raises(pytest.fail.Exception):  # any changed file, labels.csv included, reads the site anew
        _touch(root / "labels.csv")
        prepare_site(root, _config(), cache_dir=cache, progress=False)
    monkeypatch.undo()
    prepare_site(root, _config(), cache_dir=cache, progress=False)
    assert len(list(cache.glob("site-*.json"))) == 1  # what was kept for the old contents is replaced


def test_a_rejected_file_is_cached_with_its_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, cache = tmp_path / "site", tmp_path / "cache"
    write_site(root, 1)
    cc = _file(root, "P000", "L", "CC")
    cc.write_bytes(cc.read_bytes()[:-1000])
    first = prepare_site(root, _config(), cache_dir=cache, progress=False)
    for whole in cache.glob("site-*.json"):  # this test is about the per-file cache
        whole.unlink()
    monkeypatch.setattr(prepare, "decode_files", lambda paths, *a, **k: {p: "unexpected" for p in paths})
    second = prepare_site(root, _config(), cache_dir=cache, progress=False)
    assert second.rejections == first.rejections
    assert [r.kind for r in first.rejections] == ["pixel data unreadable", "incomplete exam"]


@pytest.fixture(scope="module")
def slow_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid left CC, 6000×6000 in JPEG 2000: 1 KB on disk, ~1 s to decode and preprocess (64×48: 3 ms)."""
    ds = mg_dataset(np.full((6000, 6000), 900, np.uint16), study="1.2.999", patient="P000", view="CC")
    return save(ds, tmp_path_factory.mktemp("slow") / "slow.dcm", JPEG2000Lossless)


def _site_with(root: Path, slow_file: Path) -> None:
    """Three exams; the CC of the first is the slow file, first in path order, so that the files after it
    need the replacement worker."""
    rows = write_site(root, 3)
    for path in (root / "P000").iterdir():
        path.unlink()
    (root / "P000" / "0_slow.dcm").write_bytes(slow_file.read_bytes())
    view_file(root, "1.2.999", "L", "MLO", patient="P000")
    rows[0]["study_uid"] = "1.2.999"
    write_labels(root, rows)


def test_a_decode_that_hangs_is_rejected_and_the_rest_goes_on(tmp_path: Path, slow_file: Path) -> None:
    root = tmp_path / "site"
    _site_with(root, slow_file)
    site = prepare_site(root, _config(workers=1, decode_timeout_s=0.2), progress=False)
    assert len(site.exam_ids) == 2
    reasons = {r.source: r.reason for r in site.rejections}
    assert reasons[str(root / "P000" / "0_slow.dcm")] == "decoding timed out: still decoding after 0.2 s"
    assert reasons["1.2.999_L"].startswith("incomplete exam: view(s) rejected: ")


def test_a_decoder_that_dies_is_rejected_and_the_rest_goes_on(tmp_path: Path, slow_file: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "site"
    _site_with(root, slow_file)
    handed: queue.Queue[multiprocessing.Process] = queue.Queue()
    send = prepare._Worker.send

    def send_and_tell(worker: prepare._Worker, path: Path, listed: Listed | None, target: Path | None,
                      timeout: float) -> None:
        send(worker, path, listed, target, timeout)
        if path.name == "0_slow.dcm":
            handed.put(worker.process)

    monkeypatch.setattr(prepare._Worker, "send", send_and_tell)
    killed: list[int] = []

    def kill_its_worker() -> None:  # as the kernel's out-of-memory killer would, while it has the slow file
        with contextlib.suppress(queue.Empty):
            process = handed.get(timeout=60)
            process.kill()
            killed.append(process.pid)

    killer = threading.Thread(target=kill_its_worker)
    killer.start()
    site = prepare_site(root, _config(workers=1, decode_timeout_s=60), progress=False)
    killer.join()
    assert killed, "the slow file never went to a worker"
    assert len(site.exam_ids) == 2
    reasons = {r.source: r.reason for r in site.rejections}
    assert reasons[str(root / "P000" / "0_slow.dcm")] == ("pixel data unreadable: the decoder process died "
                                                           "(exit code -9)")


def test_unusable_folder_raises_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a folder"):
        prepare_site(tmp_path / "missing", _config(), progress=False)
    cc = view_file(tmp_path, "1.2.3", "L", "CC")
    site = prepare_site(tmp_path, _config(), progress=False)  # no labels.csv: new studies to score
    assert not site.labelled and site.exam_ids == []
    assert [r.reason for r in site.rejections] == [f"incomplete exam: no MLO view (has CC {cc})"]
    (tmp_path / "labels.csv").write_bytes(b"\xff\xfe\x00 not text")
    with pytest.raises(ValueError, match=r"labels\.csv: cannot read"):
        prepare_site(tmp_path, _config(), progress=False)


def test_a_cache_of_another_version_or_a_damaged_view_is_decoded_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Entries written by another cache layout or preprocessing version are never read; a truncated view
    file is decoded again, not misread. A prepared site lists view files, never holds pixels."""
    root, cache = tmp_path / "site", tmp_path / "cache"
    write_site(root, 2)
    monkeypatch.setattr(prepare, "_KEY_VERSION", "1.2")  # an older layout and preprocessing
    old = prepare_site(root, _config(), cache_dir=cache, progress=False)
    monkeypatch.undo()
    decoded = _spy_on_decoding(monkeypatch)
    new = prepare_site(root, _config(), cache_dir=cache, progress=False)
    assert len(decoded) == 4 and not set(new.views) & set(old.views)
    assert all(isinstance(file, Path) and file.suffix == ".npy" for exam in new.views for file in exam)

    damaged = new.views[1][0]
    damaged.write_bytes(damaged.read_bytes()[:-100])
    decoded.clear()
    again = prepare_site(root, _config(), cache_dir=cache, progress=False)
    assert len(decoded) == 1  # that view only
    np.testing.assert_array_equal(views_array(again), views_array(new))
