"""Sam2Rad training touches only the PPN (and LoRA when enabled); the loss handles absent classes."""

from __future__ import annotations

import pytest
import torch

from sam2rad_monai.backbones import build_backbone
from sam2rad_monai.losses import Sam2RadLoss
from sam2rad_monai.model import MASK_PROMPT_LOGIT, Mode, Prompts, Sam2Rad


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


def test_fused_output_and_refine_edits():
    torch.manual_seed(0)
    model = Sam2Rad(build_backbone("sam", "vit_b", image_size=64, pretrained=False), 2, fuse_mask_prompt=True).eval()
    images = torch.randn(1, 3, 64, 64)
    box = torch.tensor([[[4.0, 4.0, 40.0, 40.0]] * 2])
    with torch.no_grad():
        auto = model(images)
        # class 0: a box; class 1: one negative click at (x=50, y=20)
        refine = model(images, Prompts(boxes=box, box_valid=torch.tensor([[True, False]]),
                                       points=torch.tensor([[[[0.0, 0.0]], [[50.0, 20.0]]]]),
                                       point_labels=torch.tensor([[[-1], [0]]])), "refine")
    assert torch.allclose(auto["logits"], (auto["decoder_logits"] + auto["mask_prompts"]) / 2)
    assert not torch.allclose(auto["logits"], auto["decoder_logits"])
    assert torch.equal(refine["mask_prompts"], auto["mask_prompts"])  # the learned prompt, before the user's edits
    # a boxed class gets the decoder's output; the clicked one the mean with the edited mask prompt
    assert torch.equal(refine["logits"][0, 0], refine["decoder_logits"][0, 0])
    fused = (refine["decoder_logits"][0, 1] + auto["mask_prompts"][0, 1]) / 2
    inside = (refine["decoder_logits"][0, 1] - MASK_PROMPT_LOGIT) / 2
    m = fused.shape[-1]  # the mask prompt has m cells over 64 input pixels
    assert torch.allclose(refine["logits"][0, 1, 20 * m // 64, 50 * m // 64], inside[20 * m // 64, 50 * m // 64])
    assert torch.allclose(refine["logits"][0, 1, 0, 0], fused[0, 0])
    # the loss trains the decoder's own output, not the fusion
    target = {"masks": (torch.rand(1, 2, 64, 64) > 0.5).float(), "boxes": torch.tensor([[[4.0, 4.0, 40.0, 40.0]] * 2]),
              "present": torch.ones(1, 2)}
    loss = Sam2RadLoss(image_size=64)
    assert torch.equal(loss.terms(auto, target)["mask"],
                       loss.terms({**auto, "logits": auto["decoder_logits"]}, target)["mask"])


def test_refine_edits_of_the_learned_prompts():
    """A user box replaces the learned box and clears the mask prompt outside it; clicks paint discs centred on the
    clicked pixel, later over earlier, padding points nothing; a user mask replaces the learned one."""
    model = Sam2Rad(build_backbone("sam", "vit_b", image_size=64, pretrained=False), 1, click_radius=1 / 8)
    sparse = torch.randn(2, 2 + 3, 256)
    learned = torch.zeros(2, 16, 16)  # m = 16 cells of 4 input pixels, centres at 2, 6, 10, ...; disc radius 8 px
    prompts = Prompts(boxes=torch.tensor([[[8.0, 8.0, 21.0, 31.0]], [[0.0, 0.0, 63.0, 63.0]]]),
                      box_valid=torch.tensor([[True], [False]]),
                      points=torch.tensor([[[[40.0, 40.0], [12.0, 12.0], [0.0, 0.0]]],
                                           [[[18.0, 18.0], [22.0, 18.0], [50.0, 50.0]]]]),
                      point_labels=torch.tensor([[[1, -1, -1]], [[1, 0, -1]]]))
    with torch.no_grad():
        tokens, mask, boxed = model._edit_learned_prompts(prompts, 2, sparse, learned)
    assert boxed.tolist() == [True, False]
    # the learned box's tokens, the learned tokens, the user box's, the points'
    assert tokens.shape == (2, 2 + 3 + 2 + 3, 256)
    pad = model.backbone.not_a_point()
    assert torch.equal(tokens[0, :2], pad.expand(2, -1)) and torch.equal(tokens[0, 2:5], sparse[0, 2:])
    assert torch.allclose(tokens[0, 5:7], model.backbone.embed_boxes(prompts.boxes[0])[0], atol=1e-5)
    assert torch.equal(tokens[1, :5], sparse[1]) and torch.equal(tokens[1, 5:7], pad.expand(2, -1))

    # row 0: the box spans pixel edges x 8..22, y 8..32: cells x 2..5 (centre 22 only thanks to the inclusive
    # corner), y 2..7; everything else is cleared, then the positive click at pixel (40, 40), centre (40.5, 40.5),
    # paints every cell whose centre lies within 8 px; the padding point at (12, 12), inside the box, paints nothing
    expected = torch.full((16, 16), -MASK_PROMPT_LOGIT)
    expected[2:8, 2:6] = 0.0
    for i in range(16):
        for j in range(16):
            if (4 * j + 2 - 40.5) ** 2 + (4 * i + 2 - 40.5) ** 2 <= 64:
                expected[i, j] = MASK_PROMPT_LOGIT
    assert torch.equal(mask[0], expected)
    assert mask[0, 10, 10] == mask[0, 8, 10] == MASK_PROMPT_LOGIT and mask[0, 8, 8] == -MASK_PROMPT_LOGIT
    # row 1, no box: the negative click at (22, 18) wins where the two discs overlap; the padding point paints nothing
    assert mask[1, 4, 3] == MASK_PROMPT_LOGIT and mask[1, 4, 4] == -MASK_PROMPT_LOGIT == mask[1, 4, 7]
    assert mask[1, 4, 8] == 0.0 and mask[1, 12, 12] == 0.0

    user = torch.full((1, 2, 16, 16), 3.0)
    with torch.no_grad():
        tokens, mask, boxed = model._edit_learned_prompts(Prompts(masks=user, mask_valid=torch.tensor([[False, True]])),
                                                          2, sparse, learned)
    assert torch.equal(mask[0], learned[0]) and torch.equal(mask[1], user[0, 1])
    assert not boxed.any() and torch.equal(tokens[:, 5:7], pad.expand(2, 2, -1))  # the box slot is always there


def test_refine_batch_mixing_boxes_and_clicks_trains_the_ppn():
    """The training prompt mix: in one batch, boxed rows output the decoder's logits, clicked rows the fused mean,
    and the loss reaches the PPN through both."""
    torch.manual_seed(0)
    model = Sam2Rad(build_backbone("sam", "vit_b", image_size=64, pretrained=False), 2).train()
    features = {k: v.detach() for k, v in model.encode(torch.randn(2, 3, 64, 64)).items()}
    box_valid = torch.tensor([[True, False], [False, False]])
    labels = torch.tensor([[[-1]], [[1]]]).expand(2, 2, 1).clone()
    labels[0] = -1  # image 0: class 0 boxed, class 1 learned prompts only; image 1: a click on each class
    prompts = Prompts(boxes=torch.tensor([[[4.0, 4.0, 40.0, 40.0]] * 2] * 2), box_valid=box_valid,
                      points=torch.full((2, 2, 1, 2), 30.0), point_labels=labels)
    out = model(features, prompts, Mode.REFINE)
    assert torch.equal(out["logits"][0, 0], out["decoder_logits"][0, 0])
    for b, c in ((0, 1), (1, 0), (1, 1)):
        assert not torch.allclose(out["logits"][b, c], out["decoder_logits"][b, c])
    masks = torch.zeros(2, 2, 64, 64)
    masks[..., 8:40, 8:40] = 1
    target = {"masks": masks, "boxes": torch.tensor([[[8.0, 8.0, 39.0, 39.0]] * 2] * 2), "present": torch.ones(2, 2)}
    Sam2RadLoss(image_size=64)(out, target).backward()
    grads = [p.grad for p in model.ppn.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
