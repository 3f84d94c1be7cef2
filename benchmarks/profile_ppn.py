"""Where the time of one PPN training step goes (cached LiteMedSAM features, forward + backward).

    uv run python benchmarks/profile_ppn.py [--batch 4] [--steps 3]

Prints the per-module split of one step (forward + backward) from torch.profiler, per image-class row.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch

from sam2rad_monai.backbones import build_backbone
from sam2rad_monai.losses import Sam2RadLoss
from sam2rad_monai.model import Sam2Rad


def module_times(model: Sam2Rad, features: dict, target: dict, loss_fn: Sam2RadLoss) -> dict[str, float]:
    """Wall time per top-level part, measured with forward/backward hooks (ms, forward + backward)."""
    parts = {"ppn.blocks": model.ppn.blocks, "ppn.mask_head": model.ppn.mask_head,
             "prompt_encoder": model.backbone.prompt_encoder, "decoder.transformer": model.backbone.mask_decoder.transformer,
             "decoder.output_upscaling": model.backbone.mask_decoder.output_upscaling}
    times: dict[str, float] = defaultdict(float)
    starts: dict[str, float] = {}

    def hooks(name: str, module: torch.nn.Module) -> None:
        module.register_forward_pre_hook(lambda *_: starts.__setitem__(name, time.perf_counter()))
        module.register_forward_hook(lambda *_: times.__setitem__(name, times[name] + time.perf_counter() - starts[name]))
        module.register_full_backward_pre_hook(lambda *_: starts.__setitem__(name + " (bwd)", time.perf_counter()))
        module.register_full_backward_hook(
            lambda *_: times.__setitem__(name + " (bwd)", times[name + " (bwd)"] + time.perf_counter() - starts[name + " (bwd)"]))

    for name, module in parts.items():
        hooks(name, module)
    t0 = time.perf_counter()
    out = model(features)
    t1 = time.perf_counter()
    loss = loss_fn(out, target)
    t2 = time.perf_counter()
    loss.backward()
    t3 = time.perf_counter()
    times["forward total"], times["loss"], times["backward total"] = t1 - t0, t2 - t1, t3 - t2
    return {k: 1000 * v for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = Sam2Rad(build_backbone(), num_classes=2)
    model.train()
    size = model.backbone.image_size
    features = {"embed": torch.randn(args.batch, 256, 64, 64).half()}
    target = {"masks": (torch.rand(args.batch, 2, size, size) > 0.7).float(),
              "boxes": torch.tensor([10.0, 10.0, 100.0, 120.0]).expand(args.batch, 2, 4).clone(),
              "present": torch.ones(args.batch, 2)}
    loss_fn = Sam2RadLoss(size, dice_weight=1.0)
    module_times(model, features, target, loss_fn)  # warm-up
    model.zero_grad()
    totals: dict[str, float] = defaultdict(float)
    for _ in range(args.steps):
        for k, v in module_times(model, features, target, loss_fn).items():
            totals[k] += v / args.steps
        model.zero_grad()
    rows = args.batch * 2
    step = totals["forward total"] + totals["loss"] + totals["backward total"]
    print(f"threads={torch.get_num_threads()} batch={args.batch} images x 2 classes = {rows} rows")
    print(f"one step: {step:.0f} ms = {step / rows:.0f} ms per image-class row")
    for k, v in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  {k:32s} {v:8.1f} ms  {100 * v / step:5.1f} %")


if __name__ == "__main__":
    main()
