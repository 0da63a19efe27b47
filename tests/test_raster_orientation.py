"""EXIF orientation (issue 9, part 3a): PNG / JPEG / TIFF radiographs, masks
and label images with an Orientation tag are read upright, as every viewer
shows them, and the orientation applied is recorded.

Stored pixels are built from the upright picture with numpy by the EXIF
definitions (not by Pillow), so the tests check the meaning of the tag:

- 3: stored upside down (rotated 180 degrees);
- 6: "row 0 is the visual right side, column 0 the visual top": the stored
  picture is the upright one turned 90 degrees counter-clockwise, and a
  viewer turns it 90 degrees clockwise;
- 8: "row 0 is the visual left side, column 0 the visual bottom": the
  mirror case, stored turned 90 degrees clockwise.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import ExifTags, Image

from medseg.ingest import ReadOptions, load_image
from medseg.ingest.masks import read_label_image, read_scr_masks
from medseg.ingest.raster import read_raster_pixels
from medseg.nifti import load_nifti_2d
from medseg.phantoms.anatomy import render_phantom
from medseg.structures import SCR_STRUCTURES

MEDSEG = [sys.executable, "-m", "medseg"]


def stored_for(upright: np.ndarray, orientation: int) -> np.ndarray:
    """The pixels a file tagged ``orientation`` stores for ``upright`` (H, W)."""
    stored = {
        1: upright,
        2: upright[:, ::-1],
        3: np.rot90(upright, 2),
        4: upright[::-1],
        5: upright.T,
        6: np.rot90(upright, 1),  # stored[i, j] = upright[j, W-1-i]
        7: np.rot90(upright, 2).T,
        8: np.rot90(upright, -1),  # stored[i, j] = upright[H-1-j, i]
    }[orientation]
    return np.ascontiguousarray(stored)


def exif_with(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    return exif


def asymmetric(dtype, shape=(48, 32)) -> np.ndarray:
    """Smooth (JPEG-friendly), non-square and with no symmetry: a ramp
    steeper down than across, so every turn and mirror changes it."""
    rows, cols = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float64)
    ramp = (3.0 * rows + 1.5 * cols) / (3.0 * (shape[0] - 1) + 1.5 * (shape[1] - 1))
    top = 255 if dtype == np.uint8 else 65535
    return np.round(20 + ramp * (top - 40)).astype(dtype)


def write_tagged(path: Path, upright: np.ndarray, orientation: int, **save) -> Path:
    Image.fromarray(stored_for(upright, orientation)).save(path, exif=exif_with(orientation), **save)
    return path


# --------------------------------------------------------------------------- radiographs


@pytest.mark.parametrize("orientation", [3, 6, 8])
@pytest.mark.parametrize("suffix, dtype, save", [
    (".png", np.uint8, {}),
    (".png", np.uint16, {}),
    (".tif", np.uint8, {}),
    (".tif", np.uint16, {}),  # uncompressed: Pillow memory-maps these when opened by path
    (".tiff", np.uint16, {"compression": "tiff_deflate"}),
])
def test_lossless_formats_read_upright_exactly(tmp_path, suffix, dtype, save, orientation):
    upright = asymmetric(dtype)
    path = write_tagged(tmp_path / f"scan{suffix}", upright, orientation, **save)
    image = load_image(path, ReadOptions(pixel_spacing_mm=0.5))
    assert image.shape == upright.shape
    assert np.array_equal(image.pixels, upright.astype(np.float32))
    assert image.extra["exif_orientation"] == orientation
    assert image.extra["bits"] == (8 if dtype == np.uint8 else 16)
    assert image.photometric.startswith("black-is-zero; EXIF orientation %d applied" % orientation)


def test_tiff_orientation_tag_without_exif_block(tmp_path):
    """A TIFF carries the orientation as its own baseline tag (274)."""
    upright = asymmetric(np.uint16)
    path = tmp_path / "scan.tif"
    Image.fromarray(stored_for(upright, 6)).save(path, tiffinfo={274: 6})
    image = load_image(path)
    assert np.array_equal(image.pixels, upright.astype(np.float32))
    assert image.extra["exif_orientation"] == 6


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_jpeg_reads_upright(tmp_path, orientation):
    upright = asymmetric(np.uint8)
    path = write_tagged(tmp_path / "scan.jpg", upright, orientation, quality=95)
    image = load_image(path)
    assert image.shape == upright.shape
    error = np.abs(image.pixels - upright.astype(np.float32))
    assert error.max() <= 6  # JPEG at quality 95 on a smooth ramp
    # ... and far from the readings of the same size that are wrong: upside
    # down (3 ignored, or 6 and 8 confused) or mirrored.
    for wrong in (np.rot90(upright, 2), upright[::-1], upright[:, ::-1]):
        assert np.abs(image.pixels - wrong.astype(np.float32)).mean() > 10 * error.mean() + 5
    assert image.extra["exif_orientation"] == orientation
    assert "EXIF orientation %d applied" % orientation in image.photometric


@pytest.mark.parametrize("orientation", [2, 4, 5, 7])
def test_mirroring_orientations(tmp_path, orientation):
    upright = asymmetric(np.uint8)
    image = load_image(write_tagged(tmp_path / "scan.png", upright, orientation))
    assert np.array_equal(image.pixels, upright.astype(np.float32))
    assert image.extra["exif_orientation"] == orientation


def test_orientation_1_and_no_tag(tmp_path):
    upright = asymmetric(np.uint8)
    tagged = load_image(write_tagged(tmp_path / "one.png", upright, 1))
    assert np.array_equal(tagged.pixels, upright.astype(np.float32))
    assert tagged.extra["exif_orientation"] == 1 and tagged.photometric == "black-is-zero"
    Image.fromarray(upright).save(tmp_path / "plain.png")
    plain = load_image(tmp_path / "plain.png")
    assert "exif_orientation" not in plain.extra and plain.photometric == "black-is-zero"


def test_inversion_applies_after_orientation(tmp_path):
    upright = asymmetric(np.uint16)
    image = load_image(write_tagged(tmp_path / "scan.png", upright, 6), ReadOptions(invert=True))
    assert np.array_equal(image.pixels, 65535 - upright.astype(np.float32))
    assert image.photometric == "white-is-zero (inverted); EXIF orientation 6 applied (rotated 90 degrees clockwise)"


# --------------------------------------------------------------------------- masks and label images


def test_masks_and_label_images_are_read_upright_too(tmp_path):
    """A mask is drawn and checked in a viewer: it is upright as shown."""
    mask = np.zeros((48, 32), dtype=np.uint8)
    mask[5:20, 3:12] = 255  # top left as seen
    for name in SCR_STRUCTURES:
        (tmp_path / "scr" / name).mkdir(parents=True)
        write_tagged(tmp_path / "scr" / name / "C1.png", mask, 6)
    masks, _ = read_scr_masks(tmp_path / "scr", "C1", SCR_STRUCTURES, "C1.png")
    assert all(np.array_equal(m, mask > 0) for m in masks.values())

    labels = np.zeros((48, 32), dtype=np.uint8)
    labels[5:20, 3:12] = 1
    labels[30:40, 20:30] = 2
    stored = Image.fromarray(stored_for(labels, 8), mode="P")
    stored.putpalette([v for i in range(256) for v in (min(50 * i, 255),) * 3])
    (tmp_path / "lab").mkdir()
    stored.save(tmp_path / "lab" / "C1.png", exif=exif_with(8))
    assert read_raster_pixels(tmp_path / "lab" / "C1.png", "label image").exif_orientation == 8
    split, _ = read_label_image(tmp_path / "lab", "C1", {1: "heart", 2: "left_lung"}, "C1.png")
    assert np.array_equal(split["heart"], labels == 1) and np.array_equal(split["left_lung"], labels == 2)


# --------------------------------------------------------------------------- end to end


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*MEDSEG, *args], capture_output=True, text=True)


def test_preprocess_of_exif_rotated_png_lines_up_with_upright_masks(tmp_path):
    """Done-when "upright masks for the EXIF case": a phantom stored turned
    with EXIF Orientation 6 preprocesses to exactly what the upright PNG
    gives, against the same upright SCR masks (non-square, so a sideways
    read could not even pass the mask-size check)."""
    image, truth = render_phantom(11, (160, 128))
    upright = np.round(image * 255).astype(np.uint8)
    for name in SCR_STRUCTURES:
        (tmp_path / "masks" / name).mkdir(parents=True)
        Image.fromarray(truth[name].astype(np.uint8) * 255, mode="L").save(
            tmp_path / "masks" / name / "CASE1.gif", optimize=False)
    for folder, orientation in (("upright", None), ("exif", 6), ("exif8", 8)):
        (tmp_path / folder).mkdir()
        if orientation is None:
            Image.fromarray(upright).save(tmp_path / folder / "CASE1.png")
        else:
            write_tagged(tmp_path / folder / "CASE1.png", upright, orientation)
    # Control: the same turned pixels without the tag do not fit the masks.
    (tmp_path / "untagged").mkdir()
    Image.fromarray(stored_for(upright, 6)).save(tmp_path / "untagged" / "CASE1.png")

    from medseg.ingest.types import ReadOptions
    from medseg.preprocessing.preprocess import DatasetSpec, PreprocessSettings, preprocess_dataset

    outputs = {}
    for folder in ("upright", "exif", "exif8", "untagged"):
        out = tmp_path / f"pre-{folder}"
        spec = DatasetSpec(tmp_path / folder, tmp_path / "masks", read_options=ReadOptions(pixel_spacing_mm=0.7))
        outputs[folder] = (preprocess_dataset(spec, PreprocessSettings(size=64), out), out)
    result, _ = outputs["untagged"]
    assert not result.rows and "does not match" in result.failures[0].problem

    reference_image, _ = load_nifti_2d(outputs["upright"][1] / "images" / "CASE1.nii.gz")
    reference_label, _ = load_nifti_2d(outputs["upright"][1] / "labels" / "CASE1.nii.gz")
    assert reference_label.any()
    for folder, orientation in (("exif", 6), ("exif8", 8)):
        result, out = outputs[folder]
        assert not result.failures, result.failures
        image_out, _ = load_nifti_2d(out / "images" / "CASE1.nii.gz")
        label_out, _ = load_nifti_2d(out / "labels" / "CASE1.nii.gz")
        assert np.array_equal(image_out, reference_image)
        assert np.array_equal(label_out, reference_label)
        manifest = (out / "manifest.csv").read_text()
        assert f"EXIF orientation {orientation} applied" in manifest

    # `medseg ingest` reports the turned file upright, and says so.
    proc = _run("ingest", str(tmp_path / "exif" / "CASE1.png"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["shape"] == [160, 128]
    assert "EXIF orientation 6 applied (rotated 90 degrees clockwise)" in record["photometric"]


def test_predict_on_exif_rotated_jpeg_gives_upright_masks_and_the_same_ctr(model_and_scans, tmp_path):
    """The issue's case: a JPEG stored sideways with EXIF Orientation 6 is
    segmented upright, with the CTR of the upright scan."""
    import pandas as pd

    from medseg.ingest import load_image
    from medseg.preprocessing.intensity import normalise_intensity

    model, scans = model_and_scans
    image = load_image(sorted(scans.iterdir())[0])  # 160x128 phantom, display polarity
    upright = np.round(normalise_intensity(image.pixels) * 255).astype(np.uint8)
    (tmp_path / "in").mkdir()
    Image.fromarray(upright).save(tmp_path / "in" / "upright.jpg", quality=95)
    write_tagged(tmp_path / "in" / "turned.jpg", upright, 6, quality=95)
    out = tmp_path / "out"
    proc = _run("predict", str(tmp_path / "in"), "--model", str(model), "--out", str(out),
                "--pixel-spacing", str(image.spacing_mm[0]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pd.read_csv(out / "results.csv").set_index("case_id")
    assert (table.at["turned", "rows"], table.at["turned", "cols"]) == upright.shape
    assert table.at["turned", "ctr"] == pytest.approx(table.at["upright", "ctr"], abs=0.01)
    for label in ("heart", "lungs"):
        with Image.open(out / "turned" / "masks" / f"{label}.png") as a, \
                Image.open(out / "upright" / "masks" / f"{label}.png") as b:
            turned, plain = np.asarray(a) > 0, np.asarray(b) > 0
        assert turned.shape == plain.shape == upright.shape
        assert 2 * (turned & plain).sum() / (turned.sum() + plain.sum()) > 0.95, label
