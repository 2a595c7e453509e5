"""Public mammography datasets read in their own published layout and turned into fedmammo site folders.

`fedmammo import FORMAT SRC OUT` (`common.datasets.importer.run`) reads a dataset where it lies and writes,
for each site, a folder holding `labels.csv` (one row per exam, `common.labels`) and `images.csv` (one row
per image, absolute paths into SRC, `common.manifest`). Nothing is copied into OUT and nothing in SRC is
written. One module per format reads the dataset's files (`rsna`, `vindr`, `cbis_ddsm`, `cmmd`); what they
share (records, CSV reading, the patient-level split, sites, writing, the summary) is `importer`. Every
mapping is in docs/datasets.md.

This package imports nothing from `client` or `server`: both sides may use it.
"""

FORMATS = {
    "rsna": "common.datasets.rsna",
    "vindr": "common.datasets.vindr",
    "cbis-ddsm": "common.datasets.cbis_ddsm",
    "cmmd": "common.datasets.cmmd",
}
"""`fedmammo import` FORMAT → the module that reads it (each has `DESCRIPTION`, `SITES_BY` and `read`)."""
