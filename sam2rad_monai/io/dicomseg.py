"""DICOM-SEG output for ultrasound label maps (highdicom), and a reader for tests.

Ultrasound has no Frame of Reference
    US Image and US Multi-frame objects carry no FrameOfReferenceUID and no
    patient geometry. DICOM allows a Segmentation without a Frame of Reference:
    PS3.3 Table A.51-1 makes the Frame of Reference module "Required if Derivation
    Image Functional Group is not present", and A.51.5.1 says "If the Frame of
    Reference UID is not present, each pixel of the segmentation shall correspond
    to a pixel in a referenced image, using the Derivation Image Functional Group".
    Nothing limits this to one source frame: each SEG frame references its own
    source instance, plus Referenced Frame Number (0008,1160) for a multi-frame
    source. (D. Clunie on highdicom issue #159: without a FoR, those frame-level
    references are what a recipient uses; the mandatory Multi-frame Dimension
    module only has to index the frames uniquely.)

    highdicom 0.28 implements that only for a *single* source frame; for more it
    raises "Only a single frame is supported when the source image has no Frame of
    Reference UID" (highdicom issue #284, open). So for ``F > 1`` frames we let
    highdicom build a valid one-frame SEG (all modules, patient/study from the
    source, segment descriptions) and then write the per-frame part ourselves:
    one Derivation Image reference per frame, a second dimension index
    (Temporal Position Index in the Frame Content Sequence: the source frame
    order, i.e. time for cine and InstanceNumber order for a series), the bit
    packed pixel data, and the full list of referenced instances. The result is
    read back with highdicom and compared with the input before the file is
    written, so a change in highdicom cannot produce a silently wrong SEG; it
    passes dciodvfy. No NIfTI fallback is needed.

Segments
    ``class_names[k - 1]`` describes label value ``k`` (1..C); 0 is background and
    has no segment. BINARY segmentation, one segment per class, empty frames kept.
"""

from __future__ import annotations

import copy
import io
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes

from sam2rad_monai.io.atomic import atomic_write_bytes
from sam2rad_monai.io.dicom import UltrasoundImage, package_version

__all__ = ["read_dicom_seg_labelmap", "segment_property_codes", "write_dicom_seg"]

MANUFACTURER = "sam2rad-monai"
_SINGLE_FRAME_CLASS = {
    "1.2.840.10008.5.1.4.1.1.3.1": "1.2.840.10008.5.1.4.1.1.6.1",  # US Multi-frame -> US Image
    "1.2.840.10008.5.1.4.1.1.3": "1.2.840.10008.5.1.4.1.1.6",  # retired variants
}
ALGORITHM_NAME = "Sam2Rad"

# Class-name words -> SNOMED CT segmented property type (CID 7151 members).
_ANATOMY_CODES = (
    (("artery", "arteries", "arterial"), codes.SCT.Artery),
    (("vein", "veins", "venous"), codes.SCT.Vein),
    (("vessel", "vessels", "vascular", "blood vessel"), codes.SCT.BloodVessel),
    (("nerve", "nerves", "plexus", "neural"), codes.SCT.Nerve),
)


def segment_property_codes(class_name: str) -> tuple[hd.sr.CodedConcept, hd.sr.CodedConcept]:
    """(category, type) codes for a class name: nerve / vessel / artery / vein, else generic.

    Matching is on whole words, case-insensitive ("Median nerve", "blood_vessel").
    Unknown names get category and type "Tissue" (SCT 85756007), which says no
    more than we know.
    """
    words = set(re.split(r"[^a-z]+", class_name.lower())) - {""}
    joined = " ".join(sorted(words))
    for aliases, code in _ANATOMY_CODES:
        if any(alias in words or alias == joined for alias in aliases):
            return _concept(codes.SCT.AnatomicalStructure), _concept(code)
    return _concept(codes.SCT.Tissue), _concept(codes.SCT.Tissue)


