"""Sam2Rad training touches only the PPN (and LoRA when enabled); the loss handles absent classes."""

from __future__ import annotations

import pytest
import torch

from sam2rad_monai.backbones import build_backbone
from sam2rad_monai.losses import Sam2RadLoss
from sam2rad_monai.model import Prompts, Sam2Rad


def _targets(batch: int, size: int, present: list[list[float]]) -> dict[str, torch.Tensor]:
    masks = torch.zeros(batch, 2, size, size)
    boxes = torch.zeros(batch, 2, 4)
    for b in range(batch):
        for c in range(2):
            if present[b][c]:
                masks[b, c, 8:40, 16:48] = 1
                boxes[b, c] = torch.tensor([16.0, 8.0, 47.0, 39.0])
    return {"masks": masks, "boxes": boxes, "present": torch.tensor(present)}


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_optimiser_step_changes_only_ppn_and_lora(lora_rank):
    torch.manual_seed(0)
    backbone = build_backbone("sam", "vit_b", image_size=64, pretrained=False)
    model = Sam2Rad(backbone, num_classes=2, lora_rank=lora_rank)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimiser = torch.optim.AdamW(model.trainable_parameter_groups(lr=1e-2, decoder_lr=1e-2))
    model.train()
    loss = Sam2RadLoss(image_size=64)(model(torch.randn(2, 3, 64, 64)), _targets(2, 64, [[1, 0], [1, 1]]))
    optimiser.zero_grad()
    loss.backward()
    optimiser.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    backbone_changed = {k for k in changed if k.startswith("backbone.") and "lora_" not in k}
    assert not backbone_changed, f"frozen backbone tensors changed: {sorted(backbone_changed)[:5]}"
    assert any(k.startswith("ppn.") for k in changed)
    lora_changed = {k for k in changed if "lora_" in k}
    assert bool(lora_changed) == (lora_rank > 0)
    assert not backbone.training  # the backbone stays in eval mode while the model trains


def test_lora_starts_as_identity():
    images = torch.randn(1, 3, 64, 64)
    prompts = Prompts(boxes=torch.tensor([[[4.0, 4.0, 40.0, 40.0]] * 2]))
    torch.manual_seed(0)
    plain = Sam2Rad(build_backbone("sam", "vit_b", image_size=64, pretrained=False), 2).eval()
    torch.manual_seed(0)
    lora = Sam2Rad(build_backbone("sam", "vit_b", image_size=64, pretrained=False), 2, lora_rank=4).eval()
    with torch.no_grad():
        assert torch.allclose(plain(images, prompts, "manual")["logits"], lora(images, prompts, "manual")["logits"])


@pytest.mark.parametrize("box_source", ["mask", "query"])
def test_loss_is_finite_without_any_object(box_source):
    torch.manual_seed(0)
    model = Sam2Rad(build_backbone("sam", "vit_b", image_size=64, pretrained=False), num_classes=2,
                    box_source=box_source)
    pred = model(torch.randn(2, 3, 64, 64))
    loss_fn = Sam2RadLoss(image_size=64)
    terms = loss_fn.terms(pred, _targets(2, 64, [[0, 0], [0, 0]]))
    assert set(terms) == {"objectness", "mask"} and terms["mask"] == 0
    loss = loss_fn(pred, _targets(2, 64, [[0, 0], [0, 0]]))
    assert torch.isfinite(loss)
    loss.backward()
    # an absent class only trains objectness: the box and mask-prompt heads get no gradient from it
    for head in (model.ppn.box_head, model.ppn.mask_head):
        if head is not None:
            assert head[0].weight.grad is None or head[0].weight.grad.abs().sum() == 0
    assert model.ppn.objectness_head[0].weight.grad.abs().sum() > 0


def test_loss_terms_follow_equation_1():
    torch.manual_seed(0)
    model = Sam2Rad(build_backbone("sam", "vit_b", image_size=64, pretrained=False), num_classes=2)
    pred = model(torch.randn(2, 3, 64, 64))
    target = _targets(2, 64, [[1, 0], [1, 1]])
    terms = Sam2RadLoss(image_size=64).terms(pred, target)
    assert set(terms) == {"objectness", "mask", "mask_prompt", "box"}
    doubled = Sam2RadLoss(image_size=64, mask_weight=20.0).terms(pred, target)
    assert torch.allclose(doubled["mask"], 2 * terms["mask"]) and torch.allclose(doubled["box"], terms["box"])
    assert torch.allclose(sum(terms.values()), Sam2RadLoss(image_size=64)(pred, target))


def test_ppn_checkpoint_holds_no_backbone_weights(tmp_path):
    model = Sam2Rad(build_backbone("sam", "vit_b", image_size=64, pretrained=False), num_classes=2, lora_rank=2)
    state = model.ppn_state_dict()
    assert all(k.startswith("ppn.") or "lora_" in k for k in state)
    other = Sam2Rad(build_backbone("sam", "vit_b", image_size=64, pretrained=False), num_classes=2, lora_rank=2)
    other.load_ppn_state_dict(state)
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in state.items())
    with pytest.raises(KeyError, match="num_classes"):
        Sam2Rad(build_backbone("sam", "vit_b", image_size=64, pretrained=False), num_classes=2).load_ppn_state_dict(
            state)
