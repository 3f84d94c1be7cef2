"""Presence calibration: a per-class objectness threshold and minimum region chosen on held-out frames.

A dense PPN calls a class present when its objectness logit is at least 0. Trained with BCE on the frames it fits,
the head is overconfident on frames it has not seen, and under the empty-mask policy of
:mod:`sam2rad_monai.metrics` one structure called on a frame without it costs as much as one missed. Calibration
measures, on held-out labelled frames (a validation split, or the held-out folds of a cross-validation), the score
each (frame, class) would get if the class were kept and if it were dropped, picks per class the threshold that
maximises the mean (ties go to the threshold nearest the current rule, so no evidence means no change) and stores
it in the model file as the PPN's ``presence_offset``, which every consumer of the objectness then applies. Then,
among the calls that threshold keeps, it picks the same way the share of the mask grid that a class's largest
connected region must cover (``presence_min_region``, applied by :meth:`~sam2rad_monai.model.Sam2Rad.present`): a
false call is often a few specks where a structure is one region.
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
from ..ppn import largest_region_fraction
from .evaluation import load_frame

logger = logging.getLogger(__name__)
OFFSET_KEY = "ppn.presence_offset"
MIN_REGION_KEY = "ppn.presence_min_region"


@dataclass(frozen=True)
class PresenceRow:
    """One held-out (frame, class): its objectness logit under the model's current rule, the Dice the class
    scores if kept (its mask against the ground truth) or dropped (1 on a frame without it, else 0), and the share
    of the mask grid its largest connected region covers."""

    id: str
    class_index: int
    objectness: float
    kept: float
    dropped: float
    region: float


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
    minimum = getattr(predictor.model.ppn, "presence_min_region", None)
    saved = None if minimum is None else minimum.clone()
    predictor.objectness_threshold = -float("inf")  # keep every class: its mask is what keeping it would give
    if minimum is not None:
        minimum.zero_()  # the region rule is chosen anew: every call is measured
    try:
        predictions = predictor.predict(list(frames), features=features)
    finally:
        predictor.objectness_threshold = threshold
        if minimum is not None:
            minimum.copy_(saved)
    rows = []
    for item, label, pred in zip(items, labels, predictions):
        if pred.objectness is None:
            raise ValueError("presence calibration needs a model with learned prompts (objectness)")
        regions = largest_region_fraction(torch.from_numpy(pred.logits > 0))
        for k in range(len(pred.objectness)):
            truth = (label == k + 1).astype(np.uint8)
            kept = per_class_scores(pred.masks[k].astype(np.uint8), truth, 1)[1]["dice"]
            rows.append(PresenceRow(str(item["id"]), k + 1, float(pred.objectness[k]) - threshold, kept,
                                    0.0 if truth.any() else 1.0, float(regions[k])))
    return rows


def _held_out(rows: Sequence[PresenceRow], k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Objectness, kept and dropped scores and largest regions (each (N,)) of class ``k``'s rows."""
    sel = [r for r in rows if r.class_index == k]
    return (np.array([r.objectness for r in sel]), np.array([r.kept for r in sel]),
            np.array([r.dropped for r in sel]), np.array([r.region for r in sel]))


def _mean_dice(kept: np.ndarray, dropped: np.ndarray, called: np.ndarray) -> float:
    """Held-out mean Dice (%) when the ``called`` rows are kept and the others dropped."""
    return float(100 * np.where(called, kept, dropped).mean()) if len(kept) else float("nan")


def _best_cut(values: np.ndarray, kept: np.ndarray, dropped: np.ndarray, called: np.ndarray,
              extremes: bool) -> float:
    """The cut on ``values`` (rows at or above it stay called, among ``called``) maximising the mean Dice: 0 (the
    current rule) and the midpoints between consecutive distinct values (``extremes``: also below the lowest and
    above the highest); among equal scores the one nearest 0 wins."""
    distinct = np.unique(values)
    candidates = np.concatenate([[0.0], (distinct[1:] + distinct[:-1]) / 2,
                                 [distinct[0] - 1.0, distinct[-1] + 1.0] if extremes else []])
    scores = np.array([_mean_dice(kept, dropped, called & (values >= t)) for t in candidates])
    best = np.flatnonzero(scores >= scores.max() - 1e-9)
    return float(candidates[best[np.argmin(np.abs(candidates[best]))]])


def presence_thresholds(rows: Sequence[PresenceRow], num_classes: int) -> np.ndarray:
    """Per class, the objectness threshold (C,) maximising the held-out mean Dice of ``rows``.

    Candidates are 0 (the current rule) and the midpoints between consecutive distinct objectness values of the
    class; among equal scores the one nearest 0 wins, so a class whose rows give no reason to move keeps 0.
    """
    out = np.zeros(num_classes)
    for k in range(1, num_classes + 1):
        obj, kept, dropped, _ = _held_out(rows, k)
        if len(obj):
            out[k - 1] = _best_cut(obj, kept, dropped, np.ones(len(obj), bool), extremes=True)
    return out