def write_dicom_seg(
    label_map: np.ndarray,
    source: UltrasoundImage,
    class_names: list[str],
    path: str | os.PathLike[str],
    *,
    backbone: str,
    algorithm_version: str,
    semiautomatic: bool = False,
    series_number: int = 901,
    series_description: str | None = None,
) -> Path:
    """Write ``label_map`` (``(H, W)`` or ``(F, H, W)``, values 0..C) as a BINARY DICOM-SEG.

    The label map must match ``source`` pixel for pixel (same F, H, W), because
    ultrasound has no Frame of Reference. ``class_names`` lists the C foreground
    classes (label value k -> ``class_names[k-1]``; no "background" entry).
    AlgorithmIdentificationSequence names Sam2Rad, ``backbone`` (as an algorithm
    parameter) and ``algorithm_version``; algorithm type is AUTOMATIC, or
    SEMIAUTOMATIC when ``semiautomatic`` (e.g. click-refined masks). Patient and
    study attributes come from the source. Written atomically; returns ``path``.
    """
    labels = _check_label_map(label_map, source, class_names)
    descriptions = _segment_descriptions(class_names, backbone, algorithm_version, semiautomatic)
    kwargs: dict[str, Any] = {
        "segment_descriptions": descriptions,
        "series_number": series_number,
        "series_description": series_description or f"{ALGORITHM_NAME} segmentation ({backbone})",
    }
    if labels.shape[0] == 1 and not source.is_multiframe_instance:
        seg = _highdicom_seg(source.sources, labels[0], **kwargs)
    else:
        seg = _highdicom_seg([_one_frame_proxy(source.sources[0])], labels[0], **kwargs)
        _extend_to_all_frames(seg, source, labels, len(class_names))
    _complete_general_image(seg, source.sources[0])
    data = _to_bytes(seg)
    _verify(data, labels, len(class_names))
    return atomic_write_bytes(path, data)


def read_dicom_seg_labelmap(path: str | os.PathLike[str] | Dataset, class_count: int) -> np.ndarray:
    """Read a SEG written by :func:`write_dicom_seg` back to an ``(F, H, W)`` uint8 label map.

    Frames are in source order (source frame number for a multi-frame source,
    else the order in which the SEG references the source instances). Segments
    1..``class_count`` are combined into label values 1..``class_count``.
    """
    seg = hd.seg.segread(path) if not isinstance(path, Dataset) else hd.seg.Segmentation.from_dataset(path)
    if seg.number_of_segments < class_count:
        raise ValueError(f"{_name(path)}: SEG has {seg.number_of_segments} segments, expected {class_count}")
    segment_numbers = list(range(1, class_count + 1))
    refs = _ordered_source_refs(seg)
    uids = list(dict.fromkeys(uid for uid, _ in refs))
    if len(uids) == 1 and refs[0][1] is not None:
        arr = seg.get_pixels_by_source_frame(
            source_sop_instance_uid=uids[0],
            source_frame_numbers=sorted(frame for _, frame in refs if frame is not None),
            segment_numbers=segment_numbers,
            combine_segments=True,
        )
    else:
        arr = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=uids,
            segment_numbers=segment_numbers,
            combine_segments=True,
        )
    return np.ascontiguousarray(arr, dtype=np.uint8)


# ---------------------------------------------------------------------- validation


def _check_label_map(label_map: np.ndarray, source: UltrasoundImage, class_names: Sequence[str]) -> np.ndarray:
    if not class_names:
        raise ValueError("class_names is empty; give one name per foreground label value 1..C")
    if class_names[0].strip().lower() in {"background", "bg"}:
        raise ValueError(
            "class_names lists the foreground classes for label values 1..C; drop the "
            f"'{class_names[0]}' entry (label 0 is background and gets no segment)"
        )
    arr = np.asarray(label_map)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.dtype.kind not in "iub":
        raise ValueError(f"label map must be an integer (H, W) or (F, H, W) array, got {arr.shape} {arr.dtype}")
    expected = (source.n_frames, *source.shape_hw)
    if arr.shape != expected:
        raise ValueError(
            f"label map shape {arr.shape} does not match the source frames {expected}; "
            "without a Frame of Reference a SEG must match its source pixel for pixel"
        )
    if arr.size and (arr.min() < 0 or arr.max() > len(class_names)):
        raise ValueError(
            f"label values must be in 0..{len(class_names)} (one per class name), got {arr.min()}..{arr.max()}"
        )
    return arr.astype(np.uint8)


# -------------------------------------------------------------------- highdicom part


