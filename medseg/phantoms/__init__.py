"""Synthetic chest radiographs with exact masks (the embedded demo data)."""

from medseg.phantoms.anatomy import render_phantom
from medseg.phantoms.write import write_phantom_dataset

__all__ = ["render_phantom", "write_phantom_dataset"]
