"""Write and read predicted masks as a DICOM Segmentation (SEG) object.

One BINARY segment per label, each its own frame, so overlapping labels
(clavicles over lungs) are stored without loss. The SEG copies the patient
and study of the source radiograph and references the source's Study,
Series and SOP Instance UIDs, so PACS viewers show it on top of the image.

Legacy ACR-NEMA sources (no preamble, no file meta, missing type-2
attributes such as Patient ID or Study Date) are read with ``force=True``;
the transfer syntax is inferred as in :mod:`medseg.ingest.dicom`, and the
missing type-2 attributes are added *empty* (type 2 allows an empty value).
Nothing about the patient is invented, and the source file is not modified.

highdicom 0.28 writes a Pixel Measures item (Pixel Spacing, no Slice
Thickness) for a source with Pixel Spacing but no Frame of Reference, and then
cannot read its own file back; that item is dropped (see
``_drop_unreadable_pixel_measures``).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

import medseg
from medseg.atomic import atomic_path
from medseg.ingest.dicom import ensure_transfer_syntax, read_dataset
from medseg.visualise import LABEL_COLOURS

# label -> (segmented property category, segmented property type), both
# keywords of pydicom's SNOMED CT code dictionary (``codes.SCT``). The
# category is "Anatomical Structure" (SCT 91723000): it is in CID 7150
# (Segmentation Property Categories); "Organ" is not, and clavicles are bones.
DEFAULT_STRUCTURES_INFO: dict[str, tuple[str, str]] = {
    "heart": ("AnatomicalStructure", "Heart"),
    "lungs": ("AnatomicalStructure", "Lung"),
    "clavicles": ("AnatomicalStructure", "Clavicle"),
    # SCR source structures; the side is carried by the segment label.
    "left_lung": ("AnatomicalStructure", "Lung"),
    "right_lung": ("AnatomicalStructure", "Lung"),
    "left_clavicle": ("AnatomicalStructure", "Clavicle"),
    "right_clavicle": ("AnatomicalStructure", "Clavicle"),
}

# Type-2 attributes highdicom reads from the source by attribute access (an
# AttributeError if absent) and copies into the SEG's Patient/Study modules.
_TYPE2_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)

_ALGORITHM_NAME = "medseg"
_SEG_MANUFACTURER = "medseg"
_DEVICE_SERIAL = "0"


def _memoise_iod_lookups() -> None:
    """Cache highdicom's ``is_attribute_in_iod`` (whether an attribute
    belongs to an IOD: a pure function of the standard's tables).

    Why: highdicom 0.28 walks every module of the IOD for each of its ~6
    calls per SEG, ~5 ms each, which made it the largest cost of writing a
    SEG (issue 14). The cache wraps the function where highdicom's modules
    hold it, so their calls go through it; results are the function's own.
    A highdicom without the function is left as it is.
    """
    import functools
    import sys

    from highdicom import _standard_utils

    original = getattr(_standard_utils, "is_attribute_in_iod", None)
    if original is None or hasattr(original, "cache_info"):
        return

    @functools.lru_cache(maxsize=1024)
    def cached(attribute: str, sop_class_uid: str, exclude: tuple[str, ...] | None) -> bool:
        return original(attribute, sop_class_uid, list(exclude) if exclude is not None else None)

    @functools.wraps(original)
    def is_attribute_in_iod(attribute, sop_class_uid, exclude_path_elements=None):
        exclude = None if exclude_path_elements is None else tuple(exclude_path_elements)
        return cached(attribute, str(sop_class_uid), exclude)

    is_attribute_in_iod.cache_info = cached.cache_info  # marks the wrapper (no double wrapping)
    for name, module in list(sys.modules.items()):
        if (name == "highdicom" or name.startswith("highdicom.")) and \
                getattr(module, "is_attribute_in_iod", None) is original:
            module.is_attribute_in_iod = is_attribute_in_iod


_memoise_iod_lookups()


def _sct(keyword: str) -> hd.sr.CodedConcept:
    """A SNOMED CT code from pydicom's code dictionary, by keyword."""
    try:
        code = getattr(codes.SCT, keyword)
    except AttributeError:
        raise ValueError(f"{keyword!r} is not a SNOMED CT keyword in pydicom's codedict") from None
    return hd.sr.CodedConcept(code.value, code.scheme_designator, code.meaning)


def _display_colour(label: str) -> hd.color.CIELabColor | None:
    """The project's overlay colour for ``label`` as CIELab, if highdicom can convert."""
    colour = LABEL_COLOURS.get(label) or next(
        (c for group, c in LABEL_COLOURS.items() if label.endswith(group.rstrip("s"))), None
    )
    lab = getattr(getattr(hd, "color", None), "CIELabColor", None)
    if colour is None or not hasattr(lab, "from_rgb"):
        return None  # CIELabColor.from_rgb may be newer than highdicom 0.23
    return hd.color.CIELabColor.from_rgb(*(int(round(255 * v)) for v in colour))


