"""SAM2 and SAM2.1 (Hiera tiny / small / base_plus / large) from the ``sam2`` package: the image path, and the
video memory that temporal mode uses."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from .base import Backbone, Features

SAM2_SIZES = {"tiny": "t", "small": "s", "base_plus": "b+", "large": "l"}
SAM2_VERSIONS = ("sam2", "sam2.1")


class Sam2Backbone(Backbone):
    """Frozen SAM2: Hiera + FPN encoder, prompt encoder, and the mask decoder with its high-res levels.

    The video memory (memory encoder, memory attention, object pointers) is kept for temporal mode
    (:mod:`sam2rad_monai.memory`): :attr:`video` is the whole ``SAM2Base``, whose modules are this backbone's.

    Args:
        size: ``tiny``, ``small``, ``base_plus`` or ``large``.
        version: ``sam2`` or ``sam2.1``.
        checkpoint: the user's SAM2 checkpoint (e.g. ``sam2.1_hiera_tiny.pt``); required unless ``pretrained`` is False.
        image_size: model input side; 1024 for the released weights (multiples of 64 down to 256 for tests).
        pretrained: ``False`` builds random weights (tests only).
    """

    name = "sam2"
    level_channels = (256, 64, 32)
    feature_keys = ("embed", "hr1", "hr0")  # coarse to fine: 1/16, 1/8, 1/4 of the input
    pixel_mean = (123.675, 116.28, 103.53)
    pixel_std = (58.395, 57.12, 57.375)

    def __init__(self, size: str = "tiny", version: str = "sam2.1", checkpoint: str | Path | None = None,
                 image_size: int = 1024, pretrained: bool = True) -> None:
        super().__init__()
        if size not in SAM2_SIZES:
            raise ValueError(f"unknown SAM2 size {size!r}; choose one of {sorted(SAM2_SIZES)}")
        if version not in SAM2_VERSIONS:
            raise ValueError(f"unknown SAM2 version {version!r}; choose one of {SAM2_VERSIONS}")
        self.variant = f"{version}_hiera_{size}"
        self.image_size = image_size
        model = _build_sam2_model(version, SAM2_SIZES[size], image_size)
        if pretrained:
            if checkpoint is None:
                raise ValueError(f"the sam2 {self.variant} backbone needs a checkpoint file (nothing is "
                                 "downloaded); pass checkpoint=... or pretrained=False for random weights")
            self._full_model = model  # load_checkpoint targets the whole SAM2Base, then it is dropped
            self.load_checkpoint(checkpoint)
            del self._full_model
        self.image_encoder = model.image_encoder
        self.prompt_encoder = model.sam_prompt_encoder
        self.mask_decoder = model.sam_mask_decoder
        self.no_mem_embed = model.no_mem_embed
        # registered here so that they move with the backbone (.to(device)); SAM2Base's methods use them in place
        self.memory = nn.ModuleDict({name: getattr(model, name) for name in (
            "memory_attention", "memory_encoder", "mask_downsample", "obj_ptr_proj", "obj_ptr_tpos_proj")})
        self.memory_parameters = nn.ParameterList(model.parameters(recurse=False))
        object.__setattr__(self, "video", model)  # not a submodule: its modules are registered above already
        self.freeze()
        model.eval()

    def checkpoint_target(self) -> nn.Module:
        return self._full_model

    @torch.no_grad()
    def encode(self, images: Tensor) -> Features:
        out = self.image_encoder(images)
        fpn = out["backbone_fpn"]
        # as SAM2ImagePredictor does: the decoder's own projections of the two fine levels, and the
        # no-memory embedding added to the coarse level for a single image
        return {
            "embed": fpn[2] + self.no_mem_embed.reshape(1, -1, 1, 1),
            "hr1": self.mask_decoder.conv_s1(fpn[1]),
            "hr0": self.mask_decoder.conv_s0(fpn[0]),
        }

    def decode(self, features: Features, sparse: Tensor, dense: Tensor) -> tuple[Tensor, Tensor]:
        masks, iou, _, _ = self.mask_decoder(
            image_embeddings=features["embed"], image_pe=self.dense_pe(), sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense, multimask_output=False, repeat_image=False,
            high_res_features=[features["hr0"], features["hr1"]],
        )
        return masks, iou


def _build_sam2_model(version: str, size_code: str, image_size: int) -> nn.Module:
    from hydra import compose
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    import sam2  # noqa: F401  (registers sam2's hydra config module)

    config = f"configs/{version}/{version}_hiera_{size_code}.yaml"
    overrides = [f"++model.image_size={image_size}"]
    if image_size != 1024:
        # RoPE tables of the memory attention are sized for the default 64 x 64 grid
        grid = image_size // 16
        overrides += [
            f"++model.memory_attention.layer.self_attention.feat_sizes=[{grid},{grid}]",
            f"++model.memory_attention.layer.cross_attention.feat_sizes=[{grid},{grid}]",
        ]
    cfg = compose(config_name=config, overrides=overrides)
    OmegaConf.resolve(cfg)
    return instantiate(cfg.model, _recursive_=True)
