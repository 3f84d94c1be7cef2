"""Simulated annotator clicks and the training prompt mix (refine mode is trained, not only allowed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sam2rad_monai.backbones import build_backbone
from sam2rad_monai.clicks import error_click
from sam2rad_monai.engine.inferers import PromptMixInferer, Sam2RadInferer, prepare_training_batch
from sam2rad_monai.model import Mode, Prompts, Sam2Rad


def test_click_on_missed_region_is_positive_at_its_centre():
    target = np.zeros((40, 40), bool)
    target[10:21, 10:21] = True  # 11 x 11 square, centre (15, 15)
    target[30:32, 30:32] = True  # a smaller miss elsewhere
    assert error_click(np.zeros_like(target), target) == (15.0, 15.0, 1)


def test_click_on_false_positive_is_negative():
    target = np.zeros((40, 40), bool)
    target[0:5, 0:5] = True
    pred = target.copy()
    pred[20:31, 5:16] = True  # false positive, centre (x=10, y=25)
    assert error_click(pred, target) == (10.0, 25.0, 0)


def test_no_error_no_click_and_random_clicks_stay_in_the_error():
    target = np.zeros((32, 32), bool)
    target[4:20, 4:20] = True
    assert error_click(target, target) is None
    pred = np.zeros_like(target)
    pred[4:20, 4:12] = True
    rng = np.random.default_rng(0)
    for _ in range(20):
        x, y, label = error_click(pred, target, rng)
        assert pred[int(y), int(x)] != target[int(y), int(x)]
        assert label == 1


def _batch(size: int = 64) -> dict[str, torch.Tensor]:
    masks = torch.zeros(2, 2, size, size)
    masks[:, 0, 8:40, 16:48] = 1
    masks[0, 1, 30:60, 30:60] = 1
    boxes = torch.tensor([[[16.0, 8.0, 47.0, 39.0], [30.0, 30.0, 59.0, 59.0]], [[16.0, 8.0, 47.0, 39.0], [0.0] * 4]])
    return {"image": torch.randn(2, 3, size, size), "masks": masks, "boxes": boxes,
            "present": torch.tensor([[1.0, 1.0], [1.0, 0.0]])}


@pytest.fixture(scope="module")
def model() -> Sam2Rad:
    torch.manual_seed(0)
    return Sam2Rad(build_backbone("sam", "vit_b", image_size=64, pretrained=False), num_classes=2).eval()


def test_prompt_mix_with_boxes_equals_refine_mode_with_those_boxes(model):
    inputs, targets = prepare_training_batch(_batch())
    inferer = PromptMixInferer(box_prob=1.0, click_prob=0.0, box_jitter=0.0, bf16=False)
    features = model.encode(inputs["inputs"])
    out = inferer({"inputs": features, "targets": targets}, model)
    present = targets["present"] > 0.5
    expected = model(features, Prompts(boxes=targets["boxes"], box_valid=present), Mode.REFINE)
    assert torch.allclose(out["logits"], expected["logits"], atol=1e-5)
    assert not torch.allclose(out["logits"], model(features)["logits"], atol=1e-3)


def test_prompt_mix_clicks_sit_on_errors_of_present_classes_only(model):
    inputs, targets = prepare_training_batch(_batch())
    features = model.encode(inputs["inputs"])
    inferer = PromptMixInferer(box_prob=0.0, click_prob=1.0, max_clicks=3, seed=1, bf16=False)
    rows = targets["present"] > 0.5
    points, labels = inferer.clicks(model, features, targets["masks"], rows)
    assert (labels[~rows] == -1).all()  # the absent class gets padding points only
    assert (labels[rows][:, 0] >= 0).all()  # every prompted row got a first click
    for b, c, k in (labels >= 0).nonzero().tolist():
        x, y = points[b, c, k].long().tolist()
        assert labels[b, c, k].item() == int(targets["masks"][b, c, y, x].item())
    assert not model.training  # the click passes restore the mode they found


def test_inferer_bf16_returns_float32_and_rejects_bad_setting(model):
    out = Sam2RadInferer(bf16=True)(torch.randn(1, 3, 64, 64), model)
    assert all(v.dtype == torch.float32 for v in out.values())
    with pytest.raises(ValueError, match="bf16"):
        Sam2RadInferer(bf16="yes")
    with pytest.raises(ValueError, match="box_prob"):
        PromptMixInferer(box_prob=0.8, click_prob=0.5)