def region_minimums(rows: Sequence[PresenceRow], thresholds: Sequence[float]) -> np.ndarray:
    """Per class, the minimum largest-region share (C,) maximising the held-out mean Dice of ``rows`` among the
    calls that objectness ``thresholds`` (C,) keep; 0 (no rule) where nothing is gained."""
    out = np.zeros(len(thresholds))
    for k, threshold in enumerate(thresholds, start=1):
        obj, kept, dropped, region = _held_out(rows, k)
        if len(obj):
            out[k - 1] = max(_best_cut(region, kept, dropped, obj >= threshold, extremes=False), 0.0)
    return out


def presence_summary(rows: Sequence[PresenceRow], thresholds: Sequence[float],
                     min_regions: Sequence[float] | None = None) -> dict[str, dict[str, Any]]:
    """Per class (keys "1".."C"): the threshold and minimum region, held-out mean Dice (%) under the current rule
    and under them, frames, frames without the class, false calls and missed structures before and after."""
    min_regions = np.zeros(len(thresholds)) if min_regions is None else min_regions
    out = {}
    for k, (threshold, minimum) in enumerate(zip(thresholds, min_regions), start=1):
        obj, kept, dropped, region = _held_out(rows, k)
        without = dropped > 0
        before, after = obj >= 0, (obj >= threshold) & (region >= minimum)
        out[str(k)] = {"threshold": float(threshold), "min_region": float(minimum),
                       "dice_before": _mean_dice(kept, dropped, before),
                       "dice_after": _mean_dice(kept, dropped, after), "frames": len(obj),
                       "frames_without": int(without.sum()),
                       "false_calls_before": int(before[without].sum()),
                       "false_calls_after": int(after[without].sum()),
                       "missed_before": int((~before[~without]).sum()),
                       "missed_after": int((~after[~without]).sum())}
    return out


def write_presence_rule(model_path: str | Path, thresholds: Sequence[float],
                        min_regions: Sequence[float] | None = None, output_path: str | Path | None = None) -> Path:
    """Add ``thresholds`` (C,) to the presence offset stored in a dense-PPN model file and, when given, set its
    minimum regions (C,) (atomically; in place unless ``output_path``); returns the written path."""
    state = read_state_dict(model_path)
    if "ppn.prototypes" not in state:
        raise ValueError(f"{model_path}: presence calibration applies to a dense PPN model file only")
    classes = state["ppn.prototypes"].shape[0] - 1  # the background's prototype comes first
    for name, values in (("thresholds", thresholds), ("minimum regions", min_regions)):
        if values is not None and len(values) != classes:
            raise ValueError(f"{len(values)} {name} for a model file of {classes} classes ({model_path})")
    offset = state.get(OFFSET_KEY, torch.zeros(classes))
    state[OFFSET_KEY] = offset + torch.as_tensor(np.asarray(thresholds), dtype=offset.dtype)
    if min_regions is not None:
        state[MIN_REGION_KEY] = torch.as_tensor(np.asarray(min_regions), dtype=offset.dtype)
    target = Path(output_path or model_path)
    with atomic_write_path(target) as tmp:
        torch.save(state, tmp)
    return target


def calibrate_presence(predictor: Sam2RadPredictor, items: Sequence[dict[str, Any]], model_path: str | Path,
                       output_dir: str | Path, output_model_path: str | Path | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Choose per-class presence thresholds and minimum regions on held-out ``items``; store them in the model file.

    Writes ``presence.json`` (the rule, the held-out mean Dice before and after, the rows) to ``output_dir`` and
    the calibrated model to ``output_model_path`` (default: ``model_path``, replaced atomically). Returns the
    thresholds (C,) added to the offset and the minimum regions (C,).
    """
    rows = held_out_rows(predictor, items)
    thresholds = presence_thresholds(rows, predictor.model.num_classes)
    minimums = region_minimums(rows, thresholds)
    summary = presence_summary(rows, thresholds, minimums)
    for k, entry in summary.items():
        logger.info("class %s: presence threshold %.3f, minimum region %.4f, held-out Dice %.2f -> %.2f (%d frames, "
                    "%d without it)", k, entry["threshold"], entry["min_region"], entry["dice_before"],
                    entry["dice_after"], entry["frames"], entry["frames_without"])
    written = write_presence_rule(model_path, thresholds, minimums, output_model_path)
    report = {"model": str(written), "classes": summary, "rows": [asdict(r) for r in rows]}
    atomic_write_bytes(Path(output_dir) / "presence.json", json.dumps(report, indent=1).encode())
    return thresholds, minimums
