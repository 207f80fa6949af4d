"""Annotation: the labeling app, assignment with overlap, quality control, import/export, Argilla sync, AI judge."""
