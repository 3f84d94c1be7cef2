"""Ultrasound DICOM reader: one file (single- or multi-frame) or a series folder.

Supported input
    Ultrasound Image Storage, Ultrasound Multi-frame Image Storage (and, in
    practice, any image SOP class with the same pixel attributes);
    MONOCHROME1/2, RGB, YBR_FULL, YBR_FULL_422, YBR_RCT, YBR_ICT, PALETTE COLOR;
    8 and 16 bits; little and big endian; every transfer syntax for which a
    pydicom pixel-data decoder plugin is installed (uncompressed, RLE, JPEG
    baseline, JPEG lossless, JPEG-LS, JPEG 2000 with pylibjpeg-*).

Conventions of :class:`UltrasoundImage.frames`
    * shape ``(F, H, W)`` for grey and ``(F, H, W, 3)`` for colour, even for a
      single frame (``F == 1``);
    * YBR_* data come out as RGB: pydicom >= 3 converts them while decoding
      (JPEG 2000 YBR_RCT/ICT are converted by the codec), so no second
      conversion is made here;
    * PALETTE COLOR is expanded to RGB with :func:`pydicom.pixels.apply_color_lut`
      (uint16 when the LUT entries are 16 bit);
    * MONOCHROME1 is inverted so that higher values are brighter everywhere;
    * signed pixel data are shifted to the unsigned range of the same width.

Bad input raises :class:`UltrasoundReadError` (a ``ValueError``) with a one-line
message ``"<path>: <reason>"``.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import UID

__all__ = [
    "DICOM_SUFFIXES",
    "UltrasoundImage",
    "UltrasoundReadError",
    "UltrasoundRegion",
    "instance_order_key",
    "package_version",
    "read_ultrasound",
]

DICOM_SUFFIXES = (".dcm", ".dicom")  # what a dataset folder reads as DICOM (any other name may still be one)
_GREY = frozenset({"MONOCHROME1", "MONOCHROME2"})
# pydicom returns these as RGB after decoding (YBR_* are converted by the
# decoder, PALETTE COLOR by apply_color_lut below).
_COLOUR = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT", "PALETTE COLOR"})

# Which packages provide a decoder, by transfer syntax; used in the error
# message when pydicom has no working plugin for a compressed file.
_DECODER_HINTS: dict[str, str] = {
    "1.2.840.10008.1.2.4.50": "pylibjpeg + pylibjpeg-libjpeg, or Pillow",
    "1.2.840.10008.1.2.4.51": "pylibjpeg + pylibjpeg-libjpeg, or Pillow",
    "1.2.840.10008.1.2.4.57": "pylibjpeg + pylibjpeg-libjpeg (or python-gdcm)",
    "1.2.840.10008.1.2.4.70": "pylibjpeg + pylibjpeg-libjpeg (or python-gdcm)",
    "1.2.840.10008.1.2.4.80": "pyjpegls, or pylibjpeg + pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.81": "pyjpegls, or pylibjpeg + pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.90": "pylibjpeg + pylibjpeg-openjpeg, or Pillow",
    "1.2.840.10008.1.2.4.91": "pylibjpeg + pylibjpeg-openjpeg, or Pillow",
    "1.2.840.10008.1.2.4.201": "pylibjpeg + pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.202": "pylibjpeg + pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.203": "pylibjpeg + pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.5": "pylibjpeg + pylibjpeg-rle",
}

# Files in a series folder that are never instances (DICOMDIR is handled by
# SOP class); anything else that is not DICOM is an error, not silently skipped.
_NON_DICOM_SUFFIXES = frozenset({".txt", ".md", ".csv", ".json", ".xml", ".html", ".pdf", ".png", ".jpg"})
_MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"

# US Multi-frame Image Storage and its retired predecessor.
_MULTIFRAME_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.3.1", "1.2.840.10008.5.1.4.1.1.3"})
_CM_UNITS = 3  # PhysicalUnitsX/YDirection code 3 = cm (PS3.3 C.8.5.5.1.15)
_TISSUE_2D = 1  # RegionSpatialFormat 1 = 2D (tissue or flow)


class UltrasoundReadError(ValueError):
    """An input that cannot be read as ultrasound; ``str(err)`` is ``"<path>: <reason>"``."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = Path(path)
        self.reason = " ".join(str(reason).split())  # one line, whatever pydicom said
        super().__init__(f"{self.path}: {self.reason}")


