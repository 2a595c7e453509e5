"""The synthetic multi-site mammography cohort: the product's built-in default data.

`phantom` draws and projects a breast with its lesion, `vendors` turns a projection into a unit's stored
pixels, `dicom_writer` wraps them in a Digital Mammography IOD, `readers` simulates radiologists' BI-RADS
reads, `cohort` decides who is in which split with which labels, `generate` writes it all (in parallel)
and `command` is `fedmammo synth`. `reference` measures how learnable the cohort is.
"""
