"""MONAI inferers for the Ignite engines: reduced-precision autocast on any device, and the training prompt mix.

MONAI's engines autocast only on CUDA (``amp=True``); :class:`Sam2RadInferer` autocasts on the device of the
inputs. ``"auto"`` turns bf16 on for CUDA devices with bf16 only: on a 2-core Xeon with AMX a training step was
no faster in bf16 than in fp32 (``benchmarks/profile_ppn.py``), so CPUs run fp32 unless asked. :class:`PromptMixInferer` draws, per
(image, class) row, the prompts a user would add (paper §3.2, semi-autonomous mode): none, a jittered ground-truth
box, or corrective clicks sampled from the error of the current prediction (iteratively, as SAM was trained).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from monai.inferers import Inferer
from torch import Tensor, nn

from ..clicks import error_click
from ..model import Mode, Prompts


def bf16_supported(device: torch.device | str) -> bool:
    """Whether ``device`` runs bf16 natively (CUDA with bf16, or a CPU with oneDNN bf16 kernels)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _device_of(inputs: Any) -> torch.device:
    if isinstance(inputs, dict):
        return _device_of(next(iter(inputs.values())))
    return inputs.device


class Sam2RadInferer(Inferer):
    """Run the network on images or cached features, under bf16 autocast when asked; outputs come back as float32.

    Args:
        bf16: ``True`` / ``False``, or ``"auto"``: on for CUDA devices with bf16, off on CPU.
    """

    def __init__(self, bf16: bool | str = "auto") -> None:
        super().__init__()
        if bf16 not in (True, False, "auto"):
            raise ValueError(f"bf16 must be true, false or 'auto', got {bf16!r}")
        self.bf16 = bf16

    def autocast(self, inputs: Any) -> torch.autocast:
        device = _device_of(inputs)
        enabled = (device.type == "cuda" and bf16_supported(device)) if self.bf16 == "auto" else bool(self.bf16)
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)

    def run(self, network: nn.Module, inputs: Any, prompts: Prompts | None = None,
            mode: Mode | str = Mode.AUTONOMOUS, decode: bool = True) -> dict[str, Tensor]:
        with self.autocast(inputs):
            if not decode:
                out = network(inputs, None, Mode.AUTONOMOUS, decode=False)
            else:
                out = network(inputs, prompts, mode) if prompts is not None else network(inputs)
        return {k: v.float() for k, v in out.items()}

    def __call__(self, inputs: Any, network: nn.Module, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        if isinstance(inputs, dict) and "targets" in inputs:  # a training batch from prepare_training_batch
            inputs = inputs["inputs"]
        return self.run(network, inputs)


class PromptMixInferer(Sam2RadInferer):
    """Training forward pass with a per-row prompt mix, so refine mode is trained and not only allowed.

    Each (image, class) row with the class present independently draws: learned prompts alone (the rest), edited by
    a ground-truth box jittered by up to ``box_jitter`` of its size on each side (``box_prob``), or by 1 to
    ``max_clicks`` corrective clicks (``click_prob``; how refine mode applies them:
    :class:`~sam2rad_monai.model.Sam2Rad`). Clicks are drawn one at a time from the error of the model's current
    prediction with the clicks so far (no-gradient passes over only the images that need them), then the final pass
    runs with gradients. Needs batches from :func:`prepare_training_batch` (the targets ride along). A dense PPN
    (``Sam2Rad(ppn="dense")``) trains without the decoder: no prompt mix, the mask prompts are the output.

    Args:
        box_prob, click_prob: probabilities of the two prompted row kinds.
        max_clicks: most clicks per prompted row.
        box_jitter: largest box-edge shift, as a fraction of the box side.
        seed: seed of the prompt draws (the engine's own seeding does not reach numpy's generator).
        bf16: as for :class:`Sam2RadInferer`.
    """

    def __init__(self, box_prob: float = 0.25, click_prob: float = 0.25, max_clicks: int = 3,
                 box_jitter: float = 0.1, seed: int = 0, bf16: bool | str = "auto") -> None:
        super().__init__(bf16)
        if box_prob < 0 or click_prob < 0 or box_prob + click_prob > 1:
            raise ValueError(f"box_prob and click_prob must be >= 0 with a sum <= 1, got {box_prob}, {click_prob}")
        self.box_prob, self.click_prob, self.max_clicks, self.box_jitter = box_prob, click_prob, max_clicks, box_jitter
        self.rng = np.random.default_rng(seed)

    def __call__(self, inputs: Any, network: nn.Module, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        if not (isinstance(inputs, dict) and "targets" in inputs):
            return self.run(network, inputs)
        features, targets = inputs["inputs"], inputs["targets"]
        if getattr(network.module if hasattr(network, "module") else network, "ppn_kind", "") == "dense":
            return self.run(network, features, decode=False)  # the cheap step: mask prompts, no decoder pass
        present = targets["present"] > 0.5
        draw = torch.as_tensor(self.rng.random(present.shape), device=present.device)
        box_rows = present & (draw < self.box_prob)
        click_rows = present & (draw >= self.box_prob) & (draw < self.box_prob + self.click_prob)
        if not (box_rows.any() or click_rows.any()):
            return self.run(network, features)
        prompts = Prompts(boxes=self.jittered_boxes(targets["boxes"]), box_valid=box_rows)
        if click_rows.any():
            prompts.points, prompts.point_labels = self.clicks(network, features, targets["masks"], click_rows)
        return self.run(network, features, prompts, Mode.REFINE)

    def jittered_boxes(self, boxes: Tensor) -> Tensor:
        """Shift each edge by up to ``box_jitter`` of the box side (boxes in input pixels, inclusive corners)."""
        side = torch.cat([boxes[..., 2:] - boxes[..., :2] + 1] * 2, dim=-1)
        shift = torch.as_tensor(self.rng.uniform(-1, 1, boxes.shape), dtype=boxes.dtype, device=boxes.device)
        return (boxes + shift * self.box_jitter * side).clamp(min=0)

    @torch.no_grad()
    def clicks(self, network: nn.Module, features: Any, masks: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
        """Iteratively sampled corrective clicks for the selected rows; other rows get padding points (label -1)."""
        batch, classes = rows.shape
        count = int(self.rng.integers(1, self.max_clicks + 1))
        points = torch.zeros(batch, classes, count, 2, device=masks.device)
        labels = torch.full((batch, classes, count), -1, device=masks.device, dtype=torch.long)
        images = rows.any(dim=1).nonzero().flatten()
        sub = {k: v[images] for k, v in features.items()} if isinstance(features, dict) else features[images]
        size = masks.shape[-1]
        was_training = network.training
        network.eval()
        try:
            for k in range(count):
                prompts = Prompts(points=points[images, :, :k], point_labels=labels[images, :, :k]) if k else None
                out = self.run(network, sub, prompts, Mode.REFINE if k else Mode.AUTONOMOUS)
                logits = torch.nn.functional.interpolate(out["logits"], size=(size, size), mode="bilinear")
                pred = (logits > 0).cpu().numpy()
                for i, b in enumerate(images.tolist()):
                    for c in rows[b].nonzero().flatten().tolist():
                        click = error_click(pred[i, c], masks[b, c].cpu().numpy() > 0.5, self.rng)
                        if click is not None:
                            points[b, c, k] = torch.tensor(click[:2])
                            labels[b, c, k] = click[2]
        finally:
            network.train(was_training)
        return points, labels


def prepare_training_batch(batchdata: dict[str, Any], device: str | torch.device | None = None,
                           non_blocking: bool = False, **kwargs: Any) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Like :func:`~sam2rad_monai.engine.handlers.prepare_batch`, with the targets also riding along in the inputs,
    so :class:`PromptMixInferer` can draw ground-truth prompts."""
    from .handlers import prepare_batch

    inputs, targets = prepare_batch(batchdata, device, non_blocking)
    return {"inputs": inputs, "targets": targets}, targets
