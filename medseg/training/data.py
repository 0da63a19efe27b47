"""Training data: preprocessed cases in memory, MONAI augmentation.

Preprocessed images are small (256x256 float32 = 256 KiB), so a whole fold
is read once into memory; augmentation runs per sample. Random state is
reseeded at every epoch from (seed, epoch), which makes an epoch's batches a
function of the epoch alone: a resumed run sees exactly the batches an
uninterrupted run would.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.transforms import (
    Compose,
    CenterSpatialCropd,
    RandAdjustContrastd,
    RandAffined,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    Rand2DElasticd,
    RandSpatialCropd,
)

from medseg.errors import InputError
from medseg.nifti import load_nifti_2d
from medseg.preprocessing.manifest import read_manifest
from medseg.structures import labels_from_fractions, labels_from_packed


@dataclass(frozen=True)
class AugmentSettings:
    """Augmentation suited to radiographs. No left-right flip: the heart is on
    the patient's left, and a flip would teach the wrong anatomy.

    Attributes:
        probability: chance each random transform is applied to a sample.
        rotate_deg: maximum rotation, degrees.
        scale: maximum relative zoom (0.1 = +-10%).
        translate: maximum shift, fraction of the image side.
        elastic: small elastic deformations.
        intensity: brightness / contrast / gamma changes.
        noise_std: Gaussian noise standard deviation (intensities in [0, 1]).
        blur: Gaussian blur.
    """

    enabled: bool = True
    probability: float = 0.5
    rotate_deg: float = 7.0
    scale: float = 0.1
    translate: float = 0.05
    elastic: bool = True
    intensity: bool = True
    noise_std: float = 0.02
    blur: bool = True


def augmentation(settings: AugmentSettings, size: int, patch_size: int = 0,
                 soft_labels: bool = False) -> Compose | None:
    """Dict transform over {"image": (1, S, S), "label": (C, S, S)}; None when
    off and no patches are cut.

    Args:
        settings: what to randomise.
        size: S, the preprocessed side in pixels.
        patch_size: P > 0 and < S: every sample becomes a random P x P patch
            (outputs (1, P, P) and (C, P, P)), nnU-Net's way of training at a
            resolution whose whole images would cost too much per step. The
            patch is cut with a margin before the spatial transforms, which
            then see real pixels at its corners, and centred to P after them.
        soft_labels: the labels are partial-volume shares in [0, 1]
            (:func:`medseg.structures.labels_from_fractions`): spatial
            transforms interpolate them bilinearly, as the image, instead of
            taking the nearest label.
    """
    label_mode = "bilinear" if soft_labels else "nearest"
    crops = 0 < patch_size < size
    if not settings.enabled:
        return Compose([RandSpatialCropd(keys=("image", "label"), roi_size=(patch_size, patch_size),
                                         random_size=False)]) if crops else None
    p = settings.probability
    transforms = []
    if crops:
        margin = min(size, int(round(patch_size * 1.25)))
        transforms.append(RandSpatialCropd(keys=("image", "label"), roi_size=(margin, margin), random_size=False))
        size = margin
    shift = settings.translate * size
    transforms += [
        RandAffined(
            keys=("image", "label"), prob=p, mode=("bilinear", label_mode), padding_mode="zeros",
            rotate_range=(np.deg2rad(settings.rotate_deg),),
            scale_range=(settings.scale, settings.scale),
            translate_range=(shift, shift),
        ),
    ]
    if settings.elastic:
        transforms.append(Rand2DElasticd(
            keys=("image", "label"), prob=p / 2, spacing=(size // 4, size // 4), magnitude_range=(0.5, 1.5),
            mode=("bilinear", label_mode), padding_mode="zeros",
        ))
    if settings.intensity:
        transforms += [
            RandScaleIntensityd(keys="image", factors=0.15, prob=p),
            RandShiftIntensityd(keys="image", offsets=0.1, prob=p),
            RandAdjustContrastd(keys="image", gamma=(0.7, 1.5), prob=p),
        ]
    if settings.noise_std > 0:
        transforms.append(RandGaussianNoised(keys="image", std=settings.noise_std, prob=p))
    if settings.blur:
        transforms.append(RandGaussianSmoothd(keys="image", sigma_x=(0.25, 1.0), sigma_y=(0.25, 1.0), prob=p / 2))
    if crops:
        transforms.append(CenterSpatialCropd(keys=("image", "label"), roi_size=(patch_size, patch_size)))
    return Compose(transforms)


@dataclass
class CaseTensors:
    """A split's cases in memory.

    Attributes:
        case_ids: N IDs.
        images: float32 (N, 1, S, S) in [0, 1].
        labels: float32 (N, C, S, S) in {0, 1}, one channel per label.
    """

    case_ids: list[str]
    images: torch.Tensor
    labels: torch.Tensor


def load_cases(manifest_path: str | Path, case_ids: Sequence[str], labels: Mapping[str, Sequence[str]],
               soft_labels: bool = False) -> CaseTensors:
    """Read the preprocessed images and label channels of ``case_ids``.

    Args:
        soft_labels: the labels are the masks' partial-volume shares of each
            pixel (float in [0, 1], from ``label_fractions``) instead of the
            masks thresholded at half a pixel ({0, 1}, from ``label``).

    Raises:
        medseg.errors.InputError: (naming the manifest) a case is not in the
            manifest or has no label file (or, with ``soft_labels``, no
            fractions file: a manifest written before they were recorded
            needs preprocessing again).
    """
    manifest_path = Path(manifest_path)
    frame = read_manifest(manifest_path).set_index("case_id")
    missing = [c for c in case_ids if c not in frame.index]
    if missing:
        raise InputError(manifest_path, f"cases not in the manifest: {', '.join(missing[:5])}")
    images, targets = [], []
    for case_id in case_ids:
        row = frame.loc[case_id]
        if not row["label"]:
            raise InputError(manifest_path, f"case {case_id} has no labels; training needs masks")
        image, _ = load_nifti_2d(manifest_path.parent / row["image"])
        images.append(image[np.newaxis].astype(np.float32))
        structures = row["structures"].split("|")
        if soft_labels:
            if not row.get("label_fractions", ""):
                raise InputError(manifest_path, f"case {case_id} has no label_fractions, which train.soft_labels "
                                 "needs: the manifest predates them; preprocess again (in the workflow: "
                                 "snakemake ... --forcerun preprocess)")
            fractions, _ = load_nifti_2d(manifest_path.parent / row["label_fractions"])
            targets.append(labels_from_fractions(fractions, structures, labels))
        else:
            packed, _ = load_nifti_2d(manifest_path.parent / row["label"])
            targets.append(labels_from_packed(packed, structures, labels))
    return CaseTensors(
        case_ids=list(case_ids),
        images=torch.from_numpy(np.stack(images)) if images else torch.empty(0),
        labels=torch.from_numpy(np.stack(targets)) if targets else torch.empty(0),
    )


class AugmentedCases(torch.utils.data.Dataset):
    """Samples {"image", "label"} from :class:`CaseTensors`, augmented.

    ``length`` larger than the number of cases repeats them (each repeat
    augmented differently): small datasets get enough steps per epoch.
    """

    def __init__(self, cases: CaseTensors, transform: Compose | None, length: int | None = None) -> None:
        self.cases = cases
        self.transform = transform
        self.length = max(length or 0, len(cases.case_ids))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        index = index % len(self.cases.case_ids)
        sample = {"image": self.cases.images[index], "label": self.cases.labels[index]}
        if self.transform is not None:
            sample = self.transform(sample)
            sample = {k: (v.as_tensor() if hasattr(v, "as_tensor") else torch.as_tensor(v)).float()
                      for k, v in sample.items()}
        return sample


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of one epoch: a function of (seed, epoch) only."""
    return int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1)[0] % (2**31))
