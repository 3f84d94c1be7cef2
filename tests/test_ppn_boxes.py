"""The learned box read off the mask prompt, and warm starts across PPN heads."""

from __future__ import annotations

import pytest
import torch

from sam2rad_monai.backbones import build_backbone
from sam2rad_monai.engine.handlers import InitialWeights
from sam2rad_monai.model import Sam2Rad
from sam2rad_monai.ppn import region_boxes, soft_extents


def _model(box_source: str = "mask") -> Sam2Rad:
    torch.manual_seed(0)
    return Sam2Rad(build_backbone("sam", "vit_b", image_size=64, pretrained=False), num_classes=2,
                   box_source=box_source)


def test_soft_extents_equal_pixel_extents_on_binary_maps_and_train_the_map():
    maps = torch.zeros(2, 16, 16)
    maps[0, 2:5, 3:9] = 1
    maps[1, 10:12, 0:2] = 1
    expected = torch.tensor([[3.0, 2.0, 9.0, 5.0], [0.0, 10.0, 2.0, 12.0]]) / 16
    assert torch.allclose(soft_extents(maps), expected)

    probs = torch.full((1, 16, 16), 0.1, requires_grad=True)
    box = soft_extents(probs)
    assert (box[:, 2:] >= box[:, :2]).all()
    (box[:, 2:] - box[:, :2]).sum().backward()  # a box-size loss reaches the map
    assert probs.grad.abs().sum() > 0


def test_region_boxes_keep_substantial_regions_drop_specks_and_default_to_the_whole_image():
    maps = torch.zeros(3, 16, 16, dtype=torch.bool)
    maps[0, 10:14, 0:4] = True  # 16 px: the region the box must cover
    maps[0, 0, 15] = True  # a stray pixel that would stretch a plain min/max box to the whole image
    maps[2, 2:6, 2:6] = True  # a structure in two parts (16 and 6 px): the box covers both
    maps[2, 9:11, 11:14] = True
    boxes = region_boxes(maps)
    assert torch.equal(boxes[0], torch.tensor([0.0, 10.0, 4.0, 14.0]) / 16)
    assert torch.equal(boxes[1], torch.tensor([0.0, 0.0, 1.0, 1.0]))
    assert torch.equal(boxes[2], torch.tensor([2.0, 2.0, 14.0, 11.0]) / 16)
    # a part below the fraction is dropped like a speck
    assert torch.equal(region_boxes(maps[2:], min_fraction=0.5)[0], torch.tensor([2.0, 2.0, 6.0, 6.0]) / 16)


def test_mask_box_source_gives_the_decoder_the_mask_prompt_region():
    model = _model("mask")
    out = model(torch.randn(2, 3, 64, 64))
    prompts = out["mask_prompts"].flatten(0, 1)
    assert torch.equal(out["boxes"].flatten(0, 1), region_boxes(prompts > 0))
    assert torch.allclose(out["box_fit"].flatten(0, 1), soft_extents(prompts.sigmoid()))
    assert model.ppn.box_head is None
    with pytest.raises(ValueError, match="box_source"):
        Sam2Rad(build_backbone("sam", "vit_b", image_size=64, pretrained=False), num_classes=2, box_source="points")


def test_initial_weights_load_matching_tensors_across_box_sources(tmp_path):
    source = _model("query")
    path = tmp_path / "model.pt"
    torch.save(source.ppn_state_dict(), path)
    target = _model("mask")
    torch.nn.init.zeros_(target.ppn.queries)
    skipped = InitialWeights(path, target).load()
    assert skipped and all(k.startswith("ppn.box_head.") for k in skipped)
    assert torch.equal(target.ppn.queries, source.ppn.queries)
    assert torch.equal(target.ppn.mask_head[0].weight, source.ppn.mask_head[0].weight)

    torch.save({"model": {"unrelated": torch.zeros(1)}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt"):
        InitialWeights(tmp_path / "other.pt", target).load()
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        InitialWeights(tmp_path / "missing.pt", target).load()


def test_predictor_reads_the_box_source_from_the_model_file(tmp_path):
    from sam2rad_monai.inference import Sam2RadPredictor

    for source in ("query", "mask"):
        path = tmp_path / f"{source}.pt"
        torch.save(_model(source).ppn_state_dict(), path)
        backbone = build_backbone("sam", "vit_b", image_size=64, pretrained=False)
        predictor = Sam2RadPredictor.from_checkpoint(path, 2, backbone=backbone)
        assert predictor.model.ppn.box_source == source
    with pytest.raises(KeyError, match="box_source"):
        _model("mask").load_ppn_state_dict(_model("query").ppn_state_dict())