def _concept(code: pydicom.sr.coding.Code) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(code.value, code.scheme_designator, code.meaning)


def _segment_descriptions(
    class_names: Sequence[str], backbone: str, algorithm_version: str, semiautomatic: bool
) -> list[hd.seg.SegmentDescription]:
    algorithm = hd.AlgorithmIdentificationSequence(
        name=ALGORITHM_NAME,
        version=algorithm_version,
        family=codes.cid7162.ArtificialIntelligence,
        parameters={"backbone": backbone},
    )
    algorithm_type = (
        hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC if semiautomatic
        else hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
    )
    out = []
    for number, name in enumerate(class_names, start=1):
        category, prop_type = segment_property_codes(name)
        out.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=name[:64],
                segmented_property_category=category,
                segmented_property_type=prop_type,
                algorithm_type=algorithm_type,
                algorithm_identification=algorithm,
            )
        )
    return out


def _highdicom_seg(
    sources: Sequence[Dataset],
    frame: np.ndarray,
    *,
    segment_descriptions: list[hd.seg.SegmentDescription],
    series_number: int,
    series_description: str,
) -> hd.seg.Segmentation:
    return hd.seg.Segmentation(
        source_images=list(sources),
        pixel_array=frame,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=ALGORITHM_NAME,
        software_versions=package_version(),
        device_serial_number="1",
        series_description=series_description,
        content_label="SAM2RAD",
        content_description=f"{ALGORITHM_NAME} label map",
        omit_empty_frames=False,  # empty frames missing from a SEG trip some viewers
    )


def _one_frame_proxy(source: Dataset) -> Dataset:
    """A single-frame look-alike of ``source`` for highdicom to build on.

    highdicom only reads the header. It treats every multi-frame IOD as an
    enhanced one (it looks for SharedFunctionalGroupsSequence, which US
    Multi-frame does not have), so the proxy claims the single-frame US SOP
    class. Every reference highdicom derives from the proxy is rewritten from
    the real source in :func:`_extend_to_all_frames`.
    """
    proxy = copy.deepcopy(source)
    proxy.SOPClassUID = _SINGLE_FRAME_CLASS.get(str(proxy.SOPClassUID), proxy.SOPClassUID)
    for keyword in ("NumberOfFrames", "FrameIncrementPointer"):
        if keyword in proxy:
            delattr(proxy, keyword)
    return proxy


def _complete_general_image(seg: hd.seg.Segmentation, source: Dataset) -> None:
    # General Image: Patient Orientation is type 2C, required when there is no
    # Image Orientation (Patient) - always the case for US (dciodvfy flags it).
    if "PatientOrientation" not in seg:
        seg.PatientOrientation = source.get("PatientOrientation", "")


# ------------------------------------------------------ frames beyond highdicom's one


def _extend_to_all_frames(
    seg: hd.seg.Segmentation, source: UltrasoundImage, labels: np.ndarray, n_segments: int
) -> None:
    """Turn highdicom's one-frame SEG into an F-frame one (see the module docstring)."""
    templates = _frame_templates(seg)
    refs = _source_frame_refs(source)
    items: list[Dataset] = []
    for segment in range(1, n_segments + 1):
        for index, (sop_class, sop_uid, frame_number) in enumerate(refs, start=1):
            items.append(_frame_item(templates[segment], segment, index, sop_class, sop_uid, frame_number))
    seg.PerFrameFunctionalGroupsSequence = DicomSequence(items)
    seg.DimensionIndexSequence.append(_temporal_dimension(seg.DimensionIndexSequence[0].DimensionOrganizationUID))
    seg.NumberOfFrames = len(items)
    seg.PixelData = _pack_binary_frames(labels, n_segments)
    _reference_all_instances(seg, source.sources)


def _frame_templates(seg: hd.seg.Segmentation) -> dict[int, Dataset]:
    """highdicom's per-frame item of each segment number."""
    items = list(seg.PerFrameFunctionalGroupsSequence)
    if len(items) == 1 and "SegmentIdentificationSequence" not in items[0]:
        # With a single segment highdicom shares the segment identification
        # across frames (Shared Functional Groups), which stays valid for F frames.
        return {1: items[0]}
    return {int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber): item for item in items}