@contextlib.contextmanager
def no_person_name_warnings() -> Iterator[None]:
    """Silence highdicom's warning about a one-component Patient's Name while
    building a SEG or SR: it quotes the name, which would put patient data
    into logs."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"The string .* unlikely to represent the intended person name"
        )
        yield


def _read_source(source: Path) -> Dataset:
    """The source dataset, with a transfer syntax and type-2 attributes present.

    Raises:
        medseg.errors.InputError: not a readable DICOM image.
    """
    ds = read_dataset(source)
    if "PixelData" in ds:
        # Legacy files: no file meta; infer the syntax from the parsed encoding.
        ensure_transfer_syntax(ds, source)
    for keyword in _TYPE2_PATIENT_STUDY:
        if keyword not in ds:
            setattr(ds, keyword, None)  # present but empty, as type 2 allows
    return ds


# Said in every result's Series Description: what a PACS user sees first.
RESEARCH_USE = "research use"


def series_description(model_name: str, variant: str = "") -> str:
    """A SEG's Series Description, at most 64 characters (VR LO): "<model>
    segmentation (research use)", or "<model> <variant> (research use)";
    the model name (then the variant) is shortened to fit, "research use"
    never."""
    end = f" ({RESEARCH_USE})"
    middle = f" {variant}" if variant else " segmentation"
    room = 64 - len(end) - len(middle)
    if room < 8:
        middle, room = middle[:64 - len(end) - 8].rstrip(" ,"), 8
    model = str(model_name)
    if len(model) > room:  # cut at a word, without an unclosed "(" ("jsrt-cpu (shipped with medseg)")
        model = model[:room]
        model = (model.rsplit(" (", 1)[0] if " (" in model else model).rstrip()
    return model + middle + end


def result_uids(kind: str, source_uid: str, model_name: str, model_version: str,
                *content: object) -> tuple[str, str]:
    """(Series Instance UID, SOP Instance UID) of a result, derived from what
    it is: the kind ("SEG", "SR"), the source image's SOP Instance UID, the
    model and the result's content (masks' bytes, measurements).

    The same result of the same model on the same image is thus the same
    instance wherever and whenever it is written (another output folder, a
    rerun), so a PACS that holds it is not sent a copy under a new UID
    (:func:`medseg.inference.push.push_scan` asks by SOP Instance UID); a
    different result (other settings, e.g. test-time augmentation, or
    another model) gets other UIDs. UIDs from pydicom's ``generate_uid``
    with ``entropy_srcs`` (SHA-512 of the sources under pydicom's root).
    """
    import hashlib

    digest = hashlib.sha256()
    for part in content:
        digest.update(part if isinstance(part, bytes) else repr(part).encode())
        digest.update(b"\0")
    sources = ["medseg", kind, str(source_uid), str(model_name), str(model_version), digest.hexdigest()]
    return generate_uid(entropy_srcs=[*sources, "series"]), generate_uid(entropy_srcs=[*sources, "instance"])


def write_dicom_seg(
    source: str | Path,
    masks: Mapping[str, np.ndarray],
    out_path: str | Path,
    *,
    model_name: str,
    model_version: str,
    structures_info: Mapping[str, tuple[str, str]] | None = None,
    series_number: int | None = None,
    instance_number: int = 1,
    variant: str = "",
) -> Path:
    """Write ``masks`` as a BINARY DICOM SEG derived from ``source``.

    Args:
        source: the single-frame radiograph the masks were predicted on
            (Part 10 or legacy ACR-NEMA). Its patient/study attributes are
            copied and its UIDs referenced.
        masks: label -> bool (Rows, Columns) at the source's full geometry;
            one segment per label, numbered 1.. in mapping order, segment
            label = the key. Empty masks are kept as empty frames.
        out_path: SEG file to write (atomically: temp name, then rename).
        model_name: recorded as Manufacturer's Model Name, Series
            Description and an algorithm parameter.
        model_version: Algorithm Version of every segment.
        structures_info: label -> (category keyword, type keyword) in
            ``pydicom.sr.codedict.codes.SCT``; defaults to
            :data:`DEFAULT_STRUCTURES_INFO` (entries given here override).
        series_number, instance_number: of the new SEG series / instance
            (Series Number default: 900, with a ``variant`` 902).
        variant: the settings the masks came from where they are not the
            defaults, in a few words (e.g. "TTA, threshold 0.45"; "" for
            the defaults): in the Series Description, and the Series Number
            is 902, so that a viewer tells them from the default
            prediction's stored beside them (:func:`series_description`).

    Returns:
        ``Path(out_path)``.

    Raises:
        ValueError: no masks, a mask of the wrong shape, or a label without
            a code.
        medseg.errors.InputError: the source is not a readable DICOM image.
    """
    source = Path(source)
    out_path = Path(out_path)
    if not masks:
        raise ValueError("no masks to write")
    info = {**DEFAULT_STRUCTURES_INFO, **(structures_info or {})}
    unknown = [label for label in masks if label not in info]
    if unknown:
        raise ValueError(
            f"no segmented property codes for {', '.join(unknown)}; pass structures_info"
        )

    src = _read_source(source)
    shape = (int(src.Rows), int(src.Columns))
    frames = []
    for label, mask in masks.items():
        arr = np.asarray(mask)
        if arr.shape != shape:
            raise ValueError(
                f"mask {label!r} has shape {arr.shape}; the source is {shape} (Rows, Columns)"
            )
        frames.append(arr.astype(bool))
    # (frames=1, Rows, Columns, segments): one source frame, segments last.
    pixel_array = np.stack(frames, axis=-1)[None].astype(np.uint8)

    algorithm = hd.AlgorithmIdentificationSequence(
        name=_ALGORITHM_NAME,
        family=codes.cid7162.ArtificialIntelligence,
        version=str(model_version),
        parameters={"model_name": str(model_name)},
    )
    descriptions = []
    for number, label in enumerate(masks, start=1):
        category, prop_type = info[label]
        kwargs = {}
        colour = _display_colour(label)
        if colour is not None:
            kwargs["display_color"] = colour
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=label,
                segmented_property_category=_sct(category),
                segmented_property_type=_sct(prop_type),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
                **kwargs,
            )
        )

    description = series_description(model_name, variant)
    if series_number is None:
        series_number = 902 if variant else 900
    uids = result_uids(
        "SEG", src.SOPInstanceUID, model_name, model_version, list(masks), pixel_array.tobytes(), description
    )
    with no_person_name_warnings():
        seg = _build_segmentation(
            src, pixel_array, descriptions, model_name, description, series_number, instance_number, uids
        )
    _drop_unreadable_pixel_measures(seg)
    with atomic_path(out_path) as tmp:
        seg.save_as(tmp)
    return out_path


def _build_segmentation(
    src: Dataset,
    pixel_array: np.ndarray,
    descriptions: list[hd.seg.SegmentDescription],
    model_name: str,
    series_description: str,
    series_number: int,
    instance_number: int,
    uids: tuple[str, str],
) -> hd.seg.Segmentation:
    """The highdicom Segmentation object (``uids``: Series and SOP Instance UIDs)."""
    return hd.seg.Segmentation(
        source_images=[src],
        pixel_array=pixel_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=uids[0],
        series_number=int(series_number),
        sop_instance_uid=uids[1],
        instance_number=int(instance_number),
        manufacturer=_SEG_MANUFACTURER,
        manufacturer_model_name=str(model_name)[:64],
        software_versions=f"medseg {medseg.__version__}",
        device_serial_number=_DEVICE_SERIAL,
        series_description=series_description,
        # Keep a frame for every segment, even an empty one, so reading back
        # always yields every label.
        omit_empty_frames=False,
    )


def _drop_unreadable_pixel_measures(seg: hd.seg.Segmentation) -> None:
    """Remove a Pixel Measures item that highdicom itself cannot read back.

    For a source without a Frame of Reference but with Pixel Spacing (a
    typical CR/DX), highdicom 0.28 writes a shared Pixel Measures Sequence
    holding Pixel Spacing only, and ``segread`` then refuses the file because
    ``PixelMeasuresSequence.from_sequence`` insists on Slice Thickness. Without
    a Frame of Reference the SEG's geometry is defined only through the
    referenced source image (the masks are at its full geometry), which is
    also what highdicom writes when the source has no Pixel Spacing, so the
    item is dropped rather than inventing a slice thickness for a projection
    radiograph.
    """
    if "FrameOfReferenceUID" in seg:
        return
    shared = seg.SharedFunctionalGroupsSequence[0]
    measures = shared.get("PixelMeasuresSequence")
    if measures is not None and not all("SliceThickness" in item for item in measures):
        del shared.PixelMeasuresSequence


def read_dicom_seg(path: str | Path) -> dict[str, np.ndarray]:
    """Read a single-source SEG back to {segment label: bool (Rows, Columns)}.

    Segments come in segment-number order. Works for BINARY and FRACTIONAL
    SEGs (fractional values are thresholded at > 0) derived from one
    single-frame source image.

    Raises:
        ValueError: the SEG references other than one source image, or two
            segments share a label.
    """
    seg = hd.seg.segread(path)
    sources = seg.get_source_image_uids()
    if len(sources) != 1:
        raise ValueError(f"expected a SEG of one source image, it references {len(sources)}")
    sop_uid = sources[0][2]
    numbers = list(seg.segment_numbers)
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[sop_uid],
        segment_numbers=numbers,
        combine_segments=False,
    )  # (1, Rows, Columns, segments)
    out: dict[str, np.ndarray] = {}
    for index, number in enumerate(numbers):
        label = str(seg.get_segment_description(number).SegmentLabel)
        if label in out:
            raise ValueError(f"two segments are labelled {label!r}")
        out[label] = pixels[0, :, :, index] > 0
    return out


__all__ = ["DEFAULT_STRUCTURES_INFO", "read_dicom_seg", "write_dicom_seg"]
