"""Score a folder of predictions against ground truth.

Prediction layout (written by the predict stage), one folder per case::

    <pred_dir>/<case_id>/labels.nii.gz    uint8 (H, W, C), channel c = label c (0/1),
                                          saved with medseg.nifti.save_nifti_2d
    <pred_dir>/<case_id>/prediction.json  {"case_id", "labels": [names in channel order],
                                           "source", "spacing_mm": [row, col],
                                           "spacing_source", "spacing_plane",
                                           "original_shape": [H, W], "model_uri"}

Predictions are at the original image's geometry; ground truth may be at a
whole-number scaling of it (SCR masks are 1024x1024, JSRT .IMG files
2048x2048). Metrics are computed on the ground truth's grid, at its spacing:
the truth is what the published results were scored on, and resampling it
would change it.

Outputs: a long table (one row per case and label), a per-label summary, a
plain-text comparison with published Jaccard scores (JSRT/SCR data only),
box plots, a gallery of the worst cases, and an MLflow run named
"evaluation-fold<k>" nested under the cross-validation run, its metrics
linked to the fold's logged model (:func:`log_evaluation_to_mlflow`).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from medseg.atomic import atomic_path, write_text_atomic
from medseg.errors import InputError
from medseg.evaluation.metrics import DISTANCE_METRICS, METRIC_NAMES, OVERLAP_METRICS, segmentation_metrics
from medseg.ingest.inputs import InputFile, ambiguity_note, lookup_keys
from medseg.ingest.masks import (
    find_label_file, label_values_present, read_label_file, read_scr_masks, split_label_image,
    warn_absent_label_values,
)
from medseg.ingest.types import SPACING_PLANES, plane_of_source
from medseg.preprocessing.preprocess import MASK_FORMATS
from medseg.structures import DEFAULT_LABELS, label_masks
from medseg.visualise import overlay_rgb, save_contact_sheet, save_figure, subplots

log = logging.getLogger(__name__)

LABELS_FILE = "labels.nii.gz"
# Written beside the evaluation's files: {"run_id", "experiment_id", "tracking_uri"}.
EVALUATION_RUN_RECORD = "mlflow_run.json"
PREDICTION_FILE = "prediction.json"
# truth_empty: the label's ground truth is empty in that case (both-empty
# scores 1, see metrics); a label empty in every case is reported.
TABLE_COLUMNS: tuple[str, ...] = ("case_id", "label", *METRIC_NAMES, "truth_empty")

# Mean Jaccard on JSRT/SCR as published. Their protocols differ from ours
# (folds, image sizes), so the comparison is indicative, not a ranking.
PUBLISHED_JACCARD: dict[str, dict[str, float]] = {
    "human observer (van Ginneken et al. 2006)": {"lungs": 0.946, "heart": 0.878, "clavicles": 0.896},
    "Novikov et al. 2018": {"lungs": 0.950, "heart": 0.882, "clavicles": 0.868},
    "Frid-Adar et al. 2018": {"lungs": 0.961, "heart": 0.906, "clavicles": 0.855},
}


# --------------------------------------------------------------------------- geometry


def _whole_factor(big: int, small: int) -> int | None:
    return big // small if small > 0 and big % small == 0 else None


def resample_to(mask: np.ndarray, shape: Sequence[int], case_id: str = "") -> np.ndarray:
    """Bring a mask onto a grid that is a whole-number scaling of its own.

    Shrinking by k: each k x k block is area-averaged and kept where at least
    half of it is set (the closest binary picture of the same area).
    Enlarging by k: nearest neighbour (each pixel becomes a k x k block), so
    the mask's area is preserved exactly.

    Args:
        mask: bool (H, W).
        shape: target (Ht, Wt); Ht/H and Wt/W (or their inverses) must be the
            same whole number.
        case_id: named in the error message.

    Returns:
        bool (Ht, Wt).

    Raises:
        ValueError: the target is not a whole-number scaling of ``mask``'s
            grid (the prediction then belongs to another image).
    """
    mask = np.asarray(mask, dtype=bool)
    h, w = mask.shape
    ht, wt = int(shape[0]), int(shape[1])
    if (h, w) == (ht, wt):
        return mask.copy()
    if ht <= h and wt <= w:
        fh, fw = _whole_factor(h, ht), _whole_factor(w, wt)
        if fh is not None and fh == fw:
            blocks = mask.reshape(ht, fh, wt, fw).mean(axis=(1, 3))
            return blocks >= 0.5
    elif ht >= h and wt >= w:
        fh, fw = _whole_factor(ht, h), _whole_factor(wt, w)
        if fh is not None and fh == fw:
            return np.repeat(np.repeat(mask, fh, axis=0), fw, axis=1)
    who = f"case {case_id}: " if case_id else ""
    raise ValueError(
        f"{who}prediction size {h}x{w} does not match ground-truth size {ht}x{wt} "
        "(nor a whole-number scaling of it): the prediction belongs to another image"
    )


def scaled_spacing(
    spacing_mm: tuple[float, float], from_shape: Sequence[int], to_shape: Sequence[int]
) -> tuple[float, float]:
    """Pixel spacing (row, column) in mm after resampling the same field of
    view from ``from_shape`` (H, W) to ``to_shape`` (Ht, Wt)."""
    # Ratio first: whole-number factors (2, 1/2) then scale the spacing exactly.
    return (
        float(spacing_mm[0]) * (from_shape[0] / to_shape[0]),
        float(spacing_mm[1]) * (from_shape[1] / to_shape[1]),
    )


# --------------------------------------------------------------------------- reading


@dataclass
class CasePair:
    """One case's prediction and ground truth, each on its own grid.

    Attributes:
        case_id: the case.
        pred: {label: bool (H, W)} at the original image's geometry.
        truth: {label: bool (Ht, Wt)} at the ground truth's geometry.
        pred_spacing_mm: (row, column) spacing of the prediction grid in mm.
        source: the image the prediction was made from.
        truth_values: for label-image truth, the label values (of the
            ``label_values`` table) that occur in this case's label image;
            empty for SCR truth.
    """

    case_id: str
    pred: dict[str, np.ndarray]
    truth: dict[str, np.ndarray]
    pred_spacing_mm: tuple[float, float]
    source: str
    truth_values: frozenset[int] = frozenset()

    @property
    def truth_spacing_mm(self) -> tuple[float, float]:
        """(row, column) spacing of the truth grid: same field of view."""
        some_pred = next(iter(self.pred.values()))
        some_truth = next(iter(self.truth.values()))
        return scaled_spacing(self.pred_spacing_mm, some_pred.shape, some_truth.shape)


def _case_folders(pred_dir: Path) -> list[Path]:
    if not pred_dir.is_dir():
        raise InputError(pred_dir, "prediction folder not found")
    # Hidden entries are temporary files of atomic writes, not cases.
    return sorted(p for p in pred_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def read_prediction(case_dir: Path, labels: Mapping[str, Sequence[str]]) -> tuple[str, dict[str, np.ndarray], tuple[float, float], str]:
    """Read one prediction folder.

    Returns:
        (case_id, {label: bool (H, W)} for every label in ``labels``,
        (row, column) spacing in mm, source image path).

    Raises:
        InputError: files missing or unreadable, or a label missing.
    """
    from medseg.nifti import load_nifti_2d

    meta_file, stack_file = case_dir / PREDICTION_FILE, case_dir / LABELS_FILE
    if not meta_file.is_file():
        raise InputError(case_dir, f"no {PREDICTION_FILE}")
    if not stack_file.is_file():
        raise InputError(case_dir, f"no {LABELS_FILE}")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as err:
        raise InputError(meta_file, f"unreadable: {err}") from err
    try:
        stack, nifti_spacing = load_nifti_2d(stack_file)
    except Exception as err:  # nibabel raises several types for bad files
        raise InputError(stack_file, f"unreadable NIfTI: {err}") from err
    if stack.ndim == 2:
        stack = stack[..., np.newaxis]
    names = list(meta.get("labels", []))
    if len(names) != stack.shape[2]:
        raise InputError(stack_file, f"{stack.shape[2]} channels but {PREDICTION_FILE} names {len(names)} labels")
    missing = [name for name in labels if name not in names]
    if missing:
        raise InputError(stack_file, f"prediction lacks labels {', '.join(missing)} (has {', '.join(names)})")
    # prediction.json keeps the spacing at full precision; NIfTI stores float32.
    spacing = tuple(float(s) for s in meta.get("spacing_mm", nifti_spacing))
    masks = {name: stack[..., names.index(name)] > 0 for name in labels}
    case_id = str(meta.get("case_id") or case_dir.name)
    return case_id, masks, (spacing[0], spacing[1]), str(meta.get("source", stack_file))


def truth_keys(case_dirs: Sequence[Path]) -> list[tuple[InputFile, tuple[str, ...]]]:
    """Per prediction folder, its input and the names its ground truth may be
    stored under: the input's relative path, its case ID, its file stem,
    leaving out any that another prediction of the batch shares
    (``medseg.ingest.inputs.lookup_keys``), so truth is never paired with
    another scan's prediction."""
    entries = []
    for case_dir in case_dirs:
        try:
            meta = json.loads((case_dir / PREDICTION_FILE).read_text())
        except (OSError, ValueError):
            meta = {}  # read_prediction reports it
        source = str(meta.get("source") or case_dir.name)
        entries.append(InputFile(Path(source), str(meta.get("input_name") or Path(source).name),
                                 str(meta.get("case_id") or case_dir.name)))
    return list(zip(entries, lookup_keys(entries)))


