"""Batch inference: a file or a folder tree in, one label map per input out (NIfTI or DICOM-SEG).

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

Outputs (written atomically: a temporary file then a rename, so a killed run leaves no partial output)
    * ``nifti``: ``<name>_seg.nii.gz``, uint8 label map (0 background, k = ``class_names[k-1]``). DICOM inputs get
      the pixel size from the ultrasound region calibration (else PixelSpacing, else 1 mm = unknown).
    * ``dicomseg``: ``<name>_seg.dcm``, a BINARY DICOM-SEG with one segment per class referencing the source
      instances (and frames). Only a DICOM input has instances to reference: PNG / NIfTI inputs are written as
      NIfTI instead, with one warning line listing them, so a mixed folder still runs through.

Bad input
    Every unreadable input (corrupt or truncated file, a DICOM without pixel data such as an SR, a transfer syntax
    without a decoder, an unknown photometric interpretation, an empty folder, a folder mixing series) gets one
    line ``ERROR <path>: <reason>`` on stderr; the other inputs still complete, and :meth:`RunSummary.exit` ends
    the process with status 1 if anything failed.

Modes
    ``autonomous`` (default) uses the learned prompts only. ``refine`` and ``manual`` also need user prompts, read
    from a JSON file (see :func:`load_prompts`); frames without prompts are segmented autonomously in ``refine`` and
    left empty in ``manual``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import nibabel as nib
import numpy as np
import pydicom
import torch
from PIL import Image
from pydicom.dataset import Dataset

from .engine.evaluation import load_frame
from .inference import FramePrompts, Prediction, Sam2RadPredictor
from .io import (
    UltrasoundImage,
    UltrasoundReadError,
    atomic_write_path,
    read_ultrasound,
    write_dicom_seg,
    write_nifti,
)
from .io.dicom import package_version
from .model import Mode

__all__ = [
    "OUTPUT_FORMATS",
    "InferenceRunner",
    "InputItem",
    "InputResult",
    "RunSummary",
    "discover_inputs",
    "load_prompts",
    "run_cli",
]

OUTPUT_FORMATS = ("nifti", "dicomseg")
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
NIFTI_SUFFIXES = (".nii", ".nii.gz")
# Side files of datasets and exports; never images, so they are skipped rather than reported as bad DICOM.
IGNORED_SUFFIXES = frozenset({".txt", ".md", ".csv", ".json", ".xml", ".html", ".htm", ".pdf", ".yaml", ".yml",
                              ".log", ".ini", ".db", ".zip", ".py"})
IGNORED_NAMES = frozenset({"DICOMDIR", "LICENSE", "README"})
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
MULTIFRAME_SOP_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.3.1", "1.2.840.10008.5.1.4.1.1.3"})
OUTPUT_SUFFIX = "_seg"


# ---------------------------------------------------------------------------------------------------- inputs


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
    for suffix in NIFTI_SUFFIXES[::-1]:  # ".nii.gz" before ".nii"
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem if Path(name).suffix.lower() in IMAGE_SUFFIXES | {".dcm", ".dicom"} else name


def _classify(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if path.suffix.lower() in IMAGE_SUFFIXES:
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
    ordered = sorted(instances, key=lambda item: _instance_order(*item))
    return InputItem("series", [p for p, _ in ordered], name, stem)


def _instance_order(path: Path, ds: Dataset) -> tuple[float, str, str]:
    try:
        number = float(ds.get("InstanceNumber"))
    except (TypeError, ValueError):
        number = math.inf
    when = f"{ds.get('AcquisitionDate', '')}{ds.get('AcquisitionTime', '')}" or \
        f"{ds.get('ContentDate', '')}{ds.get('ContentTime', '')}"
    return number, when, path.name


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


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _to_0_255(array: np.ndarray) -> np.ndarray:
    """The model expects 0..255; deeper data are scaled by the input's own range (one scale for all frames)."""
    array = np.asarray(array, dtype=np.float32)
    lo, hi = float(array.min()), float(array.max())
    if lo >= 0 and hi <= 255:
        return array
    return (array - lo) * (255.0 / max(hi - lo, 1e-6))