def _source_frame_refs(source: UltrasoundImage) -> list[tuple[str, str, int | None]]:
    if source.is_multiframe_instance:
        ds = source.sources[0]
        return [(ds.SOPClassUID, ds.SOPInstanceUID, f) for f in range(1, source.n_frames + 1)]
    return [(ds.SOPClassUID, ds.SOPInstanceUID, None) for ds in source.sources]


def _frame_item(
    template: Dataset, segment: int, index: int, sop_class: str, sop_uid: str, frame_number: int | None
) -> Dataset:
    item = copy.deepcopy(template)
    content = item.FrameContentSequence[0]
    content.DimensionIndexValues = [segment, index]
    content.TemporalPositionIndex = index
    ref = item.DerivationImageSequence[0].SourceImageSequence[0]
    ref.ReferencedSOPClassUID = sop_class
    ref.ReferencedSOPInstanceUID = sop_uid
    if frame_number is not None:
        ref.ReferencedFrameNumber = frame_number
    return item


def _temporal_dimension(organization_uid: str) -> Dataset:
    dim = Dataset()
    dim.DimensionOrganizationUID = organization_uid
    dim.DimensionIndexPointer = pydicom.datadict.tag_for_keyword("TemporalPositionIndex")
    dim.FunctionalGroupPointer = pydicom.datadict.tag_for_keyword("FrameContentSequence")
    dim.DimensionDescriptionLabel = "Source Frame Order"
    return dim


def _pack_binary_frames(labels: np.ndarray, n_segments: int) -> bytes:
    # Same frame order as the functional groups: segment-major, then source frame.
    # BINARY frames are one continuous little-endian bit stream (PS3.5 8.1.1).
    bits = np.stack([labels == k for k in range(1, n_segments + 1)]).reshape(-1)
    packed = np.packbits(bits, bitorder="little").tobytes()
    return packed + b"\x00" * (len(packed) % 2)


def _reference_all_instances(seg: hd.seg.Segmentation, sources: Sequence[Dataset]) -> None:
    unique = list({ds.SOPInstanceUID: ds for ds in sources}.values())
    refs = []
    for ds in unique:
        ref = Dataset()
        ref.ReferencedSOPClassUID = ds.SOPClassUID
        ref.ReferencedSOPInstanceUID = ds.SOPInstanceUID
        refs.append(ref)
    seg.SourceImageSequence = DicomSequence(copy.deepcopy(refs))
    series = Dataset()
    series.SeriesInstanceUID = unique[0].SeriesInstanceUID
    series.ReferencedInstanceSequence = DicomSequence(refs)
    seg.ReferencedSeriesSequence = DicomSequence([series])


# ------------------------------------------------------------------- write & check


def _to_bytes(seg: Dataset) -> bytes:
    buffer = io.BytesIO()
    seg.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _verify(data: bytes, labels: np.ndarray, n_segments: int) -> None:
    # Cheap insurance: what a reader gets back must be exactly what we meant.
    back = read_dicom_seg_labelmap(pydicom.dcmread(io.BytesIO(data)), n_segments)
    if back.shape != labels.shape or not np.array_equal(back, labels):
        raise RuntimeError("internal error: the DICOM-SEG does not read back to the label map; nothing written")


def _ordered_source_refs(seg: Dataset) -> list[tuple[str, int | None]]:
    seen: dict[tuple[str, int | None], None] = {}
    for item in seg.PerFrameFunctionalGroupsSequence:
        for derivation in item.get("DerivationImageSequence", []):
            for ref in derivation.get("SourceImageSequence", []):
                seen.setdefault((str(ref.ReferencedSOPInstanceUID), _frame_number(ref)), None)
    if not seen:
        raise ValueError("SEG has no per-frame source references (Derivation Image Sequence)")
    return list(seen)


def _frame_number(ref: Dataset) -> int | None:
    value = ref.get("ReferencedFrameNumber")
    if value in (None, ""):
        return None
    # One SEG frame derives from one source frame, so a multi-valued entry has one value.
    return int(value[0]) if isinstance(value, pydicom.multival.MultiValue) else int(value)


def _name(path: object) -> str:
    return str(path) if not isinstance(path, Dataset) else "<dataset>"
