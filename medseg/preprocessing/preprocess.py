"""Turn a folder of radiographs (+ masks) into the canonical training form.

Per case: read -> normalise intensity -> aspect-preserving resize + pad to a
square -> NIfTI image (float32) and NIfTI label bit field (uint8, bit i =
``structures[i]``) -> one manifest row holding the geometry needed to map a
prediction back onto the original image.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medseg.batch import Failure, report_failures, run_batch, write_failures
from medseg.ingest import load_image
from medseg.ingest.masks import check_mask_geometry, read_label_image, read_scr_masks
from medseg.ingest.types import IngestedImage, ReadOptions
from medseg.nifti import save_nifti_2d
from medseg.preprocessing.geometry import ResizePadGeometry, to_preprocessed
from medseg.preprocessing.intensity import normalise_intensity
from medseg.preprocessing.manifest import write_manifest
from medseg.preprocessing.splits import scr_fold
from medseg.structures import SCR_STRUCTURES, pack_masks

log = logging.getLogger(__name__)

MASK_FORMATS = ("scr", "label_image")
CASE_ID_SOURCES = ("filename", "sop_instance_uid")


@dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset's images and masks are and how to read them.

    Attributes:
        images: folder searched recursively (hidden files skipped), or one file.
        masks_root: SCR-layout folder or label-image folder; None for images
            without ground truth.
        mask_format: "scr" or "label_image".
        structures: source structures, in bit order of the label file.
        label_values: for label images, {pixel value: structure}.
        read_options: polarity / spacing for formats without metadata.
        case_id_from: "filename" (stem) or "sop_instance_uid" (DICOM only).
    """

    images: Path
    masks_root: Path | None = None
    mask_format: str = "scr"
    structures: tuple[str, ...] = SCR_STRUCTURES
    label_values: Mapping[int, str] = field(default_factory=dict)
    read_options: ReadOptions = ReadOptions()
    case_id_from: str = "filename"

    def __post_init__(self) -> None:
        if self.mask_format not in MASK_FORMATS:
            raise ValueError(f"mask_format must be one of {MASK_FORMATS}, got {self.mask_format!r}")
        if self.case_id_from not in CASE_ID_SOURCES:
            raise ValueError(f"case_id_from must be one of {CASE_ID_SOURCES}, got {self.case_id_from!r}")
        if self.mask_format == "label_image" and self.masks_root is not None:
            missing = sorted(set(self.structures) - set(self.label_values.values()))
            if missing:
                raise ValueError(f"label_values gives no value for structures: {', '.join(missing)}")


@dataclass(frozen=True)
class PreprocessSettings:
    """Canonical form.

    Attributes:
        size: side of the square output in pixels (256 for CPU, 512/1024 GPU).
        lower_percentile, upper_percentile: intensity window mapped to [0, 1].
    """

    size: int = 256
    lower_percentile: float = 0.5
    upper_percentile: float = 99.5


def list_image_files(images: str | Path) -> list[Path]:
    """All non-hidden files under ``images`` (recursive, sorted), or ``[images]``."""
    images = Path(images)
    if images.is_file():
        return [images]
    if not images.is_dir():
        raise FileNotFoundError(f"{images}: no such file or folder")
    return sorted(
        p for p in images.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(images).parts)
    )


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_case_id(raw: str) -> str:
    """Case ID usable as a file name (no separators, spaces or shell specials)."""
    cleaned = _UNSAFE.sub("_", raw).strip("._")
    return cleaned or "case"


def case_id_of(image: IngestedImage, case_id_from: str = "filename") -> str:
    """File-name-safe case ID: the file stem, or the SOP Instance UID."""
    raw_id = image.case_id
    if case_id_from == "sop_instance_uid":
        raw_id = image.extra.get("sop_instance_uid") or raw_id
    return safe_case_id(raw_id)


def canonical_image(image: IngestedImage, size: int, lower_percentile: float = 0.5,
                    upper_percentile: float = 99.5) -> tuple[ResizePadGeometry, np.ndarray, np.ndarray]:
    """The network's view of an image: shared by preprocessing and prediction.

    Returns:
        (geometry, normalised (H, W) in [0, 1] at the original size,
        preprocessed (1, size, size)).
    """
    geometry = ResizePadGeometry.fit(image.shape, image.spacing_mm, size)
    normalised = normalise_intensity(image.pixels, lower_percentile, upper_percentile)
    return geometry, normalised, to_preprocessed(normalised[np.newaxis], geometry)


