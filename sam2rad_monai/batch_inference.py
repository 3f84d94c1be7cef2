"""Batch inference: a file or a folder tree in, one label map per input out (NIfTI or DICOM-SEG).

What counts as one input and how it is read: :mod:`sam2rad_monai.inputs`; the user prompts of ``refine`` and
``manual`` modes: :mod:`sam2rad_monai.prompt_file`.

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

import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import TextIO

import numpy as np
import torch

from .inference import FramePrompts, Prediction, Sam2RadPredictor
from .inputs import InputItem, LoadedInput, discover_inputs, one_line, read_input
from .io import UltrasoundReadError, write_dicom_seg, write_nifti, write_nifti_like
from .io.dicom import package_version
from .model import Mode
from .prompt_file import load_prompts
from .temporal import DEFAULT_ALPHA, DEFAULT_PRESENCE_ALPHA, LoopState

__all__ = ["OUTPUT_FORMATS", "InferenceRunner", "InputResult", "RunSummary", "run_cli"]

OUTPUT_FORMATS = ("nifti", "dicomseg")
OUTPUT_SUFFIX = "_seg"


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
    loop: LoopState | None = None  # temporal mode: what the input's earlier frames carry to the next

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
        temporal: segment the frames of each multi-frame input in order, each blended with the input's earlier
            frames (:mod:`sam2rad_monai.temporal`; autonomous mode only; single frames are unaffected).
        temporal_alpha, temporal_presence_alpha: the new frame's weights in that blend (logits, objectness).
        stdout, stderr: where the summary and the error / warning lines go.
    """

    def __init__(self, predictor: Sam2RadPredictor, class_names: Sequence[str], output_dir: str | os.PathLike[str],
                 output_format: str = "nifti", mode: str = "autonomous",
                 prompts: str | os.PathLike[str] | Mapping[str, dict[int | None, FramePrompts]] | None = None,
                 temporal: bool = False, temporal_alpha: float = DEFAULT_ALPHA,
                 temporal_presence_alpha: float = DEFAULT_PRESENCE_ALPHA,
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
                "input file and class name (format: sam2rad_monai.prompt_file.load_prompts), or use "
                "--mode autonomous")
        if temporal and self.mode is not Mode.AUTONOMOUS:
            raise ValueError(f"--temporal segments loops autonomously; it does not take --mode {self.mode.value}")
        self.temporal, self.temporal_alpha = bool(temporal), float(temporal_alpha)
        self.temporal_presence_alpha = float(temporal_presence_alpha)
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
            loaded = read_input(item)
            prompts = self._prompts_for(item, len(loaded.frames))
        except UltrasoundReadError as exc:
            reason = str(exc) if item.kind != "series" else f"{exc} (series {item.path} not segmented)"
            self._fail(result, reason)
            return None
        except Exception as exc:  # noqa: BLE001 - one bad input must not stop the others
            self._fail(result, f"{item.path}: {exc if isinstance(exc, ValueError) else one_line(exc)}")
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
        return _Job(item, result, loaded, prompts, [None] * len(loaded.frames),
                    LoopState() if self.temporal else None)

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
        preds = self._decode([job for job, _ in batch], frames, prompts, features)
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

    def _decode(self, jobs: list[_Job], frames: list[np.ndarray], prompts: list[FramePrompts | None],
                features: dict[str, torch.Tensor]) -> list[Prediction]:
        if not self.temporal:
            # the predictor handles frames without prompts: empty in manual mode, learned prompts alone in refine
            return self.predictor.predict(frames, self.mode, prompts if self.mode is not Mode.AUTONOMOUS else None,
                                          features=features)
        preds: list[Prediction] = []
        # a batch holds each input's pending frames in order, input after input
        for _, group in groupby(range(len(jobs)), key=lambda row: id(jobs[row])):
            rows = list(group)
            part = slice(rows[0], rows[-1] + 1)
            preds += self.predictor.predict(frames[part], features={k: v[part] for k, v in features.items()},
                                            loop=jobs[rows[0]].loop, alpha=self.temporal_alpha,
                                            presence_alpha=self.temporal_presence_alpha)
        return preds

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
                    write_nifti_like(labels, loaded.nifti, target)
                else:
                    write_nifti(labels[0] if len(labels) == 1 else labels, target, loaded.spacing_mm,
                                frame_time_ms=loaded.dicom.frame_time_ms if loaded.dicom is not None else None)
                result.output_format = "nifti"
        except Exception as exc:  # noqa: BLE001 - a failed write is this input's failure, not the run's
            self._fail(result, f"{item.path}: cannot write the output ({one_line(exc)})")
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
