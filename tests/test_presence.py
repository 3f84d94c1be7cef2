"""Presence calibration: the held-out threshold choice, its place in the model file, and older files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.frames import GREY_IDS, SAMPLE
from sam2rad_monai.backbones import build_backbone, read_state_dict
from sam2rad_monai.engine.evaluation import load_frame
from sam2rad_monai.engine.presence import (PresenceRow, calibrate_presence, presence_thresholds,
                                           write_presence_offset)
from sam2rad_monai.inference import Sam2RadPredictor
from sam2rad_monai.model import Sam2Rad

SHIPPED_MODEL = SAMPLE.parents[1] / "models" / "model.pt"


def _rows(cls: int, objectness: list[float], kept: list[float], dropped: list[float]) -> list[PresenceRow]:
    return [PresenceRow(f"{i:04d}", cls, o, k, d) for i, (o, k, d) in enumerate(zip(objectness, kept, dropped))]


def test_threshold_maximises_held_out_dice_and_stays_at_zero_without_evidence():
    # class 1: always present and kept well -> nothing to gain by moving: stays 0
    rows = _rows(1, [2.0, 5.0, 0.5], [0.8, 0.9, 0.7], [0.0, 0.0, 0.0])
    # class 2: two frames without it at 0.4 and 1.0 (kept: false call, 0), present ones at 1.5 and 3.0
    rows += _rows(2, [0.4, 1.0, 1.5, 3.0], [0.0, 0.0, 0.6, 0.9], [1.0, 1.0, 0.0, 0.0])
    # class 3: a present frame below 0 that keeping would score well -> threshold moves down past it
    rows += _rows(3, [-2.0, -0.5, 4.0], [0.0, 0.8, 0.9], [1.0, 0.0, 0.0])
    thresholds = presence_thresholds(rows, 4)
    assert thresholds[0] == 0.0
    assert thresholds[1] == pytest.approx(1.25), "midpoint between the last false call and the first true one"
    assert thresholds[2] == pytest.approx(-1.25)
    assert thresholds[3] == 0.0, "a class with no rows keeps the trained rule"


def _dense_model(seed: int = 0) -> Sam2Rad:
    torch.manual_seed(seed)
    return Sam2Rad(build_backbone("sam", "vit_b", image_size=64, pretrained=False), num_classes=2, ppn="dense")


def test_offset_lives_in_the_model_file_and_older_files_load_with_none(tmp_path):
    model = _dense_model().eval()
    path = tmp_path / "model.pt"
    state = model.ppn_state_dict()
    assert torch.equal(state["ppn.presence_offset"], torch.zeros(2))
    torch.save({k: v for k, v in state.items() if k != "ppn.presence_offset"}, path)  # a file from before 0.8
    write_presence_offset(path, [0.0, 2.5])
    assert torch.equal(read_state_dict(path)["ppn.presence_offset"], torch.tensor([0.0, 2.5]))
    write_presence_offset(path, [1.0, -0.5])  # a second calibration adds to the first
    assert torch.equal(read_state_dict(path)["ppn.presence_offset"], torch.tensor([1.0, 2.0]))

    embed = model.backbone.levels(model.encode(torch.randn(1, 3, 64, 64)))[0]
    with torch.no_grad():
        raw = model.ppn([embed]).objectness
        other = _dense_model(1).eval()
        other.load_ppn_state_dict(read_state_dict(path))
        assert torch.allclose(other.ppn([embed]).objectness, raw - torch.tensor([1.0, 2.0]), atol=1e-5)
        other.load_ppn_state_dict(model.ppn_state_dict())  # an uncalibrated file resets the offset
        assert torch.allclose(other.ppn([embed]).objectness, raw, atol=1e-5)
        old = {k: v for k, v in read_state_dict(path).items() if k != "ppn.presence_offset"}
        other.load_ppn_state_dict(read_state_dict(path))
        other.load_ppn_state_dict(old)  # a file without the key loads with a zero offset, not the last one's
        assert torch.equal(other.ppn.presence_offset, torch.zeros(2))
    with pytest.raises(ValueError, match="3 thresholds for a model file of 2 classes"):
        write_presence_offset(path, [0.0, 0.0, 0.0])


def test_calibration_on_real_frames_drops_a_class_called_on_frames_without_it(tmp_path):
    """On the embedded sample's frames with the shipped LiteMedSAM model: a class 'absent' from the ground truth
    (labels with class 2 erased) is called by the model, so calibration raises its threshold above every call and
    the calibrated model file no longer predicts it."""
    items = []
    for stem in GREY_IDS:
        label = np.array(Image.open(SAMPLE / "masks" / f"{stem}.png"))
        path = tmp_path / f"{stem}_label.png"
        Image.fromarray(np.where(label == 2, 0, label).astype(np.uint8)).save(path)
        items.append({"image": str(SAMPLE / "images" / f"{stem}.png"), "label": str(path), "id": stem})
    model_path = tmp_path / "model.pt"
    model_path.write_bytes(SHIPPED_MODEL.read_bytes())
    predictor = Sam2RadPredictor.from_checkpoint(model_path, 2)
    thresholds = calibrate_presence(predictor, items, model_path, tmp_path / "eval")
    report = json.loads((tmp_path / "eval" / "presence.json").read_text())
    vessel = report["classes"]["2"]
    assert vessel["frames_without"] == 3 and vessel["dice_after"] == 100.0
    assert thresholds[1] > max(r["objectness"] for r in report["rows"] if r["class_index"] == 2)
    assert thresholds[0] == 0.0 or report["classes"]["1"]["dice_after"] >= report["classes"]["1"]["dice_before"]
    calibrated = Sam2RadPredictor.from_checkpoint(model_path, 2)
    frames = [load_frame(item)[0] for item in items]
    assert not any((p.label_map == 2).any() for p in calibrated.predict(frames))
