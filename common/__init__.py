"""Shared by hospitals and the coordinating center: DICOM reading, model, statistics, configuration."""