@dataclass(frozen=True)
class UltrasoundRegion:
    """One item of SequenceOfUltrasoundRegions, in pixels and mm.

    ``x0, y0, x1, y1`` are inclusive pixel bounds (column, row). The deltas are
    mm per pixel, or ``None`` when the region's units are not centimetres.
    """

    x0: int
    y0: int
    x1: int
    y1: int
    spatial_format: int
    data_type: int
    delta_x_mm: float | None
    delta_y_mm: float | None

    @property
    def area(self) -> int:
        """Number of pixels covered by the region."""
        return max(0, self.x1 - self.x0 + 1) * max(0, self.y1 - self.y0 + 1)


@dataclass
class UltrasoundImage:
    """Decoded ultrasound frames plus the headers they came from.

    ``frames`` is ``(F, H, W)`` (grey) or ``(F, H, W, 3)`` (RGB) in the native
    dtype (uint8 or uint16); see the module docstring for the conventions.
    ``spacing_mm`` is (row, column) pixel size in mm from the US regions (cm x 10),
    else PixelSpacing, else ``None``. ``sources`` holds the source headers without
    pixel data: one per frame for a series, one for a multi-frame file.
    """

    frames: np.ndarray
    is_color: bool
    spacing_mm: tuple[float, float] | None
    sources: list[Dataset]
    paths: list[Path]
    frame_time_ms: float | None
    bits_stored: int = 8
    regions: list[UltrasoundRegion] = field(default_factory=list)

    @property
    def n_frames(self) -> int:
        """Number of frames ``F``."""
        return int(self.frames.shape[0])

    @property
    def shape_hw(self) -> tuple[int, int]:
        """(rows, columns) of one frame."""
        return int(self.frames.shape[1]), int(self.frames.shape[2])

    @property
    def is_multiframe_instance(self) -> bool:
        """True when the frames come from one multi-frame SOP instance (frames are then referenced by number)."""
        if len(self.sources) != 1:
            return False
        return self.n_frames > 1 or str(self.sources[0].get("SOPClassUID", "")) in _MULTIFRAME_CLASSES

    def rgb_uint8(self) -> np.ndarray:
        """Frames as ``(F, H, W, 3)`` uint8 for the model.

        Grey is repeated over three channels; deeper data are scaled by their
        nominal range (``bits_stored``), not per image, so cine frames keep a
        consistent brightness.
        """
        arr = self.frames
        if arr.dtype != np.uint8:
            shift = max(0, self.bits_stored - 8)
            arr = np.clip(arr.astype(np.uint32) >> shift, 0, 255).astype(np.uint8)
        if not self.is_color:
            arr = np.repeat(arr[..., None], 3, axis=-1)
        return np.ascontiguousarray(arr)


def read_ultrasound(path: str | os.PathLike[str]) -> UltrasoundImage:
    """Read an ultrasound DICOM file, or a folder holding one series of instances.

    A folder is read as an ordered stack: instances sorted by InstanceNumber,
    then by acquisition/content time, then by file name. Raises
    :class:`UltrasoundReadError` for anything that cannot be read.
    """
    path = Path(path)
    if path.is_dir():
        return _read_series_folder(path)
    if not path.exists():
        raise UltrasoundReadError(path, "no such file or folder")
    ds = _read_dataset(path)
    frames, bits = _decode(ds, path)
    _drop_pixel_data(ds)
    regions = _regions(ds)
    return UltrasoundImage(
        frames=frames,
        is_color=frames.ndim == 4,
        spacing_mm=_spacing_mm(ds, regions),
        sources=[ds],
        paths=[path],
        frame_time_ms=_frame_time_ms(ds),
        bits_stored=bits,
        regions=regions,
    )


