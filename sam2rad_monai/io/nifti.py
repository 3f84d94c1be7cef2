"""NIfTI output for label maps, with the axis convention ITK-SNAP and 3D Slicer expect.

Axis convention
    Our label maps are image-ordered, ``(H, W)`` or ``(F, H, W)`` (row, column,
    frame last-to-first as in the DICOM pixel data). NIfTI stores ``data[i, j, k]``
    with ``i`` the fastest axis on disk, so we write ``data = label_map.T``:
    ``i`` = column, ``j`` = row, ``k`` = frame. The affine is
    ``diag(-col_mm, -row_mm, 1, 1)`` in RAS, i.e. the identity direction in ITK's
    LPS world. That is exactly what ITK (and so SimpleITK, ITK-SNAP, 3D Slicer)
    assigns to a PNG or an ultrasound DICOM without geometry, so the mask overlays
    the source image upright, not mirrored or rotated.

    * ``nibabel.load(path).get_fdata().T`` (or ``np.asanyarray(img.dataobj).T``)
      gives back the label map; :func:`read_nifti_labelmap` does that for you.
    * ``SimpleITK.GetArrayFromImage(SimpleITK.ReadImage(path))`` gives the label
      map directly, because SimpleITK arrays are already (k, j, i).

    A single 2D frame is written as a 2D NIfTI (shape ``(W, H)``, like MONAI's
    ``squeeze_end_dims=True``); both viewers show it as one slice. A cine loop
    ``(F, H, W)`` is written as 2D+t, the layout the NIfTI-1 standard gives time:
    shape ``(W, H, 1, F)``, the fourth axis time, ``pixdim[4]`` the frame time in
    seconds (``xyzt_units`` time "sec") where the source gives one (DICOM
    FrameTime / FrameTimeVector), else 1 with the time unit "unknown". ITK reads it
    as a 4D image of one slice; 3D Slicer loads it as a sequence.

Spacing
    ``spacing_mm`` is (row, column) mm, e.g. :attr:`UltrasoundImage.spacing_mm`
    from the US region calibration. Without it the pixels are 1 mm, which only
    means "unknown"; the NIfTI header's ``descrip`` says which case applies.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np

from sam2rad_monai.io.atomic import atomic_write_path

__all__ = ["NIFTI_SUFFIXES", "is_2d_plus_t", "label_map_affine", "read_nifti_labelmap", "write_nifti",
           "write_nifti_like"]

NIFTI_SUFFIXES = (".nii.gz", ".nii")  # ".nii.gz" first: a name is matched against the longest suffix first

_SCANNER_CODE = 1  # qform/sform code "scanner": what ITK writes for its own images


def is_2d_plus_t(shape: tuple[int, ...]) -> bool:
    """Whether a NIfTI array shape is a 2D+t loop, ``(x, y, 1, frames)`` with more than one frame."""
    return len(shape) == 4 and shape[2] == 1 and shape[3] > 1


def label_map_affine(spacing_mm: tuple[float, float] | None) -> np.ndarray:
    """RAS affine for ``label_map.T`` data (see the module docstring)."""
    row_mm, col_mm = _checked_spacing(spacing_mm)
    return np.diag([-col_mm, -row_mm, 1.0, 1.0])


def write_nifti(
    label_map: np.ndarray,
    path: str | os.PathLike[str],
    spacing_mm: tuple[float, float] | None = None,
    frame_time_ms: float | None = None,
) -> Path:
    """Write a uint8 label map ``(H, W)``, or a loop ``(F, H, W)`` as 2D+t, to ``.nii``/``.nii.gz`` atomically.

    Values must be integers in 0..255 (0 = background); ``frame_time_ms`` (a loop's time between frames) goes to
    the header's time step. Returns the path written.
    """
    path = Path(path)
    if not path.name.endswith(NIFTI_SUFFIXES):
        raise ValueError(f"{path}: NIfTI output needs a .nii or .nii.gz name")
    if frame_time_ms is not None and not frame_time_ms > 0:
        raise ValueError(f"frame_time_ms must be > 0, got {frame_time_ms}")
    data = _as_uint8_label_map(label_map).T  # (W, H) or (W, H, F)
    if data.ndim == 3:
        data = data[:, :, None, :]
    img = nib.Nifti1Image(np.ascontiguousarray(data), label_map_affine(spacing_mm))
    _describe(img, spacing_mm)
    if data.ndim == 4:
        zooms = img.header.get_zooms()
        img.header.set_zooms(zooms[:3] + ((frame_time_ms / 1000.0) if frame_time_ms else 1.0,))
        img.header.set_xyzt_units(xyz="mm", t="sec" if frame_time_ms else "unknown")
    with atomic_write_path(path) as tmp:
        nib.save(img, tmp)
    return path


def read_nifti_labelmap(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a NIfTI written by :func:`write_nifti` back to the ``(H, W)``/``(F, H, W)`` uint8 array."""
    data = np.asanyarray(nib.load(str(path)).dataobj).astype(np.uint8)
    if is_2d_plus_t(data.shape):
        data = data[:, :, 0, :]
    return np.ascontiguousarray(data.T)


def _as_uint8_label_map(label_map: np.ndarray) -> np.ndarray:
    arr = np.asarray(label_map)
    if arr.ndim not in (2, 3):
        raise ValueError(f"label map must be (H, W) or (F, H, W), got shape {arr.shape}")
    if arr.dtype.kind == "b":
        return arr.astype(np.uint8)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"label map must hold integer labels, got dtype {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise ValueError(f"label values must be in 0..255, got {arr.min()}..{arr.max()}")
    return arr.astype(np.uint8, copy=False)


def _checked_spacing(spacing_mm: tuple[float, float] | None) -> tuple[float, float]:
    if spacing_mm is None:
        return 1.0, 1.0
    row_mm, col_mm = (float(v) for v in spacing_mm)
    if not (row_mm > 0 and col_mm > 0):
        raise ValueError(f"spacing_mm must be positive (row, col) mm, got {spacing_mm}")
    return row_mm, col_mm


def _describe(img: nib.Nifti1Image, spacing_mm: tuple[float, float] | None) -> None:
    img.set_qform(img.affine, code=_SCANNER_CODE)
    img.set_sform(img.affine, code=_SCANNER_CODE)
    img.header.set_xyzt_units(xyz="mm")
    img.header.set_intent("label", name="sam2rad")
    img.header["descrip"] = (
        b"sam2rad label map; pixel size from US regions" if spacing_mm is not None
        else b"sam2rad label map; pixel size unknown (1 mm)"
    )


def write_nifti_like(labels: np.ndarray, source: nib.spatialimages.SpatialImage, path: Path) -> Path:
    """Write (F, H, W) labels in the source NIfTI's array layout, affine and voxel / time steps, so it overlays voxel
    for voxel (a 2D+t source, ``(H, W, 1, F)``, gives a 2D+t label map)."""
    shape = source.shape
    if is_2d_plus_t(shape):
        data = labels.transpose(1, 2, 0)[:, :, None, :]
    elif len(shape) >= 3 and shape[2] > 1:
        data = labels.transpose(1, 2, 0)
    else:
        data = labels[0].reshape(shape[:2] + (1,) * (len(shape) - 2)) if len(shape) > 2 else labels[0]
    img = nib.Nifti1Image(np.ascontiguousarray(data, dtype=np.uint8), source.affine)
    # keep the source's qform/sform codes so viewers place the labels exactly where the image is
    _, qcode = source.get_qform(coded=True)
    _, scode = source.get_sform(coded=True)
    img.set_qform(source.affine, code=int(qcode) if qcode else 1)
    img.set_sform(source.affine, code=int(scode) if scode else 1)
    img.header.set_zooms(source.header.get_zooms()[:data.ndim])
    img.header.set_xyzt_units(*source.header.get_xyzt_units())
    img.header.set_intent("label", name="sam2rad")
    with atomic_write_path(path) as tmp:
        nib.save(img, tmp)
    return path
