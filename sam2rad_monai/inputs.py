"""Bundle inference's inputs: what counts as one (below), and how each is read into frames for the model.

What counts as one input
    * A PNG / JPEG / BMP / TIFF file: one frame, one output.
    * A NIfTI file (``.nii`` / ``.nii.gz``): axis 0 = rows, axis 1 = columns (as in training, see
      :mod:`sam2rad_monai.transforms`); a third axis is the frame index. Its output keeps the input's array layout,
      affine and so its spacing, so it overlays the input voxel for voxel.
    * A DICOM file that is a multi-frame instance (cine): one input.
    * The single-frame DICOM image instances of one folder: ONE series input (frames in InstanceNumber order), with
      one output referencing every instance. If they belong to more than one series the folder is an error
      ("put one series per folder"); its other inputs still run. A series with an instance that cannot be read
      fails as a whole, naming that instance: its output would silently miss a frame.
    * A folder is walked recursively; every folder follows the rules above and the outputs mirror the tree under
      ``output_dir``. Files named ``*.txt``, ``*.json``, ``*.csv``, ... and ``DICOMDIR`` are ignored; anything
      else is read as DICOM, so a stray file gets a "not a DICOM file" error rather than vanishing silently.
      A folder (at any depth) that yields no input at all is reported as an error. Two inputs that would share
      an output name (``a.png`` and ``a.nii.gz``) keep their suffix in it (``a_nii_gz_seg.nii.gz``).
    * Pixel values are given to the model on a 0..255 scale; inputs with values outside it (16-bit PNG, CT-like
      NIfTI) are scaled by their own min..max, DICOM by its nominal bit depth (:meth:`UltrasoundImage.rgb_uint8`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset

from .data import PICTURE_SUFFIXES
from .engine.evaluation import load_frame
from .transforms import to_0_255
from .io import UltrasoundImage, UltrasoundReadError, read_ultrasound
from .io.dicom import DICOM_SUFFIXES, instance_order_key
from .io.nifti import NIFTI_SUFFIXES, is_2d_plus_t

__all__ = ["InputItem", "LoadedInput", "discover_inputs", "frame_datalist", "one_line", "read_frames", "read_input"]

# Side files of datasets and exports; never images, so they are skipped rather than reported as bad DICOM.
IGNORED_SUFFIXES = frozenset({".txt", ".md", ".csv", ".json", ".xml", ".html", ".htm", ".pdf", ".yaml", ".yml",
                              ".log", ".ini", ".db", ".zip", ".py"})
IGNORED_NAMES = frozenset({"DICOMDIR", "LICENSE", "README"})
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
MULTIFRAME_SOP_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.3.1", "1.2.840.10008.5.1.4.1.1.3"})




@dataclass
class InputItem:
    """One unit of work: the files that make one output.

    ``kind`` is ``image``, ``nifti``, ``dicom`` (one file) or ``series`` (single-frame instances of one folder);
    ``name`` is the input's path relative to the input root (what the summary and the prompts file use);
    ``error`` is set when the input is known to be bad before reading it.
    """

    kind: str
    paths: list[Path]
    name: str
    output_stem: Path  # relative to output_dir, without suffix
    error: str | None = None

    @property
    def path(self) -> Path:
        """The file, or the folder of a series."""
        return self.paths[0].parent if self.kind == "series" else self.paths[0]


def _strip_suffix(name: str) -> str:
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem if Path(name).suffix.lower() in (*PICTURE_SUFFIXES, *DICOM_SUFFIXES) else name


def _classify(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if path.suffix.lower() in PICTURE_SUFFIXES:
        return "image"
    if path.suffix.lower() in IGNORED_SUFFIXES or path.name.upper() in IGNORED_NAMES:
        return None
    return "dicom"


def _read_header(path: Path) -> Dataset | None:
    """The DICOM header, or None when the file is not readable as DICOM (the full read then reports why)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - any failure here is reported by the reader later
            return None


def _is_standalone(ds: Dataset | None) -> bool:
    """True for DICOM files that are an input on their own: multi-frame, non-image or unreadable."""
    if ds is None or "Rows" not in ds:
        return True
    try:
        frames = ds.get("NumberOfFrames")
        multi = frames not in (None, "") and int(frames) > 1
        return multi or str(ds.get("SOPClassUID", "")) in MULTIFRAME_SOP_CLASSES
    except (TypeError, ValueError):  # a malformed header: on its own, so that its error stays its own
        return True


