#!/usr/bin/env bash
# Set up everything the test suite needs on a fresh machine with Python 3.11, then run it.
#   - Debian tools the tests use: dciodvfy (dicom3tools), dcmtk, gdcm, nginx, chromium (report.html in a
#     headless browser), installed when missing and root
#   - a virtual environment (FEDMAMMO_VENV, default .venv) with the project and its test extras
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v dciodvfy >/dev/null || ! command -v dcmcjpeg >/dev/null || ! [ -x /usr/sbin/nginx ] \
    || ! command -v chromium >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dicom3tools dcmtk libgdcm-tools nginx \
      chromium >/dev/null
  else
    echo "warning: dicom3tools/dcmtk/nginx/chromium missing and not root: the tests that need them will fail or skip" >&2
  fi
fi

VENV="${FEDMAMMO_VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3.11 -m venv "$VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check -e ".[test]" 2> >(grep -v "^WARNING: Location" >&2)

"$VENV/bin/ruff" check .
exec "$VENV/bin/python" -m pytest -q "$@"
