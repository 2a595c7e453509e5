"""Where sites' and runs' folders are: a simulation's site folders, and the checks on folder settings."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any


def site_folders(root: Path) -> list[Path]:
    """A simulation's sites: the subfolders of `root` holding a labels.csv, sorted by name."""
    return sorted(p for p in Path(root).iterdir() if (p / "labels.csv").is_file())


def absolute_path(config: Mapping[str, Any], key: str, where: str) -> Path:
    """A folder setting: it must be absolute, as Flower's processes do not run in the user's folder."""
    path = Path(str(config.get(key) or ""))
    if not path.is_absolute():
        raise ValueError(f"{where} {key} = {str(config.get(key, ''))!r}: give an absolute path")
    return path
