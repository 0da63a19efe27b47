"""Evaluation of predicted masks against ground truth.

``metrics``: overlap and surface-distance metrics for one pair of 2-D masks.
``evaluate``: a prediction folder scored against SCR-layout (or label-image)
ground truth, summaries, the comparison with published results, pictures,
the output files, and the MLflow evaluation run.
"""
