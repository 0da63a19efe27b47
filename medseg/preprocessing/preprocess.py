"""Turn a folder of radiographs (+ masks) into the canonical training form.

Per case: read -> normalise intensity -> aspect-preserving resize + pad to a
square -> NIfTI image (float32) and NIfTI label bit field (uint8, bit i =
``structures[i]``) -> one manifest row holding the geometry needed to map a
prediction back onto the original image.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medseg.batch import Failure, report_failures, run_batch, write_failures, write_skipped
from medseg.ingest import load_image
from medseg.errors import InputError
from medseg.ingest.inputs import CASE_ID_SOURCES, InputFile, Skipped, ambiguity_note, collect_inputs, lookup_keys
from medseg.ingest.masks import check_mask_geometry, read_label_image, read_scr_masks
from medseg.ingest.types import SPACING_ASSUMED, IngestedImage, ReadOptions, assumed_spacing_warning
from medseg.nifti import save_nifti_2d
from medseg.preprocessing.geometry import ResizePadGeometry, to_preprocessed
from medseg.preprocessing.intensity import normalise_intensity
from medseg.preprocessing.manifest import write_manifest
from medseg.preprocessing.splits import scr_fold
from medseg.structures import SCR_STRUCTURES, fractions_to_uint8, pack_masks

log = logging.getLogger(__name__)

MASK_FORMATS = ("scr", "label_image")


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


def canonical_image(image: IngestedImage, size: int, lower_percentile: float = 0.5,
                    upper_percentile: float = 99.5) -> tuple[ResizePadGeometry, np.ndarray, np.ndarray]:
    """The network's view of an image: shared by preprocessing and prediction.

    Returns:
        (geometry, normalised (H, W) in [0, 1] at the original size,
        preprocessed (1, size, size)). DICOM padding pixels
        (``image.padding``) are left out of the percentiles and are 0.
    """
    geometry = ResizePadGeometry.fit(image.shape, image.spacing_mm, size)
    valid = None if image.padding is None else ~image.padding
    normalised = normalise_intensity(image.pixels, lower_percentile, upper_percentile, valid=valid)
    return geometry, normalised, to_preprocessed(normalised[np.newaxis], geometry)


def preprocess_case(item: tuple[InputFile, Sequence[str]], spec: DatasetSpec, settings: PreprocessSettings,
                    out_dir: Path) -> dict:
    """Preprocess one image (and its masks) and return its manifest row.

    Args:
        item: (the input with its case ID, the keys its masks may be stored
            under: ``medseg.ingest.inputs.lookup_keys``).

    Writes ``out_dir/images/<case_id>.nii.gz`` (float32, size x size, [0, 1])
    and, with masks, ``out_dir/labels/<case_id>.nii.gz`` (uint8 bit field)
    and ``out_dir/label_fractions/<case_id>.nii.gz`` (uint8 (size, size, n
    structures): the share of each preprocessed pixel a structure covers,
    x 255; the partial-volume targets of ``train.soft_labels``).

    Raises:
        InputError: the image or its masks cannot be used.
    """
    entry, mask_keys = item
    image_path, case_id = entry.path, entry.case_id
    image = load_image(image_path, spec.read_options)
    geometry, _, preprocessed = canonical_image(image, settings.size, settings.lower_percentile,
                                                settings.upper_percentile)
    preprocessed = preprocessed[0]

    label_path = ""
    if spec.masks_root is not None:
        try:
            if spec.mask_format == "scr":
                masks, mask_source = read_scr_masks(spec.masks_root, mask_keys, spec.structures, image_path)
            else:
                masks, mask_source = read_label_image(spec.masks_root, mask_keys, spec.label_values, image_path)
        except InputError as err:
            raise InputError(err.path, err.problem + ambiguity_note(entry, mask_keys)) from None
        mask_shape = next(iter(masks.values())).shape
        check_mask_geometry(image_path, image.shape, mask_shape)
        stacked = np.stack([masks[name] for name in spec.structures]).astype(np.float32)
        # Resample as fractions and threshold at half: smoother than nearest
        # neighbour and unbiased in area.
        fractions = to_preprocessed(stacked, geometry)
        packed = pack_masks(dict(zip(spec.structures, fractions >= 0.5)), spec.structures)
        label_path = f"labels/{case_id}.nii.gz"
        save_nifti_2d(out_dir / label_path, packed, geometry.preprocessed_spacing_mm)
        fractions_path = f"label_fractions/{case_id}.nii.gz"
        save_nifti_2d(out_dir / fractions_path, fractions_to_uint8(fractions).transpose(1, 2, 0),
                      geometry.preprocessed_spacing_mm, description="|".join(spec.structures))
    else:
        mask_source = None
        fractions_path = ""

    image_rel = f"images/{case_id}.nii.gz"
    save_nifti_2d(out_dir / image_rel, preprocessed.astype(np.float32), geometry.preprocessed_spacing_mm)
    fold = scr_fold(case_id)
    return {
        "case_id": case_id,
        "image": image_rel,
        "label": label_path,
        "label_fractions": fractions_path,
        "source": str(Path(image.source).resolve()),
        "input_name": entry.name,
        "source_format": image.source_format,
        "mask_source": str(Path(mask_source).resolve()) if mask_source else "",
        "structures": "|".join(spec.structures) if label_path else "",
        "photometric": image.photometric,
        "spacing_source": image.spacing_source,
        "spacing_plane": image.spacing_plane,
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
    skipped: list[Skipped] = field(default_factory=list)


def preprocess_dataset(
    spec: DatasetSpec, settings: PreprocessSettings, out_dir: str | Path, workers: int = 1
) -> PreprocessResult:
    """Preprocess every image under ``spec.images`` into ``out_dir``.

    Every image gets exactly one manifest row or one failure: case IDs are
    unique in the run before anything is written (``medseg.ingest.inputs``),
    and each case's masks are found by keys no other input shares.

    Writes ``manifest.csv`` (one row per successful case), ``failures.csv``
    (file, problem) and ``skipped.csv`` (non-image files found in the folder,
    e.g. a DICOMDIR). Bad files are reported, not fatal.

    Raises:
        FileNotFoundError: ``spec.images`` does not exist or holds no image.
    """
    out_dir = Path(out_dir)
    if not Path(spec.images).exists():
        raise FileNotFoundError(f"{spec.images}: no such file or folder")
    inputs = collect_inputs([spec.images], spec.case_id_from, exclude=[out_dir])
    if not inputs.files:
        raise FileNotFoundError(f"{spec.images}: no image files found")
    items = list(zip(inputs.files, lookup_keys(inputs.files)))
    work = functools.partial(preprocess_case, spec=spec, settings=settings, out_dir=out_dir)
    rows, failures = run_batch(items, work, label="preprocess", workers=workers, name_of=lambda item: str(item[0].path))

    manifest_path = out_dir / "manifest.csv"
    failures_path = out_dir / "failures.csv"
    write_manifest(manifest_path, rows)
    write_failures(failures_path, failures)
    write_skipped(out_dir / "skipped.csv", inputs.skipped)
    assumed = sum(row["spacing_source"] == SPACING_ASSUMED for row in rows)
    if assumed:  # once for the batch: the NIfTI affines and the mm measures use it
        log.warning("preprocess: %s", assumed_spacing_warning(assumed, len(rows)))
    report_failures(failures, len(inputs.files), "preprocess", skipped=len(inputs.skipped))
    if spec.mask_format == "label_image" and spec.masks_root is not None:
        # A label value in no label image is usually a wrong --label-values
        # table: warn, naming value and structure (issue 9).
        from medseg.ingest.masks import check_label_values_occur

        check_label_values_occur((row["mask_source"] for row in rows if row.get("mask_source")), spec.label_values)
    return PreprocessResult(rows, failures, manifest_path, failures_path, inputs.skipped)


