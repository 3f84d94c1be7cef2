"""Presence calibration: a per-class objectness threshold chosen on held-out frames.

A dense PPN calls a class present when its objectness logit is at least 0. Trained with BCE on the frames it fits,
the head is overconfident on frames it has not seen, and under the empty-mask policy of
:mod:`sam2rad_monai.metrics` one structure called on a frame without it costs as much as one missed. Calibration
measures, on held-out labelled frames (a validation split, or the held-out folds of a cross-validation), the score
each (frame, class) would get if the class were kept and if it were dropped, picks per class the threshold that
maximises the mean (ties go to the threshold nearest the current rule, so no evidence means no change) and stores
it in the model file as the PPN's ``presence_offset``, which every consumer of the objectness then applies.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..backbones import read_state_dict
from ..inference import Sam2RadPredictor
from ..io.atomic import atomic_write_bytes, atomic_write_path
from ..metrics import per_class_scores
from .evaluation import load_frame

logger = logging.getLogger(__name__)
OFFSET_KEY = "ppn.presence_offset"


@dataclass(frozen=True)
class PresenceRow:
    """One held-out (frame, class): its objectness logit under the model's current rule, and the Dice the class
    scores if kept (its mask against the ground truth) or dropped (1 on a frame without it, else 0)."""

    id: str
    class_index: int
    objectness: float
    kept: float
    dropped: float


def held_out_rows(predictor: Sam2RadPredictor, items: Sequence[dict[str, Any]],
                  features: dict[str, torch.Tensor] | None = None) -> list[PresenceRow]:
    """Score every class of every labelled frame in ``items`` kept and dropped (autonomous mode).

    Args:
        predictor: a predictor of a trained dense-PPN model.
        items: datalist entries with ``image``, ``label`` and ``id``.
        features: the frames' features from ``predictor.encode`` (optional; encoded here when None).
    """
    frames, labels = zip(*(load_frame(item) for item in items))
    threshold = predictor.objectness_threshold
    predictor.objectness_threshold = -float("inf")  # keep every class: its mask is what keeping it would give
    try:
        predictions = predictor.predict(list(frames), features=features)
    finally:
        predictor.objectness_threshold = threshold
    rows = []
    for item, label, pred in zip(items, labels, predictions):
        if pred.objectness is None:
            raise ValueError("presence calibration needs a model with learned prompts (objectness)")
        for k in range(len(pred.objectness)):
            truth = (label == k + 1).astype(np.uint8)
            kept = per_class_scores(pred.masks[k].astype(np.uint8), truth, 1)[1]["dice"]
            rows.append(PresenceRow(str(item["id"]), k + 1, float(pred.objectness[k]) - threshold, kept,
                                    0.0 if truth.any() else 1.0))
    return rows


def _held_out(rows: Sequence[PresenceRow], k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Objectness, kept and dropped scores (each (N,)) of class ``k``'s rows."""
    sel = [r for r in rows if r.class_index == k]
    return (np.array([r.objectness for r in sel]), np.array([r.kept for r in sel]),
            np.array([r.dropped for r in sel]))


def _mean_dice(obj: np.ndarray, kept: np.ndarray, dropped: np.ndarray, threshold: float) -> float:
    """Held-out mean Dice (%) when a class is kept at objectness >= ``threshold``."""
    return float(100 * np.where(obj >= threshold, kept, dropped).mean()) if len(obj) else float("nan")


def presence_thresholds(rows: Sequence[PresenceRow], num_classes: int) -> np.ndarray:
    """Per class, the objectness threshold (C,) maximising the held-out mean Dice of ``rows``.

    Candidates are 0 (the current rule) and the midpoints between consecutive distinct objectness values of the
    class; among equal scores the one nearest 0 wins, so a class whose rows give no reason to move keeps 0.
    """
    out = np.zeros(num_classes)
    for k in range(1, num_classes + 1):
        obj, kept, dropped = _held_out(rows, k)
        if not len(obj):
            continue
        values = np.unique(obj)
        candidates = np.concatenate([[0.0], (values[1:] + values[:-1]) / 2, [values[0] - 1.0, values[-1] + 1.0]])
        scores = np.array([_mean_dice(obj, kept, dropped, t) for t in candidates])
        best = np.flatnonzero(scores >= scores.max() - 1e-9)
        out[k - 1] = candidates[best[np.argmin(np.abs(candidates[best]))]]
    return out


def presence_summary(rows: Sequence[PresenceRow], thresholds: Sequence[float]) -> dict[str, dict[str, Any]]:
    """Per class (keys "1".."C"): the threshold, held-out mean Dice (%) at 0 and at it, frames, frames without the
    class, false calls and missed structures before and after."""
    out = {}
    for k, threshold in enumerate(thresholds, start=1):
        obj, kept, dropped = _held_out(rows, k)
        without = dropped > 0
        out[str(k)] = {"threshold": float(threshold), "dice_before": _mean_dice(obj, kept, dropped, 0.0),
                       "dice_after": _mean_dice(obj, kept, dropped, threshold), "frames": len(obj),
                       "frames_without": int(without.sum()),
                       "false_calls_before": int((obj[without] >= 0).sum()),
                       "false_calls_after": int((obj[without] >= threshold).sum()),
                       "missed_before": int((obj[~without] < 0).sum()),
                       "missed_after": int((obj[~without] < threshold).sum())}
    return out


def write_presence_offset(model_path: str | Path, thresholds: Sequence[float], output_path: str | Path | None = None
                          ) -> Path:
    """Add ``thresholds`` (C,) to the presence offset stored in a dense-PPN model file (atomically; in place unless
    ``output_path``); returns the written path."""
    state = read_state_dict(model_path)
    if "ppn.prototypes" not in state:
        raise ValueError(f"{model_path}: presence calibration applies to a dense PPN model file only")
    classes = state["ppn.objectness_head.bias"].shape[0]
    if len(thresholds) != classes:
        raise ValueError(f"{len(thresholds)} thresholds for a model file of {classes} classes ({model_path})")
    offset = state.get(OFFSET_KEY, torch.zeros(classes))
    state[OFFSET_KEY] = offset + torch.as_tensor(np.asarray(thresholds), dtype=offset.dtype)
    target = Path(output_path or model_path)
    with atomic_write_path(target) as tmp:
        torch.save(state, tmp)
    return target


def calibrate_presence(predictor: Sam2RadPredictor, items: Sequence[dict[str, Any]], model_path: str | Path,
                       output_dir: str | Path, output_model_path: str | Path | None = None) -> np.ndarray:
    """Choose per-class presence thresholds on held-out ``items`` and store them in the model file.

    Writes ``presence.json`` (thresholds, the held-out mean Dice before and after, the rows) to ``output_dir`` and
    the calibrated model to ``output_model_path`` (default: ``model_path``, replaced atomically). Returns the
    thresholds (C,) added to the offset.
    """
    rows = held_out_rows(predictor, items)
    thresholds = presence_thresholds(rows, predictor.model.num_classes)
    summary = presence_summary(rows, thresholds)
    for k, entry in summary.items():
        logger.info("class %s: presence threshold %.3f, held-out Dice %.2f -> %.2f (%d frames, %d without it)",
                    k, entry["threshold"], entry["dice_before"], entry["dice_after"], entry["frames"],
                    entry["frames_without"])
    written = write_presence_offset(model_path, thresholds, output_model_path)
    report = {"model": str(written), "classes": summary, "rows": [asdict(r) for r in rows]}
    atomic_write_bytes(Path(output_dir) / "presence.json", json.dumps(report, indent=1).encode())
    return thresholds