def package_version() -> str:
    """Installed version of sam2rad-monai, written into DICOM SoftwareVersions."""
    try:
        return version("sam2rad-monai")
    except PackageNotFoundError:  # a source checkout that is not installed
        return "0+unknown"


# --------------------------------------------------------------------------- files


def _read_dataset(path: Path, *, headers_only: bool = False) -> Dataset:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=headers_only)
        except InvalidDicomError as exc:
            raise UltrasoundReadError(path, f"not a DICOM file ({exc})") from exc
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types on bad bytes
            raise UltrasoundReadError(
                path, f"corrupt or truncated DICOM file ({type(exc).__name__}: {exc})"
            ) from exc
    # pydicom does not raise when a file ends early: it warns and returns what it read.
    ended_early = any("End of file" in str(w.message) for w in caught)
    if not headers_only:
        _check_has_pixels(ds, path, ended_early)
    for w in caught:
        if "End of file" not in str(w.message):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return ds


def _check_has_pixels(ds: Dataset, path: Path, ended_early: bool) -> None:
    if "PixelData" in ds:
        return
    sop = _sop_name(ds)
    if ended_early or "Rows" in ds:
        # An image header without its pixel data is a cut-off file, not an SR.
        raise UltrasoundReadError(
            path, f"truncated or corrupt DICOM file: the file ends before the pixel data ({sop})"
        )
    raise UltrasoundReadError(path, f"DICOM file has no pixel data ({sop}); it is not an image")


def _sop_name(ds: Dataset) -> str:
    uid = ds.get("SOPClassUID")
    if uid is None:
        return "no SOP Class UID"
    return f"SOP Class '{UID(str(uid)).name}'"


def _transfer_syntax(ds: Dataset) -> UID:
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    # pydicom itself falls back to implicit little endian without file meta.
    return UID(str(uid)) if uid else UID("1.2.840.10008.1.2")


def _check_decoder(ds: Dataset, path: Path) -> None:
    ts = _transfer_syntax(ds)
    try:
        decoder = get_decoder(ts)
    except NotImplementedError as exc:
        raise UltrasoundReadError(
            path, f"transfer syntax '{ts.name}' ({ts}) cannot be decoded by pydicom; convert the file first"
        ) from exc
    if decoder.is_available:
        return
    hint = _DECODER_HINTS.get(str(ts), "a pydicom pixel-data plugin for it")
    raise UltrasoundReadError(
        path, f"no decoder installed for transfer syntax '{ts.name}' ({ts}); install {hint}"
    )


def _decode(ds: Dataset, path: Path) -> tuple[np.ndarray, int]:
    """Decode all frames to (F, H, W[, 3]); returns the array and its nominal bit depth."""
    pi = str(ds.get("PhotometricInterpretation", "")).strip()
    if pi not in _GREY and pi not in _COLOUR:
        raise UltrasoundReadError(path, f"unsupported photometric interpretation '{pi}'")
    _check_decoder(ds, path)
    try:
        arr = ds.pixel_array  # YBR_* -> RGB happens here (pydicom >= 3), once
    except Exception as exc:  # noqa: BLE001 - decoders raise anything on bad data
        raise UltrasoundReadError(
            path, f"cannot decode the pixel data, truncated or corrupt? ({type(exc).__name__}: {exc})"
        ) from exc
    arr = _add_frame_axis(arr, int(ds.get("SamplesPerPixel", 1)))
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 8)))
    if pi == "PALETTE COLOR":
        return _apply_palette(arr, ds, path)
    arr = _to_unsigned(arr, bits)
    if pi == "MONOCHROME1":
        arr = ((1 << bits) - 1 - arr.astype(np.int64)).clip(0).astype(arr.dtype)
    return np.ascontiguousarray(arr), bits


def _add_frame_axis(arr: np.ndarray, samples: int) -> np.ndarray:
    per_frame_ndim = 3 if samples > 1 else 2
    return arr[None] if arr.ndim == per_frame_ndim else arr


