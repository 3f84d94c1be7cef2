"""The Sam2Rad training loss, paper equation (1).

``L = 10 * (focal(mask prompt) + focal(final mask)) + 1 * (L1 + GIoU)(box) + 1 * BCE(objectness)``, focal with
gamma 3 and alpha 0.7. The alpha follows torchvision / MONAI / Lin et al. (alpha weights the positive pixels), as the
authors' code does; the paper's equation (2) writes it on the negative term. A class absent from an image contributes
only to the objectness term, so a batch without any object gives a finite loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import Tensor, nn
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss


class Sam2RadLoss(nn.Module):
    """Loss on the outputs of :class:`~sam2rad_monai.model.Sam2Rad` against per-class targets.

    The final-mask terms train ``decoder_logits`` when the model returns them (the decoder's own output, before any
    fusion with the mask prompt, which has its own terms), else ``logits``.

    Targets (a dict): ``masks`` (B, C, S, S) in {0, 1}, ``boxes`` (B, C, 4) in input pixels (inclusive corner indices),
    ``present`` (B, C) in {0, 1}. Mask losses are computed at the decoder's resolution (targets area-resized).

    Args:
        image_size: S, to normalise boxes.
        dice_weight: weight of an optional soft-Dice term on the final mask and on the mask prompt (0 = the paper's
            loss). The authors' code adds one on the final mask; on CPU budgets it speeds up convergence a lot.
        mask_weight, box_weight, objectness_weight: lambda_1..3 of equation (1).
        focal_gamma, focal_alpha: focal loss parameters.
    """

    def __init__(self, image_size: int, mask_weight: float = 10.0, box_weight: float = 1.0,
                 objectness_weight: float = 1.0, focal_gamma: float = 3.0, focal_alpha: float = 0.7,
                 dice_weight: float = 0.0) -> None:
        super().__init__()
        self.image_size = image_size
        self.dice_weight = dice_weight
        self.dice = DiceLoss(sigmoid=True, reduction="mean")
        self.mask_weight, self.box_weight, self.objectness_weight = mask_weight, box_weight, objectness_weight
        self.focal_gamma, self.focal_alpha = focal_gamma, focal_alpha

    def terms(self, pred: dict[str, Tensor], target: dict[str, Tensor]) -> dict[str, Tensor]:
        """Each weighted term of the loss separately (for logging)."""
        present = target["present"].flatten() > 0.5
        # without a decoder pass (a dense PPN's cheap step) the output is the mask prompt, trained by its own terms
        final = pred.get("decoder_logits", None if "mask_prompts" in pred else pred["logits"])
        logits = (final if final is not None else pred["mask_prompts"]).flatten(0, 1)
        masks = target["masks"].flatten(0, 1).unsqueeze(1).float()
        if masks.shape[-1] != logits.shape[-1]:
            masks = F.interpolate(masks, size=logits.shape[-2:], mode="area")
        masks = masks[:, 0]
        zero = logits.sum() * 0.0  # keeps the graph connected when nothing is present
        terms = {"objectness": self.objectness_weight * F.binary_cross_entropy_with_logits(
            pred["objectness"].flatten(), target["present"].flatten().float())}
        if present.any():
            terms["mask"] = self.mask_weight * self._focal(logits[present], masks[present]) if final is not None \
                else zero
            if self.dice_weight and final is not None:
                terms["dice"] = self.dice_weight * self.dice(logits[present, None], masks[present, None])
            if "mask_prompts" in pred:
                prompts = pred["mask_prompts"].flatten(0, 1)[present]
                terms["mask_prompt"] = self.mask_weight * self._focal(prompts, masks[present])
                if self.dice_weight:
                    terms["mask_prompt_dice"] = self.dice_weight * self.dice(prompts[:, None], masks[present, None])
            if "boxes" in pred:
                box_pred = pred.get("box_fit", pred["boxes"]).flatten(0, 1)[present]
                box_true = self.normalise_boxes(target["boxes"].flatten(0, 1)[present])
                terms["box"] = self.box_weight * (F.l1_loss(box_pred, box_true)
                                                  + generalized_box_iou_loss(box_pred, box_true, reduction="mean"))
        else:
            terms["mask"] = zero
        return terms

    def forward(self, pred: dict[str, Tensor], target: dict[str, Tensor]) -> Tensor:
        return torch.stack(list(self.terms(pred, target).values())).sum()

    def normalise_boxes(self, boxes: Tensor) -> Tensor:
        """Inclusive pixel-index boxes to [0, 1] coordinates of the padded input (pixel edges, so x2 = max + 1)."""
        scale = float(self.image_size)
        return torch.cat([boxes[..., :2], boxes[..., 2:] + 1.0], dim=-1) / scale

    def _focal(self, logits: Tensor, targets: Tensor) -> Tensor:
        loss = sigmoid_focal_loss(logits, targets, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="none")
        return loss.flatten(1).mean(1).mean()