def read_truth(
    truth_root: Path,
    case_id: str | Sequence[str],
    labels: Mapping[str, Sequence[str]],
    truth_format: str = "scr",
    label_values: Mapping[int, str] | None = None,
    image_path: str | Path = "",
) -> dict[str, np.ndarray]:
    """One case's ground truth as label masks.

    Returns:
        {label: bool (Ht, Wt)}, each the union of the label's source structures.

    Raises:
        InputError: the truth is missing or unreadable.
    """
    return _read_truth_values(truth_root, case_id, labels, truth_format, label_values, image_path)[0]


def _read_truth_values(
    truth_root: Path,
    case_id: str | Sequence[str],
    labels: Mapping[str, Sequence[str]],
    truth_format: str,
    label_values: Mapping[int, str] | None,
    image_path: str | Path,
) -> tuple[dict[str, np.ndarray], frozenset[int]]:
    """:func:`read_truth` plus the label values occurring in the case's label
    image (empty for SCR truth)."""
    structures = sorted({s for group in labels.values() for s in group})
    named = image_path or case_id
    if truth_format == "scr":
        masks, _ = read_scr_masks(truth_root, case_id, structures, named)
        return label_masks(masks, labels), frozenset()
    values = label_values or {}
    array = read_label_file(find_label_file(truth_root, case_id, named))
    return label_masks(split_label_image(array, values), labels), frozenset(label_values_present(array, values))


