"""Label images (issue 9, part 4): palette PNGs read by index, colour label
images refused as label images, label values that never occur warned
about, and labels absent from every truth said so in the summary.

The predictions are written by hand from phantom truth masks with known
perturbations, so the expected Dice is exact: scored against the palette
label image it must equal the Dice against the same truth in SCR layout.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medseg.errors import InputError
from medseg.evaluation.evaluate import resample_to
from medseg.evaluation.metrics import segmentation_metrics
from medseg.ingest import load_image
from medseg.ingest.masks import read_label_image, read_scr_masks
from medseg.nifti import save_nifti_2d
from medseg.phantoms.anatomy import render_phantom
from medseg.structures import DEFAULT_LABELS, SCR_STRUCTURES

MEDSEG = [sys.executable, "-m", "medseg"]
SHAPE = (128, 112)
SPACING = (0.8, 0.8)
# Painted in this order, later over earlier: the clavicles lie over the
# lungs, and a label image holds one value per pixel.
VALUES = {1: "heart", 2: "left_lung", 3: "right_lung", 4: "left_clavicle", 5: "right_clavicle"}
LABEL_VALUES_ARG = ",".join(f"{v}={name}" for v, name in VALUES.items())
CASES = {"CASE1": 3, "CASE2": 8}  # case -> phantom seed


def grey_palette() -> list[int]:
    """Index i drawn as grey 50*i (capped at 255): what the issue's files use."""
    return [v for i in range(256) for v in (min(50 * i, 255),) * 3]


def label_array(truth: dict[str, np.ndarray], values: dict[int, str] = VALUES) -> np.ndarray:
    labels = np.zeros(next(iter(truth.values())).shape, dtype=np.uint8)
    for value, name in values.items():
        labels[truth[name]] = value
    return labels


def save_palette_png(path: Path, labels: np.ndarray) -> Path:
    img = Image.fromarray(labels, mode="P")
    img.putpalette(grey_palette())
    img.save(path)
    with Image.open(path) as check:
        assert check.mode == "P"  # the case of the issue, not an "L" PNG
    return path


# --------------------------------------------------------------------------- reading


def test_palette_label_image_is_read_by_index(tmp_path):
    _, truth = render_phantom(3, SHAPE)
    labels = label_array(truth)
    save_palette_png(tmp_path / "C1.png", labels)
    masks, source = read_label_image(tmp_path, "C1", VALUES, "C1.dcm")
    assert source == tmp_path / "C1.png"
    for value, name in VALUES.items():
        assert masks[name].dtype == bool
        assert np.array_equal(masks[name], labels == value), name
        assert masks[name].any(), name


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_greyscale_label_images_read_as_stored(tmp_path, dtype):
    labels = np.zeros((40, 30), dtype=dtype)
    labels[5:10] = 1
    labels[20:30, :10] = 1000 if dtype == np.uint16 else 2
    Image.fromarray(labels).save(tmp_path / "C1.png")
    second = 1000 if dtype == np.uint16 else 2
    masks, _ = read_label_image(tmp_path, "C1", {1: "heart", second: "left_lung"}, "img")
    assert masks["heart"].sum() == 5 * 30 and masks["left_lung"].sum() == 100


def test_several_values_for_one_structure_are_united(tmp_path):
    labels = np.zeros((20, 20), dtype=np.uint8)
    labels[:5] = 1
    labels[10:] = 6
    Image.fromarray(labels).save(tmp_path / "C1.png")
    masks, _ = read_label_image(tmp_path, "C1", {1: "heart", 6: "heart"}, "img")
    assert masks["heart"].sum() == 15 * 20


def test_colour_label_image_is_refused_as_a_label_image(tmp_path):
    rgb = np.zeros((20, 20, 3), dtype=np.uint8)
    rgb[:5, :, 0] = 255  # red heart
    rgb[10:, :, 1] = 255  # green lung
    Image.fromarray(rgb).save(tmp_path / "C1.png")
    with pytest.raises(InputError) as err:
        read_label_image(tmp_path, "C1", {1: "heart"}, "img")
    message = str(err.value)
    assert message.startswith(str(tmp_path / "C1.png"))
    assert "colour label image (mode RGB)" in message
    assert "one integer value per structure" in message
    assert "radiograph" not in message
    # A grey RGB label image holds one value per pixel: read as its grey.
    grey = np.repeat(np.where(np.arange(20)[:, None] < 5, 1, 0).astype(np.uint8)[..., None], 3, axis=2)
    grey = np.broadcast_to(grey, (20, 20, 3)).copy()
    Image.fromarray(grey).save(tmp_path / "C2.png")
    masks, _ = read_label_image(tmp_path, "C2", {1: "heart"}, "img")
    assert masks["heart"].sum() == 5 * 20