def _to_unsigned(arr: np.ndarray, bits: int) -> np.ndarray:
    if arr.dtype.kind == "u":
        return arr
    # Signed US data are rare; shifting keeps order and the nominal range.
    out_dtype = np.uint8 if arr.dtype.itemsize == 1 else np.uint16
    return (arr.astype(np.int64) + (1 << (bits - 1))).clip(0, np.iinfo(out_dtype).max).astype(out_dtype)


def _apply_palette(arr: np.ndarray, ds: Dataset, path: Path) -> tuple[np.ndarray, int]:
    try:
        rgb = apply_color_lut(arr, _palette_view(ds))
    except Exception as exc:  # noqa: BLE001
        raise UltrasoundReadError(path, f"invalid palette colour lookup table ({exc})") from exc
    rgb = rgb[..., :3]  # drop an alpha LUT if present
    return np.ascontiguousarray(rgb), 8 * rgb.dtype.itemsize


def _palette_view(ds: Dataset) -> Dataset:
    """Return ``ds`` or a copy whose 16-bit LUT data are little endian.

    pydicom 3.0 reads non-segmented OW LUT data with ``np.frombuffer`` in the
    machine's (little) byte order, so a big endian file gets byte-swapped colours.
    """
    little = ds.original_encoding[1] if ds.original_encoding[1] is not None else True
    if little or "RedPaletteColorLookupTableData" not in ds:
        return ds
    view = ds.group_dataset(0x0028)
    if "PixelPresentation" in ds:
        view.PixelPresentation = ds.PixelPresentation
    for colour in ("Red", "Green", "Blue", "Alpha"):
        keyword = f"{colour}PaletteColorLookupTableData"
        if keyword in ds:
            data = bytes(ds[keyword].value)
            n_entries = int(ds[f"{colour}PaletteColorLookupTableDescriptor"][0]) or 65536
            if len(data) == 2 * n_entries:  # 16-bit entries need swapping, 8-bit do not
                data = np.frombuffer(data, ">u2").astype("<u2").tobytes()
            view[keyword] = pydicom.DataElement(ds[keyword].tag, "OW", data)
    return view


def _drop_pixel_data(ds: Dataset) -> None:
    # Headers are kept for DICOM-SEG references; the pixels live in `frames`.
    for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if keyword in ds:
            delattr(ds, keyword)


# ------------------------------------------------------------------------ geometry


def _regions(ds: Dataset) -> list[UltrasoundRegion]:
    out: list[UltrasoundRegion] = []
    for item in ds.get("SequenceOfUltrasoundRegions", []):
        try:
            x_cm = int(item.PhysicalUnitsXDirection) == _CM_UNITS
            y_cm = int(item.PhysicalUnitsYDirection) == _CM_UNITS
            out.append(
                UltrasoundRegion(
                    x0=int(item.RegionLocationMinX0),
                    y0=int(item.RegionLocationMinY0),
                    x1=int(item.RegionLocationMaxX1),
                    y1=int(item.RegionLocationMaxY1),
                    spatial_format=int(item.RegionSpatialFormat),
                    data_type=int(item.RegionDataType),
                    delta_x_mm=abs(float(item.PhysicalDeltaX)) * 10.0 if x_cm else None,
                    delta_y_mm=abs(float(item.PhysicalDeltaY)) * 10.0 if y_cm else None,
                )
            )
        except (AttributeError, TypeError, ValueError):
            continue  # a malformed region only costs us its calibration
    return out


def _spacing_mm(ds: Dataset, regions: Sequence[UltrasoundRegion]) -> tuple[float, float] | None:
    """(row, col) mm: the largest 2D region calibrated in cm, else PixelSpacing."""
    calibrated = [
        r
        for r in regions
        if r.spatial_format == _TISSUE_2D and r.delta_x_mm and r.delta_y_mm
    ]
    if calibrated:
        best = max(calibrated, key=lambda r: r.area)
        return float(best.delta_y_mm), float(best.delta_x_mm)  # type: ignore[arg-type]
    spacing = ds.get("PixelSpacing")
    if spacing is not None and len(spacing) == 2 and all(float(v) > 0 for v in spacing):
        return float(spacing[0]), float(spacing[1])
    return None


