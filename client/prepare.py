"""A site folder read into memory: every usable exam's preprocessed views and labels.

One code path serves `fedmammo check`, training and prediction, so that what check accepts is what training
uses: labels.csv (if any: a folder without one is a set of new studies to score) and images.csv (if any,
`common.manifest`) → every file's header → views whose laterality only the pixels tell are decoded first →
exams paired → every view decoded and preprocessed → arrays.

Decoding runs in worker processes, one file at a time each, so that a file that hangs or crashes a codec
costs only its worker: after `decode_timeout_s` the worker is killed and replaced and the file rejected.
A worker's address space is capped (`DECODE_MEMORY_BYTES` above what it holds when ready), so that a file
whose codec asks for absurd memory fails with MemoryError, a rejection, instead of exhausting the host.
Workers come from a fork server, not a plain fork: the parent may run threads (torch, Flower) that a fork
would copy in a broken state. As with `spawn`, a script that calls `prepare_site` must guard its entry
point with `if __name__ == "__main__":` (workers import the main module).

Preprocessed views live on disk, one `.npy` per view (float16, memory-mappable; key: path, size,
modification time, image size, `CACHE_VERSION`, `common.preprocess.VERSION`), written atomically by the
worker that decoded it: the site is never held in memory, whatever its size, and training streams the
views from these files (`client.data`). A second run and every federated round skip decoding. A file's
rejection is cached too (its `.json` beside), except a time-out, which may have been a busy machine. The
prepared site as a whole is kept as well (a `.json` keyed by every file's path, size and modification
time, and labels.csv's), so that a federated message, which Flower runs in a fresh process, reads one file
instead of every DICOM header. Without a cache folder the views go to a temporary folder that lives as
long as the prepared site.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import resource
import tempfile
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

from common import gpu_decoding
from common.atomic import write_atomic
from common.config import Config
from common.exams import LABELS_FILE, Exam, pair_exams, scan_files, site_files, with_listed
from common.labels import ExamLabel, read_labels
from common.manifest import MANIFEST_FILE, Listed, entry, read_manifest
from common.preprocess import VERSION as INPUTS_VERSION
from common.rejection import Rejection

CACHE_VERSION = 2
"""Bump when the cache's own layout changes (2: one .npy per view, not .npz); what the views hold is
`common.preprocess.VERSION`."""
_KEY_VERSION = f"{CACHE_VERSION}.{INPUTS_VERSION}"
"""In every cache key."""
_TIMED_OUT = "decoding timed out"
"""Start of a time-out's reason: never cached, as it may have been a busy machine."""
_START_TIMEOUT_S = 300.0
"""A worker that is not ready by then means a broken installation, not a bad file."""
DECODE_MEMORY_BYTES = 4 << 30
"""Address space a decoding worker may add: the largest accepted image (`common.dicom.MAX_PIXELS`) needs
well under 2 GiB on its way through codec, LUT and resizing."""

Decoded = tuple[str, Path] | tuple[str, np.ndarray] | str
"""A decoded view, (laterality, its cached `.npy` file) or, decoded without a cache, (laterality, float16
(H, W) model input); or the reason it was rejected."""
ViewFiles = tuple[Path, ...]
"""An exam's views, one cached `.npy` each, in model order (`client.check.VIEW_NAMES`)."""


class Source(NamedTuple):
    """The file a view was decoded from, and what the site's manifest says of it (how it was read)."""

    path: Path
    listed: Listed | None = None