def _read_image(path: Path) -> LoadedInput:
    # PIL first: it names the problem ("image file is truncated"), where LoadImage only says no reader fits.
    try:
        with Image.open(path) as img:
            img.load()
    except Exception as exc:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ...
        raise ValueError(f"cannot read the image file, corrupt or truncated? ({_one_line(exc)})") from exc
    image, _ = load_frame({"image": str(path)})  # the same loading as training and evaluation
    return LoadedInput([_to_0_255(image)])


def _read_nifti(path: Path) -> LoadedInput:
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types on bad bytes
        raise ValueError(f"cannot read the NIfTI file, corrupt or truncated? ({_one_line(exc)})") from exc
    if data.dtype.names:  # RGB24 / RGBA32 structured voxels
        data = np.stack([data[c] for c in ("R", "G", "B")], axis=-1)
        frames = [data] if data.ndim == 3 else [data[:, :, k] for k in range(data.shape[2])]
    else:
        while data.ndim > 3 and data.shape[-1] == 1:
            data = data[..., 0]
        if data.ndim == 2:
            frames = [data]
        elif data.ndim == 3:
            frames = [data[:, :, k] for k in range(data.shape[2])]
        else:
            raise ValueError(f"unsupported NIfTI shape {data.shape}: expected (rows, columns[, frames])")
    scaled = _to_0_255(np.stack(frames))
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


def _read_input(item: InputItem) -> LoadedInput:
    if item.kind == "image":
        return _read_image(item.path)
    if item.kind == "nifti":
        return _read_nifti(item.path)
    image = read_ultrasound(item.path) if item.kind == "dicom" else _read_series(item)
    return LoadedInput(list(image.rgb_uint8()), dicom=image, spacing_mm=image.spacing_mm)


def read_frames(path: str | os.PathLike[str]) -> list[np.ndarray]:
    """The frames (H, W, 3) on 0..255 of one input file, loaded exactly as bundle inference loads it.

    Raises ``ValueError`` (naming the file and the reason) for anything unreadable.
    """
    path = Path(path)
    kind = _classify(path) or "dicom"
    try:
        return _read_input(InputItem(kind, [path], path.name, Path(path.stem))).frames
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err


# ---------------------------------------------------------------------------------------------------- prompts


def _class_prompt(value: Any, where: str) -> tuple[list[float] | None, list[tuple[float, float, int]]]:
    if not isinstance(value, Mapping) or not set(value) <= {"box", "points"} or not value:
        raise ValueError(f"{where}: expected {{\"box\": [x1, y1, x2, y2], \"points\": [[x, y, 1|0], ...]}}")
    box = None
    if "box" in value:
        box = [float(v) for v in value["box"]]
        if len(box) != 4 or box[2] < box[0] or box[3] < box[1]:
            raise ValueError(f"{where}: box must be [x1, y1, x2, y2] with x1 <= x2, y1 <= y2, got {value['box']}")
    points = []
    for point in value.get("points", []):
        if len(point) not in (2, 3) or (len(point) == 3 and int(point[2]) not in (0, 1)):
            raise ValueError(f"{where}: a point is [x, y] or [x, y, 1 (positive) | 0 (negative)], got {point}")
        points.append((float(point[0]), float(point[1]), int(point[2]) if len(point) == 3 else 1))
    return box, points


def _frame_prompts(value: Any, class_names: Sequence[str], where: str) -> FramePrompts:
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: expected an object keyed by class name")
    prompts = FramePrompts()
    for cls, spec in value.items():
        if cls not in class_names:
            raise ValueError(f"{where}: unknown class {cls!r}; classes are {list(class_names)}")
        box, points = _class_prompt(spec, f"{where}.{cls}")
        index = list(class_names).index(cls)
        if box is not None:
            prompts.boxes[index] = box
        if points:
            prompts.points[index] = points
    return prompts