def _frame_time_ms(ds: Dataset) -> float | None:
    value = ds.get("FrameTime")
    if value not in (None, ""):
        time_ms = float(value)
    else:
        vector = ds.get("FrameTimeVector")
        # The first entry of FrameTimeVector is 0 by definition (time of frame 1).
        if vector is None or len(vector) < 2:
            return None
        time_ms = float(np.mean([float(v) for v in list(vector)[1:]]))
    return time_ms if np.isfinite(time_ms) and time_ms > 0 else None  # 0 or garbage: unknown, as absent


# -------------------------------------------------------------------------- series


def _read_series_folder(folder: Path) -> UltrasoundImage:
    headers = _series_headers(folder)
    if len(headers) == 1:
        return read_ultrasound(headers[0][0])
    multi = [p for p, ds in headers if int(ds.get("NumberOfFrames", 1) or 1) > 1]
    if multi:
        raise UltrasoundReadError(
            folder,
            f"folder mixes {len(headers)} instances with multi-frame ones (e.g. {multi[0].name}); "
            "read the multi-frame files one by one",
        )
    ordered = sorted(headers, key=lambda item: instance_order_key(item[0], item[1]))
    return _stack_instances(folder, [p for p, _ in ordered])


def _series_headers(folder: Path) -> list[tuple[Path, Dataset]]:
    found: list[tuple[Path, Dataset]] = []
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        if path.suffix.lower() in _NON_DICOM_SUFFIXES:
            continue
        ds = _read_dataset(path, headers_only=True)
        if str(ds.get("SOPClassUID", "")) == _MEDIA_STORAGE_DIRECTORY or path.name.upper() == "DICOMDIR":
            continue
        found.append((path, ds))
    if not found:
        raise UltrasoundReadError(folder, "folder holds no DICOM files")
    series = sorted({str(ds.get("SeriesInstanceUID", "<missing>")) for _, ds in found})
    if len(series) > 1:
        raise UltrasoundReadError(
            folder, f"folder mixes {len(series)} series: {', '.join(series)}; put one series per folder"
        )
    return found


def instance_order_key(path: Path, ds: Dataset) -> tuple[float, str, str]:
    """Sort key of a series' instances: InstanceNumber, then acquisition / content time, then the file name."""
    try:
        number_key = float(ds.get("InstanceNumber"))
    except (TypeError, ValueError):  # absent or malformed
        number_key = math.inf
    time_key = ""
    for date_kw, time_kw in (("AcquisitionDate", "AcquisitionTime"), ("ContentDate", "ContentTime")):
        if ds.get(time_kw):
            time_key = f"{ds.get(date_kw, '')}{ds.get(time_kw)}"
            break
    if "AcquisitionDateTime" in ds and not time_key:
        time_key = str(ds.AcquisitionDateTime)
    return number_key, time_key, path.name


def _stack_instances(folder: Path, paths: list[Path]) -> UltrasoundImage:
    images = [read_ultrasound(p) for p in paths]
    first = images[0]
    for img in images[1:]:
        if img.frames.shape[1:] != first.frames.shape[1:] or img.frames.dtype != first.frames.dtype:
            raise UltrasoundReadError(
                img.paths[0],
                f"frame {tuple(img.frames.shape[1:])} {img.frames.dtype} differs from "
                f"{first.paths[0].name} {tuple(first.frames.shape[1:])} {first.frames.dtype} "
                f"in series folder {folder.name}",
            )
    return UltrasoundImage(
        frames=np.concatenate([img.frames for img in images], axis=0),
        is_color=first.is_color,
        spacing_mm=first.spacing_mm,
        sources=[img.sources[0] for img in images],
        paths=paths,
        frame_time_ms=first.frame_time_ms,
        bits_stored=first.bits_stored,
        regions=first.regions,
    )