@dataclass
class PreparedSite:
    name: str
    exam_ids: list[str]
    views: list[ViewFiles]
    """Each exam's view files: (H, W) float16 in [0, 1]; CC, MLO (+ contralateral CC, MLO when bilateral)."""
    labels: list[ExamLabel]
    rejections: list[Rejection] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    """Inventory for reports: files, views (mammography views read), exams_labelled, exams_complete
    (CC and MLO found), exams_usable; views_acquired and views_generated: the acquired and the generated 2D
    images among the usable exams' views (`[data] generated_2d` chooses between them)."""
    warnings: list[str] = field(default_factory=list)
    """What is usable but suspicious (a DICOM PatientID that contradicts its label row)."""
    labelled: bool = True
    """False for a folder without labels.csv: new studies, scored but not trained on or evaluated."""
    scratch: tempfile.TemporaryDirectory[str] | None = field(default=None, repr=False, compare=False)
    """The temporary folder holding the view files when no cache folder was given (removed with the last
    object that refers to it)."""
    sources: list[tuple[Source, ...]] = field(default_factory=list)
    """Each exam's DICOM files, in the order of `views` (`client.heatmaps` reads them again); empty for a
    site built from arrays."""

    def split(self, name: str) -> PreparedSite:
        """The exams of one split ('train', 'val', 'test'; 'all' keeps every exam)."""
        keep = [i for i, label in enumerate(self.labels) if name == "all" or label.split == name]
        return replace(self, exam_ids=[self.exam_ids[i] for i in keep], views=[self.views[i] for i in keep],
                       labels=[self.labels[i] for i in keep],
                       sources=[self.sources[i] for i in keep] if self.sources else [])

    def read(self, index: int) -> np.ndarray:
        """Exam `index`'s views, (V, H, W) float16."""
        return read_views(self.views[index])


def read_views(files: ViewFiles) -> np.ndarray:
    """One exam's views from their files, (V, H, W) float16."""
    return np.stack([np.load(file) for file in files])


def site_from_arrays(name: str, views: np.ndarray, labels: Sequence[ExamLabel],
                     folder: Path | None = None) -> PreparedSite:
    """A prepared site from views already preprocessed, (N, V, H, W) in [0, 1] (a benchmark's, or a
    dataset's released as arrays), written as view files in `folder` (a temporary folder, removed with the
    site, when None)."""
    if views.ndim != 4 or len(views) != len(labels):
        raise ValueError(f"{name}: views of shape {views.shape} for {len(labels)} labels; expected "
                         "(N, V, H, W)")
    scratch = None if folder else tempfile.TemporaryDirectory(prefix="fedmammo-views-")
    folder = Path(folder or scratch.name)  # type: ignore[union-attr]
    files = []
    for i, exam in enumerate(views):
        files.append(tuple(folder / f"{name}-{i}-{v}.npy" for v in range(len(exam))))
        for file, pixels in zip(files[-1], exam, strict=True):
            write_view(file, pixels)
    return PreparedSite(name, [label.exam_id for label in labels], files, list(labels), scratch=scratch)


def write_view(file: Path, pixels: np.ndarray) -> None:
    """Store one preprocessed view (float16 (H, W)) as a `.npy` file, atomically."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(pixels, dtype=np.float16))
    write_atomic(file, buffer.getvalue(), durable=False)  # a lost entry is decoded again


def decode_view(path: Path, size: tuple[int, int], listed: Listed | None = None) -> Decoded:
    """Read and preprocess one file; any failure becomes its reason, so that one file never stops a site."""
    from common.dicom import DicomError, read_view  # in the decoding workers only (see `scan_files`)
    from common.preprocess import preprocess_view

    try:
        view = read_view(path, listed)
        return view.laterality, preprocess_view(view.pixels, size).astype(np.float16)
    except DicomError as exc:
        return exc.reason
    except MemoryError:
        return "pixel data unreadable: out of memory while decoding"
    except Exception as exc:  # a codec or numpy failure on odd data
        return f"pixel data unreadable: {type(exc).__name__}: {exc}"


def limit_memory(extra: int) -> None:
    """Cap this process's address space at its current size plus `extra` bytes (Linux)."""
    current = int(Path("/proc/self/statm").read_text().split()[0]) * resource.getpagesize()
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = current + extra if hard == resource.RLIM_INFINITY else min(current + extra, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))