def load_prompts(path: str | os.PathLike[str], class_names: Sequence[str]
                 ) -> dict[str, dict[int | None, FramePrompts]]:
    """Read a prompts JSON file: ``{input name: {frame index or None (all frames): FramePrompts}}``.

    Format, coordinates in the frame's own pixels (x = column, y = row)::

        {
          "0004.png": {"nerve": {"box": [x1, y1, x2, y2]},
                       "vessel": {"points": [[x, y, 1], [x, y, 0]]}},
          "cine.dcm": {"frames": {"0": {"nerve": {"box": [...]}}, "12": {...}}},
          "series01": {"vessel": {"box": [...]}}
        }

    An input is named by its path relative to the input root (``png/0004.png``) or by its file / series folder
    name. Class prompts at the top level apply to every frame; ``frames`` holds 0-based per-frame prompts. A point
    label is 1 (positive, the default) or 0 (negative).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read the prompts file ({_one_line(exc)})") from exc
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: expected an object keyed by input file name")
    out: dict[str, dict[int | None, FramePrompts]] = {}
    for name, value in data.items():
        where = f"{path}: {name}"
        if isinstance(value, Mapping) and "frames" in value:
            if set(value) != {"frames"} or not isinstance(value["frames"], Mapping):
                raise ValueError(f"{where}: 'frames' must be the only key, an object keyed by frame index")
            per_frame: dict[int | None, FramePrompts] = {}
            for index, spec in value["frames"].items():
                if not str(index).isdigit():
                    raise ValueError(f"{where}: frame index must be a 0-based integer, got {index!r}")
                per_frame[int(index)] = _frame_prompts(spec, class_names, f"{where}.frames.{index}")
            out[str(name)] = per_frame
        else:
            out[str(name)] = {None: _frame_prompts(value, class_names, where)}
    return out


# ---------------------------------------------------------------------------------------------------- results


@dataclass
class InputResult:
    """What happened to one input."""

    name: str
    path: Path
    output: Path | None = None
    output_format: str | None = None
    frames: int = 0
    classes_found: list[str] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class RunSummary:
    """The outcome of :meth:`InferenceRunner.run`; timings are wall seconds."""

    results: list[InputResult]
    encoder_s: float = 0.0
    decoder_s: float = 0.0
    io_s: float = 0.0
    total_s: float = 0.0

    @property
    def failed(self) -> list[InputResult]:
        return [r for r in self.results if not r.ok]

    @property
    def frames(self) -> int:
        return sum(r.frames for r in self.results if r.ok)

    def exit(self) -> None:
        """End the process with status 1 when any input failed (the bundle's ``run`` calls this)."""
        if self.failed:
            raise SystemExit(1)


@dataclass
class _Job:
    item: InputItem
    result: InputResult
    loaded: LoadedInput
    prompts: list[FramePrompts | None]
    predictions: list[np.ndarray | None]  # label maps only: logits of a long cine would not fit in memory

    @property
    def done(self) -> bool:
        return all(p is not None for p in self.predictions)


# ---------------------------------------------------------------------------------------------------- runner


class InferenceRunner:
    """Segment every frame of every input and write one output per input.

    Args:
        predictor: a :class:`Sam2RadPredictor`; its ``batch_size`` is the number of frames per encoder batch
            (frames of consecutive inputs share a batch).
        class_names: foreground classes, label value k = ``class_names[k-1]``.
        output_dir: where outputs go, mirroring the input tree.
        output_format: ``nifti`` or ``dicomseg`` (DICOM inputs only; others fall back to NIfTI with a warning).
        mode: ``autonomous``, ``refine`` or ``manual``; the last two need ``prompts``.
        prompts: a prompts JSON file (see :func:`load_prompts`) or its parsed content.
        stdout, stderr: where the summary and the error / warning lines go.
    """

    def __init__(self, predictor: Sam2RadPredictor, class_names: Sequence[str], output_dir: str | os.PathLike[str],
                 output_format: str = "nifti", mode: str = "autonomous",
                 prompts: str | os.PathLike[str] | Mapping[str, dict[int | None, FramePrompts]] | None = None,
                 stdout: TextIO | None = None, stderr: TextIO | None = None) -> None:
        if output_format not in OUTPUT_FORMATS:
            raise ValueError(f"output_format must be one of {OUTPUT_FORMATS}, got {output_format!r}")
        try:
            self.mode = Mode(mode)
        except ValueError as exc:
            raise ValueError(f"mode must be one of {[m.value for m in Mode]}, got {mode!r}") from exc
        if isinstance(prompts, str) and prompts.strip() in ("", "None", "null"):
            prompts = None  # an empty bundle override arrives as a string
        if self.mode is not Mode.AUTONOMOUS and prompts is None:
            raise ValueError(
                f"--mode {self.mode.value} needs user prompts: pass --prompts prompts.json with boxes / points per "
                "input file and class name (format: sam2rad_monai.batch_inference.load_prompts), or use "
                "--mode autonomous")
        self.predictor = predictor
        self.class_names = list(class_names)
        if len(self.class_names) != predictor.model.num_classes:
            raise ValueError(f"{len(self.class_names)} class names {self.class_names} for a model with "
                             f"{predictor.model.num_classes} classes")
        self.output_dir = Path(output_dir)
        self.output_format = output_format
        self.prompts = (load_prompts(prompts, self.class_names) if isinstance(prompts, (str, os.PathLike))
                        else dict(prompts or {}))
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr
        if self.prompts and self.mode is Mode.AUTONOMOUS:
            print("WARNING prompts are ignored in autonomous mode; use --mode refine or --mode manual to apply them",
                  file=self.stderr, flush=True)
            self.prompts = {}
        bb = predictor.model.backbone
        self.backbone_label = f"{bb.name} {bb.variant}"

    # -- public ---------------------------------------------------------------------------------------------
    def run(self, input: str | os.PathLike[str]) -> RunSummary:  # noqa: A002 - the bundle's override is --input
        """Segment everything under ``input``, write the outputs, print the summary and return it."""
        start = time.perf_counter()
        items = discover_inputs(input, exclude=[self.output_dir])
        self._warn_fallback(items)
        self._warn_unused_prompts(items)
        summary = RunSummary([])
        jobs: list[_Job] = []
        for item in items:
            result = InputResult(item.name, item.path)
            summary.results.append(result)
            if item.error:
                self._fail(result, f"{item.path}: {item.error}")
                continue
            job = self._load(item, result, summary)
            if job is not None:
                jobs.append(job)
            while sum(p is None for j in jobs for p in j.predictions) >= self.predictor.batch_size:
                jobs = self._step(jobs, summary)
        while jobs:
            jobs = self._step(jobs, summary)
        summary.total_s = time.perf_counter() - start
        self._print_summary(summary)
        return summary

    # -- steps ----------------------------------------------------------------------------------------------
    def _load(self, item: InputItem, result: InputResult, summary: RunSummary) -> _Job | None:
        t0 = time.perf_counter()
        try:
            loaded = _read_input(item)
            prompts = self._prompts_for(item, len(loaded.frames))
        except UltrasoundReadError as exc:
            reason = str(exc) if item.kind != "series" else f"{exc} (series {item.path} not segmented)"
            self._fail(result, reason)
            return None
        except Exception as exc:  # noqa: BLE001 - one bad input must not stop the others
            self._fail(result, f"{item.path}: {exc if isinstance(exc, ValueError) else _one_line(exc)}")
            return None
        finally:
            summary.io_s += time.perf_counter() - t0
            result.seconds += time.perf_counter() - t0
        result.frames = len(loaded.frames)
        if not loaded.frames:
            self._fail(result, f"{item.path}: the input holds no frames")
            return None
        if self.mode is Mode.MANUAL and all(p is None for p in prompts):
            self._fail(result, f"{item.path}: manual mode segments only what is prompted, and the prompts file "
                               f"has nothing for '{item.name}'")
            return None
        return _Job(item, result, loaded, prompts, [None] * len(loaded.frames))

    def _prompts_for(self, item: InputItem, n_frames: int) -> list[FramePrompts | None]:
        spec = self.prompts.get(item.name) or self.prompts.get(item.path.name) or {}
        out: list[FramePrompts | None] = [spec.get(None)] * n_frames
        for index, prompts in spec.items():
            if index is None:
                continue
            if index >= n_frames:
                raise ValueError(f"prompts for frame {index}, but the input has {n_frames} frames")
            out[index] = prompts
        return out

    def _step(self, jobs: list[_Job], summary: RunSummary) -> list[_Job]:
        """Run one encoder batch over the next pending frames, then write the inputs that are complete."""
        batch: list[tuple[_Job, int]] = []
        for job in jobs:
            batch.extend((job, i) for i, p in enumerate(job.predictions) if p is None)
        batch = batch[: self.predictor.batch_size]
        frames = [job.loaded.frames[i] for job, i in batch]
        prompts = [job.prompts[i] for job, i in batch]

        t0 = time.perf_counter()
        features, _ = self.predictor.encode(frames)
        t1 = time.perf_counter()
        preds = self._decode(frames, prompts, features)
        t2 = time.perf_counter()
        summary.encoder_s += t1 - t0
        summary.decoder_s += t2 - t1
        for (job, i), pred in zip(batch, preds):
            job.predictions[i] = pred.label_map
            job.result.seconds += (t2 - t0) / len(batch)  # a shared batch's time, split evenly over its frames

        remaining = []
        for job in jobs:
            if job.done:
                t3 = time.perf_counter()
                self._write(job)
                summary.io_s += time.perf_counter() - t3
                job.result.seconds += time.perf_counter() - t3
            else:
                remaining.append(job)
        return remaining

    def _decode(self, frames: list[np.ndarray], prompts: list[FramePrompts | None],
                features: dict[str, torch.Tensor]) -> list[Prediction]:
        # the predictor handles frames without prompts: empty in manual mode, learned prompts alone in refine
        return self.predictor.predict(frames, self.mode, prompts if self.mode is not Mode.AUTONOMOUS else None,
                                      features=features)

    def _write(self, job: _Job) -> None:
        item, result, loaded = job.item, job.result, job.loaded
        labels = np.stack(job.predictions)  # type: ignore[arg-type]
        try:
            if self.output_format == "dicomseg" and loaded.dicom is not None:
                target = self.output_dir / item.output_stem.with_name(item.output_stem.name + OUTPUT_SUFFIX + ".dcm")
                write_dicom_seg(labels, loaded.dicom, self.class_names, target, backbone=self.backbone_label,
                                algorithm_version=package_version(), semiautomatic=self.mode is not Mode.AUTONOMOUS)
                result.output_format = "dicomseg"
            else:
                target = self.output_dir / item.output_stem.with_name(
                    item.output_stem.name + OUTPUT_SUFFIX + ".nii.gz")
                if loaded.nifti is not None:
                    _write_nifti_like(labels, loaded.nifti, target)
                else:
                    write_nifti(labels[0] if len(labels) == 1 else labels, target, loaded.spacing_mm)
                result.output_format = "nifti"
        except Exception as exc:  # noqa: BLE001 - a failed write is this input's failure, not the run's
            self._fail(result, f"{item.path}: cannot write the output ({_one_line(exc)})")
            return
        result.output = target
        present = {int(v) for v in np.unique(labels) if v}
        result.classes_found = [self.class_names[k - 1] for k in sorted(present)]
        job.loaded = LoadedInput([])  # free the frames of a finished input

    # -- messages -------------------------------------------------------------------------------------------
    def _fail(self, result: InputResult, message: str) -> None:
        result.error = " ".join(message.split())
        print(f"ERROR {result.error}", file=self.stderr, flush=True)

    def _warn_fallback(self, items: Iterable[InputItem]) -> None:
        if self.output_format != "dicomseg":
            return
        names = [i.name for i in items if i.kind in ("image", "nifti") and not i.error]
        if names:
            listed = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            print(f"WARNING dicomseg output needs a DICOM source to reference; {len(names)} non-DICOM input(s) "
                  f"written as NIfTI: {listed}", file=self.stderr, flush=True)

    def _warn_unused_prompts(self, items: Sequence[InputItem]) -> None:
        names = {i.name for i in items} | {i.path.name for i in items}
        unused = sorted(set(self.prompts) - names)
        if unused:
            print(f"WARNING the prompts file names inputs that were not found: {', '.join(unused[:5])}",
                  file=self.stderr, flush=True)

    def _print_summary(self, summary: RunSummary) -> None:
        out = self.stdout
        ok = [r for r in summary.results if r.ok]
        print(f"Sam2Rad inference ({self.mode.value}, {self.backbone_label}) -> {self.output_dir}", file=out)
        width = max((len(r.name) for r in summary.results), default=4)
        for r in summary.results:
            if r.ok:
                found = ", ".join(r.classes_found) or "none"
                rel = r.output.relative_to(self.output_dir) if r.output else "-"
                print(f"  ok    {r.name:<{width}}  {r.frames:>4} frame(s)  {r.seconds:6.1f} s  classes: {found:<16}"
                      f"  -> {rel}", file=out)
            else:
                print(f"  FAIL  {r.name:<{width}}  {r.error}", file=out)
        frames = summary.frames
        per = (lambda s: s / frames) if frames else (lambda s: 0.0)
        print(f"{len(ok)} of {len(summary.results)} input(s) ok, {len(summary.failed)} failed; {frames} frame(s) in "
              f"{summary.total_s:.1f} s", file=out)
        if frames:
            print(f"per frame: {per(summary.total_s):.2f} s total ({frames / summary.total_s:.2f} frames/s); "
                  f"encoder {per(summary.encoder_s):.2f} s, PPN+decoder {per(summary.decoder_s):.2f} s, "
                  f"read/write {per(summary.io_s):.2f} s (encoder batch {self.predictor.batch_size}, "
                  f"device {self.predictor.device})", file=out)
        out.flush()


# ---------------------------------------------------------------------------------------------------- helpers


def _empty_prediction(shape: tuple[int, int], num_classes: int) -> Prediction:
    return Prediction(label_map=np.zeros(shape, np.uint8), masks=np.zeros((num_classes, *shape), bool),
                      objectness=None, iou=np.zeros(num_classes, np.float32))


def _write_nifti_like(labels: np.ndarray, source: nib.spatialimages.SpatialImage, path: Path) -> Path:
    """Write (F, H, W) labels in the source NIfTI's array layout and affine, so it overlays voxel for voxel."""
    shape = source.shape
    if len(shape) >= 3 and shape[2] > 1:
        data = labels.transpose(1, 2, 0)
    else:
        data = labels[0].reshape(shape[:2] + (1,) * (len(shape) - 2)) if len(shape) > 2 else labels[0]
    img = nib.Nifti1Image(np.ascontiguousarray(data, dtype=np.uint8), source.affine)
    # keep the source's qform/sform codes so viewers place the labels exactly where the image is
    _, qcode = source.get_qform(coded=True)
    _, scode = source.get_sform(coded=True)
    img.set_qform(source.affine, code=int(qcode) if qcode else 1)
    img.set_sform(source.affine, code=int(scode) if scode else 1)
    img.header.set_xyzt_units(*source.header.get_xyzt_units())
    img.header.set_intent("label", name="sam2rad")
    with atomic_write_path(path) as tmp:
        nib.save(img, tmp)
    return path


def run_cli(make_runner: Callable[[], InferenceRunner], input: str | os.PathLike[str]) -> RunSummary:  # noqa: A002
    """The bundle's ``run``: build the runner, segment ``input``, exit 1 if any input failed, 2 on a bad setting.

    ``make_runner`` is the config's ``runner`` component in ``_mode_: callable``, so that a bad override
    (``--mode manual`` without ``--prompts``, an unknown ``--output_format``) is one error line, not a traceback.
    """
    try:
        runner = make_runner()
    except ValueError as exc:
        print(f"ERROR {' '.join(str(exc).split())}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    summary = runner.run(input)
    summary.exit()
    return summary
