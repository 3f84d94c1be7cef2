"""MONAI Label tasks over one shared Sam2Rad predictor: auto / interactive inference, training, active learning.

Coordinates in requests follow MONAI Label's 2D convention (the image as MONAI loads it, first axis = column):
``foreground`` / ``background`` points are ``[x, y]`` pixel indices (extra entries such as a slice index are
ignored) and ``roi`` is ``[x1, y1, x2, y2]``, the request shapes of MONAI Label's SAM2 task. Label files are written
as 2D NIfTI in the same axis order (:func:`sam2rad_monai.io.write_nifti`), or PNG with ``result_extension: .png``.
A multi-frame study (cine DICOM, 2D+t NIfTI) sent to auto inference is segmented as a loop, in temporal mode unless
the request says ``temporal: false``, and comes back as one 2D+t NIfTI (or in the source NIfTI's own layout).
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from PIL import Image

from ..inputs import LoadedInput, read_file
from ..inference import FramePrompts, Prediction, Sam2RadPredictor
from ..io import is_2d_plus_t, write_nifti, write_nifti_like
from ..io.atomic import atomic_write_path
from ..runtime import check_runtime
from ..temporal import LoopState

logger = logging.getLogger(__name__)
DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "bundle" / "models" / "model.pt"


@dataclass
class AppSettings:
    """What the app serves, from ``--conf key value`` pairs (all optional)."""

    model_path: Path  # the trained PPN; training writes it back
    class_names: list[str]
    backbone: str = "litemedsam"
    backbone_variant: str | None = None
    checkpoint: str | None = None  # backbone weights file (sam / sam2)
    cache_dir: Path | None = None
    device: str = "cpu"
    runtime: str = "torch"  # or an exported CPU runtime, "onnx" / "openvino" (sam2rad_monai.runtime)

    @property
    def labels(self) -> dict[str, int]:
        return {name: k for k, name in enumerate(self.class_names, start=1)}

    @classmethod
    def from_conf(cls, conf: dict[str, Any], studies: str) -> AppSettings:
        model = conf.get("model_path") or (DEFAULT_MODEL if DEFAULT_MODEL.is_file() else
                                           Path(studies) / ".sam2rad" / "model.pt")
        names = [n.strip() for n in str(conf.get("class_names", "nerve,vessel")).split(",") if n.strip()]
        cache = conf.get("cache_dir") or Path(model).parent / "cache"
        device = conf.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        return cls(Path(model), names, conf.get("backbone", "litemedsam"), conf.get("backbone_variant"),
                   conf.get("checkpoint"), Path(cache), device, check_runtime(conf.get("runtime", "torch")))


class ModelHolder:
    """One predictor shared by every task, reloaded when the model file changes (after a training run)."""

    def __init__(self, settings: AppSettings) -> None:
        self.settings = settings
        self._predictor: Sam2RadPredictor | None = None
        self._stamp: float | None = None
        self._lock = threading.Lock()

    def stamp(self) -> float | None:
        path = self.settings.model_path
        return path.stat().st_mtime_ns if path.is_file() else None

    @property
    def predictor(self) -> Sam2RadPredictor:
        with self._lock:
            stamp = self.stamp()
            if self._predictor is None:
                s = self.settings
                self._predictor = Sam2RadPredictor.from_checkpoint(
                    None, len(s.class_names), s.backbone, s.backbone_variant, s.checkpoint, device=s.device)
                self._stamp = None
                if stamp is None:
                    logger.warning("no model at %s: serving an untrained PPN until the train task writes one",
                                   s.model_path)
            if stamp is not None and stamp != self._stamp:
                from ..backbones import read_state_dict

                self._predictor.model.load_ppn_state_dict(read_state_dict(self.settings.model_path))
                # the exported graphs hold the PPN: re-checked (and re-exported) for every model file
                self._predictor.set_runtime(self.settings.runtime, self.settings.model_path)
                self._stamp = stamp
                logger.info("loaded %s", self.settings.model_path)
            return self._predictor

    def has_model(self) -> bool:
        return self.stamp() is not None


class RequestError(ValueError):
    """A request the client got wrong (unknown label, malformed points or box, an image the app cannot label): the
    app answers it with HTTP 400 and this message, where MONAI Label would answer any exception with 500."""


def read_study(path: str | os.PathLike) -> LoadedInput:
    """A study's frames (H, W, 3) on 0..255 (PNG / JPEG / NIfTI / ultrasound DICOM, one frame or a loop), loaded as
    bundle inference loads them; :class:`RequestError` naming the file if unreadable."""
    try:
        return read_file(path)
    except ValueError as err:
        raise RequestError(str(err)) from err


def single_frame(study: LoadedInput, path: str | os.PathLike) -> np.ndarray:
    """The one frame (H, W, 3) of a single-frame study; :class:`RequestError` naming ``path`` otherwise."""
    if len(study.frames) != 1:
        raise RequestError(f"{Path(path).name}: has {len(study.frames)} frames; only auto inference labels a loop")
    return study.frames[0]


def read_frame(path: str | os.PathLike) -> np.ndarray:
    """A 2D frame (H, W, 3) on 0..255 (:func:`read_study` of a single-frame study)."""
    return single_frame(read_study(path), path)


def _points(request: dict[str, Any], key: str) -> list[tuple[float, float]]:
    """``[[x, y, ...], ...]`` of one request key as (x, y) pairs; :class:`RequestError` naming the key if malformed."""
    value = request.get(key) or []
    try:
        return [(float(p[0]), float(p[1])) for p in value]
    except (TypeError, ValueError, IndexError, KeyError):
        raise RequestError(f"{key} must be a list of [x, y] pixel points, got {value!r}") from None


def _roi(request: dict[str, Any]) -> tuple[float, float, float, float] | None:
    """The ``roi`` box ``[x1, y1, x2, y2]`` (None when absent); :class:`RequestError` when malformed."""
    value = request.get("roi")
    if value in (None, "", []):
        return None
    try:
        x1, y1, x2, y2 = (float(v) for v in value[:4])
        ok = len(value) >= 4 and x1 <= x2 and y1 <= y2
    except (TypeError, ValueError, KeyError):
        ok = False
    if not ok:
        raise RequestError(f"roi must be [x1, y1, x2, y2] with x1 <= x2 and y1 <= y2, got {value!r}")
    return x1, y1, x2, y2


def write_label(label_map: np.ndarray, extension: str, study: LoadedInput | None = None) -> str:
    """Write a label map (H, W), or a loop's (F, H, W), to a temporary file MONAI Label sends back (and deletes).

    A NIfTI study gets its labels in its own array layout, affine and steps (so they overlay voxel for voxel);
    anything else gets :func:`~sam2rad_monai.io.write_nifti`'s layout (a loop as 2D+t with the DICOM's frame time),
    or a PNG for a single frame.
    """
    extension = extension if extension.startswith(".") else f".{extension}"
    if extension not in (".png", ".nii", ".nii.gz"):
        raise ValueError(f"result_extension {extension!r} is not supported; use .nii.gz or .png")
    loop = label_map.ndim == 3
    if loop and extension == ".png":
        raise RequestError(f"result_extension {extension!r} cannot hold a loop of {len(label_map)} frames; "
                           "use .nii.gz")
    fd, name = tempfile.mkstemp(suffix=extension, prefix="sam2rad_")
    os.close(fd)
    try:
        if extension == ".png":
            with atomic_write_path(name) as tmp:
                Image.fromarray(label_map.astype(np.uint8)).save(tmp, format="PNG")
        elif study is not None and study.nifti is not None:
            write_nifti_like(label_map if loop else label_map[None], study.nifti, Path(name))
        elif loop and study is not None:
            write_nifti(label_map, name, study.spacing_mm,
                        frame_time_ms=study.dicom.frame_time_ms if study.dicom is not None else None)
        else:
            write_nifti(label_map.astype(np.uint8), name)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return name


def is_loop(study: LoadedInput) -> bool:
    """A cine loop: a multi-frame DICOM or a 2D+t NIfTI (a 3D NIfTI's frames are slices of a volume)."""
    if len(study.frames) < 2:
        return False
    if study.nifti is not None:
        return is_2d_plus_t(study.nifti.shape)
    return study.dicom is not None


def _flag(value: Any) -> bool:
    """A request's boolean option, which MONAI Label clients may send as a string."""
    return value.strip().lower() not in ("false", "0", "no", "off", "") if isinstance(value, str) else bool(value)


def _result(prediction: Prediction, names: list[str], start: float) -> dict[str, Any]:
    found = sorted({int(v) for v in np.unique(prediction.label_map)} - {0})
    out: dict[str, Any] = {"label_names": {n: k for k, n in enumerate(names, start=1)},
                           "found": [names[k - 1] for k in found],
                           "iou": {n: round(float(v), 4) for n, v in zip(names, prediction.iou)},
                           "latencies": {"total": round(time.perf_counter() - start, 3)}}
    if prediction.objectness is not None:
        out["objectness"] = {n: round(float(v), 4) for n, v in zip(names, prediction.objectness)}
    return out


class Sam2RadAutoInfer(InferTask):
    """Every class, no prompt: Sam2Rad's autonomous mode; a cine loop's frames in order, in temporal mode (the blend
    of :mod:`sam2rad_monai.temporal`, or SAM2's memory with the ``sam2`` backbone) unless the request sets
    ``temporal: false``; the slices of a 3D volume one by one."""

    def __init__(self, holder: ModelHolder) -> None:
        super().__init__(InferType.SEGMENTATION, holder.settings.labels, 2,
                         "Sam2Rad autonomous: all classes from learned prompts (a cine loop in temporal mode)",
                         config={"result_extension": ".nii.gz", "temporal": True})
        self.holder = holder

    def is_valid(self) -> bool:
        return True

    def __call__(self, request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        start = time.perf_counter()
        study = read_study(request["image"])
        names, predictor = self.holder.settings.class_names, self.holder.predictor
        extension = request.get("result_extension", ".nii.gz")
        if len(study.frames) == 1:
            prediction = predictor.predict(study.frames, "autonomous")[0]
            return write_label(prediction.label_map, extension, study), _result(prediction, names, start)
        temporal = is_loop(study) and _flag(request.get("temporal", self._config["temporal"]))
        loop = LoopState() if temporal else None
        predictions: list[Prediction] = []
        # one encoder batch at a time, one loop state: a long loop's features would not all fit in memory
        for first in range(0, len(study.frames), predictor.batch_size):
            predictions += predictor.predict(study.frames[first:first + predictor.batch_size], "autonomous", loop=loop)
        labels = np.stack([p.label_map for p in predictions])
        present = [{int(v) for v in np.unique(p.label_map)} for p in predictions]
        out = {key: value for key, value in _result(predictions[0], names, start).items()
               if key not in ("iou", "objectness")}  # those are per frame
        out.update(found=[n for k, n in enumerate(names, start=1) if any(k in f for f in present)],
                   frames=len(predictions), temporal=temporal,
                   frames_found={n: sum(k in f for f in present) for k, n in enumerate(names, start=1)})
        return write_label(labels, extension, study), out


class Sam2RadInteractiveInfer(InferTask):
    """Foreground / background clicks and an optional box for one label, on top of the learned prompts (refine
    mode) when a trained model is loaded, or alone (manual mode, plain SAM) otherwise or with ``mode: manual``.

    The returned label map holds the prompted class only (value = its label index), as MONAI Label's SAM2 task does.
    """

    def __init__(self, holder: ModelHolder) -> None:
        super().__init__(InferType.DEEPGROW, holder.settings.labels, 2,
                         "Sam2Rad refine: clicks and a box on top of the learned prompts",
                         config={"result_extension": ".nii.gz", "mode": "refine"})
        self.holder = holder

    def is_valid(self) -> bool:
        return True

    def __call__(self, request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        start = time.perf_counter()
        names = self.holder.settings.class_names
        label = request.get("label") or (request.get("labels") or [names[0]])[0]
        if label in names:
            index = names.index(label)
        elif (isinstance(label, int) or str(label).isdigit()) and 1 <= int(label) <= len(names):
            index = int(label) - 1
        else:
            raise RequestError(f"unknown label {label!r}; this model segments {names} (or their indices 1.."
                               f"{len(names)})")
        prompts = FramePrompts()
        points = [(x, y, 1) for x, y in _points(request, "foreground")]
        points += [(x, y, 0) for x, y in _points(request, "background")]
        if points:
            prompts.points[index] = points
        roi = _roi(request)
        if roi is not None:
            prompts.boxes[index] = roi
        mode = request.get("mode") or ("refine" if self.holder.has_model() else "manual")
        if mode not in ("refine", "manual"):
            raise RequestError(f"mode must be 'refine' or 'manual', got {mode!r}")
        study = read_study(request["image"])
        frame = single_frame(study, request["image"])
        prediction = self.holder.predictor.predict([frame], mode, [prompts])[0]
        label_map = np.where(prediction.label_map == index + 1, index + 1, 0).astype(np.uint8)
        prediction.label_map = label_map
        out = write_label(label_map, request.get("result_extension", ".nii.gz"), study)
        return out, _result(prediction, names, start)


class Sam2RadTrain(TrainTask):
    """Fine-tune the PPN on the datastore's final labels, warm-starting from the model file, and write it back.

    Request options: ``max_epochs`` (default 10), ``learning_rate`` (1e-4), ``batch_size`` (4), ``cache_views`` (2),
    ``member_augmentations`` (a dense PPN's further trunks' (rotate_degrees, vertical_flip) views, one pair per trunk
    after the first; default: the few-shot recipe's ultrasound geometry for each). Features go through the project's
    feature cache, so a second run over the same labels encodes nothing.
    """

    def __init__(self, holder: ModelHolder) -> None:
        super().__init__("Fine-tune the Sam2Rad prompt predictor on the saved labels")
        self.holder = holder
        self._config = {"max_epochs": 10, "learning_rate": 1e-4, "batch_size": 4, "cache_views": 2,
                        "member_augmentations": None}

    def config(self) -> dict[str, Any]:
        return dict(self._config)

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        from monai.engines import SupervisedTrainer
        from torch.utils.data import DataLoader

        from ..engine.cache import ULTRASOUND_GEOMETRY, CachedFeatureDataset, FeatureCache
        from ..engine.handlers import SetPrototypes
        from ..engine.inferers import PromptMixInferer, prepare_training_batch
        from ..losses import Sam2RadLoss

        options = {**self._config, **{k: request[k] for k in self._config if k in request}}
        data = [{"image": d["image"], "label": d["label"], "id": Path(d["image"]).stem} for d in datastore.datalist()]
        if not data:
            raise ValueError("no saved labels in the datastore: label an image first")
        settings = self.holder.settings
        model = self.holder.predictor.model  # warm-started from the model file when there is one
        cache = FeatureCache(settings.cache_dir, model.backbone, model.num_classes)
        further = max(len(getattr(model.ppn, "trunks", ())) - 1, 0)  # each row trains one trunk, on its own views
        augmentations = options["member_augmentations"]
        augmentations = [ULTRASOUND_GEOMETRY] * further if augmentations is None else augmentations
        if len(augmentations) != further:
            raise RequestError(f"member_augmentations gives {len(augmentations)} pairs for a model with {further} "
                               f"further trunks ({settings.model_path.name})")
        dataset = CachedFeatureDataset(data, cache, int(options["cache_views"]),
                                       member_caches=cache.variants(augmentations))
        dataset.prepare()
        SetPrototypes(dataset, model)()  # a dense PPN matches against the labelled frames of this datastore
        loader = DataLoader(dataset, batch_size=int(options["batch_size"]), shuffle=True)
        optimizer = torch.optim.AdamW(model.trainable_parameter_groups(float(options["learning_rate"])))
        trainer = SupervisedTrainer(
            device=torch.device(settings.device), max_epochs=int(options["max_epochs"]), train_data_loader=loader,
            network=model, optimizer=optimizer, loss_function=Sam2RadLoss(model.backbone.image_size, dice_weight=1.0),
            inferer=PromptMixInferer(), prepare_batch=prepare_training_batch, decollate=False)
        start = time.perf_counter()
        model.train()
        try:
            trainer.run()
        finally:
            model.eval()
        settings.model_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write_path(settings.model_path) as tmp:
            torch.save(model.ppn_state_dict(), tmp)
        loss = trainer.state.output["loss"].item() if trainer.state.output else None
        logger.info("trained on %d labelled images for %s epochs; wrote %s", len(data), options["max_epochs"],
                    settings.model_path)
        return {"images": len(data), "epochs": int(options["max_epochs"]), "last_loss": loss,
                "seconds": round(time.perf_counter() - start, 1), "model_path": str(settings.model_path)}


class Sam2RadUncertainty(Strategy):
    """Propose the unlabelled image the model is least sure about.

    Per class, confidence = |2 sigmoid(objectness) - 1|, times SAM's IoU estimate when the class is predicted
    present; the image's uncertainty is 1 - the mean confidence over classes. Scores are kept per (image, model
    file) so each image is encoded once per model.
    """

    def __init__(self, holder: ModelHolder) -> None:
        super().__init__("Least confident image first (objectness and SAM's IoU estimate)")
        self.holder = holder
        self._scores: dict[tuple[str, float | None], float | None] = {}

    def uncertainty(self, path: str) -> float | None:
        """1 - the mean confidence of a single-frame study; None for a loop or a volume (not proposed)."""
        key = (path, self.holder.stamp())
        if key not in self._scores:
            study = read_study(path)
            if len(study.frames) != 1:  # a loop or a volume is not one image to label next
                self._scores[key] = None
                return None
            pred = self.holder.predictor.predict(study.frames, "autonomous")[0]
            p = 1.0 / (1.0 + np.exp(-np.asarray(pred.objectness, dtype=np.float64)))
            confidence = np.abs(2 * p - 1) * np.where(p >= 0.5, np.clip(pred.iou, 0.0, 1.0), 1.0)
            self._scores[key] = float(1.0 - confidence.mean())
        return self._scores[key]

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any] | None:
        images = datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels"))
        if not images:
            return None
        scores = {}
        for image in images:
            try:
                score = self.uncertainty(datastore.get_image_uri(image))
            except ValueError as err:  # one unreadable study must not block the queue
                logger.error("%s", err)
                continue
            if score is not None:
                scores[image] = score
        if not scores:
            return None
        best = max(scores, key=scores.get)
        return {"id": best, "weight": scores[best]}
