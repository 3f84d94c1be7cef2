"""Segment Anything (SAM v1) ViT-B / ViT-L / ViT-H, built from the ``segment-anything`` package."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn

from .base import Backbone, Features

# encoder width, depth, heads and global-attention blocks of the released SAM models
SAM_VARIANTS: dict[str, tuple[int, int, int, tuple[int, ...]]] = {
    "vit_b": (768, 12, 12, (2, 5, 8, 11)),
    "vit_l": (1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": (1280, 32, 16, (7, 15, 23, 31)),
}


# MedSAM (Ma et al. 2024): SAM ViT-B fine-tuned on medical images, fed intensities in [0, 1] (no ImageNet
# statistics); its released file (medsam_vit_b.pth) has SAM ViT-B's key layout
MEDSAM = "medsam"


def sam_prompt_modules(image_size: int, grid: int) -> tuple[nn.Module, nn.Module]:
    """SAM's prompt encoder and mask decoder (as released, shared by SAM v1 and MobileSAM) for an input of
    ``image_size`` pixels embedded on a ``grid`` x ``grid`` grid."""
    from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

    prompt_encoder = PromptEncoder(embed_dim=256, image_embedding_size=(grid, grid),
                                   input_image_size=(image_size, image_size), mask_in_chans=16)
    mask_decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
        transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256,
    )
    return prompt_encoder, mask_decoder


class SamBackbone(Backbone):
    """Frozen SAM v1, or MedSAM (variant ``medsam``).

    Args:
        variant: ``vit_b``, ``vit_l`` or ``vit_h``; ``medsam`` is the ViT-B architecture fed intensities in [0, 1]
            (pixels / 255, where SAM subtracts ImageNet means), for ``medsam_vit_b.pth``. MedSAM's own inference
            min-max normalises each frame and resizes it to 1024 x 1024 whatever its aspect; here the project's one
            intensity rule (:func:`~sam2rad_monai.transforms.to_0_255`, then / 255: the same as min-max for a frame
            spanning 0..255, darker for a low-contrast one) and resize-by-longest-side with padding apply, as for
            every backbone.
        checkpoint: the user's SAM checkpoint (e.g. ``sam_vit_b_01ec64.pth``); required unless ``pretrained`` is False.
        image_size: model input side; 1024 for the released weights (smaller sizes for tests with random weights).
        pretrained: ``False`` builds random weights (tests only).
    """

    name = "sam"

    def __init__(self, variant: str = "vit_b", checkpoint: str | Path | None = None, image_size: int = 1024,
                 pretrained: bool = True) -> None:
        super().__init__()
        from segment_anything.modeling import ImageEncoderViT

        if variant not in SAM_VARIANTS and variant != MEDSAM:
            raise ValueError(f"unknown SAM variant {variant!r}; choose one of {sorted(SAM_VARIANTS) + [MEDSAM]}")
        width, depth, heads, global_blocks = SAM_VARIANTS["vit_b" if variant == MEDSAM else variant]
        self.variant = variant
        if variant == MEDSAM:
            self.pixel_mean, self.pixel_std = (0.0, 0.0, 0.0), (255.0, 255.0, 255.0)
        self.image_size = image_size
        patch = 16
        self.image_encoder = ImageEncoderViT(
            depth=depth, embed_dim=width, img_size=image_size, mlp_ratio=4,
            norm_layer=partial(nn.LayerNorm, eps=1e-6), num_heads=heads, patch_size=patch, qkv_bias=True,
            use_rel_pos=True, global_attn_indexes=global_blocks, window_size=14, out_chans=256,
        )
        self.prompt_encoder, self.mask_decoder = sam_prompt_modules(image_size, image_size // patch)
        if pretrained:
            if checkpoint is None:
                raise ValueError(f"the sam {variant} backbone needs a checkpoint file (nothing is downloaded); "
                                 "pass checkpoint=... or pretrained=False for random weights")
            self.load_checkpoint(checkpoint)
        self.freeze()

    def ignored_checkpoint_keys(self) -> set[str]:
        # the released checkpoints carry Sam's normalisation buffers; Sam2Rad normalises in the transforms
        return {"pixel_mean", "pixel_std"}

    @torch.no_grad()
    def encode(self, images: Tensor) -> Features:
        return {"embed": self.image_encoder(images)}
