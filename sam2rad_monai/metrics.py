"""Per-class Dice and IoU for label maps, with an explicit empty-mask policy.

Scores are computed per (image, class) with MONAI's ``compute_dice`` / ``compute_iou`` (the functions behind
``DiceMetric`` and ``MeanIoU``) with ``ignore_empty=False``, which gives exactly this policy:

====================  ======================  =================================================
ground truth          prediction              Dice / IoU
====================  ======================  =================================================
class present         anything                standard overlap (0 when the prediction is empty)
class absent          empty                   1.0: a correct rejection, counted in the mean
class absent          non-empty               0.0: a false positive, counted in the mean
====================  ======================  =================================================

So a model is rewarded for leaving an absent class empty and penalised for hallucinating it. The summary also
reports ``dice_present`` / ``iou_present``: the means over images where the class is present in the ground
truth only (the convention of papers that drop empty frames), and detection counts.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.metrics import compute_dice, compute_iou
from monai.networks.utils import one_hot

from .io.atomic import atomic_write_path

__all__ = ["ScoreRow", "SegmentationScores", "per_class_scores"]


def _as_label_map(label_map: Any, name: str) -> torch.Tensor:
    lab = torch.as_tensor(np.asarray(label_map) if not isinstance(label_map, torch.Tensor) else label_map)
    if hasattr(lab, "as_tensor"):
        lab = lab.as_tensor()
    if lab.ndim == 3 and lab.shape[0] == 1:
        lab = lab[0]
    if lab.ndim != 2:
        raise ValueError(f"{name} must be a label map (H, W) or (1, H, W), got shape {tuple(lab.shape)}")
    return lab.long()


def _one_hot(lab: torch.Tensor, num_classes: int, name: str) -> torch.Tensor:
    if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) > num_classes):
        raise ValueError(f"{name} has values {sorted(torch.unique(lab).tolist())}, expected 0..{num_classes}")
    return one_hot(lab[None, None], num_classes + 1, dim=1)  # (1, K + 1, H, W), channel 0 = background


def per_class_scores(pred_label_map: Any, gt_label_map: Any, num_classes: int) -> dict[int, dict[str, float]]:
    """Dice and IoU of each foreground class for one image, under the module's empty-mask policy.

    Args:
        pred_label_map: predicted label map (H, W) or (1, H, W), values 0..K (numpy or torch).
        gt_label_map: ground-truth label map of the same size.
        num_classes: number of foreground classes ``K``.

    Returns:
        ``{k: {"dice": d, "iou": i}}`` for k = 1..K, values in [0, 1].
    """
    pred, gt = _as_label_map(pred_label_map, "prediction"), _as_label_map(gt_label_map, "ground truth")
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and ground truth {tuple(gt.shape)} differ in size")
    p, g = _one_hot(pred, num_classes, "prediction"), _one_hot(gt, num_classes, "ground truth")
    dice = compute_dice(p, g, include_background=False, ignore_empty=False)[0]
    iou = compute_iou(p, g, include_background=False, ignore_empty=False)[0]
    return {k + 1: {"dice": float(dice[k]), "iou": float(iou[k])} for k in range(num_classes)}


@dataclass(frozen=True)
class ScoreRow:
    """One (image, class) score; ``dice`` and ``iou`` in [0, 1]."""

    id: str
    class_index: int
    class_name: str
    dice: float
    iou: float
    gt_present: bool
    pred_present: bool


def _mean_percent(values: Sequence[float]) -> float:
    return 100.0 * float(np.mean(values)) if values else math.nan


class SegmentationScores:
    """Collect per-image, per-class scores and summarise them per class.

    Args:
        num_classes: number of foreground classes ``K``.
        class_names: optional names of classes 1..K (used in the CSV and the summary).

    Example::

        scores = SegmentationScores(2, ["nerve", "vessel"])
        scores.add("0001", pred, gt)
        scores.summary()[1]["dice"]   # mean nerve Dice, percent
        scores.write_csv("eval/per_image.csv")
    """

    def __init__(self, num_classes: int, class_names: Sequence[str] | None = None) -> None:
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names is not None else [str(k) for k in range(1, num_classes + 1)]
        self._rows: list[ScoreRow] = []

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def rows(self) -> list[ScoreRow]:
        """All rows collected so far, in insertion order."""
        return list(self._rows)

    def reset(self) -> None:
        """Forget all rows."""
        self._rows.clear()

    def add(self, image_id: str, pred_label_map: Any, gt_label_map: Any) -> dict[int, dict[str, float]]:
        """Score one image and store one row per class; returns :func:`per_class_scores` for it."""
        scores = per_class_scores(pred_label_map, gt_label_map, self.num_classes)
        pred, gt = _as_label_map(pred_label_map, "prediction"), _as_label_map(gt_label_map, "ground truth")
        for k, s in scores.items():
            self._rows.append(
                ScoreRow(
                    id=str(image_id),
                    class_index=k,
                    class_name=self.class_names[k - 1],
                    dice=s["dice"],
                    iou=s["iou"],
                    gt_present=bool((gt == k).any()),
                    pred_present=bool((pred == k).any()),
                )
            )
        return scores

    def summary(self) -> dict[int, dict[str, Any]]:
        """Per class: mean ``dice``/``iou`` (percent, empty-mask policy), ``dice_present``/``iou_present``
        (percent, GT-present images only; NaN if none), ``name``, ``n_images``, ``n_gt_present``,
        ``false_positives`` (GT absent, prediction not) and ``false_negatives`` (GT present, prediction empty)."""
        out: dict[int, dict[str, Any]] = {}
        for k in range(1, self.num_classes + 1):
            rows = [r for r in self._rows if r.class_index == k]
            present = [r for r in rows if r.gt_present]
            out[k] = {
                "name": self.class_names[k - 1],
                "dice": _mean_percent([r.dice for r in rows]),
                "iou": _mean_percent([r.iou for r in rows]),
                "dice_present": _mean_percent([r.dice for r in present]),
                "iou_present": _mean_percent([r.iou for r in present]),
                "n_images": len(rows),
                "n_gt_present": len(present),
                "false_positives": sum(r.pred_present and not r.gt_present for r in rows),
                "false_negatives": sum(r.gt_present and not r.pred_present for r in rows),
            }
        return out

    def mean_dice(self) -> float:
        """Mean over classes of the per-class mean Dice (percent)."""
        return float(np.mean([s["dice"] for s in self.summary().values()]))

    def write_csv(self, path: str | Path) -> Path:
        """Write one line per (image, class) with columns of :class:`ScoreRow`; written atomically."""
        path = Path(path)
        with atomic_write_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=[fld.name for fld in fields(ScoreRow)])
            writer.writeheader()
            for row in self._rows:
                writer.writerow({**asdict(row), "dice": f"{row.dice:.6f}", "iou": f"{row.iou:.6f}"})
        return path