def _check_options(labels: Mapping[str, Sequence[str]], truth_format: str, label_values: Mapping[int, str] | None) -> None:
    if truth_format not in MASK_FORMATS:
        raise ValueError(f"truth_format must be one of {MASK_FORMATS}, got {truth_format!r}")
    if not labels or any(not group for group in labels.values()):
        raise ValueError(f"every label needs at least one source structure, got {dict(labels)}")
    if truth_format == "label_image":
        needed = {s for group in labels.values() for s in group}
        missing = sorted(needed - set((label_values or {}).values()))
        if missing:
            raise ValueError(f"label_values gives no value for structures: {', '.join(missing)}")


def load_case(
    case_dir: Path,
    truth_root: Path,
    labels: Mapping[str, Sequence[str]],
    truth_format: str = "scr",
    label_values: Mapping[int, str] | None = None,
    keys: Sequence[str] | None = None,
) -> CasePair:
    """Prediction and ground truth of one case folder.

    Args:
        keys: names the case's truth may be stored under, most specific
            first (:func:`truth_keys`); default: its case ID.

    Raises:
        InputError: prediction or truth missing or unreadable.
        ValueError: the grids are not whole-number scalings of each other.
    """
    case_id, pred, spacing, source = read_prediction(case_dir, labels)
    truth, truth_values = _read_truth_values(truth_root, keys or case_id, labels, truth_format, label_values, source)
    pred_shape = next(iter(pred.values())).shape
    truth_shape = next(iter(truth.values())).shape
    resample_to(np.zeros(pred_shape, dtype=bool), truth_shape, case_id)  # refuse mismatches early
    return CasePair(case_id, pred, truth, spacing, source, truth_values)


# --------------------------------------------------------------------------- scoring


def evaluate_predictions(
    pred_dir: Path,
    truth_root: Path,
    labels: Mapping[str, Sequence[str]] = DEFAULT_LABELS,
    truth_format: str = "scr",
    label_values: Mapping[int, str] | None = None,
) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """Score every case folder of ``pred_dir`` against its ground truth.

    Metrics are computed on the ground truth's grid at its spacing (the
    prediction's spacing scaled by the grid ratio); the prediction is
    resampled with :func:`resample_to`.

    Args:
        pred_dir: folder of ``<case_id>/`` prediction folders (module docstring).
        truth_root: SCR layout (``<structure>/<case_id>.gif``) or, for
            ``truth_format="label_image"``, ``<case_id>.png|.nii.gz`` files.
        labels: label -> source structures; the label's truth is their union.
        truth_format: "scr" or "label_image".
        label_values: for label images, {pixel value: structure}.

    Returns:
        (table with columns ``TABLE_COLUMNS``, one row per case and label;
        [(case_id, problem)] for cases that could not be scored: missing or
        unreadable prediction or truth, mismatched geometry). The batch goes
        on past a bad case.

    Logs a warning for each ``label_values`` value that occurs in none of
    the label images read, and for each label whose truth is empty in every
    scored case (:func:`comparison_table` says so too).

    Raises:
        ValueError: bad options (unknown format, structures without a value).
        InputError: ``pred_dir`` does not exist.
    """
    pred_dir, truth_root = Path(pred_dir), Path(truth_root)
    _check_options(labels, truth_format, label_values)
    rows: list[dict[str, object]] = []
    problems: list[tuple[str, str]] = []
    values_seen: set[int] = set()
    n_truth = 0
    folders = _case_folders(pred_dir)
    for case_dir, (entry, keys) in zip(folders, truth_keys(folders)):
        try:
            case = load_case(case_dir, truth_root, labels, truth_format, label_values, keys)
        except (InputError, ValueError) as err:
            problem = str(err) + (ambiguity_note(entry, keys) if isinstance(err, InputError) else "")
            problems.append((case_dir.name, problem))
            log.warning("not scored: %s: %s", case_dir.name, problem)
            continue
        n_truth += 1
        values_seen |= case.truth_values
        spacing = case.truth_spacing_mm
        for label in labels:
            truth = case.truth[label]
            pred = resample_to(case.pred[label], truth.shape, case.case_id)
            rows.append({"case_id": case.case_id, "label": label, **segmentation_metrics(pred, truth, spacing),
                         "truth_empty": not truth.any()})
    table = pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
    # A value or label never seen is usually a wrong --label-values table or
    # truth folder: every score of it would be meaningless.
    if truth_format == "label_image" and n_truth:
        warn_absent_label_values(label_values or {}, values_seen, n_truth, str(truth_root))
    for label in absent_labels(table):
        log.warning("label %s is empty in the ground truth of all %d scored cases (%s): its scores are meaningless",
                    label, n_truth, truth_root)
    return table, problems


def summarise(table: pd.DataFrame) -> pd.DataFrame:
    """Per-label statistics of an :func:`evaluate_predictions` table.

    Returns:
        One row per label (index "label", in the table's order) with columns
        ``n_cases``; ``n_missed`` (cases where exactly one of prediction and
        truth is empty, i.e. infinite distances); ``n_truth_empty`` (cases
        whose truth for the label is empty; only when the table has the
        ``truth_empty`` column); for each metric
        ``<metric>_mean``, ``_std`` (sample, NaN for one case), ``_median``
        and ``_worst`` (min Dice/Jaccard, max HD95/ASSD); and
        ``worst_case`` (the case with the lowest Dice). A missed case makes
        the distance mean (and std) infinite / NaN on purpose; the median
        stays informative.
    """
    columns = ["n_cases", "n_missed"]
    has_truth_empty = "truth_empty" in table.columns
    if has_truth_empty:
        columns.append("n_truth_empty")
    for metric in METRIC_NAMES:
        columns += [f"{metric}_{stat}" for stat in ("mean", "std", "median", "worst")]
    columns.append("worst_case")
    records = []
    labels = list(dict.fromkeys(table["label"])) if len(table) else []
    for label in labels:
        rows = table[table["label"] == label]
        record: dict[str, object] = {
            "label": label,
            "n_cases": int(len(rows)),
            "n_missed": int(np.isinf(rows["hd95_mm"].to_numpy(dtype=float)).sum()),
        }
        if has_truth_empty:
            record["n_truth_empty"] = int(rows["truth_empty"].astype(bool).sum())
        for metric in METRIC_NAMES:
            values = rows[metric].astype(float)
            with np.errstate(invalid="ignore"):  # inf - inf in std is NaN, as documented
                record[f"{metric}_mean"] = float(values.mean())
                record[f"{metric}_std"] = float(values.std())
            record[f"{metric}_median"] = float(values.median())
            record[f"{metric}_worst"] = float(values.min() if metric in OVERLAP_METRICS else values.max())
        record["worst_case"] = str(rows.loc[rows["dice"].astype(float).idxmin(), "case_id"])
        records.append(record)
    summary = pd.DataFrame(records, columns=["label", *columns]).set_index("label")
    return summary