def discover_inputs(root: str | os.PathLike[str], exclude: Iterable[str | os.PathLike[str]] = ()
                    ) -> list[InputItem]:
    """List the inputs under ``root`` (a file or a folder tree) by the rules of the module docstring.

    Reads DICOM headers only. Folders in ``exclude`` (the output folder, when it lies inside the input) are
    skipped. Inputs that are bad before any pixel is read (an empty folder, a folder mixing series, a missing
    path) come back with ``error`` set.
    """
    root = Path(root)
    if not root.exists():
        return [InputItem("missing", [root], str(root), Path(root.name), "no such file or folder")]
    if root.is_file():
        kind = _classify(root) or "dicom"  # named explicitly: try it even with an odd suffix
        return [InputItem(kind, [root], root.name, Path(_strip_suffix(root.name)))]
    skip = {Path(p).resolve() for p in exclude}
    items = _scan_folder(root, root, skip)
    return _dedupe_outputs(items)


def frame_datalist(root: str | os.PathLike[str]) -> list[dict[str, str]]:
    """``[{"image": path}]`` of the single-file 2D inputs under ``root`` (pictures, NIfTI, single-frame DICOM), for
    the bundle's standard MONAI evaluator (``configs/inference.json``: ``dataset``), which maps one file to one frame.

    DICOM series, multi-frame DICOM and NIfTI with a frame axis are left to bundle inference's ``run``, which keeps
    one output per series or loop; inputs known to be bad are left out here (``run`` reports them).
    """
    items = [i for i in discover_inputs(root) if i.error is None and i.kind in ("image", "nifti", "dicom")]
    return [{"image": str(i.path)} for i in items if (i.kind == "image" or (i.kind == "nifti" and _nifti_2d(i.path))
                                                      or (i.kind == "dicom" and _single_frame(_read_header(i.path))))]


def _nifti_2d(path: Path) -> bool:
    try:
        shape = list(nib.load(str(path)).shape)  # the header only
    except Exception:  # noqa: BLE001 - unreadable: run reports it
        return False
    while len(shape) > 2 and shape[-1] == 1:
        shape.pop()
    return len(shape) == 2


def _single_frame(ds: Dataset | None) -> bool:
    try:
        return ds is not None and "Rows" in ds and int(ds.get("NumberOfFrames") or 1) == 1
    except (TypeError, ValueError):
        return False


def _scan_folder(folder: Path, root: Path, skip: set[Path]) -> list[InputItem]:
    rel = folder.relative_to(root)
    display = rel.as_posix() if rel.parts else folder.resolve().name  # "." has no name
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    items: list[InputItem] = []
    instances: list[tuple[Path, Dataset]] = []
    for path in entries:
        if path.is_dir():
            continue
        kind = _classify(path)
        if kind is None:
            continue
        name = (rel / path.name).as_posix()
        if kind != "dicom":
            items.append(InputItem(kind, [path], name, rel / _strip_suffix(path.name)))
            continue
        ds = _read_header(path)
        if ds is not None and (str(ds.get("SOPClassUID", "")) == MEDIA_STORAGE_DIRECTORY):
            continue
        if _is_standalone(ds):
            items.append(InputItem("dicom", [path], name, rel / _strip_suffix(path.name)))
        else:
            instances.append((path, ds))
    if instances:
        items.append(_series_item(folder, root, instances))
    for sub in (p for p in entries if p.is_dir() and p.resolve() not in skip):
        items.extend(_scan_folder(sub, root, skip))
    if not items:
        items.append(InputItem("folder", [folder], display, rel,
                               "folder holds no PNG, JPEG, NIfTI or DICOM files"))
    return items


def _series_item(folder: Path, root: Path, instances: list[tuple[Path, Dataset]]) -> InputItem:
    rel = folder.relative_to(root)
    name = rel.as_posix() if rel.parts else folder.resolve().name
    if len(instances) == 1:  # a lone still: named after its file, like any other one-file input
        path = instances[0][0]
        return InputItem("dicom", [path], (rel / path.name).as_posix(), rel / _strip_suffix(path.name))
    series: dict[str, list[Path]] = {}
    for path, ds in instances:
        series.setdefault(str(ds.get("SeriesInstanceUID", "<no SeriesInstanceUID>")), []).append(path)
    stem = rel if rel.parts else Path(name)
    if len(series) > 1:
        listing = "; ".join(f"{uid}: {len(paths)} file(s), e.g. {paths[0].name}" for uid, paths in series.items())
        return InputItem("series", [p for p, _ in instances], name, stem,
                         f"folder mixes {len(series)} series of single-frame DICOM instances ({listing}); "
                         "put one series per folder")
    ordered = sorted(instances, key=lambda item: instance_order_key(*item))
    return InputItem("series", [p for p, _ in ordered], name, stem)


