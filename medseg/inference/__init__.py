"""Inference: predicted masks and what is derived from them (clean-up, CTR, QC, DICOM SEG)."""
