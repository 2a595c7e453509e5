"""What the center's log lines and the launcher share: where the Flower app is, and the prefix by which the
launcher tells the ServerApp's progress lines (echoed to the console) from Flower's own."""

from __future__ import annotations

from pathlib import Path

APP_DIR = Path(__file__).resolve().parents[1]
"""The Flower app (this project): `flwr run` packs its code and configs (`fab-include`), never data."""
MARKER = "[fedmammo]"
"""Prefix of the ServerApp's progress lines, the ones echoed to the console."""
