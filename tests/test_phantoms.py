"""Synthetic chest radiographs (medseg.phantoms): geometry, polarity, files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import ComputedRadiographyImageStorage, ExplicitVRLittleEndian

import medseg.atomic
from medseg.phantoms.anatomy import render_phantom
from medseg.phantoms.write import case_seed, write_phantom_dataset
from medseg.structures import SCR_STRUCTURES

SEEDS = range(8)


def _centroid(mask: np.ndarray) -> tuple[float, float]:
    """(row, column) centre of mass of a bool mask."""
    rows, cols = np.nonzero(mask)
    return float(rows.mean()), float(cols.mean())


@pytest.fixture(scope="module")
def phantoms() -> dict[int, tuple[np.ndarray, dict[str, np.ndarray]]]:
    return {seed: render_phantom(seed) for seed in SEEDS}


def test_same_seed_same_phantom_different_seed_different() -> None:
    image_a, masks_a = render_phantom(3)
    image_b, masks_b = render_phantom(3)
    np.testing.assert_array_equal(image_a, image_b)
    for name in SCR_STRUCTURES:
        np.testing.assert_array_equal(masks_a[name], masks_b[name])
    image_c, masks_c = render_phantom(4)
    assert not np.array_equal(image_a, image_c)
    assert not np.array_equal(masks_a["heart"], masks_c["heart"])


def test_image_and_mask_types(phantoms) -> None:
    for image, masks in phantoms.values():
        assert image.dtype == np.float32 and image.shape == (512, 512)
        assert 0.0 <= image.min() and image.max() <= 1.0
        assert image.std() > 0.1  # real contrast, not a flat field
        assert set(masks) == set(SCR_STRUCTURES)
        for mask in masks.values():
            assert mask.dtype == bool and mask.shape == image.shape
            assert mask.any()


def test_masks_are_anatomically_plausible(phantoms) -> None:
    for seed, (image, masks) in phantoms.items():
        height, width = image.shape
        area = {name: m.mean() for name, m in masks.items()}
        centre = {name: _centroid(m) for name, m in masks.items()}
        # Patient's right lung is on the image's left (PA view), and vice versa.
        assert centre["right_lung"][1] < width / 2 < centre["left_lung"][1], seed
        assert 0.05 < area["right_lung"] < 0.25 and 0.04 < area["left_lung"] < 0.25, (seed, area)
        # Lung fields span most of the image height (SCR: 0.62-0.91).
        lung_rows = np.nonzero((masks["left_lung"] | masks["right_lung"]).any(axis=1))[0]
        assert 0.5 < (lung_rows.max() - lung_rows.min()) / height < 0.95, seed
        # Heart: between the lungs, across the midline, lower than the lungs' centres.
        assert centre["right_lung"][1] < centre["heart"][1] < centre["left_lung"][1], seed
        heart_cols = np.nonzero(masks["heart"].any(axis=0))[0]
        assert heart_cols.min() < width / 2 < heart_cols.max(), seed
        assert centre["heart"][0] > max(centre["right_lung"][0], centre["left_lung"][0]), seed
        assert 0.03 < area["heart"] < 0.15, (seed, area)
        # SCR convention: lung masks exclude the heart.
        lungs = masks["left_lung"] | masks["right_lung"]
        assert (masks["heart"] & lungs).sum() <= 0.01 * masks["heart"].sum(), seed
        # Clavicles cross the apices: they overlap their lung, high in the image.
        for side in ("left", "right"):
            clavicle, lung = masks[f"{side}_clavicle"], masks[f"{side}_lung"]
            assert (clavicle & lung).sum() > 0.5 * clavicle.sum(), (seed, side)
            assert centre[f"{side}_clavicle"][0] < centre["heart"][0], (seed, side)
            assert centre[f"{side}_clavicle"][0] < 0.35 * height, (seed, side)
        assert centre["right_clavicle"][1] < width / 2 < centre["left_clavicle"][1], seed


def test_display_polarity_air_dark_tissue_bright(phantoms) -> None:
    for seed, (image, masks) in phantoms.items():
        lungs = masks["left_lung"] | masks["right_lung"]
        lung_mean = image[lungs].mean()
        assert lung_mean + 0.1 < image[masks["heart"]].mean(), seed
        # Spine / mediastinum: the middle columns above the heart, outside the lungs.
        height, width = image.shape
        top = int(np.nonzero(masks["heart"].any(axis=1))[0].min())
        band = np.zeros_like(lungs)
        band[top // 2 : top, width // 2 - width // 40 : width // 2 + width // 40] = True
        assert lung_mean + 0.1 < image[band & ~lungs].mean(), seed


@pytest.mark.parametrize("shape", [(512, 448), (300, 420), (96, 80)])
def test_non_square_shapes(shape: tuple[int, int]) -> None:
    image, masks = render_phantom(11, shape)
    assert image.shape == shape and image.dtype == np.float32
    for name in SCR_STRUCTURES:
        assert masks[name].shape == shape and masks[name].any(), name
    width = shape[1]
    assert _centroid(masks["right_lung"])[1] < width / 2 < _centroid(masks["left_lung"])[1]


def _read_gif(path: Path) -> np.ndarray:
    with Image.open(path) as gif:
        assert gif.mode == "L"
        return np.asarray(gif)


def test_write_phantom_dataset(tmp_path: Path) -> None:
    shape, seed = (96, 80), 5
    calls: list[tuple[int, int]] = []
    ids = write_phantom_dataset(tmp_path / "ds", 3, seed, shape=shape, pixel_spacing_mm=0.7,
                                progress=lambda done, total: calls.append((done, total)))
    assert ids == ["PHANTOM0001", "PHANTOM0002", "PHANTOM0003"]
    assert calls == [(1, 3), (2, 3), (3, 3)]

    photometrics = set()
    for index, case_id in enumerate(ids, start=1):
        ds = pydicom.dcmread(tmp_path / "ds" / "images" / f"{case_id}.dcm")
        assert ds.preamble == b"\x00" * 128
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.SOPClassUID == ComputedRadiographyImageStorage
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.Modality == "CR" and ds.ViewPosition == "PA" and ds.BodyPartExamined == "CHEST"
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, 12, 11, 0)
        assert [float(v) for v in ds.PixelSpacing] == [0.7, 0.7]
        assert [float(v) for v in ds.ImagerPixelSpacing] == [0.7, 0.7]
        assert "WindowCenter" in ds and "WindowWidth" in ds
        assert str(ds.PatientName) == f"Phantom^Secret{index}"
        assert ds.PatientID == f"SECRETID{index:05d}"
        photometrics.add(ds.PhotometricInterpretation)

        stored = ds.pixel_array
        assert stored.shape == shape and stored.max() <= 4095
        # Stored values are the rendered phantom, inverted for MONOCHROME1.
        image, masks = render_phantom(case_seed(seed, index), shape)
        display = 4095 - stored if ds.PhotometricInterpretation == "MONOCHROME1" else stored
        np.testing.assert_array_equal(display, np.round(image * 4095).astype(np.uint16))
        for name in SCR_STRUCTURES:
            gif = _read_gif(tmp_path / "ds" / "masks" / name / f"{case_id}.gif")
            assert gif.shape == shape
            assert set(np.unique(gif)) <= {0, 255}
            np.testing.assert_array_equal(gif == 255, masks[name])
    assert photometrics == {"MONOCHROME1", "MONOCHROME2"}

    # No temporary files left behind.
    assert not [p for p in (tmp_path / "ds").rglob("*") if p.name.startswith(".")]

    # Case k does not depend on n; UIDs are deterministic, so files are byte-identical.
    write_phantom_dataset(tmp_path / "ds2", 2, seed, shape=shape)
    for case_id in ids[:2]:
        assert (tmp_path / "ds2" / "images" / f"{case_id}.dcm").read_bytes() == (
            tmp_path / "ds" / "images" / f"{case_id}.dcm"
        ).read_bytes()


def test_interrupted_write_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(medseg.atomic.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_phantom_dataset(tmp_path, 1, 0, shape=(64, 64))
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


# Overlay colours of phantoms and known masks: tests/test_visualise.py (medseg's own overlay_rgb).
