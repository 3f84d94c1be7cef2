"""Evaluation of a trained Sam2Rad on a split: learned prompts (``lp``), learned prompts plus the ground-truth box
(``bb+lp``) and the frozen backbone prompted with the ground-truth box alone (``box``, the zero-shot baseline).

Scores are per class Dice and IoU at each frame's own resolution, with the policy of :mod:`sam2rad_monai.metrics`:
a prediction on a frame without the class is a false positive (score 0), an empty prediction there scores 1.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from monai.visualize import blend_images
from torchvision.ops import masks_to_boxes

from ..inference import FramePrompts, Sam2RadPredictor
from ..io.atomic import atomic_write_bytes
from ..metrics import SegmentationScores
from ..transforms import load_transforms

logger = logging.getLogger(__name__)
MODES = {"lp": "autonomous", "bb+lp": "refine", "box": "manual"}


def load_frame(item: dict[str, Any]) -> tuple[np.ndarray, np.ndarray | None]:
    """Image (H, W, 3) float 0..255 and label map (H, W) uint8 of a datalist entry, rows first."""
    keys = ["image"] + (["label"] if item.get("label") else [])
    data = dict(item)
    for t in load_transforms("image", "label" if "label" in keys else None):
        data = t(data)
    image = np.asarray(data["image"]).transpose(1, 2, 0)
    label = np.asarray(data["label"])[0].astype(np.uint8) if "label" in keys else None
    return image, label


def gt_box_prompts(label: np.ndarray, num_classes: int) -> FramePrompts:
    """Ground-truth boxes (inclusive pixel corners) of the classes present in a label map."""
    prompts = FramePrompts()
    masks = torch.from_numpy(label)[None] == torch.arange(1, num_classes + 1)[:, None, None]
    for k, (present, box) in enumerate(zip(masks.flatten(1).any(1), masks_to_boxes(masks))):
        if present:
            prompts.boxes[k] = tuple(float(v) for v in box)
    return prompts


def overlay(image: np.ndarray, label: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Side by side (H, 2W, 3) uint8: ground truth | prediction, each blended over the frame (H, W, 3) by MONAI's
    ``blend_images`` (class k coloured at k / ``num_classes`` of the colour map, so both panels agree)."""
    frame = np.clip(image, 0, 255).transpose(2, 0, 1) / 255.0
    panels = [blend_images(frame, lab[None] / max(num_classes, 1), alpha=0.5, cmap="hsv", rescale_arrays=False)
              for lab in (label, pred)]
    return (np.concatenate(panels, axis=2).transpose(1, 2, 0) * 255).round().astype(np.uint8)


def evaluate(predictor: Sam2RadPredictor, data: Sequence[dict[str, Any]], class_names: Sequence[str],
             output_dir: str | Path, modes: Sequence[str] = ("lp", "bb+lp", "box"), num_overlays: int = 4
             ) -> dict[str, dict[str, dict[str, float]]]:
    """Score every mode on ``data`` and write ``metrics.json``, ``per_image.csv`` and overlay PNGs.

    Returns ``{mode: {class name: {"dice": %, "iou": %}}}`` (also written to ``<output_dir>/metrics.json``).
    """
    unknown = set(modes) - set(MODES)
    if unknown:
        raise ValueError(f"unknown evaluation modes {sorted(unknown)}; choose from {sorted(MODES)}")
    if not data:
        raise ValueError("no images to evaluate")
    output_dir = Path(output_dir)
    (output_dir / "overlays").mkdir(parents=True, exist_ok=True)
    num_classes = len(class_names)
    scores = {mode: SegmentationScores(num_classes, class_names) for mode in modes}
    start = time.perf_counter()
    for index, item in enumerate(data):
        image, label = load_frame(item)
        features, _ = predictor.encode([image])  # one encoder pass serves every mode
        prompts = gt_box_prompts(label, num_classes)
        for mode in modes:
            # a frame without any object: box gives an empty map, bb+lp falls back to the learned prompts
            # lp ignores the boxes: autonomous mode takes no user input (not even the presence a box implies)
            pred = predictor.predict([image], MODES[mode], [prompts], features=features)[0]
            scores[mode].add(str(item.get("id", index)), pred.label_map, label)
            if mode == modes[0] and index < num_overlays:
                Image.fromarray(overlay(image, label, pred.label_map, num_classes)).save(
                    output_dir / "overlays" / f"{item.get('id', index)}_{mode.replace('+', '_')}.png")
    elapsed = time.perf_counter() - start
    metrics = {mode: {class_names[k - 1]: {"dice": round(v["dice"], 2), "iou": round(v["iou"], 2)}
                      for k, v in scores[mode].summary().items()} for mode in modes}
    _write_json(output_dir / "metrics.json", metrics)
    _write_json(output_dir / "metrics_detail.json", {mode: {s["name"]: s for s in scores[mode].summary().values()}
                                                     for mode in modes})
    for mode in modes:
        scores[mode].write_csv(output_dir / f"per_image_{mode.replace('+', '_')}.csv")
    logger.info("evaluated %d images x %d modes in %.1f s: %s", len(data), len(modes), elapsed, metrics)
    return metrics


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())

