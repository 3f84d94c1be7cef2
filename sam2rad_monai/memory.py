"""Temporal mode with SAM2's memory: the learned prompts condition a loop where they are confident, and SAM2's
memory encoder and memory attention carry each structure through the frames where they are not.

Each class is one tracked object with its own memory, as in SAM2's video predictor. On a frame where the class's
model calls it present (objectness at or above the predictor's presence threshold, and any calibrated minimum
region: a dense PPN has no IoU estimate of its own, its presence probability stands in), the model's own autonomous mask is given to SAM2 as a mask prompt on
that frame (a conditioning frame, what ``SAM2VideoPredictor.add_new_mask`` does with a user's mask): the output is
that mask, and SAM2 encodes it into the class's memory. On any other frame after the first conditioning one, SAM2
segments the class from its memory alone (no prompt), and its object score decides presence; before the first, the
frame's own output stands. A structure can so start on a confident frame, be held or lost by SAM2's memory and be
re-acquired on the next confident frame. Unprompted frames are kept as far back as SAM2 reads them (spatial memory
and object pointers); conditioning frames, which SAM2 keeps all of, are capped at the ``num_maskmem`` latest so
that a long confident loop does not grow the attention without bound.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from .backbones import Features
from .temporal import LoopState

if TYPE_CHECKING:
    from .backbones.sam2 import Sam2Backbone


def has_memory(backbone: torch.nn.Module) -> bool:
    """Whether a backbone carries SAM2's video memory (the ``sam2`` family)."""
    return getattr(backbone, "video", None) is not None


@torch.no_grad()
def track(backbone: Sam2Backbone, features: Features, logits: Tensor, objectness: Tensor, state: LoopState,
          threshold: float = 0.0, called: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One frame of a loop through SAM2's memory.

    Args:
        backbone: a :class:`~sam2rad_monai.backbones.sam2.Sam2Backbone`.
        features: this frame's features (batch 1: ``embed`` with the no-memory embedding added, ``hr1``, ``hr0``).
        logits: (C, m, m) the model's autonomous output logits for this frame, m = image_size / 4.
        objectness: (C,) its objectness logits.
        state: the loop's state (updated: frame index, one memory per class).
        threshold: the predictor's presence threshold on objectness logits (a class at or above it conditions).
        called: (C,) bool, which classes the model calls present on this frame
            (:meth:`~sam2rad_monai.model.Sam2Rad.present`, which adds a calibrated minimum region to the threshold);
            those condition. Default: objectness at or above ``threshold``.

    Returns:
        (C, m, m) output logits and (C,) objectness logits on the same scale (SAM2's object score, present above 0,
        shifted by ``threshold`` on the frames it tracks).
    """
    sam = backbone.video
    sam.training = False  # SAM2Base keeps its object scores only in eval mode
    size = backbone.image_size
    if not state.tracks:
        state.tracks = [{"cond_frame_outputs": {}, "non_cond_frame_outputs": {}} for _ in range(len(logits))]
    levels = [features["hr0"], features["hr1"], features["embed"] - backbone.no_mem_embed.reshape(1, -1, 1, 1)]
    levels = [level.to(logits.dtype) for level in levels]
    feats = [x.flatten(2).permute(2, 0, 1) for x in levels]  # (HW, 1, C), SAM2's layout
    top = levels[-1]  # SAM2 reads the positional encoding of the top level only
    pos = [None, None, backbone.image_encoder.neck.position_encoding(top).to(top.dtype).flatten(2).permute(2, 0, 1)]
    sizes = [tuple(x.shape[-2:]) for x in levels]
    t = state.frame
    out_logits, out_obj = logits.clone(), objectness.clone()
    for c, memory in enumerate(state.tracks):
        conditioned = bool(called[c]) if called is not None else bool(objectness[c] >= threshold)
        if not conditioned and not memory["cond_frame_outputs"]:
            continue  # nothing to track yet: the frame's own output stands
        mask = None
        if conditioned:
            mask = (F.interpolate(logits[c][None, None], size=(size, size), mode="bilinear", align_corners=False)
                    > 0).to(logits.dtype)
        out = sam.track_step(frame_idx=t, is_init_cond_frame=conditioned and not memory["cond_frame_outputs"],
                             current_vision_feats=feats, current_vision_pos_embeds=pos, feat_sizes=sizes,
                             point_inputs=None, mask_inputs=mask, output_dict=memory,
                             # the loop's length is unknown; SAM2 scales object-pointer distances by min(it, window)
                             num_frames=max(t + 1, sam.max_obj_ptrs_in_encoder))
        kind = "cond_frame_outputs" if conditioned else "non_cond_frame_outputs"
        memory[kind][t] = {k: v for k, v in out.items() if k not in ("pred_masks_high_res", "mask_inputs")}
        horizon = t - max(sam.num_maskmem, sam.max_obj_ptrs_in_encoder)
        for frame in [f for f in memory["non_cond_frame_outputs"] if f < horizon]:
            del memory["non_cond_frame_outputs"][frame]
        for frame in sorted(memory["cond_frame_outputs"])[:-sam.num_maskmem]:
            del memory["cond_frame_outputs"][frame]
        if not conditioned:  # SAM2's low-res masks are image_size / 4, the model's own output grid
            out_logits[c] = out["pred_masks"][0, 0]
            out_obj[c] = out["object_score_logits"].reshape(()) + threshold
    state.frame += 1
    return out_logits, out_obj
