"""Temporal mode for cine loops: a blend of each frame's output with the loop's earlier frames (backbones without a
memory: LiteMedSAM, SAM, MobileSAM), and the loop state that SAM2's memory uses instead (:mod:`sam2rad_monai.memory`).

Each frame of a loop still gets its own learned prompts (the prompt-free path runs on every frame, so a structure
that leaves the view and returns is found again); temporal mode carries the loop's recent evidence forward by
blending each frame's output logits and objectness with the previous frame's blended ones (exponential moving
averages with weights ``alpha`` and ``presence_alpha`` on the new frame). A structure then keeps its identity and
extent through a loop instead of flickering with each frame's independent errors, and a single frame's low
objectness no longer drops it.
Both are blended in the model's padded input frame, which the frames of one loop share.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

# the new frame's weights, chosen on validation loops (docs/BENCHMARKS.md, "Cine loops"): the objectness follows the
# loop more slowly than the mask, whose lag under motion costs a small structure more than its flicker
DEFAULT_ALPHA = 0.85
DEFAULT_PRESENCE_ALPHA = 0.5


@dataclass
class LoopState:
    """What temporal mode carries from one frame of a loop to the next."""

    logits: Tensor | None = None  # (C, m, m) blended output logits
    objectness: Tensor | None = None  # (C,) blended objectness logits
    use_memory: bool = True  # a backbone with a video memory (SAM2) tracks with it instead of the blend
    frame: int = 0  # index in the loop of the next frame
    tracks: list[dict[str, Any]] = field(default_factory=list)  # SAM2's memory: one output dict per class


def blend(state: LoopState, logits: Tensor, objectness: Tensor, alpha: float = DEFAULT_ALPHA,
          presence_alpha: float = DEFAULT_PRESENCE_ALPHA) -> tuple[Tensor, Tensor]:
    """Blend one frame's logits (C, m, m) and objectness (C,) into ``state`` (updated) and return the blend.

    ``alpha`` is the new frame's weight for the logits, ``presence_alpha`` for the objectness: 1 and 1 is per-frame
    segmentation, smaller values follow the loop more slowly.
    """
    for name, value in (("alpha", alpha), ("presence_alpha", presence_alpha)):
        if not 0.0 < value <= 1.0:
            raise ValueError(f"{name} must be in (0, 1], got {value}")
    if state.logits is None or state.logits.shape != logits.shape:
        state.logits, state.objectness = logits, objectness
    else:
        state.logits = alpha * logits + (1.0 - alpha) * state.logits
        state.objectness = presence_alpha * objectness + (1.0 - presence_alpha) * state.objectness
    return state.logits, state.objectness
