"""Writing files so that a reader, or a crash, sees the old content or the new one, never a mix."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path


def _temporary(path: Path, data: bytes | str, durable: bool) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return tmp


def _sync_folder(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)  # makes the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_atomic(path: str | Path, data: bytes | str, *, durable: bool = True) -> None:
    """Write one whole file via a temporary file beside it and a rename. `durable` also fsyncs the file
    and its folder (checkpoints, reports); bulk outputs that can be regenerated may skip it."""
    write_files_atomic({Path(path): data}, durable=durable)


def write_files_atomic(files: Mapping[Path, bytes | str], *, durable: bool = True) -> None:
    """Write every file or none: all go to temporary files first, then each is renamed into place."""
    temporary: dict[Path, str] = {}
    try:
        for path, data in files.items():
            temporary[Path(path)] = _temporary(Path(path), data, durable)
        for path, tmp in temporary.items():
            os.replace(tmp, path)
        if durable:
            for folder in {path.parent for path in temporary}:
                _sync_folder(folder)
    finally:
        for tmp in temporary.values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
