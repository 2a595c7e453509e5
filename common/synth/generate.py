"""Write a synthetic multi-site cohort: per site `<site>/labels.csv` and
`<site>/<PatientID>/<StudyUID>/<SOPUID>.dcm` (four views per study), `cohort.json` describing it, and
`lesions.csv`, where each lesion lies in its views' stored pixels (the truth for localisation).

Everything is drawn from the seed: the cohort plan from a stream per site, each study's anatomy and pixels
from a stream per patient, UIDs from hashes of (seed, site, patient, image). The same seed therefore writes
byte-identical files whatever the number of worker processes. Studies are rendered in parallel.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from pydicom.uid import UID, generate_uid
from tqdm import tqdm

from common.atomic import write_atomic
from common.labels import REQUIRED_COLUMNS, SPLITS
from common.synth.cohort import Case, ideal_observer, plan_site
from common.synth.dicom_writer import ImageInfo, StudyInfo, build_dataset, to_bytes
from common.synth.phantom import (
    DEFAULT_CONSPICUITY,
    DENSITIES,
    IDEAL_AUC,
    Breast,
    Lesion,
    ViewGeometry,
    render_view,
    sample_breast,
    sample_lesion,
)
from common.synth.readers import DEFAULT_READERS, Reader
from common.synth.vendors import Presentation, VendorProfile, present, site_profile

IMAGES = (("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO"))
"""The four views of a study, in instance-number order."""
_RENDER_STREAM = 0xD1C0
_FIRST_STUDY_DAY = dt.date(2019, 1, 2)


@dataclass(frozen=True)
class CohortSpec:
    train: tuple[int, ...]
    """Training exams per site; its length is the number of sites."""
    val: tuple[int, ...]
    test: tuple[int, ...]
    seed: int = 0
    scale: float = 0.125
    readers: tuple[Reader, ...] = DEFAULT_READERS
    conspicuity: float = DEFAULT_CONSPICUITY

    def __post_init__(self) -> None:
        if not self.train:
            raise ValueError("the cohort needs at least one site")
        for name in ("val", "test"):
            if len(getattr(self, name)) != len(self.train):
                raise ValueError(f"{name} has {len(getattr(self, name))} counts for {len(self.train)} sites")
        if not 0 < self.scale <= 1:
            raise ValueError(f"scale must be in (0, 1]; got {self.scale}")
        if self.conspicuity <= 0:
            raise ValueError(f"conspicuity must be > 0; got {self.conspicuity}")
        if len({r.name for r in self.readers}) != len(self.readers):
            raise ValueError("reader names must be unique")

    @property
    def sites(self) -> int:
        return len(self.train)


@dataclass(frozen=True)
class Site:
    index: int
    name: str
    profile: VendorProfile
    cases: list[Case]


def plan(spec: CohortSpec) -> list[Site]:
    sites = []
    for i in range(spec.sites):
        profile = site_profile(i, spec.seed)
        counts = {"train": spec.train[i], "val": spec.val[i], "test": spec.test[i]}
        cases = plan_site(i, counts, spec.seed, spec.readers)
        sites.append(Site(i, f"site{i + 1}_{profile.key}", profile, cases))
    return sites


def _uid(seed: int, *parts: object) -> UID:
    return generate_uid(entropy_srcs=["fedmammo-synth", *(f"|{p}" for p in (seed, *parts))])


def study_uid(seed: int, case: Case) -> UID:
    return _uid(seed, case.site, case.index, "study")


def anatomy(case: Case, seed: int, conspicuity: float) -> tuple[np.random.Generator, Breast, Lesion, Breast]:
    """The patient's breasts and lesion, and the random stream that goes on to render them."""
    rng = np.random.default_rng([seed, case.site, case.index, _RENDER_STREAM])
    breast = sample_breast(case.density, rng)
    lesion = sample_lesion(breast, case.appearance, rng, conspicuity)
    return rng, breast, lesion, breast.twin(rng)


def image_uid(seed: int, case: Case, laterality: str, view: str) -> UID:
    return _uid(seed, case.site, case.index, laterality, view)


