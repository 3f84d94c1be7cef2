"""Where the time of one PPN training step goes (cached LiteMedSAM features, forward + backward).

    uv run python benchmarks/profile_ppn.py [--batch 4] [--steps 3]

Prints the per-module split of one step (forward + backward), per image-class row, then the time of the same step
under bf16 autocast (the trainer's ``bf16`` setting) against fp32, measured in the same run.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch

from sam2rad_monai.backbones import build_backbone
from sam2rad_monai.engine.inferers import Sam2RadInferer, bf16_supported
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


def step_seconds(model: Sam2Rad, features: dict, target: dict, loss_fn: Sam2RadLoss, bf16: bool, steps: int
                 ) -> float:
    """Mean wall time of a full training step (forward, loss, backward) without hooks."""
    inferer = Sam2RadInferer(bf16=bf16)
    for _ in range(2):  # warm-up: oneDNN builds its kernels for each dtype on first use
        model.zero_grad()
        loss_fn(inferer(features, model), target).backward()
    start = time.perf_counter()
    for _ in range(steps):
        model.zero_grad()
        loss_fn(inferer(features, model), target).backward()
    return (time.perf_counter() - start) / steps


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
    fp32 = step_seconds(model, features, target, loss_fn, False, args.steps)
    bf16 = step_seconds(model, features, target, loss_fn, True, args.steps)
    print(f"step without hooks: fp32 {fp32:.2f} s, bf16 autocast {bf16:.2f} s (fp32 / bf16 = {fp32 / bf16:.2f}; "
          f"native bf16 on this device: {bf16_supported('cpu')})")


if __name__ == "__main__":
    main()