def _dedupe_outputs(items: list[InputItem]) -> list[InputItem]:
    # "a.png" next to "a.nii.gz" or a series folder "a" would all map to "a_seg.*": tag the later ones by kind.
    seen: set[str] = set()
    for item in (i for i in items if not i.error):  # bad inputs write nothing
        base = item.output_stem
        tag = "_series" if item.kind == "series" else ("".join(item.path.suffixes).replace(".", "_") or "_dicom")
        candidate, n = base, 1
        while candidate.as_posix().lower() in seen:
            candidate = base.with_name(f"{base.name}{tag}{n if n > 1 else ''}")
            n += 1
        item.output_stem = candidate
        seen.add(candidate.as_posix().lower())
    return items


# ---------------------------------------------------------------------------------------------------- reading


@dataclass
class LoadedInput:
    """Frames of one input, ready for the model, and what its writer needs."""

    frames: list[np.ndarray]  # (H, W, 3) on a 0..255 scale
    dicom: UltrasoundImage | None = None
    nifti: nib.spatialimages.SpatialImage | None = None
    spacing_mm: tuple[float, float] | None = None


def one_line(exc: BaseException) -> str:
    """An exception as one line: its type and its message with whitespace collapsed."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _read_image(path: Path) -> LoadedInput:
    try:  # the same loading (and intensity rule) as training and evaluation
        image, _ = load_frame({"image": str(path)})
    except Exception as exc:  # noqa: BLE001 - LoadImage only says that no reader fits; PIL names the problem
        reason: BaseException = exc
        try:
            with Image.open(path) as img:
                img.load()
        except Exception as pil_exc:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ...
            reason = pil_exc
        raise ValueError(f"cannot read the image file, corrupt or truncated? ({one_line(reason)})") from reason
    return LoadedInput([image])


def _read_nifti(path: Path) -> LoadedInput:
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types on bad bytes
        raise ValueError(f"cannot read the NIfTI file, corrupt or truncated? ({one_line(exc)})") from exc
    if data.dtype.names:  # RGB24 / RGBA32 structured voxels
        data = np.stack([data[c] for c in ("R", "G", "B")], axis=-1)
        frames = [data] if data.ndim == 3 else [data[:, :, k] for k in range(data.shape[2])]
    else:
        if is_2d_plus_t(data.shape):  # NIfTI's fourth axis is time
            data = data[:, :, 0, :]
        while data.ndim > 3 and data.shape[-1] == 1:
            data = data[..., 0]
        if data.ndim == 2:
            frames = [data]
        elif data.ndim == 3:
            frames = [data[:, :, k] for k in range(data.shape[2])]
        else:
            raise ValueError(f"unsupported NIfTI shape {data.shape}: expected (rows, columns[, frames]) or 2D+t "
                             "(rows, columns, 1, frames)")
    scaled = to_0_255(np.stack(frames))  # one scale for all frames of a volume
    rgb = [np.repeat(f[..., None], 3, axis=-1) if f.ndim == 2 else f for f in scaled]
    return LoadedInput(rgb, nifti=img)


def _read_series(item: InputItem) -> UltrasoundImage:
    images = [read_ultrasound(p) for p in item.paths]
    first = images[0]
    for img in images[1:]:
        if img.shape_hw != first.shape_hw:
            raise UltrasoundReadError(img.paths[0], f"frame size {img.shape_hw} differs from {first.paths[0].name} "
                                                    f"{first.shape_hw} in the same series")
    return UltrasoundImage(
        frames=np.concatenate([img.rgb_uint8() for img in images]),  # one scale per instance, then stacked
        is_color=True,
        spacing_mm=first.spacing_mm,
        sources=[img.sources[0] for img in images],
        paths=list(item.paths),
        frame_time_ms=first.frame_time_ms,
        bits_stored=8,
        regions=first.regions,
    )


def read_input(item: InputItem) -> LoadedInput:
    """The frames of a discovered input; raises ``ValueError`` (for DICOM an ``UltrasoundReadError``) naming why."""
    if item.kind == "image":
        return _read_image(item.path)
    if item.kind == "nifti":
        return _read_nifti(item.path)
    image = read_ultrasound(item.path) if item.kind == "dicom" else _read_series(item)
    return LoadedInput(list(image.rgb_uint8()), dicom=image, spacing_mm=image.spacing_mm)


def read_file(path: str | os.PathLike[str]) -> LoadedInput:
    """One input file loaded exactly as bundle inference loads it: its frames (H, W, 3) on 0..255 and what a writer
    needs (the DICOM's geometry and frame time, or the source NIfTI).

    Raises ``ValueError`` (naming the file and the reason) for anything unreadable.
    """
    path = Path(path)
    kind = _classify(path) or "dicom"
    try:
        return read_input(InputItem(kind, [path], path.name, Path(path.stem)))
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err


def read_frames(path: str | os.PathLike[str]) -> list[np.ndarray]:
    """The frames (H, W, 3) on 0..255 of one input file (:func:`read_file`)."""
    return read_file(path).frames