def _worker(conn: Connection, size: tuple[int, int], memory: int, gpu: bool) -> None:
    import torch

    torch.set_num_threads(1)  # the parallelism is the processes
    if gpu:  # CUDA reserves far more address space than any cap on it allows: the header checks guard
        gpu_decoding.register()
    else:
        limit_memory(memory)
    conn.send("ready")
    try:
        while (job := conn.recv()) is not None:
            path, listed, target = job
            result = decode_view(path, size, listed)
            if target is not None and not isinstance(result, str):
                write_view(target, result[1])  # the parent gets the file, not the pixels
                result = result[0], target
            conn.send(result)
    except (EOFError, KeyboardInterrupt):
        pass


class _Worker:
    """One decoding process and the file it is working on."""

    def __init__(self, size: tuple[int, int], memory: int, gpu: bool) -> None:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["torch", "common.dicom", "common.preprocess", __name__])
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_worker, args=(child, size, memory, gpu), daemon=True)
        self.process.start()
        child.close()
        self.path: Path | None = None
        self.deadline = 0.0
        try:
            if self.conn.poll(_START_TIMEOUT_S) and self.conn.recv() == "ready":
                return
        except (EOFError, OSError):
            pass
        self.kill()
        raise RuntimeError(f"a decoding worker failed to start (exit code {self.process.exitcode})")

    def send(self, path: Path, listed: Listed | None, target: Path | None, timeout: float) -> None:
        self.path, self.deadline = path, time.monotonic() + timeout
        self.conn.send((path, listed, target))

    def outcome(self, ready: list[object], now: float, timeout: float) -> tuple[Decoded, bool] | None:
        """(result, whether the worker can go on), or None while it is still working."""
        if self.conn in ready:
            try:
                return self.conn.recv(), True
            except (EOFError, OSError):
                pass
        elif self.process.sentinel not in ready:
            if now < self.deadline:
                return None
            return f"{_TIMED_OUT}: still decoding after {timeout:g} s", False
        self.process.join()
        return f"pixel data unreadable: the decoder process died (exit code {self.process.exitcode})", False

    def kill(self) -> None:
        self.process.kill()
        self.process.join()
        self.conn.close()


def decode_files(paths: Sequence[Path], size: tuple[int, int], workers: int, timeout: float,
                 progress: bool = False, desc: str = "decoding", memory: int = DECODE_MEMORY_BYTES,
                 listed: Mapping[Path, Listed] | None = None,
                 targets: Mapping[Path, Path] | None = None, gpu: bool = False) -> dict[Path, Decoded]:
    """Decode `paths` in `workers` processes (0 = one per CPU core this process may use), each allowed
    `memory` more bytes of address space (without limit when `gpu`: JPEG 2000 and JPEG decoded by
    nvImageCodec, `common.gpu_decoding`); a file still decoding after `timeout` seconds, or whose worker
    dies, is rejected and its worker replaced. `listed`: the manifest's entries, by resolved path.
    `targets`: where each file's view is to be written (`write_view`, by the worker: only the file's name
    crosses back); without one the pixels come back."""
    listed, targets = listed or {}, targets or {}
    results: dict[Path, Decoded] = {}
    todo = deque(paths)
    idle: list[_Worker] = []
    busy: list[_Worker] = []
    bar = tqdm(total=len(todo), desc=desc, unit="file", disable=not progress)
    try:
        count = min(workers or len(os.sched_getaffinity(0)), len(todo))
        idle += [_Worker(size, memory, gpu) for _ in range(count)]
        while todo or busy:
            while idle and todo:
                worker = idle.pop()
                try:
                    worker.send(todo[0], entry(listed, todo[0]), targets.get(todo[0]), timeout)
                except OSError:  # it died while idle (e.g. killed for memory): replace it
                    worker.kill()
                    idle.append(_Worker(size, memory, gpu))
                    continue
                todo.popleft()
                busy.append(worker)
            ready = wait([w.conn for w in busy] + [w.process.sentinel for w in busy],
                         timeout=max(0.0, min(w.deadline for w in busy) - time.monotonic()))
            now = time.monotonic()
            for worker in list(busy):
                outcome = worker.outcome(ready, now, timeout)
                if outcome is None:
                    continue
                busy.remove(worker)
                results[worker.path], healthy = outcome
                bar.update()
                if healthy:
                    idle.append(worker)
                else:
                    worker.kill()
                    if todo:
                        idle.append(_Worker(size, memory, gpu))
    finally:
        bar.close()
        for worker in idle + busy:
            worker.kill()
    return results