def absent_labels(table_or_summary: pd.DataFrame) -> list[str]:
    """Labels whose ground truth is empty in every scored case, in order.

    Accepts an :func:`evaluate_predictions` table (``truth_empty`` column) or
    a :func:`summarise` summary (``n_truth_empty``); [] when neither says.
    """
    frame = table_or_summary
    if "n_truth_empty" in frame.columns:
        hits = frame[(frame["n_cases"] > 0) & (frame["n_truth_empty"] == frame["n_cases"])]
        return [str(label) for label in hits.index]
    if "truth_empty" in frame.columns and len(frame):
        every = frame["truth_empty"].astype(bool).groupby(frame["label"], sort=False).all()
        return [str(label) for label, all_empty in every.items() if all_empty]
    return []


def absent_labels_note(summary: pd.DataFrame) -> str:
    """One line naming the labels absent from every ground-truth image, e.g.
    "Absent from every ground-truth image (2 cases): clavicles. Their scores
    are meaningless: check the truth folder and --label-values."; "" when
    none is."""
    absent = absent_labels(summary)
    if not absent:
        return ""
    n = int(summary["n_cases"].max())
    return (f"Absent from every ground-truth image ({n} case{'s' if n != 1 else ''}): {', '.join(absent)}. "
            "Their scores are meaningless: check the truth folder and --label-values.")


# JSRT's case IDs: 154 nodule cases JPCLN001..154, 93 without nodule JPCNN001..093.
_JSRT_CASE_ID = re.compile(r"JPC([LN])N(\d{3})")
_JSRT_CASES = {"L": 154, "N": 93}


def is_jsrt_case_id(case_id: str) -> bool:
    """True for a JSRT case ID: JPCLN001..JPCLN154 or JPCNN001..JPCNN093."""
    match = _JSRT_CASE_ID.fullmatch(str(case_id))
    return bool(match) and 1 <= int(match.group(2)) <= _JSRT_CASES[match.group(1)]


def literature_comparison_reason(case_ids: Sequence[str] | None, truth_format: str = "scr") -> str:
    """Why the published figures (:data:`PUBLISHED_JACCARD`, all JSRT images
    scored against SCR masks) do not apply to an evaluation; "" when they do.

    They apply when every scored case ID is a JSRT ID
    (:func:`is_jsrt_case_id`) and the truth format is "scr". Decided from the
    data, not from a setting, so ``medseg evaluate`` and the workflow agree:
    phantom or hospital scores never stand beside the human observer's.

    Args:
        case_ids: the scored cases (repeats allowed); None when unknown.
        truth_format: "scr" or "label_image".

    Returns:
        A reason in words (no final full stop), or "".
    """
    if case_ids is None:
        return "the scored case IDs were not given"
    ids = list(dict.fromkeys(str(c) for c in case_ids))
    if not ids:
        return "no case was scored"
    other = [c for c in ids if not is_jsrt_case_id(c)]
    if other:
        # No example ID: this line is printed, and IDs may come from patient data.
        return (f"{len(other)} of {len(ids)} scored cases are not JSRT images (JSRT IDs are JPCLN001-JPCLN154 "
                "and JPCNN001-JPCNN093)")
    if truth_format != "scr":
        kind = "label images" if truth_format == "label_image" else truth_format
        return f"the ground truth is {kind}, not SCR masks"
    return ""


def comparison_table(summary: pd.DataFrame, case_ids: Sequence[str] | None = None, truth_format: str = "scr") -> str:
    """Plain-text table: our mean Jaccard per label beside the published ones.

    Shown only for JSRT/SCR data (:func:`literature_comparison_reason`);
    otherwise one line says why there is no comparison. Rows are sources
    (this evaluation first, then :data:`PUBLISHED_JACCARD`), columns the
    summary's labels in its order (as everywhere in summary.txt); "-" where a
    source reports no figure for a label. Ends with
    :func:`absent_labels_note` when some label's truth is empty in every
    case (the table is printed by ``medseg evaluate`` and is part of
    summary.txt).

    Args:
        summary: :func:`summarise` output (index: labels; uses n_cases,
            jaccard_mean and, if present, n_truth_empty).
        case_ids: the scored case IDs (e.g. the table's case_id column);
            None: unknown, so no comparison.
        truth_format: "scr" or "label_image".
    """
    labels = [str(label) for label in summary.index]
    reason = literature_comparison_reason(case_ids, truth_format)
    if reason:
        out = [f"No comparison with published results: {reason}; the published Jaccard figures are for JSRT "
               "images scored against SCR masks."]
    else:
        n = int(summary["n_cases"].max()) if len(summary) else 0
        ours = {str(label): float(summary.loc[label, "jaccard_mean"]) for label in summary.index}
        rows = [(f"this evaluation (n={n})", ours), *PUBLISHED_JACCARD.items()]
        first = max(len("Mean Jaccard"), *(len(name) for name, _ in rows))
        widths = [max(len(label), 6) for label in labels]

        def line(cells: Sequence[str], name: str) -> str:
            return "  ".join([name.ljust(first), *(c.rjust(w) for c, w in zip(cells, widths))]).rstrip()

        out = [line(labels, "Mean Jaccard")]
        out.append("-" * len(out[0]))
        for name, scores in rows:
            out.append(line([f"{scores[label]:.3f}" if label in scores else "-" for label in labels], name))
        out.append("")
        out.append("Published results used their own splits and image sizes on JSRT/SCR: indicative only.")
    note = absent_labels_note(summary)
    if note:
        out += ["", note]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- pictures