def test_refusal_wording_fits_what_is_read(tmp_path):
    rgb = np.zeros((20, 20, 3), dtype=np.uint8)
    rgb[..., 0] = 200
    Image.fromarray(rgb).save(tmp_path / "colour.png")
    with pytest.raises(InputError, match="radiographs must be greyscale"):
        load_image(tmp_path / "colour.png")
    for name in SCR_STRUCTURES:
        (tmp_path / "scr" / name).mkdir(parents=True)
        Image.fromarray(rgb).save(tmp_path / "scr" / name / "C1.png")
    with pytest.raises(InputError, match="masks must be greyscale") as err:
        read_scr_masks(tmp_path / "scr", "C1", SCR_STRUCTURES, "img")
    assert "radiograph" not in str(err.value)


def test_palette_radiograph_is_still_read_through_its_palette(tmp_path):
    """A palette radiograph is a picture: its grey levels are the palette's."""
    indices = np.tile(np.arange(6, dtype=np.uint8), (4, 1))
    save_palette_png(tmp_path / "scan.png", indices)
    assert np.array_equal(load_image(tmp_path / "scan.png").pixels, np.minimum(50 * indices, 255).astype(np.float32))


# --------------------------------------------------------------------------- end to end


def _label_groups_at(truth: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {label: np.logical_or.reduce([truth[s] for s in group]) for label, group in DEFAULT_LABELS.items()}


def _write_prediction(pred_dir: Path, case_id: str, masks: dict[str, np.ndarray], source: Path) -> None:
    case = pred_dir / case_id
    case.mkdir(parents=True)
    names = list(masks)
    save_nifti_2d(case / "labels.nii.gz", np.stack([masks[n] for n in names], axis=-1).astype(np.uint8), SPACING)
    (case / "prediction.json").write_text(json.dumps({
        "case_id": case_id, "labels": names, "source": str(source), "spacing_mm": list(SPACING),
        "original_shape": list(SHAPE), "model_uri": "models:/test/1",
    }))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict:
    """Two phantom cases: radiograph PNGs, truth as palette label images
    (``labels/``), the same truth in SCR layout (``scr/``), label images
    without clavicles (``noclav/``), and predictions with known errors: the
    heart shifted 3 px right, the lungs eroded by a 1-px border, the
    clavicles exact."""
    from scipy import ndimage

    tmp = tmp_path_factory.mktemp("labels")
    expected: dict[tuple[str, str], float] = {}
    for sub in ("images", "labels", "noclav", "pred"):
        (tmp / sub).mkdir()
    for case_id, seed in CASES.items():
        image, phantom = render_phantom(seed, SHAPE)
        Image.fromarray(np.round(image * 255).astype(np.uint8)).save(tmp / "images" / f"{case_id}.png")
        labels = label_array(phantom)
        save_palette_png(tmp / "labels" / f"{case_id}.png", labels)
        save_palette_png(tmp / "noclav" / f"{case_id}.png",
                         label_array(phantom, {v: n for v, n in VALUES.items() if "clavicle" not in n}))
        # SCR layout of exactly what the label image encodes.
        truth = {name: labels == value for value, name in VALUES.items()}
        for name, mask in truth.items():
            (tmp / "scr" / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(tmp / "scr" / name / f"{case_id}.gif",
                                                                          optimize=False)
        groups = _label_groups_at(truth)
        pred = {
            "heart": np.roll(groups["heart"], 3, axis=1),
            "lungs": ndimage.binary_erosion(groups["lungs"]),
            "clavicles": groups["clavicles"].copy(),
        }
        _write_prediction(tmp / "pred", case_id, pred, tmp / "images" / f"{case_id}.png")
        for label in DEFAULT_LABELS:
            expected[case_id, label] = segmentation_metrics(resample_to(pred[label], SHAPE), groups[label],
                                                            SPACING)["dice"]
    return {"tmp": tmp, "expected": expected}


def _evaluate(dataset: dict, truth: str, out: str, *extra: str) -> tuple[subprocess.CompletedProcess, pd.DataFrame]:
    tmp = dataset["tmp"]
    proc = subprocess.run([*MEDSEG, "evaluate", "--predictions", str(tmp / "pred"), "--truth", str(tmp / truth),
                           "--no-mlflow", "--out", str(tmp / out), *extra], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, pd.read_csv(tmp / out / "cases.csv")


def _dice(table: pd.DataFrame) -> dict[tuple[str, str], float]:
    return {(r.case_id, r.label): float(r.dice) for r in table.itertuples()}


def test_palette_label_image_scores_as_scr_truth(dataset):
    """Done-when: "the Dice for the palette case"."""
    _, scr = _evaluate(dataset, "scr", "eval-scr")
    proc, palette = _evaluate(dataset, "labels", "eval-palette",
                              "--truth-format", "label_image", "--label-values", LABEL_VALUES_ARG)
    expected = dataset["expected"]
    assert set(_dice(palette)) == set(expected)
    for key, dice in _dice(palette).items():
        assert dice == pytest.approx(_dice(scr)[key], abs=1e-6), key
        assert dice == pytest.approx(expected[key], abs=5e-5), key  # cases.csv keeps 4 decimals
    assert all(expected[case, "heart"] > 0.8 and expected[case, "lungs"] > 0.8 for case in CASES)
    assert all(expected[case, "clavicles"] == 1.0 for case in CASES)
    assert np.isfinite(palette["hd95_mm"]).all()
    assert not palette["truth_empty"].any()
    assert "occurs in none" not in proc.stderr and "Absent from every" not in proc.stdout


def test_label_value_that_never_occurs_is_a_warning(dataset):
    proc, table = _evaluate(dataset, "labels", "eval-extra", "--truth-format", "label_image",
                            "--label-values", LABEL_VALUES_ARG + ",7=heart")
    assert "label value 7 (heart) occurs in none of the 2 label images" in proc.stderr
    assert "heart is empty" not in proc.stderr  # value 1 still gives the heart
    # 7 adds nothing to the heart: the scores stand.
    for key, dice in _dice(table).items():
        assert dice == pytest.approx(dataset["expected"][key], abs=5e-5)  # cases.csv keeps 4 decimals


def test_label_absent_from_every_truth_is_said_in_the_summary(dataset):
    proc, table = _evaluate(dataset, "noclav", "eval-noclav", "--truth-format", "label_image",
                            "--label-values", LABEL_VALUES_ARG)
    for value, name in ((4, "left_clavicle"), (5, "right_clavicle")):
        assert f"label value {value} ({name}) occurs in none of the 2 label images" in proc.stderr
        assert f"{name} is empty in every case" in proc.stderr
    note = "Absent from every ground-truth image (2 cases): clavicles."
    assert note in proc.stdout  # the comparison table `medseg evaluate` prints
    assert note in (dataset["tmp"] / "eval-noclav" / "summary.txt").read_text()
    summary = pd.read_csv(dataset["tmp"] / "eval-noclav" / "summary.csv", index_col="label")
    assert summary.loc["clavicles", "n_truth_empty"] == 2 and summary.loc["heart", "n_truth_empty"] == 0
    assert table.loc[table.label == "clavicles", "truth_empty"].all()


def test_preprocess_warns_about_a_label_value_that_never_occurs(dataset, tmp_path, caplog):
    from medseg.preprocessing.preprocess import DatasetSpec, PreprocessSettings, preprocess_dataset

    tmp = dataset["tmp"]
    spec = DatasetSpec(tmp / "images", tmp / "labels", mask_format="label_image",
                       label_values={**VALUES, 9: "right_lung"})
    with caplog.at_level(logging.WARNING):
        result = preprocess_dataset(spec, PreprocessSettings(size=32), tmp_path)
    assert len(result.rows) == len(CASES) and not result.failures
    warned = [r.getMessage() for r in caplog.records if "occurs in none" in r.getMessage()]
    assert len(warned) == 1 and "label value 9 (right_lung) occurs in none of the 2 label images" in warned[0]