class _Cache:
    """Decoded views on disk: per file and image size, `<key>.npy` (the view) and `<key>.json` (its
    laterality, or the reason it was rejected); per site, `site-<folder>-<key>.json`."""

    def __init__(self, folder: Path | None, size: tuple[int, int]) -> None:
        self.scratch = None if folder else tempfile.TemporaryDirectory(prefix="fedmammo-views-")
        self.folder = Path(folder or self.scratch.name)  # type: ignore[union-attr]
        self.size = size

    def _key(self, path: Path, listed: Listed | None) -> Path | None:
        """The entry's path without suffix; None when `path` vanished."""
        try:
            stat = path.stat()
        except OSError:
            return None
        key = f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\0{self.size}\0{_KEY_VERSION}\0{listed}"
        return self.folder / hashlib.sha256(key.encode()).hexdigest()

    def target(self, path: Path, listed: Listed | None) -> Path | None:
        """Where `path`'s view is to be written."""
        key = self._key(path, listed)
        return None if key is None else key.with_suffix(".npy")

    def _valid(self, file: Path) -> bool:
        """Whether `file` holds a whole view of this size (its header and length; the pixels are not read)."""
        try:
            view = np.load(file, mmap_mode="r")
        except Exception:  # missing, truncated or foreign: decode again
            return False
        return view.shape == self.size and view.dtype == np.float16

    def load(self, path: Path, listed: Listed | None) -> Decoded | None:
        key = self._key(path, listed)
        if key is None:
            return None
        try:
            record = json.loads(key.with_suffix(".json").read_text())
            if "reason" in record:
                return str(record["reason"])
            laterality = str(record["laterality"])
        except Exception:  # no entry, or a damaged one: decode again
            return None
        view = key.with_suffix(".npy")
        return (laterality, view) if self._valid(view) else None

    def store(self, path: Path, listed: Listed | None, result: Decoded) -> None:
        """Record `result` (its view already written by the worker)."""
        key = self._key(path, listed)
        if key is None or (isinstance(result, str) and result.startswith(_TIMED_OUT)):
            return
        record = {"reason": result} if isinstance(result, str) else {"laterality": result[0]}
        write_atomic(key.with_suffix(".json"), json.dumps(record), durable=False)

    def site_key(self, root: Path, files: Sequence[Path], config: Config) -> str:
        """The key of a whole prepared site: every file's path, size and modification time (those the
        manifest lists outside the folder too), labels.csv's and images.csv's (or their absence), and the
        settings that shape the arrays."""
        digest = hashlib.sha256(f"{_KEY_VERSION}\0{self.size}\0{config.data.bilateral}\0"
                                f"{config.data.generated_2d}".encode())
        for path in [root / LABELS_FILE, root / MANIFEST_FILE, *files]:
            try:
                stat = path.stat()
                digest.update(f"\0{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
            except OSError:  # absent: labels.csv or images.csv not there, or a file just removed
                digest.update(f"\0{path.resolve()}\0-".encode())
        return digest.hexdigest()

    def _site_file(self, root: Path, key: str) -> Path:
        folder = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
        return self.folder / f"site-{folder}-{key}.json"

    def load_site(self, root: Path, key: str) -> PreparedSite | None:
        """The site kept under `key`, if every view file it names is still whole."""
        try:
            meta = json.loads(self._site_file(root, key).read_text())
            views = [tuple(self.folder / name for name in exam) for exam in meta["views"]]
            sources = [tuple(Source(Path(path), listed and Listed(**listed)) for path, listed in exam)
                       for exam in meta["sources"]]
        except Exception:  # none, or a damaged entry: prepare the site again
            return None
        if not all(self._valid(file) for exam in views for file in exam):
            return None
        return PreparedSite(meta["name"], meta["exam_ids"], views, [ExamLabel(**x) for x in meta["labels"]],
                            [Rejection(*x) for x in meta["rejections"]], meta["counts"], meta["warnings"],
                            meta["labelled"], self.scratch, sources)

    def store_site(self, root: Path, key: str, site: PreparedSite) -> None:
        """Keep `site` under `key`, replacing what was kept for the same folder's earlier contents."""
        if any(r.reason.startswith(_TIMED_OUT) for r in site.rejections):
            return
        meta = {"name": site.name, "exam_ids": site.exam_ids, "labels": [asdict(x) for x in site.labels],
                "views": [[file.name for file in exam] for exam in site.views],
                "rejections": [(r.source, r.reason) for r in site.rejections], "counts": site.counts,
                "warnings": site.warnings, "labelled": site.labelled,
                "sources": [[(str(path.resolve()), listed and asdict(listed)) for path, listed in exam]
                            for exam in site.sources]}
        file = self._site_file(root, key)
        write_atomic(file, json.dumps(meta))
        for old in file.parent.glob(file.name.rsplit("-", 1)[0] + "-*.json"):
            if old != file:
                old.unlink(missing_ok=True)


def _decode(paths: Sequence[Path], listed: Mapping[Path, Listed], config: Config, cache: _Cache,
            progress: bool, desc: str) -> dict[Path, Decoded]:
    listing = {p: entry(listed, p) for p in paths}
    results = {p: r for p in paths if (r := cache.load(p, listing[p])) is not None}
    todo = [p for p in paths if p not in results]
    targets = {p: t for p in todo if (t := cache.target(p, listing[p])) is not None}
    decoded = decode_files(todo, config.data.image_size, config.data.workers, config.data.decode_timeout_s,
                           progress, desc, listed=listed, targets=targets,
                           gpu=gpu_decoding.use_gpu(config.data.gpu_decode))
    for path, result in decoded.items():
        if not isinstance(result, str) and path not in targets:  # vanished since: not cached, not usable
            result = decoded[path] = "file vanished while being read"
        cache.store(path, listing[path], result)
    return results | decoded


def prepare_site(root: Path, config: Config, cache_dir: str | Path | None = None,
                 progress: bool = True) -> PreparedSite:
    """Read a site folder (DICOM at any depth, labels.csv, images.csv) into arrays; see the module docstring.
    Without labels.csv every complete breast is an exam to score, with no targets.

    The cache lives in `config.data.cache_dir` if set, else in `cache_dir` (the caller's default, e.g.
    `<output>/cache`); with neither, in a temporary folder removed with the result. Raises ValueError when
    the folder, its labels file or its manifest as a whole is unusable; everything smaller is a rejection
    in the result.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: not a folder")
    folder = config.data.cache_dir or cache_dir
    cache = _Cache(Path(folder) if folder else None, config.data.image_size)
    listed, rejected = read_manifest(root)
    files = with_listed(site_files(root, skip=[cache.folder]), listed)
    # Every federated message prepares the site anew (Flower starts a process per message): with nothing
    # changed since the last time, the whole result is one file, not a header read per DICOM file.
    key = cache.site_key(root, files, config)
    if (kept := cache.load_site(root, key)) is not None:
        return kept
    labelled = (root / LABELS_FILE).exists()
    labels, rejections = read_labels(root / LABELS_FILE) if labelled else (None, [])
    site = _prepare(root.name, files, labels, listed, config, cache, progress, rejections + rejected)
    cache.store_site(root, key, site)
    return site


def prepare_files(name: str, paths: Sequence[Path], config: Config, cache_dir: str | Path | None = None,
                  progress: bool = True) -> PreparedSite:
    """New studies given as DICOM files and folders of them (no labels, no manifest): every complete
    breast they show is an exam to score."""
    folder = config.data.cache_dir or cache_dir
    cache = _Cache(Path(folder) if folder else None, config.data.image_size)
    files: list[Path] = []
    for path in map(Path, paths):
        if not path.exists():
            raise ValueError(f"{path}: no such file or folder")
        files += site_files(path) if path.is_dir() else [path]
    return _prepare(name, sorted(set(files)), None, {}, config, cache, progress, [])


def _prepare(name: str, files: Sequence[Path], labels: dict[str, ExamLabel] | None,
             listed: Mapping[Path, Listed], config: Config, cache: _Cache, progress: bool,
             rejections: list[Rejection]) -> PreparedSite:
    """Headers → laterality from pixels where no tag gives it → exams → decoded views → arrays."""
    headers, rejected = scan_files(files, listed, progress, f"{name}: headers")
    rejections += rejected

    unknown = [h.path for h in headers if h.laterality is None]
    decoded = _decode(unknown, listed, config, cache, progress, f"{name}: laterality from pixels")
    resolved = []
    for header in headers:
        result = decoded.get(header.path)
        if isinstance(result, str):
            rejections.append(Rejection(str(header.path), result))
        else:
            resolved.append(header if result is None else replace(header, laterality=result[0]))

    exams, rejected = pair_exams(resolved, labels, config.data.bilateral, config.data.generated_2d)
    rejections += rejected
    needed = sorted({p for exam in exams for p in exam.paths} - set(decoded))
    decoded |= _decode(needed, listed, config, cache, progress, f"{name}: decoding")
    rejections += [Rejection(str(p), r) for p in needed if isinstance(r := decoded[p], str)]

    usable: list[Exam] = []
    for exam in exams:
        failed = [str(p) for p in exam.paths if isinstance(decoded[p], str)]
        if failed:
            reason = f"incomplete exam: view(s) rejected: {', '.join(failed)}"
            rejections.append(Rejection(exam.exam_id, reason))
        else:
            usable.append(exam)

    views = [tuple(decoded[path][1] for path in exam.paths) for exam in usable]  # type: ignore[misc]
    generated = {h.path for h in resolved if h.generated}
    used = [p for exam in usable for p in exam.paths]
    counts = {"files": len(files), "views": len(headers), "exams_labelled": len(labels or {}),
              "exams_complete": len(exams), "exams_usable": len(usable),
              "views_acquired": sum(p not in generated for p in used),
              "views_generated": sum(p in generated for p in used)}
    warnings = patient_mismatches(usable, {h.path: h.patient_id for h in resolved}) if labels else []
    sources = [tuple(Source(path, entry(listed, path)) for path in exam.paths) for exam in usable]
    return PreparedSite(name, [e.exam_id for e in usable], views, [e.label for e in usable], rejections,
                        counts, warnings, labels is not None, cache.scratch, sources)


def patient_mismatches(exams: Sequence[Exam], patient_of: Mapping[Path, str]) -> list[str]:
    """A warning when views' DICOM PatientID contradicts their exam's label row (a mislabelled or
    misfiled study, or a manifest that pairs the wrong patient's images)."""
    found = [(exam.exam_id, exam.label.patient_id, dicom) for exam in exams
             for dicom in sorted({patient_of[p] for p in exam.paths if patient_of.get(p)})
             if dicom != exam.label.patient_id]
    if not found:
        return []
    shown = "; ".join(f"{e}: labels.csv {label!r}, DICOM {dicom!r}" for e, label, dicom in found[:3])
    return [f"{len(found)} exam(s) whose DICOM PatientID differs from their labels.csv patient_id ({shown}"
            f"{' …' if len(found) > 3 else ''}): check that each label row names its own images"]
