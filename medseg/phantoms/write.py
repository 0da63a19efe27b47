"""Write a phantom data set in the SCR layout: DICOM CR images plus GIF masks.

Layout (as JSRT/SCR, with DICOM in place of the raw JSRT files)::

    out_dir/images/PHANTOM0001.dcm
    out_dir/masks/<structure>/PHANTOM0001.gif   (8-bit, 0 or 255, image size)

Every file is written atomically (medseg.atomic: temporary name in the same
folder, then rename), so an interrupted run never leaves a truncated file behind.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ComputedRadiographyImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

from medseg.atomic import write_bytes_atomic
from medseg.phantoms.anatomy import render_phantom
from medseg.structures import SCR_STRUCTURES

# 12 bits stored in 16 allocated, as most CR detectors deliver.
BITS_STORED = 12
MAX_VALUE = (1 << BITS_STORED) - 1  # 4095


def phantom_id(index: int) -> str:
    """Case identifier for the 1-based ``index``: "PHANTOM0001", ..."""
    return f"PHANTOM{index:04d}"


def case_seed(seed: int, index: int) -> int:
    """Seed of case ``index`` in a data set drawn with ``seed``: depends only
    on the pair, so case k is the same whatever the number of cases."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def _dicom_bytes(image: np.ndarray, index: int, seed: int, pixel_spacing_mm: float) -> bytes:
    """Encode a display-polarity image (float (H, W) in [0, 1]) as a Part 10
    CR file. Odd indices are stored MONOCHROME1 (white is zero)."""
    values = np.round(np.clip(image, 0.0, 1.0) * MAX_VALUE).astype(np.uint16)
    photometric = "MONOCHROME1" if index % 2 else "MONOCHROME2"
    if photometric == "MONOCHROME1":
        values = (MAX_VALUE - values).astype(np.uint16)

    # UIDs are reproducible, so a rewrite gives identical files, yet differ
    # whenever the pixels can (seed, index, shape, spacing).
    def uid(kind: str) -> str:
        sources = ["medseg-phantom", str(seed), str(index), repr(image.shape), repr(pixel_spacing_mm), kind]
        return generate_uid(entropy_srcs=sources)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    meta.MediaStorageSOPInstanceUID = uid("instance")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = FileDataset("", {}, file_meta=meta, preamble=b"\x00" * 128)
    ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = uid("study")
    ds.SeriesInstanceUID = uid("series")
    ds.Modality = "CR"
    ds.Manufacturer = "medseg phantom"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20000101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.SeriesNumber = 1
    ds.InstanceNumber = index
    # Fake identifying fields: tests check they never reach outputs or logs.
    ds.PatientName = f"Phantom^Secret{index}"
    ds.PatientID = f"SECRETID{index:05d}"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PatientOrientation = ["L", "F"]  # columns run to the patient's left, rows to the feet
    ds.ImageType = ["ORIGINAL", "PRIMARY"]

    rows, cols = values.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = 16
    ds.BitsStored = BITS_STORED
    ds.HighBit = BITS_STORED - 1
    ds.PixelRepresentation = 0
    spacing = [f"{pixel_spacing_mm:.6g}", f"{pixel_spacing_mm:.6g}"]  # (row, column) mm
    ds.PixelSpacing = spacing
    ds.ImagerPixelSpacing = spacing
    # The phantom is drawn at the patient: its spacing is calibrated, not
    # detector pitch (PS3.3 10.7.1.3: equal spacings without a calibration
    # type would read as detector plane).
    ds.PixelSpacingCalibrationType = "GEOMETRY"
    ds.WindowCenter = (MAX_VALUE + 1) // 2
    ds.WindowWidth = MAX_VALUE + 1
    ds.PixelData = values.astype("<u2").tobytes()
    ds["PixelData"].VR = "OW"

    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _gif_bytes(mask: np.ndarray) -> bytes:
    """8-bit greyscale GIF of a bool (H, W) mask, 0 or 255 (SCR style)."""
    buffer = io.BytesIO()
    # optimize=False keeps the full grey palette, so readers get mode "L" with
    # values 0/255 (as the SCR GIFs) rather than palette indices 0/1.
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L").save(buffer, format="GIF", optimize=False)
    return buffer.getvalue()


def write_phantom_dataset(
    out_dir: Path,
    n: int,
    seed: int,
    shape: tuple[int, int] = (512, 512),
    pixel_spacing_mm: float = 0.7,
    progress: Callable[[int, int], None] | None = None,
) -> list[str]:
    """Render ``n`` phantoms and write them as DICOM CR images + GIF masks.

    Args:
        out_dir: created if missing; files already there are overwritten.
        n: number of cases; case k (1-based) is the same for any n >= k.
        seed: data set seed; case k uses :func:`case_seed` (seed, k).
        shape: (H, W) of every image in pixels.
        pixel_spacing_mm: written as PixelSpacing and ImagerPixelSpacing.
        progress: called as ``progress(done, n)`` after each case.

    Returns:
        The case IDs written, in order ("PHANTOM0001", ...).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if pixel_spacing_mm <= 0:
        raise ValueError(f"pixel_spacing_mm must be > 0, got {pixel_spacing_mm}")
    out_dir = Path(out_dir)
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    for name in SCR_STRUCTURES:
        (out_dir / "masks" / name).mkdir(parents=True, exist_ok=True)

    ids = []
    for index in range(1, n + 1):
        case_id = phantom_id(index)
        image, masks = render_phantom(case_seed(seed, index), shape)
        write_bytes_atomic(image_dir / f"{case_id}.dcm", _dicom_bytes(image, index, seed, pixel_spacing_mm))
        for name in SCR_STRUCTURES:
            write_bytes_atomic(out_dir / "masks" / name / f"{case_id}.gif", _gif_bytes(masks[name]))
        ids.append(case_id)
        if progress is not None:
            progress(index, n)
    return ids
