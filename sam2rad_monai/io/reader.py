"""A MONAI :class:`~monai.data.ImageReader` for ultrasound DICOM, so that ``LoadImage`` reads a DICOM frame in
training and evaluation exactly as bundle inference and the MONAI Label app read it (:func:`read_ultrasound`, then
:meth:`UltrasoundImage.rgb_uint8`: one intensity rule for 8- and 16-bit data, every photometric interpretation the
project reads). MONAI's own DICOM readers (ITK, pydicom-based ``PydicomReader``) read CT / MR series as volumes and
know neither ultrasound's palette and YBR colour spaces nor the ultrasound region calibration, hence this one.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import ImageReader
from monai.utils import ensure_tuple

from sam2rad_monai.io.dicom import DICOM_SUFFIXES, UltrasoundImage, read_ultrasound

__all__ = ["UltrasoundDicomReader"]


class UltrasoundDicomReader(ImageReader):
    """Read one single-frame ultrasound DICOM file as an (H, W, 3) uint8 frame, rows first (the project's axis
    convention, :mod:`sam2rad_monai.transforms`), with ``spacing`` (row, column mm) in the metadata when the file
    gives it. ``read`` raises on anything else, as ``LoadImage`` needs of a reader it is given explicitly (it then
    tries the next one): files without a DICOM suffix, multi-frame files (a training pair is one frame).
    """

    def verify_suffix(self, filename: Sequence[str | os.PathLike[str]] | str | os.PathLike[str]) -> bool:
        return all(str(f).lower().endswith(DICOM_SUFFIXES) for f in ensure_tuple(filename))

    def read(self, data: Sequence[str | os.PathLike[str]] | str | os.PathLike[str], **kwargs: Any
             ) -> UltrasoundImage | list[UltrasoundImage]:
        paths = ensure_tuple(data)
        if not self.verify_suffix(paths):
            raise ValueError(f"{paths}: not a DICOM file name ({', '.join(DICOM_SUFFIXES)})")
        images = [read_ultrasound(Path(p)) for p in paths]
        return images[0] if len(images) == 1 else images

    def get_data(self, img: UltrasoundImage | list[UltrasoundImage]) -> tuple[np.ndarray, dict[str, Any]]:
        images = ensure_tuple(img)
        if len(images) != 1:
            raise ValueError(f"read one DICOM file per image, got {len(images)}")
        image = images[0]
        if image.n_frames != 1:
            raise ValueError(f"{image.paths[0]}: {image.n_frames} frames; a training or evaluation image is one "
                             "frame (bundle inference reads multi-frame files)")
        frame = image.rgb_uint8()[0]
        # spatial_shape (width, height), as MONAI's PILReader reports it whatever its indexing: tools that restore a
        # label map to its source's size from this record (MONAI Label's Restored) read it that way
        meta: dict[str, Any] = {"spatial_shape": np.asarray(frame.shape[1::-1]), "original_channel_dim": -1,
                                "filename_or_obj": str(image.paths[0])}
        if image.spacing_mm is not None:
            meta["spacing"] = np.asarray(image.spacing_mm, dtype=np.float64)
        return frame, meta
