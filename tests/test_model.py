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


def test_lora_starts_as_identity_and_manual_mode_bypasses_it():
    images = torch.randn(1, 3, 64, 64)
    prompts = Prompts(boxes=torch.tensor([[[4.0, 4.0, 40.0, 40.0]] * 2]))
    torch.manual_seed(0)
    plain = Sam2Rad(build_backbone("sam", "vit_b", image_size=64, pretrained=False), 2).eval()
    torch.manual_seed(0)
    lora = Sam2Rad(build_backbone("sam", "vit_b", image_size=64, pretrained=False), 2, lora_rank=4).eval()
    with torch.no_grad():
        assert torch.allclose(plain(images, prompts, "refine")["logits"], lora(images, prompts, "refine")["logits"])
        for p in lora.lora_parameters():  # a trained update: B no longer zero
            p.add_(0.5)
        # manual mode is the backbone's own decoder (the zero-shot baseline); the learned modes use the update
        assert torch.allclose(plain(images, prompts, "manual")["logits"], lora(images, prompts, "manual")["logits"])
        assert not torch.allclose(plain(images, prompts, "refine")["logits"], lora(images, prompts, "refine")["logits"])


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
    # a model built without LoRA takes the checkpoint's rank; one built with LoRA refuses a checkpoint without it
    plain = Sam2Rad(build_backbone("sam", "vit_b", image_size=64, pretrained=False), num_classes=2)
    plain.load_ppn_state_dict(state)
    assert plain.lora_rank == 2 and all(torch.equal(v, plain.state_dict()[k]) for k, v in state.items())
    no_lora = Sam2Rad(build_backbone("sam", "vit_b", image_size=64, pretrained=False), num_classes=2).ppn_state_dict()
    with pytest.raises(KeyError, match="lora_rank"):
        other.load_ppn_state_dict(no_lora)
    query = Sam2Rad(build_backbone("sam", "vit_b", image_size=64, pretrained=False), num_classes=2, box_source="query")
    with pytest.raises(KeyError, match="box_source"):
        query.load_ppn_state_dict(state)
    assert query.lora_rank == 0  # a refused checkpoint leaves the model as it was


def test_fused_output_only_in_autonomous_mode():
    torch.manual_seed(0)
    model = Sam2Rad(build_backbone("sam", "vit_b", image_size=64, pretrained=False), 2, fuse_mask_prompt=True).eval()
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        auto = model(images)
        refine = model(images, Prompts(boxes=torch.tensor([[[4.0, 4.0, 40.0, 40.0]] * 2])), "refine")
    assert torch.allclose(auto["logits"], (auto["decoder_logits"] + auto["mask_prompts"]) / 2)
    assert not torch.allclose(auto["logits"], auto["decoder_logits"])
    assert torch.equal(refine["logits"], refine["decoder_logits"])  # the user's prompts keep the last word
    # the loss trains the decoder's own output, not the fusion
    target = {"masks": (torch.rand(1, 2, 64, 64) > 0.5).float(), "boxes": torch.tensor([[[4.0, 4.0, 40.0, 40.0]] * 2]),
              "present": torch.ones(1, 2)}
    loss = Sam2RadLoss(image_size=64)
    assert torch.equal(loss.terms(auto, target)["mask"],
                       loss.terms({**auto, "logits": auto["decoder_logits"]}, target)["mask"])