def preprocess_case(image_path: Path, spec: DatasetSpec, settings: PreprocessSettings, out_dir: Path) -> dict:
    """Preprocess one image (and its masks) and return its manifest row.

    Writes ``out_dir/images/<case_id>.nii.gz`` (float32, size x size, [0, 1])
    and, with masks, ``out_dir/labels/<case_id>.nii.gz`` (uint8 bit field).

    Raises:
        InputError: the image or its masks cannot be used.
    """
    image = load_image(image_path, spec.read_options)
    case_id = case_id_of(image, spec.case_id_from)
    geometry, _, preprocessed = canonical_image(image, settings.size, settings.lower_percentile,
                                                settings.upper_percentile)
    preprocessed = preprocessed[0]

    label_path = ""
    if spec.masks_root is not None:
        if spec.mask_format == "scr":
            masks, mask_source = read_scr_masks(spec.masks_root, image.case_id, spec.structures, image_path)
        else:
            masks, mask_source = read_label_image(spec.masks_root, image.case_id, spec.label_values, image_path)
        mask_shape = next(iter(masks.values())).shape
        check_mask_geometry(image_path, image.shape, mask_shape)
        stacked = np.stack([masks[name] for name in spec.structures]).astype(np.float32)
        # Resample as fractions and threshold at half: smoother than nearest
        # neighbour and unbiased in area.
        resampled = to_preprocessed(stacked, geometry) >= 0.5
        packed = pack_masks(dict(zip(spec.structures, resampled)), spec.structures)
        label_path = f"labels/{case_id}.nii.gz"
        save_nifti_2d(out_dir / label_path, packed, geometry.preprocessed_spacing_mm)
    else:
        mask_source = None

    image_rel = f"images/{case_id}.nii.gz"
    save_nifti_2d(out_dir / image_rel, preprocessed.astype(np.float32), geometry.preprocessed_spacing_mm)
    fold = scr_fold(case_id)
    return {
        "case_id": case_id,
        "image": image_rel,
        "label": label_path,
        "source": str(Path(image.source).resolve()),
        "source_format": image.source_format,
        "mask_source": str(Path(mask_source).resolve()) if mask_source else "",
        "structures": "|".join(spec.structures) if label_path else "",
        "photometric": image.photometric,
        "spacing_source": image.spacing_source,
        **geometry.as_record(),
        "preprocessed_spacing_mm": float(np.mean(geometry.preprocessed_spacing_mm)),
        "scr_fold": fold if fold is not None else "",
    }


@dataclass
class PreprocessResult:
    """Outcome of a dataset run."""

    rows: list[dict]
    failures: list[Failure]
    manifest_path: Path
    failures_path: Path


def preprocess_dataset(
    spec: DatasetSpec, settings: PreprocessSettings, out_dir: str | Path, workers: int = 1
) -> PreprocessResult:
    """Preprocess every image under ``spec.images`` into ``out_dir``.

    Writes ``manifest.csv`` (one row per successful case) and ``failures.csv``
    (file, problem). Bad files are reported, not fatal.
    """
    out_dir = Path(out_dir)
    files = list_image_files(spec.images)
    if not files:
        raise FileNotFoundError(f"{spec.images}: no image files found")
    work = functools.partial(preprocess_case, spec=spec, settings=settings, out_dir=out_dir)
    rows, failures = run_batch(files, work, label="preprocess", workers=workers)

    # Two files with the same stem would overwrite each other's outputs.
    seen: dict[str, str] = {}
    unique_rows = []
    for row in rows:
        if row["case_id"] in seen:
            failures.append(Failure(row["source"], f"duplicate case ID {row['case_id']!r} (also {seen[row['case_id']]})"))
            continue
        seen[row["case_id"]] = row["source"]
        unique_rows.append(row)

    manifest_path = out_dir / "manifest.csv"
    failures_path = out_dir / "failures.csv"
    write_manifest(manifest_path, unique_rows)
    write_failures(failures_path, failures)
    report_failures(failures, len(files), "preprocess")
    return PreprocessResult(unique_rows, failures, manifest_path, failures_path)


