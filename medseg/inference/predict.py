"""Batch prediction on new scans, mapped back to each scan's own geometry.

Per scan, in ``<out_dir>/<case_id>/``:
- ``masks/<label>.png``: 0/255 at the original size;
- ``labels.nii.gz``: uint8 label stack with the pixel spacing: NIfTI shape
  (W, H, 1, 1, C), intent "vector", label names in ``descrip``
  (``medseg.nifti.load_nifti_2d`` reads it as (H, W, C));
- ``overlay.png``: heart red, lungs green, clavicles blue, CTR lines (heart
  width yellow, thorax width magenta), with a band below giving the case ID,
  the CTR, the QC flags and the colour legend;
- ``seg.dcm``: DICOM SEG referencing the source (DICOM input only);
- ``sr.dcm``: DICOM SR (TID 1500 measurement report) with the CTR, heart and
  thoracic widths in mm and the QC flags, referencing the source and the SEG
  (DICOM input only; :mod:`medseg.inference.dicom_sr`);
- ``prediction.json``: the scan's results row, written last: a scan whose
  ``prediction.json`` exists is finished and skipped when the run is repeated.
Then ``results.csv`` and ``results.parquet`` gather every finished scan
(rounded: :data:`RESULTS_DECIMALS`), ``failures.csv`` lists the inputs that
could not be predicted, ``ctr_distribution.png`` and ``overlays.png`` (a
contact sheet of up to 12 scans' overlays) picture the batch, and
``summary.txt`` says in three sentences what the batch holds.

On a cluster, one batch is split into chunks (``Chunk``): each chunk job
writes its scans' folders plus ``results.chunk-<i>-of-<n>.csv`` and
``failures.chunk-<i>-of-<n>.csv``, and ``gather_chunks`` then writes the
batch's tables and pictures, as an unsplit run would have.

Memory stays flat whatever the number of scans: files are streamed in
batches and only the small results rows are kept. While the network predicts
one batch, threads read the next scans and write the previous batch's
results (:mod:`medseg.inference.pipeline`; ``PredictSettings.workers``).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import pandas as pd
import torch
from PIL import Image

from medseg.atomic import atomic_path, write_text_atomic
from medseg.batch import Failure, report_failures, write_failures, write_skipped
from medseg.errors import InputError
from medseg.ingest import ReadOptions, load_image
from medseg.ingest.inputs import InputFile, Skipped
from medseg.ingest.types import IngestedImage
from medseg.inference.model import LoadedModel
from medseg.inference.pipeline import Outcome, WriteBehind, read_ahead
from medseg.nifti import save_nifti_2d
from medseg.preprocessing.geometry import ResizePadGeometry, to_original
from medseg.preprocessing.preprocess import canonical_image
from medseg.visualise import (
    LegendEntry, annotate_below, label_colour, overlay_rgb, save_contact_sheet, save_figure, subplots,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

# Test-time augmentation: shifts in preprocessed pixels and a zoom-out (no
# flips: anatomy is not left-right symmetric). A zoom-out keeps the whole
# image in view, so its inverse covers every pixel.
TTA_SHIFTS = ((4, 0), (-4, 0), (0, 4), (0, -4))
TTA_SCALES = (0.9,)


# Probability threshold of a label whose model records none.
DEFAULT_THRESHOLD = 0.5


@dataclass(frozen=True)
class PredictSettings:
    """How to predict.

    Attributes:
        threshold: probability from which a pixel belongs to a label, for
            every label; None: the model's own (per label, chosen on
            cross-validation when it records them, else 0.5).
        postprocess: keep the expected connected components, fill holes.
        tta: average probabilities over small shifts.
        batch_size: scans per forward pass.
        write_seg: write a DICOM SEG for DICOM inputs.
        read_options: polarity / spacing for inputs without metadata.
        workers: threads reading scans ahead of the forward pass and
            writing results behind it (:mod:`medseg.inference.pipeline`);
            0: one stage after the other in the calling thread; None:
            :func:`default_workers`.
    """

    threshold: float | None = None
    postprocess: bool = True
    tta: bool = False
    batch_size: int = 8
    write_seg: bool = True
    read_options: ReadOptions = ReadOptions()
    workers: int | None = None

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 0:
            raise ValueError(f"workers must be >= 0 (0: no threads), got {self.workers}")


def default_workers(scans: int, batch_size: int) -> int:
    """Threads each for reading ahead and writing behind: none when the
    scans fit one forward pass (nothing to overlap), else 2."""
    return 0 if scans <= batch_size else 2


@dataclass
class _Prepared:
    entry: InputFile
    image: IngestedImage
    geometry: ResizePadGeometry
    tensor: np.ndarray  # (1, size, size)
    normalised: np.ndarray  # (H, W) in [0, 1]


    @property
    def path(self) -> Path:
        return self.entry.path

    @property
    def case_id(self) -> str:
        return self.entry.case_id


def _prepare(entry: InputFile, model: LoadedModel, settings: PredictSettings,
             fetch: Callable[[InputFile], object] | None = None) -> _Prepared:
    if entry.url:  # a DICOMweb instance: retrieved now, into entry.path
        if fetch is None:
            raise InputError(entry.url, "a DICOMweb instance, but this run has no connection to retrieve it")
        from medseg.dicomweb import DicomWebError

        try:
            fetch(entry)
        except DicomWebError as err:
            raise InputError(entry.url, f"not retrieved: {err}") from None
        try:
            image = load_image(entry.path, settings.read_options)
        except InputError as err:
            entry.path.unlink(missing_ok=True)
            raise InputError(entry.url, err.problem) from None
        except BaseException:
            entry.path.unlink(missing_ok=True)
            raise
    else:
        image = load_image(entry.path, settings.read_options)
    geometry, normalised, tensor = canonical_image(image, model.size, model.intensity["lower_percentile"],
                                                   model.intensity["upper_percentile"])
    return _Prepared(entry, image, geometry, tensor, normalised)


# prediction.json keys that say what a result was made from (not table columns).
_PROVENANCE_KEYS = ("source_bytes", "source_mtime_ns", "settings")


def thresholds(model: LoadedModel, settings: PredictSettings) -> float | dict[str, float]:
    """The probability threshold in force: ``settings.threshold`` for every
    label, else the model's per-label thresholds ({label: threshold}), else
    0.5 (a single float whenever all labels share one)."""
    if settings.threshold is not None:
        return float(settings.threshold)
    per_label = {name: float(model.thresholds.get(name, DEFAULT_THRESHOLD)) for name in model.labels}
    return per_label if len(set(per_label.values())) > 1 else next(iter(per_label.values()), DEFAULT_THRESHOLD)


def _run_settings(model: LoadedModel, settings: PredictSettings) -> dict:
    """What a result depends on besides the file: the model's weights (not
    its path or alias, which can point to other weights later) and the
    settings. ``model_weights_sha256`` is :meth:`LoadedModel.fingerprint`
    (the weights' tensors, labels, size and intensity window), not the SHA-256
    of a checkpoint file: the same weights give the same value whatever path,
    alias or registry version they were loaded through. For a model run in
    ONNX Runtime it is the ``.onnx`` file's SHA-256 (its graph, weights and
    contract). ``backend``: the runtime (``LoadedModel.backend``); results of
    one runtime are not reused for another (their probabilities agree to
    1e-4, not bit for bit, so masks can differ at the threshold)."""
    return {"model_uri": model.uri, "model_weights_sha256": model.fingerprint(), "backend": model.backend,
            "threshold": thresholds(model, settings),
            "min_confidence": model.min_confidence,
            "tta": settings.tta, "postprocess": settings.postprocess, "write_seg": settings.write_seg,
            "read_options": repr(settings.read_options)}


def _provenance(entry: InputFile, run_settings: dict) -> dict:
    """The file's size and time and the run's settings: a rerun reuses a
    result only if all are unchanged (size and time, as make and rsync do:
    reading every file again to hash it would make a resumed run as slow as
    a fresh one). A DICOMweb instance has neither: its URL (compared by
    :func:`finished_by`) holds its SOP Instance UID, which names one
    instance that is never changed (PS3.3 C.12.1.1.1)."""
    if entry.url:
        return {"source_bytes": None, "source_mtime_ns": None, "settings": run_settings}
    stat = entry.path.stat()
    return {"source_bytes": stat.st_size, "source_mtime_ns": stat.st_mtime_ns, "settings": run_settings}


def finished_by(out_dir: Path, entry: InputFile, run_settings: dict) -> str | None:
    """Whether ``out_dir/<case_id>`` holds this input's finished results.

    Returns:
        "" when it does, made from this file as it is now, with this model
        and these settings; None when the scan is to be predicted (not
        finished, or the file, model or settings changed since: the results
        are then replaced); else the other file whose results the folder
        holds (an earlier run that named its inputs differently), which are
        never taken for this one's.
    """
    meta_file = out_dir / entry.case_id / "prediction.json"
    try:
        meta = json.loads(meta_file.read_text()) if meta_file.exists() else None
    except (OSError, ValueError):
        meta = None  # unreadable: predict it again
    if meta is None:
        return None
    # The file itself, not its name: siteA/IM0001.dcm and siteB/IM0001.dcm
    # predicted in two runs into one folder have the same name and case ID.
    if meta.get("source") != entry.source:
        return str(meta.get("source") or "another input")
    try:
        current = _provenance(entry, run_settings)
    except OSError:
        return None  # the file is gone: reading it fails and says so
    if {k: meta.get(k) for k in _PROVENANCE_KEYS} != current:
        log.info("predict %s again: the file, the model or the settings changed since its results were made",
                 entry.name)
        return None
    return ""


def _shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Translate (N, C, H, W) by (dy, dx) pixels with zero fill."""
    out = torch.zeros_like(x)
    h, w = x.shape[-2:]
    out[..., max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        x[..., max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def _zoom_out(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Shrink (N, C, S, S) by ``scale`` < 1 about the centre, zero padded."""
    size = x.shape[-1]
    inner = int(round(size * scale))
    small = torch.nn.functional.interpolate(x, size=(inner, inner), mode="bilinear", align_corners=False)
    top = (size - inner) // 2
    out = torch.zeros_like(x)
    out[..., top:top + inner, top:top + inner] = small
    return out


def _zoom_back(p: torch.Tensor, scale: float) -> torch.Tensor:
    """Inverse of :func:`_zoom_out` for predictions."""
    size = p.shape[-1]
    inner = int(round(size * scale))
    top = (size - inner) // 2
    return torch.nn.functional.interpolate(p[..., top:top + inner, top:top + inner], size=(size, size),
                                           mode="bilinear", align_corners=False)


@torch.no_grad()
def predict_probabilities(model: LoadedModel, batch: np.ndarray, tta: bool, device: torch.device) -> np.ndarray:
    """(N, 1, S, S) preprocessed images -> (N, C, S, S) float32 probabilities,
    averaged over :data:`TTA_SHIFTS` and :data:`TTA_SCALES` when ``tta``.

    On CUDA the forward pass autocasts as the model was trained
    (``model.amp``: :func:`medseg.training.trainer.cuda_amp_dtype`; "off":
    float32); on the CPU it runs in float32.
    """
    x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
    if device.type == "cuda":
        from medseg.training.trainer import cuda_amp_dtype

        # Pinned memory: the copy runs asynchronously, the CPU goes on.
        x = x.pin_memory().to(device, non_blocking=True)
        dtype = cuda_amp_dtype(model.amp, torch.cuda.is_bf16_supported())
        autocast = torch.autocast("cuda", dtype=dtype) if dtype is not None else torch.autocast("cuda", enabled=False)
    else:
        x = x.to(device)
        autocast = torch.autocast("cpu", enabled=False)

    def run(inputs: torch.Tensor) -> torch.Tensor:
        with autocast:
            return model.module(inputs).float()

    outputs = [run(x)]
    if tta:
        outputs += [_shift(run(_shift(x, dy, dx)), -dy, -dx) for dy, dx in TTA_SHIFTS]
        outputs += [_zoom_back(run(_zoom_out(x, s)), s) for s in TTA_SCALES]
    return (torch.stack(outputs).mean(0)).cpu().numpy()


def _save_png(path: Path, array: np.ndarray) -> None:
    # Level 1: masks and overlays compress nearly as well, several times faster.
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG", compress_level=1)


def overlay_caption(case_id: str, ctr, flags: Sequence[str]) -> list[str]:
    """Text lines under a scan's overlay: case ID, CTR, QC flags.

    Args:
        ctr: the scan's ``CtrResult`` (``ctr`` nan when not measurable) or None.
        flags: the scan's QC flags, as in the results table.
    """
    value = None if ctr is None else ctr.ctr
    measured = value is not None and math.isfinite(value)
    return [case_id, f"CTR {value:.3f}" if measured else "CTR: none",
            f"QC: {', '.join(flags)}" if flags else "QC: no flags"]


def overlay_legend(labels: Sequence[str], ctr) -> list[LegendEntry]:
    """Legend of a scan's overlay: its labels' fills (colours as
    ``overlay_rgb`` draws them), then the CTR lines drawn on it."""
    from medseg.inference.ctr import HEART_LINE_COLOUR, THORAX_LINE_COLOUR

    legend = [LegendEntry(name, label_colour(name, index)) for index, name in enumerate(labels)]
    if ctr is not None and ctr.heart_line is not None:
        legend.append(LegendEntry("heart width", HEART_LINE_COLOUR, line=True))
    if ctr is not None and ctr.thorax_line is not None:
        legend.append(LegendEntry("thorax width", THORAX_LINE_COLOUR, line=True))
    return legend


def _variant(settings: PredictSettings) -> str:
    """The settings that make a result differ from the default prediction's,
    in words, for the SEG's and SR's Series Description ("" for none)."""
    words = ["TTA"] if settings.tta else []
    if settings.threshold is not None:
        words.append(f"threshold {settings.threshold:g}")
    if not settings.postprocess:
        words.append("raw masks")
    return ", ".join(words)


def _write_dicom_result(name: str, what: str, write: Callable[[], object]) -> bool:
    """``write()`` one DICOM result of scan ``name``; False, with the reason
    logged, when it fails (the masks and tables stand without it)."""
    try:
        write()
        return True
    except Exception as err:  # noqa: BLE001 - any failure: say why there is no such file
        log.warning("predict %s: no %s written (%s: %s); masks and tables are", name, what, type(err).__name__, err)
        return False


def _finish_scan(prep: _Prepared, probabilities: np.ndarray, model: LoadedModel, settings: PredictSettings,
                 out_dir: Path, forward_seconds: float, run_settings: dict) -> dict:
    """Map one scan's probabilities back, clean, measure and write outputs
    (``seconds`` in its row: ``forward_seconds``, its share of the batch's
    forward pass, plus this)."""
    started = time.perf_counter()
    from medseg.inference.ctr import boundary_confidence, cardiothoracic_ratio, draw_ctr_lines, qc_flags
    from medseg.inference.plausibility import check_anatomy, gate_ctr
    from medseg.inference.postprocess import clean_masks

    original = to_original(probabilities, prep.geometry)  # (C, H, W)
    prob_maps = dict(zip(model.labels, original))
    threshold = thresholds(model, settings)
    masks = {name: p >= (threshold[name] if isinstance(threshold, dict) else threshold)
             for name, p in prob_maps.items()}
    if settings.postprocess:
        masks = clean_masks(masks)
    case_dir = out_dir / prep.case_id
    # Temporary files left by a killed earlier attempt at this scan.
    for stale in case_dir.rglob(".tmp-*") if case_dir.exists() else []:
        stale.unlink(missing_ok=True)
    spacing = prep.image.spacing_mm
    for name, mask in masks.items():
        _save_png(case_dir / "masks" / f"{name}.png", mask.astype(np.uint8) * 255)
    stack = np.stack([masks[n] for n in model.labels], axis=-1).astype(np.uint8)
    save_nifti_2d(case_dir / "labels.nii.gz", stack, spacing, description="labels: " + ",".join(model.labels))

    ctr = None
    if "heart" in masks and "lungs" in masks:
        ctr = cardiothoracic_ratio(masks["heart"], masks["lungs"], spacing)
    confidence = boundary_confidence(masks, prob_maps)
    flags = qc_flags(masks, prob_maps, ctr, min_confidence=model.min_confidence, confidence=confidence)
    # Not an upright frontal chest: no CTR (nan), no CTR reading, no lines.
    anatomy = check_anatomy(masks, spacing, prep.image.extra.get("view_position"))
    ctr, flags = gate_ctr(ctr, flags, anatomy)
    reasons = qc_reasons(flags, image=prep.image, masks=masks, ctr=ctr, confidence=confidence,
                         min_confidence=model.min_confidence, anatomy=anatomy, read_options=settings.read_options)
    rgb = overlay_rgb(prep.normalised, masks)
    if ctr is not None:
        rgb = draw_ctr_lines(rgb, ctr)
    rgb = annotate_below(rgb, overlay_caption(prep.case_id, ctr, flags), overlay_legend(list(masks), ctr))
    _save_png(case_dir / "overlay.png", (np.clip(rgb, 0, 1) * 255).astype(np.uint8))

    seg_written = sr_written = False
    if settings.write_seg and prep.image.source_format == "dicom":
        from medseg import __version__
        from medseg.inference.dicom_seg import write_dicom_seg
        from medseg.inference.dicom_sr import write_ctr_report

        model_args = dict(model_name=model.uri or "medseg", model_version=__version__, variant=_variant(settings))
        seg_written = _write_dicom_result(prep.entry.name, "DICOM SEG", lambda: write_dicom_seg(
            prep.path, masks, case_dir / "seg.dcm", **model_args))
        sr_written = _write_dicom_result(prep.entry.name, "DICOM SR", lambda: write_ctr_report(
            prep.path, case_dir / "seg.dcm" if seg_written else None, ctr, flags, case_dir / "sr.dcm", **model_args))
    # A SEG or SR of an earlier prediction (other settings) must not sit beside these masks.
    for name, written in (("seg.dcm", seg_written), ("sr.dcm", sr_written)):
        if not written:
            (case_dir / name).unlink(missing_ok=True)

    pixel_area = spacing[0] * spacing[1]
    row = {
        "case_id": prep.case_id,
        "source": prep.entry.source,
        "input_name": prep.entry.name,
        "source_format": prep.image.source_format,
        "rows": prep.image.shape[0],
        "cols": prep.image.shape[1],
        "spacing_row_mm": spacing[0],
        "spacing_col_mm": spacing[1],
        "spacing_source": prep.image.spacing_source,
        "spacing_plane": prep.image.spacing_plane,  # "patient", "detector", "unknown" or "default"
        **{f"area_mm2_{n}": float(masks[n].sum() * pixel_area) for n in model.labels},
        "ctr": float(ctr.ctr) if ctr is not None else float("nan"),
        "heart_width_mm": float(ctr.heart_width_mm) if ctr is not None else float("nan"),
        "thoracic_width_mm": float(ctr.thoracic_width_mm) if ctr is not None else float("nan"),
        "qc_flags": "|".join(flags),
        "qc_reasons": reasons,
        "boundary_confidence": confidence,
        "model_uri": model.uri,
        "seconds": forward_seconds + time.perf_counter() - started,
        "dicom_seg": seg_written,
        "dicom_sr": sr_written,
    }
    meta = {**row, "labels": model.labels, "spacing_mm": list(spacing), "original_shape": list(prep.image.shape),
            **_provenance(prep.entry, run_settings)}
    write_text_atomic(case_dir / "prediction.json", json.dumps(meta, indent=1) + "\n")
    return row


def qc_reasons(flags: Sequence[str], *, image: IngestedImage, masks: dict[str, np.ndarray], ctr, confidence: float,
               min_confidence: float, anatomy, read_options: ReadOptions) -> str:
    """The ``qc_reasons`` of a scan: why each of its QC flags was given.

    Args:
        flags: the scan's final QC flags (after :func:`medseg.inference.plausibility.gate_ctr`).
        image: the scan as read.
        masks: label -> bool (H, W) predicted masks.
        ctr: the scan's ``CtrResult`` (after gating) or None.
        confidence: its ``boundary_confidence``; ``min_confidence``: the threshold in force.
        anatomy: :func:`medseg.inference.plausibility.check_anatomy` of the masks.
        read_options: how it was read (``invert`` matters for PNG / JPEG / TIFF).

    Returns:
        "" without a flag; else ``"<flag>: <why>"`` per flag, joined by "; ".
        The anatomy flags come as one entry, ``"not_frontal_chest: <failed
        rules>"``, followed by the hints of
        :func:`medseg.inference.plausibility.reading_hints` (pixel spacing
        assumed, a PNG / JPEG / TIFF that looks inverted, ...).
    """
    from medseg.inference.ctr import CARDIOMEGALY_THRESHOLD, PLAUSIBLE_CTR
    from medseg.inference.postprocess import component_count
    from medseg.inference.plausibility import ANATOMY_FLAGS, middle_minus_sides, reading_hints

    value = ctr.ctr if ctr is not None else float("nan")
    parts = []
    for flag in flags:
        if flag in ANATOMY_FLAGS:
            if flag != next(f for f in flags if f in ANATOMY_FLAGS):
                continue  # all anatomy flags in one entry: the rules do not say which flag each belongs to
            polarity = middle_minus_sides(image.pixels) if image.source_format == "raster" else None
            hints = reading_hints(anatomy, source_format=image.source_format, spacing_source=image.spacing_source,
                                  spacing_mm=image.spacing_mm, inverted=read_options.invert, polarity=polarity)
            named = ", ".join(f for f in flags if f in ANATOMY_FLAGS)
            parts.append(f"{named}: " + "; ".join([*anatomy.reasons, *hints]))
        elif flag.startswith("missing_"):
            parts.append(f"{flag}: no {flag.removeprefix('missing_')} predicted")
        elif flag == "lungs_not_two_components" and "lungs" in masks:
            parts.append(f"{flag}: {component_count(masks['lungs'])} connected lung regions, not two")
        elif flag == "cardiomegaly":
            parts.append(f"{flag}: CTR {value:.3f} > {CARDIOMEGALY_THRESHOLD}")
        elif flag == "implausible_ctr":
            parts.append(f"{flag}: CTR {value:.3f} outside {PLAUSIBLE_CTR[0]}-{PLAUSIBLE_CTR[1]}")
        elif flag == "low_confidence":
            parts.append(f"{flag}: boundary confidence {confidence:.3f} < {min_confidence:g}")
        else:
            parts.append(flag)
    return "; ".join(parts)


def reading_warnings(table: pd.DataFrame) -> list[str]:
    """The batch's warnings about how its scans were read, each said once
    for the whole batch (per-scan details are in ``qc_reasons``).

    Args:
        table: the results rows of the batch (or chunk).

    Returns:
        Sentences: how many scans had no pixel spacing (1.0 mm assumed, see
        :func:`medseg.ingest.types.assumed_spacing_warning`) and how many of
        those were flagged ``not_frontal_chest``; how many scans failed a
        size rule (thorax width, lung height in mm) with a pixel spacing the
        user gave (a wrong ``--pixel-spacing``: no warning otherwise, the
        batch "succeeds"); how many flagged PNG / JPEG / TIFF scans look
        inverted (``--invert``). [] when none of these.
    """
    from medseg.inference.plausibility import GIVEN_SPACING_HINT, INVERT_HINT, NOT_FRONTAL_CHEST
    from medseg.ingest.types import SPACING_ASSUMED, assumed_spacing_warning

    if table.empty or "spacing_source" not in table:
        return []
    warnings = []
    flags = table.get("qc_flags", pd.Series("", index=table.index)).fillna("").astype(str).str.split("|")
    reasons = table.get("qc_reasons", pd.Series("", index=table.index)).fillna("").astype(str)
    assumed = table["spacing_source"].astype(str) == SPACING_ASSUMED
    if assumed.any():
        flagged = int(flags[assumed].map(lambda f: NOT_FRONTAL_CHEST in f).sum())
        warnings.append(assumed_spacing_warning(int(assumed.sum()), len(table))
                        + (f"; {flagged} of them {'was' if flagged == 1 else 'were'} flagged {NOT_FRONTAL_CHEST}"
                           " (see qc_reasons in results.csv)" if flagged else ""))
    given = int(reasons.str.contains(f"mm {GIVEN_SPACING_HINT} (--pixel-spacing)", regex=False).sum())
    if given:
        warnings.append(f"{given} of {len(table)} scan{'s' if len(table) != 1 else ''} failed a size rule (thorax "
                        "width or lung height in mm) with the pixel spacing given by --pixel-spacing (not read "
                        "from the file): check that it is these files' spacing; see qc_reasons in results.csv")
    inverted = int(reasons.str.contains(INVERT_HINT, regex=False).sum())
    if inverted:
        warnings.append(f"{inverted} PNG / JPEG / TIFF scan{'s' if inverted != 1 else ''} flagged "
                        f"{NOT_FRONTAL_CHEST} or implausible_anatomy {'look' if inverted != 1 else 'looks'} "
                        "inverted (the middle darker than the sides, where a chest film has its bright "
                        "mediastinum): if bone is dark in the file, predict with --invert (if --invert was given, "
                        "without it); see qc_reasons in results.csv")
    return warnings


# CTR histogram bins: 1/40 = 0.025 wide on multiples of 1/40, so that 0.5 (the
# cardiomegaly threshold) is a bin edge exactly and no bar straddles it.
CTR_BINS_PER_UNIT = 40
CTR_HISTOGRAM_RANGE = (0.2, 0.9)


def ctr_histogram(values: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Counts and bin edges of CTR values for :func:`save_ctr_distribution`.

    Args:
        values: finite CTRs (ratios, no unit).

    Returns:
        (counts int (B,), edges float (B + 1,)). Edges are k / 40 for whole k
        (0.5 among them, exactly), spanning :data:`CTR_HISTOGRAM_RANGE`,
        widened to cover every value. Bins are closed on the right,
        (a, b], like the cardiomegaly flag (CTR > 0.5): a CTR of exactly 0.5
        counts left of the 0.5 line, with the scans not above it.
    """
    values = np.asarray(values, dtype=float)
    lo = round(CTR_HISTOGRAM_RANGE[0] * CTR_BINS_PER_UNIT)
    hi = round(CTR_HISTOGRAM_RANGE[1] * CTR_BINS_PER_UNIT)
    if values.size:
        lo = min(lo, math.floor(values.min() * CTR_BINS_PER_UNIT))
        hi = max(hi, math.ceil(values.max() * CTR_BINS_PER_UNIT))
    # Whole numbers divided once: k / 40 is the float nearest k / 40 (0.5 exact).
    edges = np.arange(lo, hi + 1) / CTR_BINS_PER_UNIT
    index = np.clip(np.searchsorted(edges, values, side="left") - 1, 0, len(edges) - 2)
    return np.bincount(index, minlength=len(edges) - 1), edges


def ctr_distribution_figure(table: pd.DataFrame):
    """The figure of :func:`save_ctr_distribution`, not saved (tests inspect it).

    Args:
        table: results rows; its ``ctr`` column (nan: no CTR) at full precision.

    Returns:
        A matplotlib Figure: histogram of the CTRs (:func:`ctr_histogram`),
        a dashed line at 0.5, whole-number scan counts on the y axis, and
        "k of n above 0.5" in the title (n: scans with a CTR).
    """
    from matplotlib.ticker import MaxNLocator

    from medseg.inference.ctr import CARDIOMEGALY_THRESHOLD

    ctrs = pd.to_numeric(table["ctr"], errors="coerce") if "ctr" in table else pd.Series(dtype=float)
    values = ctrs[np.isfinite(ctrs)].to_numpy(dtype=float)
    counts, edges = ctr_histogram(values)
    above = int((values > CARDIOMEGALY_THRESHOLD).sum())
    fig, ax = subplots(figsize=(6, 3.5))
    ax.stairs(counts, edges, fill=True, color="tab:red", alpha=0.7, label="scans per 0.025 of CTR")
    ax.axvline(CARDIOMEGALY_THRESHOLD, color="black", linestyle="--", label="0.5: cardiomegaly on a PA film")
    ax.set_xlabel("cardiothoracic ratio")
    ax.set_ylabel("scans")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts are whole scans
    ax.set_ylim(0, max(1, int(counts.max(initial=0))) * 1.15)
    title = f"CTR: {above} of {len(values)} scans above 0.5"
    if len(values):
        title += f" (median {np.median(values):.2f})"
    missing = len(table) - len(values)
    if missing:
        title += f"\n{missing} scan{'s' if missing != 1 else ''} without a CTR (see the QC flags)"
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return fig


def save_ctr_distribution(path: Path, table: pd.DataFrame) -> None:
    """Histogram of the cardiothoracic ratios, with the 0.5 cardiomegaly
    line, as a PNG (figure: :func:`ctr_distribution_figure`)."""
    save_figure(ctr_distribution_figure(table), path)


OVERLAY_SHEET_CASES = 12
# Tiles are shown about 300 px wide; a full-size radiograph (3000 px) per tile
# would only cost memory.
_TILE_MAX_PX = 600


def overlay_sample(case_ids: Sequence[str], count: int = OVERLAY_SHEET_CASES) -> list[str]:
    """Up to ``count`` of ``case_ids`` (sorted), evenly spread from the first
    to the last, so a sample of a large batch is not just its start."""
    ids = sorted(case_ids)
    if len(ids) <= count:
        return ids
    picks = np.linspace(0, len(ids) - 1, count).round().astype(int)
    return [ids[i] for i in picks]


def save_overlay_sheet(path: Path, out_dir: Path, case_ids: Sequence[str], batch: str = "") -> int:
    """Contact sheet of the ``overlay.png`` of a sample of the batch's scans
    (:func:`overlay_sample`), case ID as each tile's title.

    Returns:
        The number of scans shown (a scan without its overlay is left out).
    """
    tiles, titles = [], []
    for case_id in overlay_sample(case_ids):
        overlay = out_dir / case_id / "overlay.png"
        if not overlay.is_file():
            continue
        with Image.open(overlay) as png:
            tile = png.convert("RGB")
            tile.thumbnail((_TILE_MAX_PX, _TILE_MAX_PX))
            tiles.append(np.asarray(tile, dtype=np.float32) / 255.0)
        titles.append(case_id)
    shown = len(tiles)
    what = f"{shown} of {len(case_ids)} scans" + (f" of batch {batch}" if batch else "")
    caption = (f"Prediction overlays, {what}: heart red, lungs green, clavicles blue; "
               "CTR lines: heart width yellow, thorax width magenta")
    if not tiles:  # the picture is an output all the same: say why it is empty
        tiles, titles = [np.full((8, 8), 0.5, dtype=np.float32)], ["no scan finished"]
    # Large tiles: each carries its case ID, CTR, QC flags and legend in a band under the scan.
    save_contact_sheet(path, tiles, titles, columns=3, tile_inches=5.0, caption=caption)
    return shown


# Start of the problem of a scan predicted but not stored on the DICOMweb server.
NOT_PUSHED = "results written, not pushed"


def _not_pushed(failures: Sequence[Failure]) -> int:
    return sum(f.problem.startswith(NOT_PUSHED) for f in failures)


def batch_summary(table: pd.DataFrame, failures: Sequence[Failure], shown: int) -> str:
    """``summary.txt`` of a batch: scans and failures, CTRs above 0.5, the
    overlays shown. Numbers and plain words only: the report's captions
    include it as reStructuredText."""
    from medseg.inference.ctr import CARDIOMEGALY_THRESHOLD

    n = len(table)
    ctrs = pd.to_numeric(table["ctr"], errors="coerce") if "ctr" in table else pd.Series(dtype=float)
    values = ctrs[np.isfinite(ctrs)]
    above = int((values > CARDIOMEGALY_THRESHOLD).sum())
    ctr_line = f"CTR above 0.5 in {above} of {len(values)} scans with a CTR."
    if n > len(values):
        ctr_line += (f" {n - len(values)} without one (not an upright frontal chest film, or a structure missing: "
                     "see the QC flags).")
    unpushed = _not_pushed(failures)
    lines = [
        f"{n} scan{'s' if n != 1 else ''} predicted, {len(failures)} input{'s' if len(failures) != 1 else ''} "
        "failed (failures.csv)." + (f" {unpushed} of those were predicted but not confirmed stored on the DICOMweb "
                                    "server (the same command again asks it and stores what it lacks)."
                                    if unpushed else ""),
        ctr_line,
        f"overlays.png shows {shown} of {n} scans.",
    ]
    return "\n\n".join(lines) + "\n"


@dataclass(frozen=True)
class Chunk:
    """Part ``index`` (0-based) of ``count`` contiguous, near-equal parts of a batch."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"chunk {self.index} of {self.count}: need 0 <= index < count")

    @classmethod
    def parse(cls, text: str) -> "Chunk":
        """``"I/N"`` (as on the command line) -> Chunk(I, N)."""
        index, sep, count = text.partition("/")
        if not sep or not index.strip().isdigit() or not count.strip().isdigit():
            raise ValueError(f"chunk {text!r}: expected I/N, e.g. 0/4")
        return cls(int(index), int(count))

    @property
    def name(self) -> str:
        return f"chunk-{self.index}-of-{self.count}"

    def select(self, files: Sequence[T]) -> list[T]:
        """This chunk's files; the chunks of all indices cover ``files`` once, in order."""
        start = len(files) * self.index // self.count
        stop = len(files) * (self.index + 1) // self.count
        return list(files[start:stop])


def chunk_table_paths(out_dir: Path, chunk: Chunk) -> tuple[Path, Path]:
    """(results, failures) CSV of one chunk inside the batch's output folder."""
    return out_dir / f"results.{chunk.name}.csv", out_dir / f"failures.{chunk.name}.csv"


def _batches(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of ``size`` items (the last may be shorter), read lazily."""
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def _progress_state(counts: Counter, failed: int) -> tuple[int, int, int]:
    return counts["done"], counts["already"], failed


def _log_progress(counts: Counter, failed: int, total: int, start: float) -> tuple[int, int, int]:
    """Log one progress line; returns what it said (:func:`_progress_state`)."""
    handled = counts["done"] + counts["already"] + failed
    elapsed = time.perf_counter() - start
    log.info("predict %d/%d scans (%d new, %d already done, %d failed) %.1f scans/s", handled, total,
             counts["done"], counts["already"], failed, counts["done"] / elapsed if elapsed else 0.0)
    return _progress_state(counts, failed)


def gather_results(out_dir: Path, case_ids: Iterable[str] | None = None) -> pd.DataFrame:
    """Every finished scan's row (from its prediction.json), sorted by case ID;
    with ``case_ids``, only those scans' rows (the finished ones)."""
    if case_ids is None:
        metas = sorted(out_dir.glob("*/prediction.json"))
    else:
        metas = [path for c in sorted(set(case_ids)) if (path := out_dir / c / "prediction.json").exists()]
    rows = []
    for meta in metas:
        record = json.loads(meta.read_text())
        for key in ("labels", "spacing_mm", "original_shape", *_PROVENANCE_KEYS):
            record.pop(key, None)
        rows.append(record)
    return pd.DataFrame(rows)


def predict_files(files: Sequence[InputFile], model: LoadedModel, settings: PredictSettings, out_dir: str | Path,
                  device: torch.device | None = None, chunk: Chunk | None = None,
                  skipped: Sequence[Skipped] = (),
                  fetch: Callable[[InputFile], object] | None = None,
                  push: Callable[[Path, InputFile], Sequence[str]] | None = None,
                  ) -> tuple[pd.DataFrame, list[Failure]]:
    """Predict every input; skip those already finished; never stop on a bad one.

    Args:
        files: the inputs with unique case IDs (``medseg.ingest.inputs.collect_inputs``,
            over the whole batch when this is a chunk of it).
        chunk: ``files`` is this chunk of a larger batch: write the chunk's own
            tables (``chunk_table_paths``) and leave the batch's tables to
            ``gather_chunks``.
        skipped: non-image files skipped while collecting the inputs, listed
            in ``skipped.csv`` (unsplit runs) and the closing summary.
        fetch: retrieves a DICOMweb input (``InputFile.url``) into its
            ``path`` (e.g. :func:`medseg.ingest.remote.retrieve` bound to a
            connection), called by the reading threads when the run gets to
            it; the copy lies in ``out_dir/.retrieved`` and is removed once
            the scan's results are written. Its failure is that scan's.
        push: stores a finished scan's DICOM results (its folder, its
            input) on a server and returns the SOP Instance UIDs it stored
            (e.g. :func:`medseg.inference.push.push_scan` bound to a
            connection and server); called once the batch is predicted for
            every scan of this run, those finished before included (it skips
            what the server holds). A scan it fails for is listed among the
            failures ("not pushed: ...") with its results kept, so that a
            rerun pushes it.

    Returns:
        (results table of the finished scans: all of ``out_dir``, or this
        chunk's only; failures of this run). Every input is either in the
        table or among the failures.

    Raises:
        ValueError: two inputs share a case ID (a caller bug: IDs come from
            ``collect_inputs``).
    """
    from medseg.ingest.remote import RETRIEVED_FOLDER, local_copy

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [local_copy(out_dir, f) for f in files]
    device = device or next((p.device for p in model.module.parameters()), torch.device("cpu"))
    counts = Counter(f.case_id.casefold() for f in files)
    shared = sorted({f.case_id for f in files if counts[f.case_id.casefold()] > 1})
    if shared or any(not f.case_id for f in files):
        raise ValueError(f"inputs without a unique case ID: {', '.join(shared) or 'empty ID'}")
    run_settings = _run_settings(model, settings)
    failures: list[Failure] = []
    case_ids: list[str] = []  # of this run's inputs (finished now or before)
    counts = Counter()  # "done", "already"
    start = time.perf_counter()

    def fail(path, problem: str, name: str) -> None:
        failures.append(Failure(str(path), problem))
        log.warning("predict %s FAILED: %s", name, problem)

    def to_predict() -> Iterator[InputFile]:
        """The inputs not finished by an earlier run (read lazily, as the reader gets to them)."""
        for entry in files:
            owner = finished_by(out_dir, entry, run_settings)
            if owner:
                fail(entry.url or entry.path, f"its output folder {out_dir / entry.case_id} holds the results of "
                     f"{owner} from an earlier run; predict into a new --out folder", entry.name)
            elif owner == "":
                case_ids.append(entry.case_id)
                counts["already"] += 1
                if entry.url:  # a copy a killed run retrieved and had not removed yet
                    entry.path.unlink(missing_ok=True)
            else:
                yield entry

    def finish(job: tuple[_Prepared, np.ndarray, float]) -> dict:
        prep, probabilities, forward_seconds = job
        try:
            return _finish_scan(prep, probabilities, model, settings, out_dir, forward_seconds, run_settings)
        finally:
            if prep.entry.url:  # the retrieved copy: its results are written (or its failure listed)
                prep.path.unlink(missing_ok=True)

    def collect(outcomes: Iterable[Outcome]) -> None:
        for outcome in outcomes:
            if outcome.error is None:
                counts["done"] += 1
            else:
                err = outcome.error
                entry = outcome.item[0].entry
                fail(entry.url or entry.path, f"{type(err).__name__}: {err}", entry.name)

    logged = None
    workers = settings.workers if settings.workers is not None else default_workers(len(files), settings.batch_size)
    # One batch read ahead and one written behind: the forward pass never
    # waits for a whole batch to be read, memory holds about three batches.
    read = read_ahead(to_predict(), lambda entry: _prepare(entry, model, settings, fetch), workers=workers,
                      ahead=settings.batch_size)
    with WriteBehind(finish, workers=workers, in_flight=settings.batch_size) as writer:
        for outcomes in _batches(read, settings.batch_size):
            prepared: list[_Prepared] = []
            for outcome in outcomes:
                if isinstance(outcome.error, InputError):
                    fail(outcome.error.path, outcome.error.problem, outcome.item.name)
                elif outcome.error is not None:  # one bad file must not stop the batch
                    fail(outcome.item.url or outcome.item.path, f"{type(outcome.error).__name__}: {outcome.error}",
                         outcome.item.name)
                else:
                    case_ids.append(outcome.item.case_id)
                    prepared.append(outcome.result)
            if prepared:
                t0 = time.perf_counter()
                probabilities = predict_probabilities(model, np.stack([p.tensor for p in prepared]), settings.tta,
                                                      device)
                per_scan = (time.perf_counter() - t0) / len(prepared)
                for prep, prob in zip(prepared, probabilities):
                    collect(writer.submit((prep, prob, per_scan)))
            logged = _log_progress(counts, len(failures), len(files), start)
        collect(writer.drain())
    if _progress_state(counts, len(failures)) != logged:  # the writes finished since, or nothing to predict
        _log_progress(counts, len(failures), len(files), start)
    if push is not None:
        finished = set(case_ids)
        for entry, problem in _push_all(push, out_dir, [f for f in files if f.case_id in finished], workers):
            fail(entry.url or entry.path, f"{NOT_PUSHED}: {problem}", entry.name)
    try:
        (out_dir / RETRIEVED_FOLDER).rmdir()  # the DICOMweb copies' folder, once each copy is removed
    except OSError:
        pass  # none, or a parallel chunk job is still using it
    # In input order, as a sequential run lists them (reading and writing failures interleave otherwise).
    order = {entry.url or str(entry.path): index for index, entry in enumerate(files)}
    failures.sort(key=lambda failure: order.get(failure.file, len(order)))
    write_skipped(out_dir / "skipped.csv", skipped)  # the same list from every chunk job
    if chunk is None:
        table = write_batch_tables(out_dir, failures, case_ids)
    else:
        table = gather_results(out_dir, case_ids)  # this chunk's scans only, not the whole batch folder
        results_path, failures_path = chunk_table_paths(out_dir, chunk)
        _write_results_csv(results_path, table)
        write_failures(failures_path, failures)
    for warning in reading_warnings(table):  # once per batch, just above the closing summary
        log.warning("predict: %s", warning)
    unpushed = _not_pushed(failures)
    if unpushed:  # "32 of 32 inputs failed" alone alarms when most only await storing
        log.warning("predict: %d of the failed inputs have their results written and only their storing on the "
                    "DICOMweb server was not confirmed; the same command again asks it and stores what it lacks",
                    unpushed)
    report_failures(failures, len(files), "predict" if chunk is None else f"predict {chunk.name}",
                    skipped=len(skipped))
    return table, failures


def _push_all(push: Callable[[Path, InputFile], Sequence[str]], out_dir: Path, entries: Sequence[InputFile],
              workers: int) -> list[tuple[InputFile, str]]:
    """Call ``push`` for every finished scan (a few at a time: each waits on
    the network; Ctrl-C does not wait for a push in flight, see
    :mod:`medseg.inference.pipeline`); log progress; return (entry, problem)
    per scan it failed for."""
    problems: list[tuple[InputFile, str]] = []
    counts = Counter()
    start = time.perf_counter()
    step = max(1, len(entries) // 10)
    threads = max(1, min(workers, 4))
    outcomes = read_ahead(entries, lambda entry: push(out_dir / entry.case_id, entry), workers=threads,
                          ahead=2 * threads)
    for number, outcome in enumerate(outcomes, start=1):
        if outcome.error is not None:  # one scan's failure must not stop the others
            err = outcome.error
            problems.append((outcome.item, str(err) if isinstance(err, (OSError, RuntimeError))
                             else f"{type(err).__name__}: {err}"))
            counts["failed"] += 1
        else:
            counts["stored" if outcome.result else "already"] += 1
        if number % step == 0 or number == len(entries):
            log.info("push %d/%d scans (%d stored, %d already on the server, %d failed) %.1f s", number,
                     len(entries), counts["stored"], counts["already"], counts["failed"],
                     time.perf_counter() - start)
    return problems


# Decimals of the results tables (results*.csv, results.parquet): 0.1 mm and
# 0.1 mm² are far below what a radiograph's pixels resolve, a CTR to 4 digits,
# seconds to the millisecond. Pixel spacings stay exact (millimetres are
# computed from them); prediction.json keeps every value at full precision.
RESULTS_DECIMALS = {"area_mm2_<label>": 1, "<name>_width_mm": 1, "ctr": 4, "seconds": 3, "boundary_confidence": 4}


def results_decimals(column: str) -> int | None:
    """Decimals a results-table column is rounded to (:data:`RESULTS_DECIMALS`);
    None: kept as it is."""
    if column.startswith("area_mm2_") or column.endswith("_width_mm"):
        return 1
    return {"ctr": 4, "seconds": 3, "boundary_confidence": 4}.get(column)


def round_results(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` with its float measurement columns rounded
    (:func:`results_decimals`); other columns unchanged."""
    decimals = {column: places for column in table.columns
                if (places := results_decimals(column)) is not None and pd.api.types.is_float_dtype(table[column])}
    return table.round(decimals)


def _write_results_csv(path: Path, table: pd.DataFrame) -> None:
    """The table as CSV (rounded: :func:`round_results`), or just the header
    ``case_id`` when no scan finished."""
    write_text_atomic(path, round_results(table).to_csv(index=False) if not table.empty else "case_id\n")


def write_batch_tables(out_dir: Path, failures: Sequence[Failure], case_ids: Iterable[str]) -> pd.DataFrame:
    """``results.csv``/``.parquet`` of the batch's finished scans (``case_ids``;
    other scans an earlier run left in ``out_dir`` are not this batch's), the
    CTR histogram, the overlays' contact sheet, ``summary.txt`` and
    ``failures.csv``; returns the results table (full precision)."""
    case_ids = list(case_ids)
    table = gather_results(out_dir, case_ids)
    _write_results_csv(out_dir / "results.csv", table)
    if not table.empty:
        with atomic_path(out_dir / "results.parquet") as tmp:
            round_results(table).to_parquet(tmp, index=False)  # the same table as results.csv
    else:  # never a results.parquet of an earlier batch beside this batch's results.csv
        (out_dir / "results.parquet").unlink(missing_ok=True)
    earlier = sorted({p.parent.name for p in out_dir.glob("*/prediction.json")} - set(map(str, case_ids)))
    if earlier:
        log.info("results.csv lists this batch's %d scan(s); %d scan folder(s) in %s from earlier runs are not "
                 "in it (e.g. %s)", len(table), len(earlier), out_dir, ", ".join(earlier[:3]))
    save_ctr_distribution(out_dir / "ctr_distribution.png", table)
    finished = table["case_id"].astype(str).tolist() if not table.empty else []
    shown = save_overlay_sheet(out_dir / "overlays.png", out_dir, finished, batch=out_dir.name)
    write_text_atomic(out_dir / "summary.txt", batch_summary(table, failures, shown))
    write_failures(out_dir / "failures.csv", failures)
    return table


def gather_chunks(out_dir: str | Path, count: int) -> tuple[pd.DataFrame, list[Failure]]:
    """Batch tables of a batch predicted as ``count`` chunks.

    Raises:
        InputError: a chunk has not finished (its failures table is missing).
    """
    out_dir = Path(out_dir)
    failures: list[Failure] = []
    case_ids: list[str] = []
    for index in range(count):
        results_path, failures_path = chunk_table_paths(out_dir, Chunk(index, count))
        if not failures_path.exists() or not results_path.exists():
            raise InputError(failures_path, f"chunk {index} of {count} has not finished (no failures table)")
        frame = pd.read_csv(failures_path, dtype=str, keep_default_na=False)
        failures += [Failure(row.file, row.problem) for row in frame.itertuples()]
        case_ids += pd.read_csv(results_path, dtype={"case_id": str}, keep_default_na=False)["case_id"].tolist()
    return write_batch_tables(out_dir, failures, case_ids), failures


__all__ = ["Chunk", "PredictSettings", "RESULTS_DECIMALS", "batch_summary", "chunk_table_paths",
           "ctr_distribution_figure", "ctr_histogram", "finished_by", "gather_chunks", "gather_results",
           "overlay_caption", "overlay_legend", "overlay_sample", "predict_files", "predict_probabilities",
           "qc_reasons", "reading_warnings", "results_decimals", "round_results", "save_overlay_sheet",
           "write_batch_tables"]
