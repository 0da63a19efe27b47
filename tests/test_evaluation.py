"""Evaluation: metrics checked against hand computations, resampling between
prediction and ground-truth grids, a synthetic prediction folder scored end to
end, summaries, pictures and the MLflow evaluation run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medseg.evaluation.evaluate import (
    EvaluationLink,
    PUBLISHED_JACCARD,
    TABLE_COLUMNS,
    boxplot_figure,
    comparison_table,
    evaluate_predictions,
    is_jsrt_case_id,
    literature_comparison_reason,
    log_evaluation_to_mlflow,
    resample_to,
    rounded_for_csv,
    save_boxplots,
    scaled_spacing,
    summarise,
    write_evaluation,
)
from medseg.evaluation.metrics import segmentation_metrics
from medseg.nifti import save_nifti_2d
from medseg.structures import DEFAULT_LABELS, SCR_STRUCTURES
from medseg.tracking import client_for

# MONAI returns float32 distances between edge-pixel centres found exactly
# (KD-tree in float64), so the only error is float32 rounding (~1e-7 relative).
TOL = 1e-5


def square(top: int, left: int, size: int = 20, shape=(48, 48)) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[top:top + size, left:left + size] = True
    return mask


# --------------------------------------------------------------------------- metrics


def test_identical_masks_score_perfectly():
    m = segmentation_metrics(square(10, 10), square(10, 10), (0.5, 0.5))
    assert m == {"dice": 1.0, "jaccard": 1.0, "hd95_mm": 0.0, "assd_mm": 0.0}


def test_disjoint_masks_have_zero_overlap():
    """10x10 squares at (0, 0) and (30, 30), 1 mm pixels.

    Edges: each square's 36-pixel ring (the image border counts as outside).
    A ring pixel of A at (9 - i, 9 - j) has its nearest B edge pixel at B's
    corner (30, 30): distance sqrt((21 + i)^2 + (21 + j)^2), ring means i or j
    in {0, 9}. B -> A is the mirror image: the same 36 values.
    The largest, sorted: sqrt(30^2 + 30^2) (pixel (0, 0)), then
    sqrt(29^2 + 30^2) twice (pixels (0, 1) and (1, 0)), then
    sqrt(28^2 + 30^2) twice. HD95: rank 0.95 * 35 = 33.25 (linear) lies
    between the 34th and 35th values, both sqrt(29^2 + 30^2), so
    HD95 = sqrt(1741) = 41.725 mm. ASSD: the mean of the 36 distances.
    """
    m = segmentation_metrics(square(0, 0, 10), square(30, 30, 10), (1.0, 1.0))
    assert m["dice"] == 0.0 and m["jaccard"] == 0.0
    ring = [math.hypot(21 + i, 21 + j) for i in range(10) for j in range(10) if i in (0, 9) or j in (0, 9)]
    assert len(ring) == 36
    assert sorted(ring)[33] == sorted(ring)[34] == pytest.approx(math.sqrt(29**2 + 30**2), abs=1e-12)
    assert m["hd95_mm"] == pytest.approx(math.sqrt(29**2 + 30**2), abs=TOL)  # 41.725 mm
    assert m["assd_mm"] == pytest.approx(sum(ring) / 36, abs=TOL)  # 36.250 mm


def test_square_shifted_right_by_4px():
    """20x20 square vs the same square 4 columns to the right, 0.5 mm pixels.

    Overlap: 20x16 = 320 px of 400 each -> Dice 640/800 = 0.8, Jaccard 320/480.
    Edges (pixels with a 4-neighbour outside): the 76-pixel ring of each
    square. Distance from each ring pixel of A to the nearest ring pixel of B,
    in pixels:
      left column (18 px, rows 11..28): 4 each (B's left column);
      top and bottom rows (20 px each): columns 10..13 -> 4, 3, 2, 1; the
        other 16 lie on B's top/bottom row -> 0;
      right column (18 px, rows 11..28): min(4, r - 10, 29 - r) ->
        1, 2, 3, 4 x 12, 3, 2, 1.
    Multiset: 0 x 32, 1 x 4, 2 x 4, 3 x 4, 4 x 32 (76 values); B -> A is
    the mirror image, the same multiset.
    HD95: 95th percentile sits at rank 0.95 * 75 = 71.25 of the sorted
    values, inside the run of 4s (ranks 44..75) -> 4 px = 2.0 mm.
    ASSD: sum = 32*4 + 4*3 + 4*2 + 4*1 = 152 per direction; 152 / 76 = 2 px
    = 1.0 mm (both directions pooled, same mean).
    """
    m = segmentation_metrics(square(10, 14), square(10, 10), (0.5, 0.5))
    assert m["dice"] == pytest.approx(0.8, abs=1e-12)
    assert m["jaccard"] == pytest.approx(320 / 480, abs=1e-12)
    assert m["hd95_mm"] == pytest.approx(2.0, abs=TOL)
    assert m["assd_mm"] == pytest.approx(1.0, abs=TOL)


def test_anisotropic_spacing_is_honoured_per_axis():
    """Spacing (row 1.0 mm, column 0.5 mm).

    Shift of 4 columns: the same ring pairs as above, with column steps of
    0.5 mm and row steps of 1 mm. Left column 2.0 mm (18); top/bottom rows
    2.0, 1.5, 1.0, 0.5 then 0 (x16); right column min(2.0, r - 10, 29 - r)
    mm -> 1, 2 x 16, 1. Multiset: 0 x 32, 0.5 x 2, 1 x 4, 1.5 x 2, 2 x 36:
    HD95 2.0 mm, ASSD (1 + 4 + 3 + 72) / 76 = 80/76 mm.
    Shift of 4 rows: the largest distances are now 4 rows of 1 mm -> 4.0 mm,
    twice the column case; swapping (row, col) in the code would swap them.
    """
    right = segmentation_metrics(square(10, 14), square(10, 10), (1.0, 0.5))
    down = segmentation_metrics(square(14, 10), square(10, 10), (1.0, 0.5))
    assert right["hd95_mm"] == pytest.approx(2.0, abs=TOL)
    assert right["assd_mm"] == pytest.approx(80 / 76, abs=TOL)
    assert down["hd95_mm"] == pytest.approx(4.0, abs=TOL)
    assert right["dice"] == down["dice"] == pytest.approx(0.8)


def test_empty_masks():
    empty = np.zeros((16, 16), dtype=bool)
    both = segmentation_metrics(empty, empty, (1.0, 1.0))
    assert both == {"dice": 1.0, "jaccard": 1.0, "hd95_mm": 0.0, "assd_mm": 0.0}
    for pred, truth in ((empty, square(2, 2, 5, (16, 16))), (square(2, 2, 5, (16, 16)), empty)):
        one = segmentation_metrics(pred, truth, (1.0, 1.0))
        assert one["dice"] == 0.0 and one["jaccard"] == 0.0
        assert one["hd95_mm"] == math.inf and one["assd_mm"] == math.inf


def test_metrics_refuse_mismatched_shapes():
    with pytest.raises(ValueError, match="shape"):
        segmentation_metrics(np.zeros((4, 4), bool), np.zeros((4, 5), bool), (1, 1))


# --------------------------------------------------------------------------- resampling


def test_resample_to_enlarges_by_nearest_neighbour():
    mask = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 1]], dtype=bool)
    big = resample_to(mask, (6, 6))
    assert big.dtype == bool and big.shape == (6, 6)
    np.testing.assert_array_equal(big, np.kron(mask, np.ones((2, 2), dtype=bool)))
    assert scaled_spacing((0.7, 0.7), (3, 3), (6, 6)) == (0.35, 0.35)


def test_resample_to_shrinks_by_area_then_half():
    mask = np.zeros((4, 4), dtype=bool)
    mask[0, 0] = True  # block (0,0): 1/4 set -> off
    mask[0, 2:4] = True  # block (0,1): 2/4 -> on (>= 0.5)
    mask[2:4, 0:2] = True
    mask[2, 0] = False  # block (1,0): 3/4 -> on
    mask[2:4, 2:4] = True  # block (1,1): 4/4 -> on
    np.testing.assert_array_equal(resample_to(mask, (2, 2)), [[False, True], [True, True]])
    # Round trip: enlarging then shrinking gives the mask back.
    small = np.random.default_rng(0).random((5, 7)) > 0.5
    np.testing.assert_array_equal(resample_to(resample_to(small, (10, 14)), (5, 7)), small)


@pytest.mark.parametrize("shape", [(3, 3), (2, 4), (8, 4)])
def test_resample_to_refuses_other_mismatches(shape):
    with pytest.raises(ValueError, match="case JPCLN001"):
        resample_to(np.zeros((4, 4), bool), shape, case_id="JPCLN001")


# --------------------------------------------------------------------------- end to end

TRUTH_SHAPE = (48, 48)  # like SCR's 1024x1024 masks ...
PRED_SHAPE = (96, 96)  # ... for JSRT's 2048x2048 images: factor 2
PRED_SPACING = (0.25, 0.25)  # -> 0.5 mm on the truth grid


def _truth_structures() -> dict[str, np.ndarray]:
    """Five SCR structures at TRUTH_SHAPE; the lungs together are the 20x20
    square of the hand-computed test."""
    s = {name: np.zeros(TRUTH_SHAPE, dtype=bool) for name in SCR_STRUCTURES}
    s["right_lung"][10:30, 10:20] = True  # patient's right: image left
    s["left_lung"][10:30, 20:30] = True
    s["heart"][30:40, 20:32] = True
    s["right_clavicle"][3:6, 5:20] = True
    s["left_clavicle"][3:6, 28:43] = True
    return s


def _write_truth(root: Path, case_id: str, structures: dict[str, np.ndarray]) -> None:
    for name, mask in structures.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(root / name / f"{case_id}.gif")


def _write_prediction(pred_dir: Path, case_id: str, label_masks: dict[str, np.ndarray]) -> None:
    case = pred_dir / case_id
    case.mkdir(parents=True)
    names = list(label_masks)
    stack = np.stack([label_masks[n] for n in names], axis=-1).astype(np.uint8)
    save_nifti_2d(case / "labels.nii.gz", stack, PRED_SPACING)
    (case / "prediction.json").write_text(json.dumps({
        "case_id": case_id, "labels": names, "source": f"/data/{case_id}.IMG",
        "spacing_mm": list(PRED_SPACING), "original_shape": list(PRED_SHAPE), "model_uri": "models:/medseg/1",
    }))


def _labels_at_pred_grid(structures: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {
        label: resample_to(np.logical_or.reduce([structures[s] for s in group]), PRED_SHAPE)
        for label, group in DEFAULT_LABELS.items()
    }


@pytest.fixture(scope="module")
def scored(tmp_path_factory) -> dict:
    """Cases: PERFECT (prediction = truth), SHIFTED (lungs 8 px right at the
    prediction grid = 4 px on the truth grid; heart missed), NOTRUTH (no
    ground truth), BROKEN (no labels.nii.gz)."""
    tmp = tmp_path_factory.mktemp("eval")
    pred_dir, truth_root = tmp / "pred", tmp / "truth"
    truth = _truth_structures()
    _write_truth(truth_root, "PERFECT", truth)
    _write_truth(truth_root, "SHIFTED", truth)
    _write_prediction(pred_dir, "PERFECT", _labels_at_pred_grid(truth))
    shifted = _labels_at_pred_grid(truth)
    shifted["lungs"] = np.roll(shifted["lungs"], 8, axis=1)
    shifted["heart"] = np.zeros(PRED_SHAPE, dtype=bool)
    _write_prediction(pred_dir, "SHIFTED", shifted)
    _write_prediction(pred_dir, "NOTRUTH", _labels_at_pred_grid(truth))
    (pred_dir / "BROKEN").mkdir()
    (pred_dir / "BROKEN" / "prediction.json").write_text("{}")
    table, problems = evaluate_predictions(pred_dir, truth_root, DEFAULT_LABELS)
    return {"tmp": tmp, "pred_dir": pred_dir, "truth_root": truth_root, "table": table, "problems": problems,
            "summary": summarise(table)}


def _row(table: pd.DataFrame, case: str, label: str) -> pd.Series:
    rows = table[(table.case_id == case) & (table.label == label)]
    assert len(rows) == 1
    return rows.iloc[0]


def test_evaluate_predictions_scores_cases_and_lists_problems(scored):
    table, problems = scored["table"], scored["problems"]
    assert list(table.columns) == list(TABLE_COLUMNS)
    assert sorted(set(table.case_id)) == ["PERFECT", "SHIFTED"]
    assert len(table) == 2 * len(DEFAULT_LABELS)
    problem = dict(problems)
    assert set(problem) == {"NOTRUTH", "BROKEN"}
    assert "mask" in problem["NOTRUTH"] and "labels.nii.gz" in problem["BROKEN"]

    for label in DEFAULT_LABELS:
        perfect = _row(table, "PERFECT", label)
        assert (perfect.dice, perfect.jaccard, perfect.hd95_mm, perfect.assd_mm) == (1.0, 1.0, 0.0, 0.0)
    # Lungs: the hand-computed shifted square, on the truth grid at
    # 0.25 mm x (96/48) = 0.5 mm: HD95 2.0 mm, ASSD 1.0 mm.
    lungs = _row(table, "SHIFTED", "lungs")
    assert lungs.dice == pytest.approx(0.8)
    assert lungs.hd95_mm == pytest.approx(2.0, abs=TOL)
    assert lungs.assd_mm == pytest.approx(1.0, abs=TOL)
    heart = _row(table, "SHIFTED", "heart")
    assert heart.dice == 0.0 and heart.hd95_mm == math.inf
    assert _row(table, "SHIFTED", "clavicles").dice == 1.0


def test_evaluate_refuses_bad_options(scored):
    with pytest.raises(ValueError, match="truth_format"):
        evaluate_predictions(scored["pred_dir"], scored["truth_root"], DEFAULT_LABELS, truth_format="nrrd")
    with pytest.raises(ValueError, match="heart"):
        evaluate_predictions(scored["pred_dir"], scored["truth_root"], DEFAULT_LABELS,
                             truth_format="label_image", label_values={1: "left_lung", 2: "right_lung"})


def test_summary_and_comparison_table(scored):
    summary = scored["summary"]
    assert list(summary.index) == list(DEFAULT_LABELS)
    lungs = summary.loc["lungs"]
    assert lungs.n_cases == 2 and lungs.n_missed == 0
    assert lungs.dice_mean == pytest.approx(0.9) and lungs.dice_median == pytest.approx(0.9)
    assert lungs.dice_worst == pytest.approx(0.8) and lungs.hd95_mm_worst == pytest.approx(2.0, abs=TOL)
    assert lungs.jaccard_mean == pytest.approx((1 + 320 / 480) / 2)
    assert lungs.worst_case == "SHIFTED"
    heart = summary.loc["heart"]
    assert heart.n_missed == 1 and heart.dice_worst == 0.0 and heart.hd95_mm_mean == math.inf

    # The fixture's cases are not JSRT images: no published figures beside them.
    text = comparison_table(summary, scored["table"]["case_id"], "scr")
    assert text.startswith("No comparison with published results: 2 of 2 scored cases are not JSRT images")
    assert not any(source in text for source in PUBLISHED_JACCARD) and "0.961" not in text
    # The same scores from JSRT cases against SCR masks: compared.
    text = comparison_table(summary, ["JPCLN001", "JPCNN093"], "scr")
    for source, scores in PUBLISHED_JACCARD.items():
        assert source in text
        for value in scores.values():
            assert f"{value:.3f}" in text
    ours = next(line for line in text.splitlines() if line.startswith("this evaluation"))
    assert f"{lungs.jaccard_mean:.3f}" in ours and "(n=2)" in ours


def test_write_evaluation_files_and_pictures(scored):
    out = scored["tmp"] / "out"
    written = write_evaluation(out, scored["table"], scored["summary"], scored["problems"],
                               pred_dir=scored["pred_dir"], truth_root=scored["truth_root"])
    assert set(written) == {"cases.csv", "summary.csv", "summary.txt", "problems.csv", "boxplots.png",
                            "worst_cases.png"}
    assert len(pd.read_csv(out / "cases.csv")) == len(scored["table"])
    assert pd.read_csv(out / "summary.csv", index_col="label").loc["lungs", "worst_case"] == "SHIFTED"
    assert set(pd.read_csv(out / "problems.csv").case_id) == {"NOTRUTH", "BROKEN"}
    txt = (out / "summary.txt").read_text()
    assert txt.startswith("Evaluation of 2 cases\n")
    assert "NOTRUTH" in txt
    # Cases PERFECT and SHIFTED are not JSRT images: one line says why there is no comparison.
    assert "Novikov et al. 2018" not in txt and "this evaluation" not in txt
    assert comparison_table(scored["summary"], ["PERFECT", "SHIFTED"], "scr") in txt
    assert sum(line.startswith("No comparison with published results: ") for line in txt.splitlines()) == 1
    assert "lungs     0.900 0.141   0.900  0.800" in txt  # Dice mean, std, median, worst
    # Box plots: 2 rows x 3 labels of 3.2 x 3.2 inches at 100 dpi, boxes
    # filled with the label colours at 55 % over white (Dice; Jaccard at 25 %):
    # heart and lungs (the clavicles' boxes have no height, both cases scoring 1).
    boxes = _picture_colours(out / "boxplots.png", (960, 640))
    for colour in ((255, 115, 115), (115, 255, 115), (255, 191, 191), (191, 255, 191)):
        assert boxes.get(colour, 0) > 100, colour
    assert len(boxes) > 20
    # Worst cases: 4 tiles (truth, prediction of SHIFTED and PERFECT) in one
    # row of 3-inch tiles, drawn with overlay_rgb on mid-grey: the exact
    # overlay colours of lungs, heart and clavicles (0.65 * 0.5 + 0.35 * colour).
    gallery = _picture_colours(out / "worst_cases.png", (1200, 300))
    for colour in ((127, 127, 127), (82, 172, 82), (172, 82, 82), (82, 109, 172)):
        assert gallery.get(colour, 0) > 1000, colour
    assert not list(out.glob(".tmp-*"))  # atomic writes left nothing behind


def _picture_colours(path: Path, size: tuple[int, int]) -> dict[tuple[int, int, int], int]:
    """{RGB colour: pixel count} of a PNG figure, after checking its size and mode."""
    with Image.open(path) as img:
        assert img.format == "PNG" and img.mode == "RGBA" and img.size == size, (img.format, img.mode, img.size)
        pixels = np.asarray(img.convert("RGB")).reshape(-1, 3)
    colours, counts = np.unique(pixels, axis=0, return_counts=True)
    return {tuple(int(v) for v in c): int(n) for c, n in zip(colours, counts)}


def test_boxplots_from_a_bare_table(tmp_path):
    table = pd.DataFrame({"case_id": ["a", "b", "c"], "label": "lungs", "dice": [0.9, 0.95, 0.97],
                          "jaccard": [0.8, 0.9, 0.94], "hd95_mm": [3.0, math.inf, 1.0], "assd_mm": [1.0, math.inf, 0.5]})
    save_boxplots(table, tmp_path / "box.png")
    colours = _picture_colours(tmp_path / "box.png", (320, 640))  # one label: 3.2 x 6.4 inches at 100 dpi
    # Lungs green boxes (55 % over white), black medians and dots.
    assert colours.get((115, 255, 115), 0) > 500 and colours.get((0, 0, 0), 0) > 500 and len(colours) > 20


# --------------------------------------------------------------------------- literature comparison, pictures, CSVs


@pytest.mark.parametrize("case_id, jsrt", [
    ("JPCLN001", True), ("JPCLN154", True), ("JPCNN001", True), ("JPCNN093", True),
    ("JPCLN155", False), ("JPCNN094", False), ("JPCLN000", False), ("jpcln001", False),
    ("JPCLN001.IMG", False), ("xJPCLN001", False), ("JPCXN001", False), ("PHANTOM0001", False),
])
def test_jsrt_case_ids(case_id, jsrt):
    assert is_jsrt_case_id(case_id) is jsrt


@pytest.mark.parametrize("case_ids, truth_format, shown", [
    (["JPCLN001", "JPCLN002", "JPCNN010", "JPCLN001"], "scr", True),
    (["PHANTOM0001", "PHANTOM0002"], "scr", False),
    (["JPCLN001", "PHANTOM0002"], "scr", False),  # one case from elsewhere is enough
    (["JPCLN001", "JPCNN010"], "label_image", False),  # not the SCR masks
    ([], "scr", False),
    (None, "scr", False),  # unknown data: never compared
])
def test_comparison_only_for_jsrt_cases_with_scr_truth(scored, case_ids, truth_format, shown):
    text = comparison_table(scored["summary"], case_ids, truth_format)
    reason = literature_comparison_reason(case_ids, truth_format)
    assert (reason == "") is shown
    for source in PUBLISHED_JACCARD:
        assert (source in text) is shown, source
    if not shown:  # one line, saying why
        assert text == (f"No comparison with published results: {reason}; the published Jaccard figures are for "
                        "JSRT images scored against SCR masks.\n")
    assert literature_comparison_reason(["PHANTOM0001", "JPCLN001", "PHANTOM0002"]).startswith(
        "2 of 3 scored cases are not JSRT images")
    assert "label images" in literature_comparison_reason(["JPCLN001"], "label_image")


def test_comparison_columns_follow_the_label_order(scored):
    summary = scored["summary"]
    assert comparison_table(summary, ["JPCLN001"]).splitlines()[0].split()[2:] == list(DEFAULT_LABELS)
    # Any order, and a label nobody published: the summary's order, "-" where no figure.
    order = ["clavicles", "heart", "trachea", "lungs"]
    other = pd.concat([summary.loc[["clavicles", "heart"]], summary.loc[["lungs"]].rename(index={"lungs": "trachea"}),
                       summary.loc[["lungs"]]])
    lines = comparison_table(other, ["JPCLN001", "JPCNN002"], "scr").splitlines()
    assert lines[0].split()[2:] == order  # after "Mean Jaccard"
    ours = next(line for line in lines if line.startswith("this evaluation"))
    assert ours.split()[-4:] == [f"{other.loc[label, 'jaccard_mean']:.3f}" for label in order]
    for source, scores in PUBLISHED_JACCARD.items():
        row = next(line for line in lines if line.startswith(source))
        assert row.split()[-4:] == [f"{scores[label]:.3f}" if label != "trachea" else "-" for label in order]
        # Right-aligned under the header's label names.
        ends = [lines[0].index(label) + len(label) for label in order]
        assert all(row[end - 1] != " " and row[end:end + 1] in ("", " ") for end in ends), row


def test_write_evaluation_compares_jsrt_cases_with_published_results(scored, tmp_path):
    table = scored["table"].replace({"case_id": {"PERFECT": "JPCLN001", "SHIFTED": "JPCNN002"}})
    summary = summarise(table)
    write_evaluation(tmp_path / "scr", table, summary)
    txt = (tmp_path / "scr" / "summary.txt").read_text()
    assert comparison_table(summary, ["JPCLN001", "JPCNN002"], "scr") in txt
    # Columns heart, lungs, clavicles as in the rest of summary.txt: the heart
    # is missed in one of two cases, the lungs score (1 + 320/480) / 2.
    assert "Mean Jaccard                                heart   lungs  clavicles" in txt
    assert "this evaluation (n=2)                       0.500   0.833      1.000" in txt
    assert "Frid-Adar et al. 2018                       0.906   0.961      0.855" in txt
    assert "No comparison" not in txt
    # The same cases scored against label images: not the published protocol.
    write_evaluation(tmp_path / "li", table, summary, truth_format="label_image")
    txt = (tmp_path / "li" / "summary.txt").read_text()
    assert "No comparison with published results: the ground truth is label images, not SCR masks" in txt
    assert "Frid-Adar" not in txt


def test_boxplot_figure_shows_jaccard_beside_dice_in_label_colours(scored):
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgb

    from medseg.visualise import label_colour

    table = scored["table"]
    fig = boxplot_figure(table)
    try:
        assert fig.get_suptitle().startswith("Evaluation of 2 cases")
        axes = fig.axes
        assert len(axes) == 2 * len(DEFAULT_LABELS)  # row-major: overlap row, then HD95 row
        for col, label in enumerate(DEFAULT_LABELS):
            top, bottom = axes[col], axes[len(DEFAULT_LABELS) + col]
            assert top.get_title().startswith(f"{label}: Dice and Jaccard")
            assert [t.get_text() for t in top.get_xticklabels()] == ["Dice", "Jaccard"]
            assert top.get_ylim() == (0.0, 1.02)
            assert bottom.get_title().startswith(f"{label}: HD95 (mm)")
            boxes = [*top.patches, *bottom.patches]
            assert len(boxes) == 3
            for box in boxes:
                assert to_rgb(box.get_facecolor()) == pytest.approx(label_colour(label, col)), label
            # The dots at x = 2 are the cases' Jaccard values.
            rows = table[table.label == label]
            dots = top.collections[1].get_offsets()
            assert np.allclose(dots[:, 0], 2, atol=0.1)
            assert sorted(dots[:, 1]) == pytest.approx(sorted(rows.jaccard))
        assert "1 missed, not shown" in axes[len(DEFAULT_LABELS)].get_title()  # heart HD95 of SHIFTED
    finally:
        plt.close(fig)


def test_rounded_for_csv():
    frame = pd.DataFrame({"dice": [0.123456789, 1.0], "hd95_mm": [1.23456, math.inf], "hd95_mm_mean": [2.005001, 3.0],
                          "area_mm2": [123.456, 0.04], "n_cases": [3, 4], "truth_empty": [True, False],
                          "case_id": ["JPCLN001", "JPCLN002"]})
    out = rounded_for_csv(frame)
    assert out["dice"].tolist() == [0.1235, 1.0]
    assert out["hd95_mm"].tolist() == [1.23, math.inf]  # inf stays inf
    assert out["hd95_mm_mean"].tolist() == [2.01, 3.0]
    assert out["area_mm2"].tolist() == [123.5, 0.0]
    assert out[["n_cases", "truth_empty", "case_id"]].equals(frame[["n_cases", "truth_empty", "case_id"]])
    assert frame["dice"][0] == 0.123456789  # a copy: the caller's frame is unchanged


def test_evaluation_csvs_are_rounded(scored, tmp_path):
    import csv

    table = scored["table"].copy()
    table["hd95_mm"] *= 1.0123456  # 2.0 mm -> 2.0246912 mm; 0 and inf stay
    summary = summarise(table)
    write_evaluation(tmp_path, table, summary, pred_dir=scored["pred_dir"])
    for name in ("cases.csv", "summary.csv"):
        with open(tmp_path / name, newline="") as f:
            rows = list(csv.DictReader(f))
        for row in rows:
            for column, text in row.items():
                if column in ("case_id", "label", "worst_case", "spacing_source", "spacing_plane"):
                    continue
                decimals = len(text.split(".")[1]) if "." in text else 0
                limit = 2 if column.endswith("_mm") or "_mm_" in column else 4
                assert decimals <= limit, (name, column, text)
    cases = pd.read_csv(tmp_path / "cases.csv")
    shifted = cases[cases.case_id == "SHIFTED"].set_index("label")
    assert shifted.loc["lungs", "jaccard"] == 0.6667 and shifted.loc["lungs", "hd95_mm"] == 2.02
    assert shifted.loc["heart", "hd95_mm"] == math.inf and shifted.loc["heart", "assd_mm"] == math.inf
    assert list(cases.columns) == [*TABLE_COLUMNS, "spacing_source", "spacing_plane"]
    written = pd.read_csv(tmp_path / "summary.csv", index_col="label")
    assert written.loc["lungs", "jaccard_mean"] == 0.8333 and written.loc["lungs", "hd95_mm_mean"] == 1.01
    assert written.loc["heart", "hd95_mm_mean"] == math.inf
    assert written["n_cases"].tolist() == [2, 2, 2]


def test_log_evaluation_to_mlflow(scored):
    tmp = scored["tmp"]
    out = tmp / "mlflow-out"
    write_evaluation(out, scored["table"], scored["summary"], scored["problems"])
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = client_for(uri)
    parent = client.create_run(client.create_experiment("evaluation-test"), run_name="cv").info.run_id
    link = EvaluationLink(training_run_id="trainrun123", model_uri="models:/medseg/1", parent_run_id=parent, fold=2,
                          dataset_fingerprint="f" * 64)
    run_id = log_evaluation_to_mlflow(uri, "evaluation-test", out, scored["summary"], link,
                                      params={"truth_format": "scr"}, tags={"medseg.version": "9.9"})
    run = client.get_run(run_id)
    assert run.info.run_name == "evaluation-fold2" and run.info.status == "FINISHED"
    tags = run.data.tags
    assert tags["medseg.role"] == "evaluation" and tags["mlflow.parentRunId"] == parent
    assert tags["training_run_id"] == "trainrun123" and tags["model_uri"] == "models:/medseg/1"
    assert tags["fold"] == "2" and tags["medseg.version"] == "9.9" and tags["dataset.fingerprint"] == "f" * 64
    assert "fold 2" in tags["mlflow.note.content"]
    assert run.data.params["n_cases"] == "2" and run.data.params["n_missed.heart"] == "1"
    assert run.data.params["truth_format"] == "scr"
    metrics = run.data.metrics
    assert metrics["test/dice/lungs"] == pytest.approx(0.9)
    assert metrics["test_median/hd95_mm/lungs"] == pytest.approx(1.0, abs=TOL)  # median of 0 and 2.0 mm
    assert "test/hd95_mm/heart" not in metrics  # infinite: not logged, n_missed explains
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"cases.csv", "summary.csv", "summary.txt", "boxplots.png"} <= artifacts
    # A later evaluation of the same fold (e.g. after a prediction setting
    # changed) marks this one superseded; another fold's run is left alone.
    other = log_evaluation_to_mlflow(uri, "evaluation-test", out, scored["summary"],
                                     EvaluationLink(parent_run_id=parent, fold=3))
    again = log_evaluation_to_mlflow(uri, "evaluation-test", out, scored["summary"], link)
    assert client.get_run(run_id).data.tags["medseg.superseded_by"] == again
    assert client.get_run(run_id).data.tags["mlflow.note.content"].startswith("**Superseded**")
    assert "medseg.superseded_by" not in client.get_run(again).data.tags
    assert "medseg.superseded_by" not in client.get_run(other).data.tags
