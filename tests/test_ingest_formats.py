"""JSRT .IMG, PNG/TIFF rasters, SCR-layout masks and label images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medseg.errors import InputError
from medseg.ingest import ReadOptions, image_format, load_image
from medseg.ingest.jsrt import JSRT_BYTES
from medseg.ingest.masks import check_mask_geometry, read_label_image, read_scr_masks
from medseg.nifti import load_nifti_2d, save_nifti_2d
from medseg.structures import SCR_STRUCTURES


def write_jsrt_img(path: Path, stored: np.ndarray) -> Path:
    """A JSRT .IMG per the spec: headerless 2048x2048 big-endian uint16."""
    assert stored.shape == (2048, 2048)
    stored.astype(">u2").tofile(path)
    return path


def test_jsrt_img_read_and_inverted(tmp_path):
    stored = np.zeros((2048, 2048), dtype=np.uint16)
    stored[:, :1024] = 4000  # dense (white-is-zero -> dark) left half
    stored[100, 200] = 1234
    image = load_image(write_jsrt_img(tmp_path / "JPCLN001.IMG", stored))
    assert image.source_format == "jsrt"
    assert image.shape == (2048, 2048)
    assert image.pixels.dtype == np.float32
    assert image.spacing_mm == (0.175, 0.175)
    assert Path(image.source).name == "JPCLN001.IMG"
    # White is zero: stored 4000 becomes 95, stored 0 becomes 4095.
    assert image.pixels[0, 0] == 4095 - 4000
    assert image.pixels[0, 2047] == 4095
    assert image.pixels[100, 200] == 4095 - 1234


def test_jsrt_img_big_endian(tmp_path):
    stored = np.full((2048, 2048), 0x0102, dtype=np.uint16)
    image = load_image(write_jsrt_img(tmp_path / "a.img", stored))
    assert image.pixels[5, 5] == 4095 - 0x0102  # little-endian reading would give 0x0201


def test_jsrt_img_wrong_size_is_refused(tmp_path):
    path = tmp_path / "JPCNN002.IMG"
    path.write_bytes(b"\0" * (JSRT_BYTES - 2))
    with pytest.raises(InputError) as err:
        load_image(path)
    assert str(path) in str(err.value)
    assert "8388608 bytes" in str(err.value) and str(JSRT_BYTES - 2) in str(err.value)


def test_jsrt_img_more_than_12_bits_is_refused(tmp_path):
    stored = np.zeros((2048, 2048), dtype=np.uint16)
    stored[0, 0] = 60000
    with pytest.raises(InputError, match="12 bits"):
        load_image(write_jsrt_img(tmp_path / "x.IMG", stored))


@pytest.mark.parametrize("suffix, dtype", [(".png", np.uint8), (".png", np.uint16), (".tif", np.uint16), (".tiff", np.uint8)])
def test_raster_bit_depths_and_inversion(tmp_path, suffix, dtype):
    top = np.iinfo(dtype).max
    stored = np.zeros((60, 40), dtype=dtype)
    stored[:30] = top  # upper half white as stored
    path = tmp_path / f"img{suffix}"
    Image.fromarray(stored).save(path)
    plain = load_image(path, ReadOptions(invert=False, pixel_spacing_mm=0.35))
    inverted = load_image(path, ReadOptions(invert=True, pixel_spacing_mm=0.35))
    assert plain.shape == (60, 40)
    assert plain.spacing_mm == (0.35, 0.35)
    assert plain.pixels[0, 0] == top and plain.pixels[-1, 0] == 0
    assert inverted.pixels[0, 0] == 0 and inverted.pixels[-1, 0] == top


def test_jpeg_reads(tmp_path):
    stored = np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (48, 1))
    path = tmp_path / "scan.jpg"
    Image.fromarray(stored).save(path, quality=95)
    image = load_image(path)
    assert image.shape == (48, 64)
    assert abs(float(image.pixels[:, -1].mean()) - 255) < 8


def test_colour_png_is_refused(tmp_path):
    rgb = np.zeros((10, 10, 3), dtype=np.uint8)
    rgb[..., 0] = 200
    path = tmp_path / "colour.png"
    Image.fromarray(rgb).save(path)
    with pytest.raises(InputError, match="colour"):
        load_image(path)


def test_garbage_png_is_refused(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(InputError) as err:
        load_image(path)
    assert str(path) in str(err.value)
    # Text named .png: the problem in words, not Pillow's file-object repr.
    text = tmp_path / "notes.png"
    text.write_text("minutes of the meeting")
    with pytest.raises(InputError, match="not an image file Pillow can decode") as err:
        load_image(text)
    assert "BufferedReader" not in str(err.value)


def test_format_dispatch():
    assert image_format("a/b/JPCLN001.IMG") == "jsrt"
    assert image_format("x.PNG") == "raster"
    assert image_format("IM000001") == "dicom"
    assert image_format("x.dcm") == "dicom"


def write_scr_case(root: Path, case_id: str, shape=(64, 64), skip=()) -> dict[str, np.ndarray]:
    masks = {}
    for i, name in enumerate(SCR_STRUCTURES):
        mask = np.zeros(shape, dtype=np.uint8)
        mask[5 + i : 20 + i, 5 + 3 * i : 30] = 255
        masks[name] = mask > 0
        if name in skip:
            continue
        (root / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(root / name / f"{case_id}.gif")
    return masks


def test_scr_layout_read(tmp_path):
    expected = write_scr_case(tmp_path, "JPCLN001")
    masks, root = read_scr_masks(tmp_path, "JPCLN001", SCR_STRUCTURES, "img.png")
    assert root == tmp_path
    for name in SCR_STRUCTURES:
        assert masks[name].dtype == bool
        assert np.array_equal(masks[name], expected[name])


def test_scr_missing_structure_names_image_and_structure(tmp_path):
    write_scr_case(tmp_path, "JPCLN003", skip=("left_clavicle",))
    with pytest.raises(InputError) as err:
        read_scr_masks(tmp_path, "JPCLN003", SCR_STRUCTURES, "/data/images/JPCLN003.png")
    message = str(err.value)
    assert message.startswith("/data/images/JPCLN003.png")
    assert "left_clavicle" in message and "without its mask" in message


def test_non_binary_mask_refused(tmp_path):
    write_scr_case(tmp_path, "C1")
    Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64).astype(np.uint8)).save(tmp_path / "heart" / "C1.gif")
    with pytest.raises(InputError, match="not a binary mask"):
        read_scr_masks(tmp_path, "C1", SCR_STRUCTURES, "img")


def test_mask_geometry_rules():
    check_mask_geometry("a", (2048, 2048), (1024, 1024))  # SCR masks for a JSRT .IMG
    check_mask_geometry("a", (512, 448), (512, 448))
    with pytest.raises(InputError, match="does not match"):
        check_mask_geometry("a.dcm", (512, 448), (512, 512))
    with pytest.raises(InputError, match="does not match"):
        check_mask_geometry("a.dcm", (1000, 1000), (300, 300))


@pytest.mark.parametrize("suffix", [".png", ".nii.gz"])
def test_label_image(tmp_path, suffix):
    labels = np.zeros((40, 30), dtype=np.uint8)
    labels[5:10] = 1
    labels[20:30, :10] = 2
    if suffix == ".png":
        Image.fromarray(labels).save(tmp_path / f"case7{suffix}")
    else:
        save_nifti_2d(tmp_path / f"case7{suffix}", labels, (0.5, 0.5))
    masks, source = read_label_image(tmp_path, "case7", {1: "heart", 2: "left_lung"}, "img")
    assert source.name == f"case7{suffix}"
    assert masks["heart"].shape == (40, 30)
    assert masks["heart"].sum() == 5 * 30
    assert masks["left_lung"].sum() == 100


def test_nifti_round_trip_keeps_orientation_and_spacing(tmp_path):
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    save_nifti_2d(tmp_path / "a.nii.gz", array, (0.7, 0.35))
    back, spacing = load_nifti_2d(tmp_path / "a.nii.gz")
    assert np.array_equal(back, array)
    assert spacing == pytest.approx((0.7, 0.35))
    assert not list(tmp_path.glob(".tmp-*"))  # atomic write leaves no temp file
    # A label stack: NIfTI's x = columns, y = rows, channels on the vector axis
    # (what README says a viewer sees), label names in descrip.
    import nibabel as nib

    stack = np.zeros((3, 4, 2), dtype=np.uint8)
    stack[0, 3, 1] = 1  # row 0, column 3, second label
    save_nifti_2d(tmp_path / "s.nii.gz", stack, (0.7, 0.35), description="labels: heart,lungs")
    img = nib.load(str(tmp_path / "s.nii.gz"))
    assert img.shape == (4, 3, 1, 1, 2) and np.asarray(img.dataobj)[3, 0, 0, 0, 1] == 1
    assert img.header.get_intent()[0] == "vector"
    assert img.header["descrip"].tobytes().rstrip(b"\0") == b"labels: heart,lungs"
    back, _ = load_nifti_2d(tmp_path / "s.nii.gz")
    assert np.array_equal(back, stack)


# --------------------------------------------------------------------------- what a folder walk reads


def test_folder_walk_skips_files_that_are_not_images_by_name(tmp_path, caplog):
    """Stray files in an export folder (notes, Windows / macOS litter, a
    DICOMDIR) are skipped and counted in one log line, not failed; files
    without an extension are still inputs (DICOM); named explicitly, such a
    file is an input that fails, saying it is not an image."""
    import logging

    from dicom_factory import make_dicom, synthetic_image
    from medseg.ingest.inputs import collect_inputs

    folder = tmp_path / "export"
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(folder / "scan.png")
    make_dicom(folder / "sub" / "IM0001", synthetic_image(8, 8))  # PACS style: no extension
    (folder / "1.2.840.10008.5").write_bytes(b"not dicom either")  # UID-like name: tried, fails later
    stray = {"notes.txt": b"hello", ".DS_Store": b"\0\0\0\1Bud1", "sub/Thumbs.db": b"\xd0\xcf\x11\xe0",
             "DICOMDIR": b"not a real one", "report.PDF": b"%PDF-1.4", "sub/._IM0001": b"\0\5\26\7"}
    for name, data in stray.items():
        (folder / name).write_bytes(data)
    with caplog.at_level(logging.INFO, logger="medseg"):
        inputs = collect_inputs([folder])
    assert sorted(f.name for f in inputs.files) == ["1.2.840.10008.5", "scan.png", "sub/IM0001"]
    assert sorted(Path(s.file).relative_to(folder).as_posix() for s in inputs.skipped) == sorted(stray)
    lines = [r.getMessage() for r in caplog.records if "not images" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("skipped 6 files that are not images: "), lines
    assert "notes.txt" in lines[0] and "sub/Thumbs.db" in lines[0] and "DICOMDIR" in lines[0]
    assert not [r for r in caplog.records if r.levelname in ("WARNING", "ERROR")]

    explicit = collect_inputs([folder / "sub" / "Thumbs.db"])
    assert [f.name for f in explicit.files] == ["Thumbs.db"] and not explicit.skipped
    with pytest.raises(InputError) as err:
        load_image(folder / "sub" / "Thumbs.db")
    assert str(folder / "sub" / "Thumbs.db") in str(err.value) and "not an image: a .db file" in str(err.value)
