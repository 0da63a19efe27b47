"""medseg: heart, lung and clavicle segmentation on chest radiographs."""

__version__ = "0.1.0"
