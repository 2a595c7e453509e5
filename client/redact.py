"""What a site may tell the center about a failure: the text with what could name a patient taken out.

An exception's text can quote a labels.csv cell, a DICOM attribute value or a file path, and hospitals
name folders and files after patients. The center gets the redacted text, the site's own log the whole
exception (Flower logs a ClientApp's exception where it runs). Redaction is a safety net, not a proof:
the messages the site sends on purpose are checked by tests/test_privacy_leaks.py.
"""

from __future__ import annotations

import re

_REDACTIONS = (
    (re.compile(r"""'[^']*'|"[^"]*\""""), "'…'"),  # quoted values: cells, attribute values, names
    (re.compile(r"\S*[/\\]\S*"), "<path>"),  # anything with a path separator
    (re.compile(r"\S*\^\S*|\d[\d.:\-]{4,}\d"), "<value>"),  # DICOM person names; dates, times, UIDs, IDs
)


def redact(text: str) -> str:
    """`text` with quoted values, paths, long numbers and person names (A^B) replaced by placeholders."""
    for pattern, placeholder in _REDACTIONS:
        text = pattern.sub(placeholder, text)
    return text