def boxplot_figure(table: pd.DataFrame):
    """The figure of :func:`save_boxplots`, not saved (tests inspect it).

    Args:
        table: :func:`evaluate_predictions` table (case_id, label, dice,
            jaccard, hd95_mm; one row per case and label).

    Returns:
        A matplotlib Figure, one column per label (in the table's order):
        Dice and Jaccard side by side on one [0, 1] axis (top), HD95 in mm
        (bottom); boxes filled with the label's colour
        (:func:`medseg.visualise.label_colour`), each case a dot; the title
        gives the number of cases.
    """
    from medseg.visualise import label_colour

    labels = list(dict.fromkeys(table["label"])) or ["(no cases)"]
    n_cases = int(table["case_id"].nunique()) if "case_id" in table.columns else 0
    fig, axes = subplots(2, len(labels), figsize=(3.2 * len(labels), 6.4), squeeze=False)
    panels = ((("dice", "Dice"), ("jaccard", "Jaccard")), (("hd95_mm", "HD95"),))
    for col, label in enumerate(labels):
        rows = table[table["label"] == label]
        colour = label_colour(str(label), col)
        for row, metrics in enumerate(panels):
            ax = axes[row, col]
            notes, names = [], []
            for position, (metric, name) in enumerate(metrics, start=1):
                values = rows[metric].to_numpy(dtype=float) if metric in rows.columns else np.array([])
                finite = values[np.isfinite(values)]
                names.append(name)
                if finite.size < values.size:
                    notes.append(f"{values.size - finite.size} missed, not shown")
                if not finite.size:
                    continue
                # Jaccard lighter than Dice: the same label, another metric.
                fill = (*colour, 0.55 if position == 1 else 0.25)
                # No fliers: the dots below already show every case.
                ax.boxplot(finite, positions=[position], widths=0.5, patch_artist=True, showfliers=False,
                           boxprops={"facecolor": fill, "edgecolor": "0.2"},
                           medianprops={"color": "black", "linewidth": 1.5})
                # Individual cases: with few cases a box alone hides them.
                jitter = np.random.default_rng(0).uniform(-0.08, 0.08, finite.size)
                ax.scatter(position + jitter, finite, s=8, alpha=0.5, color="k", zorder=3)
            if not ax.has_data():
                ax.text(0.5, 0.5, "no finite values", ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks(range(1, len(names) + 1), names)
            ax.set_xlim(0.4, len(names) + 0.6)
            title = f"{label}: {' and '.join(names)}{' (mm)' if row else ''}"
            title += "".join(f"\n({note})" for note in notes)
            ax.set_title(title, fontsize=9)
            if row == 0:
                ax.set_ylim(0.0, 1.02)  # Dice and Jaccard are in [0, 1]
                ax.set_ylabel("Dice, Jaccard")
            else:
                ax.set_ylabel("HD95 (mm)")
    fig.suptitle(f"Evaluation of {n_cases} case{'s' if n_cases != 1 else ''}: one dot per case")
    return fig


def save_boxplots(table: pd.DataFrame, path: str | Path) -> None:
    """Box plots per label as one PNG, written atomically: Dice beside
    Jaccard (top row) and HD95 in mm (bottom row); figure:
    :func:`boxplot_figure`.

    Infinite HD95 values (missed structures) cannot be drawn; their count is
    given in the panel title instead.
    """
    save_figure(boxplot_figure(table), path)


def _thumbnail(rgb: np.ndarray, max_side: int = 512) -> np.ndarray:
    """Area-average (H, W, 3) down so the longer side is at most ``max_side``."""
    step = max(1, math.ceil(max(rgb.shape[:2]) / max_side))
    if step == 1:
        return rgb
    h, w = (rgb.shape[0] // step) * step, (rgb.shape[1] // step) * step
    return rgb[:h, :w].reshape(h // step, step, w // step, step, 3).mean(axis=(1, 3))


def worst_cases(table: pd.DataFrame, n: int) -> list[tuple[str, float]]:
    """The ``n`` cases with the lowest mean Dice over labels, worst first:
    [(case_id, mean Dice)]."""
    if not len(table):
        return []
    means = table.groupby("case_id", sort=False)["dice"].mean().sort_values(kind="stable")
    return [(str(case), float(dice)) for case, dice in means.head(n).items()]


def save_worst_gallery(
    pred_dir: str | Path,
    truth_root: str | Path,
    table: pd.DataFrame,
    images: Callable[[str], np.ndarray | None] | None,
    path: str | Path,
    n: int = 6,
    labels: Mapping[str, Sequence[str]] = DEFAULT_LABELS,
    truth_format: str = "scr",
    label_values: Mapping[int, str] | None = None,
) -> list[str]:
    """Gallery of the ``n`` worst cases by mean Dice: truth beside prediction.

    Each case gives two tiles at the prediction's geometry (the truth is
    resampled onto it with :func:`resample_to`): ground truth, then
    prediction, both over the radiograph.

    Args:
        images: ``images(case_id)`` -> greyscale float (H, W) in [0, 1] at
            the prediction's geometry, or None; without it (or for None, or a
            mismatched shape) the background is mid-grey.

    Returns:
        The case IDs shown (cases that can no longer be read are skipped).
    """

    pred_dir, truth_root = Path(pred_dir), Path(truth_root)
    folders = {p.name: p for p in _case_folders(pred_dir)}
    tiles: list[np.ndarray] = []
    titles: list[str] = []
    shown: list[str] = []
    for case_id, mean_dice in worst_cases(table, n):
        folder = folders.get(case_id)
        if folder is None:
            continue
        try:
            case = load_case(folder, truth_root, labels, truth_format, label_values)
        except (InputError, ValueError) as err:
            log.warning("gallery: skipping %s: %s", case_id, err)
            continue
        shape = next(iter(case.pred.values())).shape
        background = images(case_id) if images is not None else None
        if background is None or np.shape(background) != shape:
            background = np.full(shape, 0.5, dtype=np.float32)
        truth = {label: resample_to(mask, shape, case_id) for label, mask in case.truth.items()}
        tiles.append(_thumbnail(overlay_rgb(background, truth)))
        tiles.append(_thumbnail(overlay_rgb(background, case.pred)))
        titles += [f"{case_id}: ground truth", f"{case_id}: prediction (mean Dice {mean_dice:.3f})"]
        shown.append(case_id)
    if tiles:
        save_contact_sheet(path, tiles, titles, columns=4)
    return shown


# --------------------------------------------------------------------------- spacing provenance


def spacing_provenance(pred_dir: str | Path, case_ids: Sequence[str] | None = None) -> pd.DataFrame:
    """Where each case's millimetres come from, read from its prediction.json.

    Args:
        pred_dir: folder of ``<case_id>/prediction.json``.
        case_ids: only these cases (e.g. the scored ones); None for all.

    Returns:
        DataFrame with columns case_id, spacing_source, spacing_plane (one of
        :data:`medseg.ingest.types.SPACING_PLANES`), spacing_row_mm,
        spacing_col_mm; one row per case ID with a readable
        prediction.json. Files written before the plane was recorded get it
        from their spacing_source (:func:`medseg.ingest.types.plane_of_source`).
    """
    wanted = None if case_ids is None else set(map(str, case_ids))
    rows = []
    for case_dir in _case_folders(Path(pred_dir)):
        try:
            meta = json.loads((case_dir / PREDICTION_FILE).read_text())
        except (OSError, ValueError):
            continue  # listed as a problem by evaluate_predictions already
        case_id = str(meta.get("case_id") or case_dir.name)
        if wanted is not None and case_id not in wanted:
            continue
        source = str(meta.get("spacing_source") or "")
        plane = str(meta.get("spacing_plane") or plane_of_source(source))
        spacing = list(meta.get("spacing_mm") or [math.nan, math.nan])
        rows.append({"case_id": case_id, "spacing_source": source,
                     "spacing_plane": plane if plane in SPACING_PLANES else "unknown",
                     "spacing_row_mm": float(spacing[0]), "spacing_col_mm": float(spacing[1])})
    frame = pd.DataFrame(rows, columns=["case_id", "spacing_source", "spacing_plane", "spacing_row_mm",
                                        "spacing_col_mm"])
    # One row per case ID, so merging into the per-case table adds no rows.
    return frame.drop_duplicates("case_id").reset_index(drop=True)


def spacing_note(provenance: pd.DataFrame) -> str:
    """One sentence on the plane of the millimetres (HD95, ASSD), for summary.txt.

    E.g. "HD95/ASSD in mm: 3 of 10 cases use detector-plane spacing
    (magnification not corrected: distances too large by the magnification
    factor, typically 5-20 %); 1 uses the configured default spacing
    (1 mm), not read from the image." Empty when there are no cases.
    """
    n = len(provenance)
    if not n:
        return ""
    counts = provenance["spacing_plane"].value_counts()
    if counts.get("patient", 0) == n:
        return f"HD95/ASSD in mm: all {n} cases at the patient plane (spacing calibrated or magnification-corrected)."
    defaults = provenance.loc[provenance["spacing_plane"] == "default", "spacing_row_mm"]
    values = ", ".join(sorted({f"{v:g} mm" for v in defaults if math.isfinite(v)}))
    what = {
        "detector": "detector-plane spacing (magnification not corrected: distances too large by the "
                    "magnification factor, typically 5-20 %)",
        "unknown": "a Pixel Spacing of unknown plane (no calibration information)",
        "default": f"the configured default spacing{f' ({values})' if values else ''}, not read from the image",
    }
    parts = []
    for plane, text in what.items():
        k = int(counts.get(plane, 0))
        if k:
            verb = "uses" if k == 1 else "use"
            parts.append(f"{k} of {n} cases {verb} {text}" if not parts else f"{k} {verb} {text}")
    return "HD95/ASSD in mm: " + "; ".join(parts) + "."


def _with_spacing_counts(summary: pd.DataFrame, table: pd.DataFrame, provenance: pd.DataFrame) -> pd.DataFrame:
    """``summary`` plus n_spacing_<plane> columns: per label, how many of its
    cases were measured with spacing of each plane (summary.csv is what the
    workflow report shows)."""
    out = summary.copy()
    plane_of = dict(zip(provenance["case_id"], provenance["spacing_plane"]))
    for plane in SPACING_PLANES:
        out[f"n_spacing_{plane}"] = [
            int(sum(plane_of.get(str(c), "unknown") == plane for c in table.loc[table["label"] == label, "case_id"]))
            for label in out.index
        ]
    return out


# --------------------------------------------------------------------------- outputs


def _csv_decimals(column: str) -> int:
    """Decimals kept for a float column of cases.csv / summary.csv: further
    digits are noise (distances are float32, a pixel is ~0.1-0.2 mm)."""
    name = column.lower()
    if "mm2" in name or "mm²" in name:
        return 1  # areas, mm²
    if name.endswith("_mm") or "_mm_" in name:
        return 2  # distances, mm
    return 4  # Dice, Jaccard and other ratios


def rounded_for_csv(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``frame`` with float columns rounded for the CSV files:
    ratios (Dice, Jaccard) to 4 decimals, mm distances to 0.01 mm, mm²
    (columns named ``*mm2*``) to 0.1 mm². inf and NaN stay as they are;
    integer, bool and text columns are untouched."""
    out = frame.copy()
    for column in out.columns:
        if pd.api.types.is_float_dtype(out[column]):
            out[column] = out[column].round(_csv_decimals(str(column)))
    return out


def _write_csv(frame: pd.DataFrame, path: Path, index: bool) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=index)


def write_evaluation(
    out_dir: str | Path,
    table: pd.DataFrame,
    summary: pd.DataFrame,
    problems: Sequence[tuple[str, str]] = (),
    pred_dir: str | Path | None = None,
    truth_root: str | Path | None = None,
    images: Callable[[str], np.ndarray | None] | None = None,
    labels: Mapping[str, Sequence[str]] = DEFAULT_LABELS,
    truth_format: str = "scr",
    label_values: Mapping[int, str] | None = None,
    n_worst: int = 6,
) -> dict[str, Path]:
    """Write the evaluation's files, each atomically.

    Files: ``cases.csv`` (the long table), ``summary.csv`` (both rounded:
    :func:`rounded_for_csv`), ``summary.txt`` (summary, comparison with
    published results for JSRT/SCR data only or a line saying why not:
    :func:`comparison_table` with the table's case IDs and
    ``truth_format``; problems), ``problems.csv`` (case_id, problem; header
    only when none), ``boxplots.png`` (:func:`boxplot_figure`), and
    ``worst_cases.png`` when ``pred_dir`` and
    ``truth_root`` are given and some case was scored. With ``pred_dir``,
    the spacing provenance of the scored cases (:func:`spacing_provenance`)
    is added: spacing_source / spacing_plane columns in cases.csv,
    ``n_spacing_<plane>`` counts in summary.csv and a sentence in
    summary.txt (:func:`spacing_note`) saying how many cases were measured
    in detector-plane, unknown-plane or default millimetres.

    Returns:
        {file name: path} of what was written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}

    def target(name: str) -> Path:
        written[name] = out_dir / name
        return written[name]

    note = ""
    cases, summary_out = table, summary
    if pred_dir is not None and len(table):
        provenance = spacing_provenance(pred_dir, list(dict.fromkeys(table["case_id"].astype(str))))
        note = spacing_note(provenance)
        cases = table.merge(provenance[["case_id", "spacing_source", "spacing_plane"]], on="case_id", how="left")
        summary_out = _with_spacing_counts(summary, table, provenance)
    # Rounded copies for the CSVs only: summary.txt and MLflow get full precision.
    _write_csv(rounded_for_csv(cases), target("cases.csv"), index=False)
    _write_csv(rounded_for_csv(summary_out), target("summary.csv"), index=True)
    _write_csv(pd.DataFrame(list(problems), columns=["case_id", "problem"]), target("problems.csv"), index=False)

    shown = ["mean", "std", "median", "worst"]
    text = [f"Evaluation of {summary['n_cases'].max() if len(summary) else 0} cases", ""]
    if note:
        text += [note, ""]
    with pd.option_context("display.width", 200, "display.max_columns", 50):
        for metric in METRIC_NAMES:
            part = summary[[f"{metric}_{s}" for s in shown]].rename(columns=lambda c: c.rsplit("_", 1)[1])
            unit = " (mm)" if metric in DISTANCE_METRICS else ""
            text += [f"{metric}{unit}", part.to_string(float_format=lambda v: f"{v:.3f}"), ""]
        text += [summary[["n_cases", "n_missed", "worst_case"]].to_string(), ""]
    text += [comparison_table(summary, table["case_id"].astype(str).tolist(), truth_format)]
    if problems:
        text += [f"Not scored ({len(problems)}):", *(f"  {case}: {problem}" for case, problem in problems), ""]
    write_text_atomic(target("summary.txt"), "\n".join(text))

    save_boxplots(table, target("boxplots.png"))
    if pred_dir is not None and truth_root is not None and len(table):
        gallery = out_dir / "worst_cases.png"
        if save_worst_gallery(pred_dir, truth_root, table, images, gallery, n_worst, labels, truth_format, label_values):
            written["worst_cases.png"] = gallery
    return written


@dataclass(frozen=True)
class EvaluationLink:
    """What an evaluation was of: the model, its training run and data.

    Attributes:
        training_run_id: the fold's training run.
        model_uri: the registered model version (``models:/<name>/<v>``).
        model_id: MLflow logged-model ID: the test metrics are linked to it
            and show on its model page.
        parent_run_id: the cross-validation run to nest under.
        fold: the fold whose held-out cases were scored (names the run
            ``evaluation-fold<k>``).
        dataset_fingerprint: the training data's fingerprint (tag).
        manifest: the preprocessing manifest, logged as the run's dataset
            input (context "test").
        dataset_name: the dataset's name in MLflow.
    """

    training_run_id: str | None = None
    model_uri: str | None = None
    model_id: str | None = None
    parent_run_id: str | None = None
    fold: int | None = None
    dataset_fingerprint: str | None = None
    manifest: str | None = None
    dataset_name: str | None = None


def evaluation_metrics(summary: pd.DataFrame) -> dict[str, float]:
    """MLflow metrics of a :func:`summarise` summary: ``test/<metric>/<label>``
    (mean) and ``test_median/<metric>/<label>`` for dice, jaccard, hd95_mm,
    assd_mm, the names the cross-validation run uses for the folds' means.
    Non-finite values (a mean made infinite by a missed structure) are left
    out: the SQL store would turn +inf into 1.8e308; the ``n_missed``
    parameter says why the metric is absent."""
    values: dict[str, float] = {}
    for label in summary.index:
        for metric in METRIC_NAMES:
            for stat, group in (("mean", "test"), ("median", "test_median")):
                value = float(summary.loc[label, f"{metric}_{stat}"])
                if math.isfinite(value):
                    values[f"{group}/{metric}/{label}"] = value
    return values


def log_evaluation_to_mlflow(
    tracking_uri: str,
    experiment: str,
    out_dir: str | Path,
    summary: pd.DataFrame,
    link: EvaluationLink = EvaluationLink(),
    params: Mapping[str, str] | None = None,
    tags: Mapping[str, str] | None = None,
) -> str:
    """Record the evaluation as an MLflow run.

    The run is named ``evaluation-fold<k>`` (``evaluation`` without a
    fold), nested under ``link.parent_run_id`` when given, tagged
    ``medseg.role=evaluation`` plus ``tags`` (the training run's version,
    commit, dataset and fold tags) and ``training_run_id`` / ``model_uri``;
    its metrics (:func:`evaluation_metrics`) are linked to the logged model
    ``link.model_id`` (MLflow then lists the model as the run's input and
    the metrics on the model's page). Parameters: ``params`` plus
    ``n_cases`` and ``n_missed.<label>``. Dataset input: the manifest
    (context "test"). Artifacts: every file in ``out_dir``.

    Returns:
        The run ID.

    Raises:
        medseg.tracking.TrackingUnavailable: the store cannot be reached.
    """
    import mlflow

    from medseg.tracking import DESCRIPTION_TAG, connect, dataset_input, tolerant

    experiment_id = connect(tracking_uri, experiment)
    name = "evaluation" if link.fold is None else f"evaluation-fold{link.fold}"
    all_tags = {**(tags or {}), "medseg.role": "evaluation"}
    if link.fold is not None:
        all_tags["fold"] = str(link.fold)
    if link.training_run_id:
        all_tags["training_run_id"] = link.training_run_id
    if link.model_uri:
        all_tags["model_uri"] = link.model_uri
    if link.dataset_fingerprint:
        all_tags["dataset.fingerprint"] = link.dataset_fingerprint
    n_cases = int(summary["n_cases"].max()) if len(summary) else 0
    all_tags[DESCRIPTION_TAG] = (
        f"Held-out test cases{f' of fold {link.fold}' if link.fold is not None else ''} ({n_cases}) scored "
        f"against the ground truth at its own resolution: Dice, Jaccard, HD95 and ASSD (mm) per label "
        f"(`test/*` means, `test_median/*` medians). Model: {link.model_uri or 'not recorded'}."
    )
    run_params = {**(params or {}), "n_cases": str(n_cases),
                  **{f"n_missed.{label}": str(int(summary.loc[label, "n_missed"])) for label in summary.index}}
    out_dir = Path(out_dir)
    with mlflow.start_run(experiment_id=experiment_id, run_name=name, parent_run_id=link.parent_run_id,
                          tags=all_tags) as run:
        mlflow.log_params(run_params)
        if link.manifest and link.dataset_fingerprint and Path(link.manifest).is_file():
            # Parallel evaluation jobs may insert the same dataset at once.
            tolerant("logging the dataset input", mlflow.log_input,
                     dataset_input(link.manifest, link.dataset_name or experiment, link.dataset_fingerprint),
                     context="test")
        mlflow.log_metrics(evaluation_metrics(summary), step=0, model_id=link.model_id)
        for item in sorted(out_dir.iterdir()):
            if item.is_file() and not item.name.startswith(".") and item.name != EVALUATION_RUN_RECORD:
                mlflow.log_artifact(str(item))
    if link.parent_run_id is not None and link.fold is not None:
        _mark_superseded(tracking_uri, experiment_id, link, run.info.run_id)
    return run.info.run_id


def _mark_superseded(tracking_uri: str, experiment_id: str, link: EvaluationLink, run_id: str) -> None:
    """Tag the earlier evaluation runs of the same fold and cross-validation
    (e.g. before a prediction setting changed) ``medseg.superseded_by`` and
    say so in their description: MLflow keeps every run, and the
    cross-validation run and the model page keep their metrics, so the tag
    is what tells the current one apart."""
    from medseg.tracking import DESCRIPTION_TAG, client_for

    client = client_for(tracking_uri)
    query = (f"tags.`mlflow.parentRunId` = '{link.parent_run_id}' AND tags.`medseg.role` = 'evaluation' "
             f"AND tags.fold = '{link.fold}'")
    for old in client.search_runs([experiment_id], query):
        if old.info.run_id == run_id or "medseg.superseded_by" in old.data.tags:
            continue
        client.set_tag(old.info.run_id, "medseg.superseded_by", run_id)
        client.set_tag(old.info.run_id, DESCRIPTION_TAG, f"**Superseded** by the evaluation run {run_id} (a later "
                       f"evaluation of the same fold).\n\n{old.data.tags.get(DESCRIPTION_TAG, '')}")
