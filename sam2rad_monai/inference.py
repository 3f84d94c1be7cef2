"""Predictor: frames in, per-class masks and a label map at the frames' own size out, in any of the three modes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.utils import convert_to_tensor
from torch import Tensor

from .backbones import Backbone, build_backbone, read_state_dict
from .memory import has_memory, track
from .model import MASK_PROMPT_LOGIT, Mode, Prompts, Sam2Rad
from .runtime import ExportedRuntime
from .temporal import DEFAULT_ALPHA, DEFAULT_PRESENCE_ALPHA, LoopState, blend
from .transforms import preprocessing_transforms


@dataclass
class FramePrompts:
    """User prompts for one frame, in the frame's own pixel coordinates (x = column, y = row).

    Keys are class indices 0..C-1 (class ``k`` of the label map is index ``k - 1``).
    """

    boxes: dict[int, Sequence[float]] = field(default_factory=dict)  # (x1, y1, x2, y2)
    points: dict[int, Sequence[tuple[float, float, int]]] = field(default_factory=dict)  # (x, y, 1 pos | 0 neg)
    masks: dict[int, np.ndarray] = field(default_factory=dict)  # (H, W) bool brush or previous mask

    def is_empty(self) -> bool:
        return not (self.boxes or self.points or self.masks)


@dataclass
class Prediction:
    """The model's answer for one frame."""

    label_map: np.ndarray  # (H, W) uint8: 0 background, k = class k (overlaps go to the highest logit)
    masks: np.ndarray  # (C, H, W) bool, per class before overlap resolution
    objectness: np.ndarray | None  # (C,) logits (None in manual mode)
    iou: np.ndarray  # (C,) SAM's IoU estimate
    logits: np.ndarray = field(repr=False, default=None)  # (C, m, m) the output logits (fused, see Sam2Rad)


