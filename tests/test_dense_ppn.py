"""The dense PPN: prototypes, the cheap (decoder-free) step, its autonomous output, the refine box rule, and a model
file that carries its PPN kind."""

from __future__ import annotations

import torch

from sam2rad_monai.backbones import build_backbone
from sam2rad_monai.engine.handlers import InitialWeights
from sam2rad_monai.losses import Sam2RadLoss
from sam2rad_monai.model import Mode, Prompts, Sam2Rad
from sam2rad_monai.ppn import PEAK_MARGIN, DensePromptPredictor


def _model(lora_rank: int = 0) -> Sam2Rad:
    torch.manual_seed(0)
    backbone = build_backbone("sam", "vit_b", image_size=64, pretrained=False)
    return Sam2Rad(backbone, num_classes=2, ppn="dense", lora_rank=lora_rank)


def _legacy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A one-trunk model file in the layout before bundle 0.12 (the trunk's tensors at the PPN's top level)."""
    return {f"ppn.{k[len('ppn.trunks.0.'):]}" if k.startswith("ppn.trunks.0.") else k: v for k, v in state.items()}


def _targets(size: int = 64) -> dict[str, torch.Tensor]:
    masks = torch.zeros(2, 2, size, size)
    masks[:, 0, 8:40, 16:48] = 1
    masks[0, 1, 40:60, 4:20] = 1
    boxes = torch.tensor([[[16.0, 8.0, 47.0, 39.0], [4.0, 40.0, 19.0, 59.0]], [[16.0, 8.0, 47.0, 39.0], [0.0] * 4]])
    return {"masks": masks, "boxes": boxes, "present": torch.tensor([[1.0, 1.0], [1.0, 0.0]])}


def test_prototypes_are_mean_unit_embeddings_under_each_mask():
    ppn = DensePromptPredictor(num_classes=2, level_channels=(8,), mask_prompt_size=16)
    embed = torch.zeros(1, 8, 4, 4)
    embed[:, 0] = 2.0  # background direction
    embed[:, 1, :2, :2] = 5.0  # class 1 region, top-left
    embed[:, 0, :2, :2] = 0.0
    embed[:, 2, 2:, 2:] = 3.0  # class 2 region, bottom-right
    embed[:, 0, 2:, 2:] = 0.0
    masks = torch.zeros(1, 2, 16, 16)
    masks[:, 0, :8, :8] = 1
    masks[:, 1, 8:, 8:] = 1
    ppn.set_prototypes([(embed, masks)])
    assert torch.allclose(ppn.prototypes, torch.eye(8)[:3], atol=1e-6)
    sim = ppn.similarities(embed)[:, 0:3]  # prototype similarities come first
    assert torch.equal(sim.argmax(1)[0], torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 2, 2], [0, 0, 2, 2]]))


def test_cheap_step_runs_no_decoder_and_trains_only_the_ppn():
    model = _model()
    calls = []
    model.backbone.mask_decoder.register_forward_hook(lambda *a: calls.append(1))
    model.backbone.mask_decoder.transformer.register_forward_hook(lambda *a: calls.append(1))
    features = model.encode(torch.randn(2, 3, 64, 64))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    out = model(features, decode=False)
    assert "decoder_logits" not in out and torch.equal(out["logits"], out["mask_prompts"])
    assert out["mask_prompts"].shape == (2, 2, 16, 16) and out["objectness"].shape == (2, 2)
    terms = Sam2RadLoss(image_size=64, dice_weight=1.0).terms(out, _targets())
    assert set(terms) == {"objectness", "mask", "mask_prompt", "mask_prompt_dice", "box"} and terms["mask"] == 0
    optimiser = torch.optim.AdamW(model.trainable_parameter_groups(lr=1e-2))
    sum(terms.values()).backward()
    optimiser.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and all(k.startswith("ppn.") for k in changed)
    assert not calls, "the cheap step must not run the mask decoder"


def test_autonomous_output_is_the_mask_prompt_and_a_present_class_keeps_its_peak():
    model = _model().eval()
    model.ppn.mirror = False  # the peak rule alone (mirroring has its own test)
    with torch.no_grad():
        model.ppn.trunks[0].head.weight.zero_()  # a flat map, so upsampling keeps its peak
        model.ppn.trunks[0].head.bias.fill_(-20.0)  # every pixel far below 0
        model.ppn.trunks[0].objectness_head.bias.copy_(torch.tensor([5.0, -5.0]))  # class 1 present, class 2 absent
        features = model.encode(torch.randn(1, 3, 64, 64))
        out = model(features)
    assert torch.equal(out["logits"], out["mask_prompts"])
    assert "decoder_logits" not in out
    nerve, vessel = out["logits"][0]
    assert (nerve > 0).any(), "a class called present keeps the pixels near its peak"
    assert torch.isclose(nerve.max(), torch.tensor(PEAK_MARGIN), atol=1e-3)
    assert not (vessel > 0).any(), "an absent class stays empty"
    assert torch.allclose(out["iou"], out["objectness"].sigmoid())


def test_refine_with_a_box_is_never_rated_below_the_plain_box():
    model = _model(lora_rank=2).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_b" in name:
                p.normal_(0, 0.5)  # a LoRA update that changes the decoder, which manual mode must bypass
        features = model.encode(torch.randn(2, 3, 64, 64))
        boxes = torch.tensor([[[10.0, 10.0, 40.0, 40.0], [5.0, 30.0, 25.0, 60.0]]] * 2)
        valid = torch.tensor([[True, False], [True, True]])
        refined = model(features, Prompts(boxes=boxes, box_valid=valid), Mode.REFINE)
        plain = model(features, Prompts(boxes=boxes, box_valid=valid), Mode.MANUAL)
        auto = model(features)
    assert (refined["iou"][valid] >= plain["iou"][valid] - 1e-6).all()
    same = torch.isclose(refined["iou"][valid], plain["iou"][valid])
    assert torch.equal(refined["logits"][valid][same], plain["logits"][valid][same])
    # the row without a box keeps the autonomous output
    assert torch.allclose(refined["logits"][0, 1], auto["logits"][0, 1])


def test_a_model_file_carries_its_ppn_kind():
    dense = _model()
    state = dense.ppn_state_dict()
    assert "ppn.prototypes" in state
    other = Sam2Rad(dense.backbone, num_classes=2)  # built with the default attention PPN
    other.load_ppn_state_dict(state)
    assert other.ppn_kind == "dense" and isinstance(other.ppn, DensePromptPredictor)
    wrong = Sam2Rad(dense.backbone, num_classes=3)
    try:
        wrong.load_ppn_state_dict(state)
    except KeyError as err:
        assert "num_classes" in str(err)
    else:
        raise AssertionError("a 2-class file must not load into a 3-class model")
    assert wrong.ppn_kind == "attention", "a refused file leaves the model as it was"


def test_mirroring_at_evaluation_is_symmetric_and_off_in_training():
    model = _model().eval()
    with torch.no_grad():
        embed = model.backbone.levels(model.encode(torch.randn(1, 3, 64, 64)))[0]
        out, out_flipped = model.ppn([embed]), model.ppn([embed.flip(-1)])
        # mirrored evaluation is equivariant: the prediction of a mirrored embedding is the mirrored prediction
        assert torch.allclose(out.mask_prompts, out_flipped.mask_prompts.flip(-1), atol=1e-5)
        assert torch.allclose(out.objectness, out_flipped.objectness, atol=1e-5)
        model.ppn.mirror = False
        plain = model.ppn([embed])
    assert not torch.allclose(plain.mask_prompts, out.mask_prompts, atol=1e-5)
    model.ppn.train()
    torch.manual_seed(0)
    a = model.ppn([embed]).mask_prompts
    model.ppn.mirror = True
    torch.manual_seed(0)
    b = model.ppn([embed]).mask_prompts
    assert torch.equal(a, b), "training never mirrors"


def test_neighbour_bank_matches_labelled_pixels_and_leaves_out_a_rows_own_frame():
    torch.manual_seed(0)
    ppn = DensePromptPredictor(num_classes=2, level_channels=(8,), mask_prompt_size=16, neighbours=1)
    embed = torch.randn(2, 8, 4, 4)
    masks = torch.zeros(2, 2, 16, 16)
    masks[:, 0, :8, :8] = 1  # class 1: the top-left 2 x 2 embedding pixels of both frames
    masks[0, 1, 8:, 8:] = 1  # class 2: frame 0 only
    ppn.set_prototypes([(embed, masks)])
    assert ppn.bank_class.bincount(minlength=3).tolist() == [32 - 4 - 4 - 4, 8, 4]
    assert torch.equal(ppn.bank_source[ppn.bank_class == 2], torch.zeros(4, dtype=torch.long))
    unit = torch.nn.functional.normalize(embed, dim=1)
    own = ppn.neighbour_similarity(unit)
    assert torch.allclose(own[:, 1, :2, :2], torch.ones(2, 2, 2)), "a labelled pixel's nearest neighbour is itself"
    held_out = ppn.neighbour_similarity(unit, source=torch.tensor([0, 1]))
    other = unit[1, :, :2, :2].flatten(1)  # frame 0's class-1 pixels may only match frame 1's
    expected = (unit[0].flatten(1).T @ other).amax(1).reshape(4, 4)
    assert torch.allclose(held_out[0, 1], expected, atol=1e-6)
    assert (held_out[0, 2] == -1).all(), "class 2 is only in frame 0, so a frame-0 row matches none of it"
    assert torch.equal(ppn.similarities(embed)[:, 3:6], own), "the neighbour maps follow the prototype similarities"


def test_a_model_file_carries_its_neighbour_bank_and_older_dense_files_load():
    dense = _model().eval()
    with torch.no_grad():
        embed = dense.backbone.levels(dense.encode(torch.randn(2, 3, 64, 64)))[0]
        dense.ppn.set_prototypes([(embed, _targets()["masks"])])
        expected = dense.ppn([embed]).mask_prompts
    state = dense.ppn_state_dict()
    assert state["ppn.bank"].shape[0] == dense.ppn.bank.shape[0] > 0
    other = Sam2Rad(dense.backbone, num_classes=2).eval()
    other.load_ppn_state_dict(state)
    assert torch.equal(other.ppn.bank, dense.ppn.bank) and torch.equal(other.ppn.bank_source, dense.ppn.bank_source)
    with torch.no_grad():
        assert torch.allclose(other.ppn([embed]).mask_prompts, expected)
    older = _model()
    older._build_ppn("dense", bank=False)  # the layout of dense model files before the bank
    fresh = Sam2Rad(dense.backbone, num_classes=2, ppn="dense")
    fresh.load_ppn_state_dict(older.ppn_state_dict())
    assert fresh.ppn.neighbours == 0 and "ppn.bank" not in fresh.ppn_state_dict()


def test_objectness_reads_the_class_mask_without_training_it_and_older_files_load_it_as_zero():
    ppn = DensePromptPredictor(num_classes=2, level_channels=(8,), mask_prompt_size=16, neighbours=0, mirror=False)
    embed = torch.randn(2, 8, 8, 8)
    ppn.set_prototypes([(embed, torch.ones(2, 2, 16, 16))])
    ppn.eval()  # no dropout, so the two passes are comparable
    trunk = ppn.trunks[0]
    extra = ppn.similarities(embed)
    plain_logits, plain = ppn._predict(embed, extra)
    with torch.no_grad():
        trunk.region_objectness.fill_(0.5)
    logits, objectness = ppn._predict(embed, extra)
    assert torch.equal(logits, plain_logits) and not torch.allclose(objectness, plain)
    ppn.zero_grad()
    objectness.sum().backward()
    assert trunk.region_objectness.grad.abs().sum() > 0
    assert trunk.head.weight.grad is None or trunk.head.weight.grad.abs().sum() == 0  # the mask is read, not trained
    model = _model()
    with torch.no_grad():
        model.ppn.trunks[0].region_objectness.fill_(1.0)
    older = {k: v for k, v in _legacy(model.ppn_state_dict()).items() if k != "ppn.region_objectness"}
    fresh = _model()
    with torch.no_grad():
        fresh.ppn.trunks[0].region_objectness.fill_(3.0)
    fresh.load_ppn_state_dict(older)
    assert fresh.ppn.trunks[0].region_objectness.abs().sum() == 0


def test_self_support_grows_a_partly_found_structure_at_evaluation_only_and_older_files_load_without_it():
    ppn = DensePromptPredictor(num_classes=1, level_channels=(4,), mask_prompt_size=16, dropout=0.0, neighbours=0,
                               mirror=False, self_support=20.0)
    embed = torch.zeros(1, 4, 8, 8)
    embed[0, 0] = 1.0  # the background's look
    embed[0, :, 2:6, 2:6] = torch.tensor([0.0, 1.0, 0.0, 0.0])[:, None, None]  # a 4 x 4 structure's look
    logits = torch.full((1, 1, 8, 8), -1.0)
    logits[0, 0, 2:4, 2:4] = 1.0  # a quarter of the structure found
    grown = logits + ppn.self_support_term(embed, logits)
    structure = torch.zeros(8, 8, dtype=torch.bool)
    structure[2:6, 2:6] = True
    assert torch.equal(grown[0, 0] > 0, structure), "the whole structure and nothing else"
    assert (ppn.self_support_term(embed, torch.full_like(logits, -1.0)) == 0).all(), "nothing found, no term"
    ppn.set_prototypes([(embed, structure[None, None].float())])
    trained, _ = ppn._predict(embed, ppn.similarities(embed))
    ppn.eval()
    evaluated, _ = ppn._predict(embed, ppn.similarities(embed))
    assert torch.allclose(evaluated, trained + ppn.self_support_term(embed, trained))
    torch.manual_seed(0)
    backbone = build_backbone("sam", "vit_b", image_size=64, pretrained=False)
    model = Sam2Rad(backbone, num_classes=2, ppn="dense", self_support=20.0)
    assert float(model.ppn_state_dict()["ppn.self_support"]) == 20.0
    older = {k: v for k, v in _legacy(model.ppn_state_dict()).items() if k != "ppn.self_support"}
    fresh = Sam2Rad(backbone, num_classes=2, ppn="dense", self_support=20.0)
    fresh.load_ppn_state_dict(older)
    assert float(fresh.ppn.self_support) == 0.0, "a model file from before the term keeps its outputs"


def test_an_ensemble_trains_each_trunk_on_its_own_rows_and_averages_them_at_evaluation():
    torch.manual_seed(0)
    ppn = DensePromptPredictor(num_classes=2, level_channels=(8,), mask_prompt_size=16, neighbours=1, trunks=2)
    embed = torch.randn(3, 8, 4, 4)
    ppn.set_prototypes([(embed, _targets(16)["masks"][[0, 1, 0]])])
    ppn.train()
    out = ppn([embed], member=torch.tensor([1, 1, 1]))
    (out.mask_prompts.sum() + out.objectness.sum()).backward()
    assert all(p.grad is None for p in ppn.trunks[0].parameters()), "trunk 0 has no row here"
    assert ppn.trunks[1].head.weight.grad.abs().sum() > 0
    for bad in (None, torch.tensor([0, 2, 0])):
        try:
            ppn([embed], member=bad)
        except ValueError as err:
            assert "2 trunks" in str(err)
        else:
            raise AssertionError(f"rows must name one of the 2 trunks, got {bad}")
    ppn.eval()
    with torch.no_grad():
        both = ppn([embed])
        alone = []
        for keep in (0, 1):  # each trunk as a one-trunk PPN with the same prototypes and bank
            single = DensePromptPredictor(num_classes=2, level_channels=(8,), mask_prompt_size=16, neighbours=1)
            single.bank, single.bank_class, single.bank_source = ppn.bank, ppn.bank_class, ppn.bank_source
            single.load_state_dict({k.replace(f"trunks.{keep}.", "trunks.0."): v for k, v in ppn.state_dict().items()
                                    if not k.startswith(f"trunks.{1 - keep}.")})
            alone.append(single.eval()([embed]))
    assert torch.allclose(both.mask_prompts, (alone[0].mask_prompts + alone[1].mask_prompts) / 2, atol=1e-6)
    assert torch.allclose(both.objectness, (alone[0].objectness + alone[1].objectness) / 2, atol=1e-6)


def test_a_model_file_carries_its_trunks_and_older_dense_files_load_into_one(tmp_path):
    torch.manual_seed(0)
    backbone = build_backbone("sam", "vit_b", image_size=64, pretrained=False)
    features = Sam2Rad(backbone, num_classes=2).encode(torch.randn(1, 3, 64, 64))
    ensemble = Sam2Rad(backbone, num_classes=2, ppn="dense", trunks=2).eval()
    other = Sam2Rad(backbone, num_classes=2).eval()  # built with the default attention PPN and one trunk
    other.load_ppn_state_dict(ensemble.ppn_state_dict())
    assert len(other.ppn.trunks) == 2
    with torch.no_grad():
        assert torch.equal(other(features)["logits"], ensemble(features)["logits"])
    single = _model().eval()
    older = _legacy(single.ppn_state_dict())
    assert "ppn.stem.0.weight" in older and not any(".trunks." in k for k in older)
    other.load_ppn_state_dict(older)
    assert len(other.ppn.trunks) == 1
    with torch.no_grad():
        assert torch.equal(other(features)["logits"], single(features)["logits"])
    torch.save(older, tmp_path / "older.pt")  # a warm start from it fills the first trunk and names the rest
    skipped = InitialWeights(tmp_path / "older.pt", ensemble).load()
    assert torch.equal(ensemble.ppn.trunks[0].stem[0].weight, single.ppn.trunks[0].stem[0].weight)
    assert skipped and all(k.startswith("ppn.trunks.1.") for k in skipped if k.startswith("ppn.trunks."))