def image_path(site_dir: Path, seed: int, case: Case, laterality: str, view: str) -> Path:
    """Where a view of a patient's study is written: `<site>/<PatientID>/<StudyUID>/<SOPUID>.dcm`."""
    sop_uid = image_uid(seed, case, laterality, view)
    return site_dir / case.patient_id / study_uid(seed, case) / f"{sop_uid}.dcm"


def write_study(case: Case, profile: VendorProfile, site_dir: Path, scale: float, seed: int,
                conspicuity: float) -> None:
    """Render and write the four views of one patient's study."""
    rng, breast, lesion, contralateral = anatomy(case, seed, conspicuity)
    day = _FIRST_STUDY_DAY + dt.timedelta(days=int(rng.integers(0, 5 * 365)))
    study = StudyInfo(
        patient_id=case.patient_id,
        patient_name=f"SYNTHETIC^{case.patient_id}",
        birth_date=f"{day.year - case.age}{int(rng.integers(1, 13)):02d}15",
        age=case.age,
        study_uid=study_uid(seed, case),
        series_uid=_uid(seed, case.site, case.index, "series"),
        frame_of_reference_uid=_uid(seed, case.site, case.index, "frame"),
        study_date=day.strftime("%Y%m%d"),
        study_time=f"{int(rng.integers(8, 18)):02d}{int(rng.integers(0, 60)):02d}00",
        accession=f"A{case.site + 1}{case.index + 1:07d}",
        institution=f"Synthetic Hospital {case.site + 1}",
        device_serial=f"{profile.key.upper()}-{case.site + 1:03d}",
    )
    shape, spacing = profile.shape(scale), profile.spacing(scale)
    pixel_mm = round(spacing, 6)  # as written in PixelSpacing
    for number, (laterality, view) in enumerate(IMAGES, start=1):
        labelled = laterality == case.laterality
        attenuation, mask = render_view(breast if labelled else contralateral, view, shape, spacing, rng,
                                        lesion if labelled else None)
        presented = present(profile, attenuation, mask, rng, spacing)
        if laterality == "R":  # a detector sees a right breast mirrored: chest wall on the right
            presented = Presentation(np.ascontiguousarray(presented.pixels[:, ::-1]), presented.window,
                                     presented.lut)
        image = ImageInfo(image_uid(seed, case, laterality, view), number, laterality, view, pixel_mm)
        dataset = build_dataset(profile, study, image, presented)
        write_atomic(image_path(site_dir, seed, case, laterality, view), to_bytes(dataset), durable=False)


LESION_COLUMNS = ("site", "patient_id", "study_uid", "laterality", "view", "file", "split", "malignant",
                  "row", "col", "radius")
"""`lesions.csv`: one row per view of a labelled breast (the one with the lesion). `file`: the view's DICOM
file, relative to the cohort folder; `row`, `col`: the lesion's centre in the file's stored pixel grid, as
a viewer displays it (pixel indices, (0, 0) the top-left pixel's centre; fractional); `radius`: the
lesion's core radius in pixels (its margin blurs and its spicules reach further)."""


def lesion_rows(case: Case, profile: VendorProfile, site_name: str, scale: float, seed: int,
                conspicuity: float) -> list[dict[str, object]]:
    """`lesions.csv`'s rows of one patient: where `write_study` draws the lesion in each view, from the
    same anatomy (nothing is rendered, and the images do not change)."""
    _, breast, lesion, _ = anatomy(case, seed, conspicuity)
    shape, spacing = profile.shape(scale), profile.spacing(scale)
    rows = []
    for view in ("CC", "MLO"):
        row, col = ViewGeometry(breast, view, shape, spacing).to_pixel(lesion)
        if case.laterality == "R":  # stored mirrored, as `write_study` writes it
            col = shape[1] - 1 - col
        file = image_path(Path(site_name), seed, case, case.laterality, view)
        rows.append({"site": site_name, "patient_id": case.patient_id, "study_uid": study_uid(seed, case),
                     "laterality": case.laterality, "view": view, "file": file.as_posix(),
                     "split": case.split, "malignant": int(case.malignant), "row": round(row, 2),
                     "col": round(col, 2), "radius": round(lesion.radius / spacing, 2)})
    return rows


