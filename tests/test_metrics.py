"""Tests for sam2rad_monai.metrics: the empty-mask policy and the accumulator."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sam2rad_monai.metrics import SegmentationScores, per_class_scores
from tests.frames import SAMPLE, WIDE_RGB



def _maps() -> tuple[np.ndarray, np.ndarray]:
    """4 classes, one per policy case: overlap, missed, correctly empty, false positive."""
    gt = np.zeros((10, 10), dtype=np.uint8)
    pred = np.zeros((10, 10), dtype=np.uint8)
    gt[0:4, 0:4] = 1  # 16 px
    pred[0:4, 2:6] = 1  # 16 px, 8 shared
    gt[6:8, 6:8] = 2  # present in GT, prediction empty
    pred[9, 0:3] = 4  # absent in GT, predicted anyway; class 3 is absent in both
    return pred, gt


def test_four_empty_mask_cases() -> None:
    pred, gt = _maps()
    scores = per_class_scores(pred, gt, num_classes=4)
    assert scores[1]["dice"] == pytest.approx(2 * 8 / 32) and scores[1]["iou"] == pytest.approx(8 / 24)
    assert scores[2] == {"dice": 0.0, "iou": 0.0}  # GT present, prediction empty
    assert scores[3] == {"dice": 1.0, "iou": 1.0}  # GT absent, prediction empty: correct rejection
    assert scores[4] == {"dice": 0.0, "iou": 0.0}  # GT absent, prediction non-empty: false positive


def test_inputs_may_be_torch_channel_first_and_must_match() -> None:
    pred, gt = _maps()
    assert per_class_scores(torch.from_numpy(pred)[None], torch.from_numpy(gt)[None], 4) == per_class_scores(
        pred, gt, 4
    )
    with pytest.raises(ValueError, match="differ in size"):
        per_class_scores(pred[:5], gt, 4)
    with pytest.raises(ValueError, match="expected 0..2"):
        per_class_scores(pred, gt, 2)


def test_real_mask_against_itself_scores_one() -> None:
    gt = np.asarray(Image.open(SAMPLE / "masks" / f"{WIDE_RGB}.png"))
    scores = per_class_scores(gt, gt, 2)
    assert all(s == {"dice": 1.0, "iou": 1.0} for s in scores.values())
    shifted = np.roll(gt, 5, axis=1)
    assert 0.0 < per_class_scores(shifted, gt, 2)[1]["dice"] < 1.0


def test_accumulator_summary_and_csv(tmp_path: Path) -> None:
    pred, gt = _maps()
    scores = SegmentationScores(4, ["a", "b", "c", "d"])
    scores.add("img1", pred, gt)
    scores.add("img2", gt, gt)
    assert len(scores) == 8
    s = scores.summary()
    assert s[1]["dice"] == pytest.approx(100 * (0.5 + 1.0) / 2) and s[1]["name"] == "a"
    assert s[2]["dice"] == pytest.approx(50.0) and s[2]["false_negatives"] == 1
    assert s[3]["dice"] == 100.0 and s[3]["n_gt_present"] == 0 and math.isnan(s[3]["dice_present"])
    assert s[4]["dice"] == pytest.approx(50.0) and s[4]["false_positives"] == 1
    assert s[4]["n_images"] == 2 and math.isnan(s[4]["iou_present"])
    assert scores.mean_dice() == pytest.approx((75.0 + 50.0 + 100.0 + 50.0) / 4)

    path = scores.write_csv(tmp_path / "out" / "per_image.csv")
    with path.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and list(rows[0]) == [
        "id",
        "class_index",
        "class_name",
        "dice",
        "iou",
        "gt_present",
        "pred_present",
    ]
    fp = [r for r in rows if r["id"] == "img1" and r["class_name"] == "d"][0]
    assert (float(fp["dice"]), fp["gt_present"], fp["pred_present"]) == (0.0, "False", "True")
    scores.reset()
    assert len(scores) == 0


def test_overlay_colours_each_class_and_leaves_the_background() -> None:
    from sam2rad_monai.engine.evaluation import overlay

    image = np.full((8, 10, 3), 100.0)
    label = np.zeros((8, 10), np.uint8)
    label[1:3, 1:3], label[5:7, 6:9] = 1, 2
    pred = np.zeros_like(label)
    pred[5:7, 6:9] = 2  # the nerve missed, the vessel found
    out = overlay(image, label, pred, num_classes=2)
    assert out.shape == (8, 20, 3) and out.dtype == np.uint8
    assert (out[0, 0] == 100).all() and (out[0, 10] == 100).all()  # background untouched in both panels
    nerve, vessel = out[1, 1], out[5, 6]
    assert not (nerve == 100).all() and not (vessel == 100).all() and not (nerve == vessel).all()
    assert (out[5, 16] == vessel).all() and (out[1, 11] == 100).all()  # same colour per class in both panels
