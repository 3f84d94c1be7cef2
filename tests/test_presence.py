"""Presence calibration: the held-out threshold choice, its place in the model file, and older files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from tests.frames import GREY_IDS, SAMPLE
from sam2rad_monai.backbones import build_backbone, read_state_dict
from sam2rad_monai.engine.evaluation import load_frame
from sam2rad_monai.engine.presence import (PresenceRow, calibrate_presence, presence_thresholds, region_minimums,
                                           write_presence_rule)
from sam2rad_monai.inference import Sam2RadPredictor
from sam2rad_monai.model import Sam2Rad
from sam2rad_monai.ppn import largest_region_fraction

SHIPPED_MODEL = SAMPLE.parents[1] / "models" / "model.pt"


def _rows(cls: int, objectness: list[float], kept: list[float], dropped: list[float],
          regions: list[float] | None = None) -> list[PresenceRow]:
    regions = regions or [0.1] * len(objectness)
    return [PresenceRow(f"{i:04d}", cls, o, k, d, r)
            for i, (o, k, d, r) in enumerate(zip(objectness, kept, dropped, regions))]


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


def test_minimum_region_drops_speckled_calls_among_those_the_threshold_keeps():
    # class 1: false calls (dropped = 1) whose largest regions are specks, true ones one large region
    rows = _rows(1, [3.0, 2.0, 1.0, 4.0, 2.5], [0.0, 0.0, 0.0, 0.8, 0.7], [1.0, 1.0, 0.0, 0.0, 0.0],
                 [0.002, 0.004, 0.006, 0.03, 0.02])
    # class 2: a structure always present and well kept, however small: no rule
    rows += _rows(2, [1.0, 2.0], [0.9, 0.8], [0.0, 0.0], [0.001, 0.05])
    minimums = region_minimums(rows, [0.0, 0.0])
    assert minimums[0] == pytest.approx(0.005), "midpoint above the false calls, below the poorly kept true call"
    assert minimums[1] == 0.0
    # a threshold that already drops a false call leaves the region rule only the rest to decide
    assert region_minimums(rows, [2.2, 0.0])[0] == pytest.approx(0.003)


def test_present_drops_a_class_whose_largest_region_is_below_its_minimum():
    model = _dense_model().eval()
    logits = torch.full((1, 2, 10, 10), -5.0)
    logits[0, 0, :5, :5] = 5.0  # one region of 25 of 100 grid pixels
    logits[0, 1, 0, ::2] = 5.0  # five specks of one pixel each
    objectness = torch.tensor([[1.0, 1.0]])
    assert model.present(logits, objectness).tolist() == [[True, True]], "no calibrated minimum: objectness alone"
    model.ppn.presence_min_region.copy_(torch.tensor([0.2, 0.02]))
    assert model.present(logits, objectness).tolist() == [[True, False]]
    assert model.present(logits, objectness, threshold=2.0).tolist() == [[False, False]]


def _dense_model(seed: int = 0) -> Sam2Rad:
    torch.manual_seed(seed)
    return Sam2Rad(build_backbone("sam", "vit_b", image_size=64, pretrained=False), num_classes=2, ppn="dense")


def test_offset_lives_in_the_model_file_and_older_files_load_with_none(tmp_path):
    model = _dense_model().eval()
    path = tmp_path / "model.pt"
    state = model.ppn_state_dict()
    assert torch.equal(state["ppn.presence_offset"], torch.zeros(2))
    old_keys = ("ppn.presence_offset", "ppn.presence_min_region")
    torch.save({k: v for k, v in state.items() if k not in old_keys}, path)  # a file from before 0.8
    write_presence_rule(path, [0.0, 2.5])
    assert torch.equal(read_state_dict(path)["ppn.presence_offset"], torch.tensor([0.0, 2.5]))
    assert "ppn.presence_min_region" not in read_state_dict(path), "no minimum given, none written"
    write_presence_rule(path, [1.0, -0.5], [0.0, 0.01])  # a second calibration adds to the first offset
    assert torch.equal(read_state_dict(path)["ppn.presence_offset"], torch.tensor([1.0, 2.0]))
    assert torch.equal(read_state_dict(path)["ppn.presence_min_region"], torch.tensor([0.0, 0.01]))

    embed = model.backbone.levels(model.encode(torch.randn(1, 3, 64, 64)))[0]
    with torch.no_grad():
        raw = model.ppn([embed]).objectness
        other = _dense_model(1).eval()
        other.load_ppn_state_dict(read_state_dict(path))
        assert torch.allclose(other.ppn([embed]).objectness, raw - torch.tensor([1.0, 2.0]), atol=1e-5)
        other.load_ppn_state_dict(model.ppn_state_dict())  # an uncalibrated file resets the offset
        assert torch.allclose(other.ppn([embed]).objectness, raw, atol=1e-5)
        old = {k: v for k, v in read_state_dict(path).items() if k not in old_keys}
        other.load_ppn_state_dict(read_state_dict(path))
        assert torch.equal(other.ppn.presence_min_region, torch.tensor([0.0, 0.01]))
        other.load_ppn_state_dict(old)  # a file without the keys loads with no rule, not the last one's
        assert torch.equal(other.ppn.presence_offset, torch.zeros(2))
        assert torch.equal(other.ppn.presence_min_region, torch.zeros(2))
    with pytest.raises(ValueError, match="3 thresholds for a model file of 2 classes"):
        write_presence_rule(path, [0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="1 minimum regions for a model file of 2 classes"):
        write_presence_rule(path, [0.0, 0.0], [0.1])


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
    thresholds, _ = calibrate_presence(predictor, items, model_path, tmp_path / "eval")
    report = json.loads((tmp_path / "eval" / "presence.json").read_text())
    vessel = report["classes"]["2"]
    assert vessel["frames_without"] == 3 and vessel["dice_after"] == 100.0
    assert thresholds[1] > max(r["objectness"] for r in report["rows"] if r["class_index"] == 2)
    assert thresholds[0] == 0.0 or report["classes"]["1"]["dice_after"] >= report["classes"]["1"]["dice_before"]
    calibrated = Sam2RadPredictor.from_checkpoint(model_path, 2)
    frames = [load_frame(item)[0] for item in items]
    assert not any((p.label_map == 2).any() for p in calibrated.predict(frames))


def test_largest_region_matches_8_connected_labelling_eagerly_traced_and_on_empty_maps():
    generator = torch.Generator().manual_seed(0)
    masks = torch.rand(4, 48, 40, generator=generator) > 0.55  # many regions touching only at corners
    masks[2] = False  # an empty map among others
    masks[3] = False
    masks[3, 30:34, 5:9] = True  # one square away from the others' bounding box
    expected = []
    for m in masks.numpy():
        labels, count = ndimage.label(m, structure=np.ones((3, 3)))
        expected.append(np.bincount(labels.ravel())[1:].max() / m.size if count else 0.0)
    assert torch.allclose(largest_region_fraction(masks), torch.tensor(expected, dtype=torch.float32))
    traced = torch.jit.trace(largest_region_fraction, masks[:1])
    assert torch.allclose(traced(masks), torch.tensor(expected, dtype=torch.float32))
    assert torch.equal(largest_region_fraction(torch.zeros(2, 8, 8, dtype=torch.bool)), torch.zeros(2))