def lesions_csv(spec: CohortSpec, sites: list[Site]) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, LESION_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for site in sites:
        for case in site.cases:
            writer.writerows(lesion_rows(case, site.profile, site.name, spec.scale, spec.seed,
                                         spec.conspicuity))
    return buffer.getvalue().encode()


def _write_study_task(args: tuple) -> None:
    write_study(*args)


def labels_csv(cases: list[Case], seed: int, readers: tuple[Reader, ...]) -> bytes:
    """The site's labels CSV (format: `common.labels`), one row per labelled exam."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*REQUIRED_COLUMNS, *(r.column for r in readers)])
    for case in cases:
        writer.writerow([
            case.patient_id, study_uid(seed, case), case.laterality,
            "malignant" if case.malignant else "benign", case.birads, case.density, int(case.symptomatic),
            case.split, *(case.reads[r.column] for r in readers),
        ])
    return buffer.getvalue().encode()


def describe(spec: CohortSpec, sites: list[Site]) -> dict:
    """What cohort.json records: the settings (with the ideal observer's expected AUC), each site's vendor
    profile, its counts and its ideal observer's AUC per split, and the same for the whole cohort."""
    def counts(cases: list[Case]) -> dict:
        return {
            "exams": {s: sum(c.split == s for c in cases) for s in SPLITS},
            "malignant": {s: sum(c.split == s and c.malignant for c in cases) for s in SPLITS},
            "density": {d: sum(c.density == d for c in cases) for d in DENSITIES},
            "symptomatic": sum(c.symptomatic for c in cases),
            # The ceiling of any model's AUC on each split's exams (`cohort.ideal_observer`).
            "ideal_observer": {s: ideal_observer([c for c in cases if c.split == s]) for s in SPLITS},
        }

    return {
        "generator": "fedmammo synth",
        "seed": spec.seed,
        "scale": spec.scale,
        "conspicuity": spec.conspicuity,
        "ideal_observer_auc": round(IDEAL_AUC, 3),
        "readers": [asdict(r) for r in spec.readers],
        "sites": [
            {
                "name": site.name,
                "profile": {**asdict(site.profile), "transfer_syntax": site.profile.transfer_syntax.name,
                            "transfer_syntax_uid": str(site.profile.transfer_syntax)},
                "matrix": list(site.profile.shape(spec.scale)),
                "pixel_spacing_mm": round(site.profile.spacing(spec.scale), 6),
                **counts(site.cases),
            }
            for site in sites
        ],
        "total": counts([c for site in sites for c in site.cases]),
    }


def generate(spec: CohortSpec, out: Path, workers: int = 0, progress: bool = True) -> dict:
    """Write the cohort under `out` and return what cohort.json says. `workers`: processes (0 = one per
    CPU; 1 = in this process; small cohorts use fewer)."""
    sites = plan(spec)
    tasks = [(case, site.profile, out / site.name, spec.scale, spec.seed, spec.conspicuity)
             for site in sites for case in site.cases]
    if workers <= 0:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = min(workers, len(tasks) // 4)  # starting a worker costs as much as rendering a few studies
    with tqdm(total=len(tasks), unit="study", disable=not progress, file=sys.stderr) as bar:
        if workers <= 1:
            for task in tasks:
                _write_study_task(task)
                bar.update()
        else:
            # spawn: no fork of a parent that may hold threads (torch, BLAS) in an unknown state.
            with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
                for _ in pool.map(_write_study_task, tasks, chunksize=4):
                    bar.update()
    for site in sites:
        write_atomic(out / site.name / "labels.csv", labels_csv(site.cases, spec.seed, spec.readers))
    write_atomic(out / "lesions.csv", lesions_csv(spec, sites))
    summary = describe(spec, sites)
    write_atomic(out / "cohort.json", (json.dumps(summary, indent=2) + "\n").encode())
    return summary
