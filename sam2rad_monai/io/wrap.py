"""Wrap 8-bit grey frames (PNG files or arrays) as ultrasound DICOM.

Useful to try the DICOM path of the bundle on PNG data sets, and in tests. The
output is honest about its origin: ImageType is DERIVED, DerivationDescription
says the pixels were converted from PNG, and no patient geometry is invented
(Ultrasound objects have no Frame of Reference; only the US region calibration
you pass in is written).

* :func:`png_frames_to_dicom_series`: one Ultrasound Image Storage instance per
  frame, all in one series (InstanceNumber 1..n).
* :func:`png_frames_to_multiframe_dicom`: one Ultrasound Multi-frame Image
  Storage instance (cine), FrameTime set.

Both produce MONOCHROME2, 8 bit, explicit VR little endian, and pass dciodvfy.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, UID, generate_uid

from sam2rad_monai.io.atomic import atomic_write_path
from sam2rad_monai.io.dicom import package_version

__all__ = ["PatientStudy", "png_frames_to_dicom_series", "png_frames_to_multiframe_dicom"]

US_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.6.1")
US_MULTIFRAME_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.3.1")

FrameSource = str | os.PathLike[str] | np.ndarray


@dataclass(frozen=True)
class PatientStudy:
    """Patient and study attributes written into every wrapped instance.

    The defaults describe an anonymous volunteer scan; replace them with
    real values when wrapping clinical data.
    """

    patient_name: str = "Volunteer^Anonymous"
    patient_id: str = "SAM2RAD-0001"
    patient_birth_date: str = ""
    patient_sex: str = "O"
    study_date: str = ""  # YYYYMMDD; empty means today
    study_time: str = ""  # HHMMSS; empty means now
    study_id: str = "1"
    accession_number: str = ""
    study_description: str = "Ultrasound-guided regional anaesthesia"
    referring_physician_name: str = ""
    body_part_examined: str = ""
    institution_name: str = ""
    laterality: str = ""  # "R", "L" or empty
    #: ImageType value 3, a defined term of PS3.3 C.8.5.6.1.1 (e.g. "VASCULAR", "SMALL PARTS").
    us_exam_type: str = "MUSCULOSKELETAL"


def png_frames_to_dicom_series(
    pngs: Sequence[FrameSource],
    out_dir: str | os.PathLike[str],
    *,
    spacing_mm: tuple[float, float] = (0.1, 0.1),
    patient_study: PatientStudy | None = None,
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    series_number: int = 1,
    series_description: str = "B-mode frames (wrapped PNG)",
    frame_time_ms: float | None = None,
    manufacturer: str = "sam2rad-monai",
) -> list[Path]:
    """Write one single-frame Ultrasound Image Storage file per frame.

    ``spacing_mm`` is (row, column) pixel size in mm and is written as
    PhysicalDeltaY/X (in cm, as DICOM requires) of one US region covering the
    whole frame. Files are ``out_dir/IM0001.dcm`` ... in frame order, written
    atomically; returns their paths. Frames of different sizes raise ValueError.
    ``frame_time_ms`` (optional) spaces the AcquisitionTime of consecutive frames.
    """
    frames, names = _load_frames(pngs)
    out_dir = Path(out_dir)
    common = _common_dataset(frames[0], spacing_mm, patient_study, study_instance_uid,
                             series_instance_uid, series_number, series_description, manufacturer)
    start = _acquisition_start(common)
    paths: list[Path] = []
    for index, (frame, name) in enumerate(zip(frames, names), start=1):
        ds = _copy_dataset(common)
        offset_ms = (index - 1) * (frame_time_ms or 0.0)
        _set_instance(ds, US_IMAGE_STORAGE, index, frame[None], start + _dt.timedelta(milliseconds=offset_ms))
        ds.DerivationDescription = f"Converted from 8-bit grey {name} by sam2rad-monai"
        paths.append(_save(ds, out_dir / f"IM{index:04d}.dcm"))
    return paths


def png_frames_to_multiframe_dicom(
    pngs: Sequence[FrameSource],
    out_path: str | os.PathLike[str],
    *,
    spacing_mm: tuple[float, float] = (0.1, 0.1),
    frame_time_ms: float = 33.3,
    patient_study: PatientStudy | None = None,
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    series_number: int = 1,
    series_description: str = "B-mode cine (wrapped PNG)",
    manufacturer: str = "sam2rad-monai",
) -> Path:
    """Write all frames as one Ultrasound Multi-frame Image Storage file (cine).

    ``spacing_mm`` is (row, column) in mm (see :func:`png_frames_to_dicom_series`);
    ``frame_time_ms`` becomes FrameTime, the FrameIncrementPointer target.
    Written atomically; returns ``out_path``. Frames of different sizes raise ValueError.
    """
    if frame_time_ms <= 0:
        raise ValueError(f"frame_time_ms must be > 0, got {frame_time_ms}")
    frames, names = _load_frames(pngs)
    ds = _common_dataset(frames[0], spacing_mm, patient_study, study_instance_uid,
                         series_instance_uid, series_number, series_description, manufacturer)
    _set_instance(ds, US_MULTIFRAME_IMAGE_STORAGE, 1, np.stack(frames), _acquisition_start(ds))
    ds.NumberOfFrames = len(frames)
    ds.FrameIncrementPointer = 0x00181063  # FrameTime
    ds.FrameTime = _ds_value(frame_time_ms)
    ds.CineRate = max(1, round(1000.0 / frame_time_ms))
    ds.DerivationDescription = f"Converted from {len(frames)} 8-bit grey frames by sam2rad-monai"
    return _save(ds, Path(out_path))


# ------------------------------------------------------------------------- helpers


def _load_frames(sources: Sequence[FrameSource]) -> tuple[list[np.ndarray], list[str]]:
    if len(sources) == 0:
        raise ValueError("no frames given")
    frames: list[np.ndarray] = []
    names: list[str] = []
    for index, src in enumerate(sources):
        if isinstance(src, np.ndarray):
            arr, name = _check_array(src, index), f"array #{index}"
        else:
            # Grey B-mode stored as RGB (UI overlays) is reduced to luminance.
            with Image.open(src) as img:
                arr, name = np.asarray(img.convert("L"), dtype=np.uint8), Path(src).name
        frames.append(np.ascontiguousarray(arr))
        names.append(name)
    shapes = {f.shape for f in frames}
    if len(shapes) > 1:
        listing = ", ".join(f"{n}: {f.shape[0]}x{f.shape[1]}" for n, f in zip(names, frames))
        raise ValueError(
            f"frames differ in size ({listing}); a series or multi-frame file needs frames of one size"
        )
    return frames, names


def _check_array(arr: np.ndarray, index: int) -> np.ndarray:
    if arr.ndim != 2 or arr.dtype != np.uint8:
        raise ValueError(f"array #{index} must be a 2D uint8 grey frame, got {arr.shape} {arr.dtype}")
    return arr


def _common_dataset(
    frame: np.ndarray,
    spacing_mm: tuple[float, float],
    patient_study: PatientStudy | None,
    study_uid: str | None,
    series_uid: str | None,
    series_number: int,
    series_description: str,
    manufacturer: str,
) -> Dataset:
    ps = patient_study or PatientStudy()
    now = _dt.datetime.now()
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    # Patient
    ds.PatientName = ps.patient_name
    ds.PatientID = ps.patient_id
    ds.PatientBirthDate = ps.patient_birth_date
    ds.PatientSex = ps.patient_sex
    # General Study
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.StudyDate = ps.study_date or now.strftime("%Y%m%d")
    ds.StudyTime = ps.study_time or now.strftime("%H%M%S")
    ds.ReferringPhysicianName = ps.referring_physician_name
    ds.StudyID = ps.study_id
    ds.AccessionNumber = ps.accession_number
    ds.StudyDescription = ps.study_description
    # General Series
    ds.Modality = "US"
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series_description
    ds.SeriesDate = ds.StudyDate
    ds.Laterality = ps.laterality  # type 2C: empty = unpaired structure or unknown
    ds.SeriesTime = ds.StudyTime
    if ps.body_part_examined:
        ds.BodyPartExamined = ps.body_part_examined
    # General Equipment
    ds.Manufacturer = manufacturer
    if ps.institution_name:
        ds.InstitutionName = ps.institution_name
    ds.SoftwareVersions = package_version()
    # Image Pixel / US Image
    ds.Rows, ds.Columns = (int(v) for v in frame.shape)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    # Value 4 "0001" = 2D imaging only (bit mask of PS3.3 C.8.5.6.1.1).
    ds.ImageType = ["DERIVED", "PRIMARY", ps.us_exam_type, "0001"]
    ds.PatientOrientation = ""
    ds.BurnedInAnnotation = "NO"
    ds.SequenceOfUltrasoundRegions = DicomSequence([_full_frame_region(frame.shape, spacing_mm)])
    return ds


def _full_frame_region(shape: tuple[int, ...], spacing_mm: tuple[float, float]) -> Dataset:
    row_mm, col_mm = (float(v) for v in spacing_mm)
    if row_mm <= 0 or col_mm <= 0:
        raise ValueError(f"spacing_mm must be positive (row, col) mm, got {spacing_mm}")
    region = Dataset()
    region.RegionSpatialFormat = 1  # 2D
    region.RegionDataType = 1  # tissue
    region.RegionFlags = 0
    region.RegionLocationMinX0 = 0
    region.RegionLocationMinY0 = 0
    region.RegionLocationMaxX1 = int(shape[1]) - 1
    region.RegionLocationMaxY1 = int(shape[0]) - 1
    region.PhysicalUnitsXDirection = 3  # cm
    region.PhysicalUnitsYDirection = 3  # cm
    region.PhysicalDeltaX = col_mm / 10.0
    region.PhysicalDeltaY = row_mm / 10.0
    return region


def _set_instance(ds: Dataset, sop_class: UID, number: int, frames: np.ndarray, when: _dt.datetime) -> None:
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.InstanceNumber = number
    ds.ContentDate = ds.AcquisitionDate = when.strftime("%Y%m%d")
    ds.ContentTime = ds.AcquisitionTime = when.strftime("%H%M%S.%f")
    ds.InstanceCreationDate = _dt.datetime.now().strftime("%Y%m%d")
    ds.InstanceCreationTime = _dt.datetime.now().strftime("%H%M%S")
    ds.PixelData = np.ascontiguousarray(frames, dtype=np.uint8).tobytes()
    ds["PixelData"].VR = "OB"


def _acquisition_start(ds: Dataset) -> _dt.datetime:
    return _dt.datetime.strptime(f"{ds.StudyDate}{str(ds.StudyTime)[:6]}", "%Y%m%d%H%M%S")


def _copy_dataset(ds: Dataset) -> Dataset:
    out = Dataset()
    for elem in ds:
        if elem.VR == "SQ":
            out.add_new(elem.tag, "SQ", DicomSequence([_copy_dataset(item) for item in elem.value]))
        else:
            out.add_new(elem.tag, elem.VR, elem.value)
    return out


def _save(ds: Dataset, path: Path) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    with atomic_write_path(path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    return path


def _ds_value(value: float) -> str:
    # DS is limited to 16 characters.
    return f"{value:.6g}"