class Sam2RadPredictor:
    """Run a Sam2Rad model on frames of any size, batching the frozen encoder.

    Args:
        model: a Sam2Rad model (its PPN trained, or untrained for manual mode).
        device: where to run.
        objectness_threshold: a class whose objectness logit is below it is empty, as is one whose mask misses the
            model's calibrated minimum region (:meth:`~sam2rad_monai.model.Sam2Rad.present`); rows with a user prompt
            for that class are kept: the user said the object is there.
        batch_size: frames per encoder batch; ``None``: 1 on a CPU (LiteMedSAM's encoder there runs a frame alone
            faster than in a batch, docs/BENCHMARKS.md "Encoder runtimes"), 8 on an accelerator.
        runtime: ``torch`` (default), or an exported CPU runtime, ``onnx`` (ONNX Runtime) or ``openvino``
            (:mod:`sam2rad_monai.runtime`): the encoder and autonomous mode's prompt path run exported, refine and
            manual modes run the PyTorch prompt path on the exported encoder's features.
        model_path: the file the model's PPN was loaded from, which an exported runtime checks its graphs against
            (they are exported next to it, or rebuilt when stale); ``None`` with a runtime: an untrained model,
            whose graphs go to ``export_folder``.
        export_folder: where the exported graphs live (default: next to ``model_path``).
    """

    def __init__(self, model: Sam2Rad, device: str | torch.device = "cpu", objectness_threshold: float = 0.0,
                 batch_size: int | None = None, runtime: str = "torch", model_path: str | Path | None = None,
                 export_folder: str | Path | None = None) -> None:
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.objectness_threshold = objectness_threshold
        if batch_size is None:
            batch_size = 1 if self.device.type == "cpu" else 8
        self.batch_size = batch_size
        self.runtime: ExportedRuntime | None = None
        self.set_runtime(runtime, model_path, export_folder)
        bb = model.backbone
        self.size = bb.image_size
        self._preprocess = preprocessing_transforms(bb.image_size, bb.pixel_mean, bb.pixel_std, model.num_classes,
                                                    label_key=None, load=False)

    @classmethod
    def from_checkpoint(cls, model_path: str | Path | None, num_classes: int, backbone: str | Backbone = "litemedsam",
                        variant: str | None = None, checkpoint: str | Path | None = None,
                        device: str | torch.device = "cpu", model_kwargs: dict | None = None,
                        **kwargs) -> Sam2RadPredictor:
        """Build the backbone, load a trained PPN from ``model_path`` (None: untrained, manual mode only).

        The PPN's box source is read from the file (a file with a query box head was trained with
        ``box_source="query"``) unless ``model_kwargs`` sets it.
        """
        bb = backbone if isinstance(backbone, Backbone) else build_backbone(backbone, variant, checkpoint)
        kwargs_model = dict(model_kwargs or {})
        state = read_state_dict(model_path) if model_path is not None else None
        if state is not None and "box_source" not in kwargs_model:
            kwargs_model["box_source"] = "query" if any(k.startswith("ppn.box_head.") for k in state) else "mask"
        model = Sam2Rad(bb, num_classes, **kwargs_model)
        if state is not None:
            model.load_ppn_state_dict(state)
        return cls(model, device, model_path=model_path, **kwargs)

    def set_runtime(self, runtime: str, model_path: str | Path | None = None,
                    export_folder: str | Path | None = None) -> None:
        """Switch to ``runtime`` (see the class arguments); call again after loading another PPN into the model."""
        self.runtime = None
        if runtime != "torch":
            if self.device.type != "cpu":
                raise ValueError(f"runtime {runtime!r} runs on the CPU; use device 'cpu' or runtime 'torch'")
            self.runtime = ExportedRuntime.load(self.model, model_path, runtime, export_folder)

    # -- steps ------------------------------------------------------------------------------------------------
    def preprocess(self, frame: np.ndarray) -> tuple[Tensor, tuple[int, int]]:
        """(H, W) or (H, W, 3) frame, 0..255 -> normalised padded (3, S, S) tensor and the resized (h, w)."""
        array = np.asarray(frame, dtype=np.float32)
        if array.ndim == 2:
            array = array[..., None]
        if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
            raise ValueError(f"a frame must be (H, W) or (H, W, 3), got shape {array.shape}")
        data = self._preprocess({"image": torch.from_numpy(np.ascontiguousarray(array[..., :3].transpose(2, 0, 1)))})
        h, w = (int(v) for v in data["input_size"])
        # a plain tensor: MetaTensor dispatch on every decoder op costs time and carries nothing the model needs
        return convert_to_tensor(data["image"], track_meta=False).float(), (h, w)

    @torch.no_grad()
    def encode(self, frames: Sequence[np.ndarray]) -> tuple[dict[str, Tensor], list[tuple[int, int]]]:
        """Encode frames in batches; returns batched features and each frame's resized (h, w)."""
        tensors, sizes = zip(*(self.preprocess(f) for f in frames))
        encode = self.runtime.encode if self.runtime is not None else self.model.encode
        parts = [encode(torch.stack(tensors[i:i + self.batch_size]).to(self.device))
                 for i in range(0, len(tensors), self.batch_size)]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}, list(sizes)

    @torch.no_grad()
    def predict(self, frames: Sequence[np.ndarray], mode: Mode | str = Mode.AUTONOMOUS,
                prompts: Sequence[FramePrompts | None] | None = None,
                features: dict[str, Tensor] | None = None, loop: LoopState | None = None,
                alpha: float = DEFAULT_ALPHA, presence_alpha: float = DEFAULT_PRESENCE_ALPHA) -> list[Prediction]:
        """Segment every class in every frame.

        Args:
            frames: (H, W) or (H, W, 3) arrays on a 0..255 scale.
            mode: ``autonomous``, ``refine`` or ``manual``.
            prompts: per-frame user prompts (refine / manual), in frame pixels; ignored in autonomous mode.
            features: precomputed features of these frames (from :meth:`encode`) to skip the encoder.
            loop: temporal mode (autonomous only): ``frames`` are consecutive frames of one cine loop, blended in
                order with the loop's earlier frames (:func:`~sam2rad_monai.temporal.blend`, new-frame weights
                ``alpha`` and ``presence_alpha``); pass the same :class:`~sam2rad_monai.temporal.LoopState` for the
                loop's next frames. With the ``sam2`` backbone SAM2's memory tracks each class
                instead (:func:`~sam2rad_monai.memory.track`), unless the state says ``use_memory=False``.
        """
        mode = Mode(mode)
        if loop is not None and mode is not Mode.AUTONOMOUS:
            raise ValueError(f"temporal mode segments loops autonomously; it does not take {mode.value} mode")
        prompts = list(prompts) if prompts is not None else [None] * len(frames)
        if mode is not Mode.AUTONOMOUS and all(p is None or p.is_empty() for p in prompts):
            if mode is Mode.MANUAL:  # nothing prompted, nothing segmented
                return [self._empty(np.asarray(f).shape[:2]) for f in frames]
            mode = Mode.AUTONOMOUS  # refine without user prompts is the learned prompts alone
        if mode is Mode.AUTONOMOUS:
            # autonomous means no user input at all: a prompt must not even keep a class its objectness drops
            prompts = [None] * len(frames)
        if features is None:
            features, sizes = self.encode(frames)
        else:
            sizes = [self._resized(np.asarray(f).shape[:2]) for f in frames]
        results: list[Prediction] = []
        for start in range(0, len(frames), self.batch_size):
            stop = min(start + self.batch_size, len(frames))
            batch_prompts = None
            if mode is not Mode.AUTONOMOUS:
                batch_prompts = self.to_model_prompts([np.asarray(f).shape[:2] for f in frames[start:stop]],
                                                      [p or FramePrompts() for p in prompts[start:stop]])
            model = self.runtime if self.runtime is not None and mode is Mode.AUTONOMOUS else self.model
            out = model({k: v[start:stop] for k, v in features.items()}, batch_prompts, mode)
            for i in range(stop - start):
                frame_out, index = out, i
                if loop is not None:
                    if loop.use_memory and has_memory(self.model.backbone):
                        frame = {k: v[start + i : start + i + 1] for k, v in features.items()}
                        called = self.model.present(out["logits"][i : i + 1], out["objectness"][i : i + 1],
                                                    self.objectness_threshold)[0]
                        logits, objectness = track(self.model.backbone, frame, out["logits"][i],
                                                   out["objectness"][i], loop, self.objectness_threshold, called)
                    else:
                        logits, objectness = blend(loop, out["logits"][i], out["objectness"][i], alpha,
                                                   presence_alpha)
                    frame_out, index = {"logits": logits[None], "objectness": objectness[None],
                                        "iou": out["iou"][i : i + 1]}, 0
                results.append(self._postprocess(frame_out, index, np.asarray(frames[start + i]).shape[:2],
                                                 sizes[start + i], prompts[start + i], mode))
        return results

    # -- helpers ----------------------------------------------------------------------------------------------
    def _resized(self, shape: tuple[int, int]) -> tuple[int, int]:
        scale = self.size / max(shape)
        return int(round(shape[0] * scale)), int(round(shape[1] * scale))

    def to_model_prompts(self, shapes: Sequence[tuple[int, int]], prompts: Sequence[FramePrompts]) -> Prompts:
        """Frame-pixel prompts of a batch to model-input :class:`Prompts` (padded to a common point count)."""
        classes, m = self.model.num_classes, self.model.backbone.mask_prompt_size
        batch = len(prompts)
        scales = [self.size / max(shape) for shape in shapes]
        out = Prompts()
        if any(p.boxes for p in prompts):
            out.boxes = torch.zeros(batch, classes, 4)
            out.box_valid = torch.zeros(batch, classes, dtype=torch.bool)
            for b, p in enumerate(prompts):
                for c, box in p.boxes.items():
                    out.boxes[b, c] = torch.tensor(box, dtype=torch.float32) * scales[b]
                    out.box_valid[b, c] = True
        n_points = max((len(v) for p in prompts for v in p.points.values()), default=0)
        if n_points:
            out.points = torch.zeros(batch, classes, n_points, 2)
            out.point_labels = torch.full((batch, classes, n_points), -1, dtype=torch.long)
            for b, p in enumerate(prompts):
                for c, pts in p.points.items():
                    for j, (x, y, label) in enumerate(pts):
                        out.points[b, c, j] = torch.tensor([x, y]) * scales[b]
                        out.point_labels[b, c, j] = int(label)
        if any(p.masks for p in prompts):
            out.masks = torch.zeros(batch, classes, m, m)
            out.mask_valid = torch.zeros(batch, classes, dtype=torch.bool)
            for b, p in enumerate(prompts):
                for c, mask in p.masks.items():
                    out.masks[b, c] = self._mask_prompt(np.asarray(mask, bool), scales[b])
                    out.mask_valid[b, c] = True
        return Prompts(**{k: (v.to(self.device) if isinstance(v, Tensor) else v) for k, v in vars(out).items()})

    def _mask_prompt(self, mask: np.ndarray, scale: float) -> Tensor:
        h, w = (int(round(s * scale)) for s in mask.shape)
        m = self.model.backbone.mask_prompt_size
        resized = F.interpolate(torch.from_numpy(mask).float()[None, None], size=(h, w), mode="nearest-exact")
        padded = F.pad(resized, (0, self.size - w, 0, self.size - h))
        low = F.interpolate(padded, size=(m, m), mode="area")[0, 0]
        return (2.0 * low - 1.0) * MASK_PROMPT_LOGIT

    def _empty(self, shape: tuple[int, int]) -> Prediction:
        classes = self.model.num_classes
        return Prediction(label_map=np.zeros(shape, np.uint8), masks=np.zeros((classes, *shape), bool),
                          objectness=None, iou=np.zeros(classes, np.float32))

    def _postprocess(self, out: dict[str, Tensor], i: int, shape: tuple[int, int], resized: tuple[int, int],
                     prompts: FramePrompts | None, mode: Mode) -> Prediction:
        logits = out["logits"][i : i + 1]
        # as SAM: upscale to the padded input, drop the padding, then resize to the frame
        full = F.interpolate(logits, size=(self.size, self.size), mode="bilinear", align_corners=False)
        full = full[..., : resized[0], : resized[1]]
        full = F.interpolate(full, size=tuple(shape), mode="bilinear", align_corners=False)[0]
        masks = full > 0
        prompted = set(prompts.boxes) | set(prompts.points) | set(prompts.masks) if prompts is not None else set()
        objectness = out.get("objectness")
        # a class is kept when the user prompted it (the user said it is there) or, with learned prompts, when its
        # objectness passes; in manual mode an unprompted class is empty (SAM with no prompt segments something)
        keep = torch.zeros(masks.shape[0], dtype=torch.bool, device=masks.device)
        if objectness is not None:
            keep = self.model.present(logits, objectness[i : i + 1], self.objectness_threshold)[0].to(masks.device)
        keep[list(prompted)] = True
        masks &= keep.reshape(-1, 1, 1)
        ranked = torch.where(masks, full, torch.tensor(float("-inf")))
        # max gives argmax's indices (the first of equal values) and, over the leading class dimension, runs faster
        label_map = torch.where(masks.any(0), ranked.max(0).indices + 1, 0).to(torch.uint8)
        return Prediction(
            label_map=label_map.cpu().numpy(), masks=masks.cpu().numpy(),
            objectness=None if objectness is None else objectness[i].cpu().numpy(),
            iou=out["iou"][i].cpu().numpy(), logits=out["logits"][i].cpu().numpy(),
        )
