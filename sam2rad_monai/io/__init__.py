"""Ultrasound DICOM in; DICOM-SEG and NIfTI out (all writes atomic).

* :func:`read_ultrasound` -> :class:`UltrasoundImage` (file or series folder);
  bad input raises :class:`UltrasoundReadError` (a ``ValueError``).
* :func:`write_nifti`, :func:`write_nifti_like` (in a source NIfTI's layout), :func:`read_nifti_labelmap` (axis convention in
  :mod:`sam2rad_monai.io.nifti`).
* :func:`write_dicom_seg`, :func:`read_dicom_seg_labelmap` (how multi-frame
  ultrasound without a Frame of Reference is encoded: :mod:`sam2rad_monai.io.dicomseg`).
* :func:`png_frames_to_dicom_series`, :func:`png_frames_to_multiframe_dicom`
  wrap grey PNG frames as ultrasound DICOM.
"""

from __future__ import annotations

from sam2rad_monai.io.atomic import atomic_write_bytes, atomic_write_path
from sam2rad_monai.io.dicom import (
    UltrasoundImage,
    UltrasoundReadError,
    UltrasoundRegion,
    read_ultrasound,
)
from sam2rad_monai.io.dicomseg import read_dicom_seg_labelmap, segment_property_codes, write_dicom_seg
from sam2rad_monai.io.nifti import is_2d_plus_t, label_map_affine, read_nifti_labelmap, write_nifti, write_nifti_like
from sam2rad_monai.io.wrap import PatientStudy, png_frames_to_dicom_series, png_frames_to_multiframe_dicom

__all__ = [
    "PatientStudy",
    "UltrasoundImage",
    "UltrasoundReadError",
    "UltrasoundRegion",
    "atomic_write_bytes",
    "atomic_write_path",
    "is_2d_plus_t",
    "label_map_affine",
    "png_frames_to_dicom_series",
    "png_frames_to_multiframe_dicom",
    "read_dicom_seg_labelmap",
    "read_nifti_labelmap",
    "read_ultrasound",
    "segment_property_codes",
    "write_dicom_seg",
    "write_nifti",
    "write_nifti_like",
]
