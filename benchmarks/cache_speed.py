"""Training-epoch speed with and without the frozen-encoder feature cache, measured in one run.

    uv run python benchmarks/cache_speed.py --dataset_dir bundle/data/usgra_sample --images 8
    uv run python benchmarks/cache_speed.py --backbone sam2 --variant sam2.1_tiny --images 4

For one set of images it times, in the same process:
  1. an uncached epoch: preprocess + augment + encode + PPN/decoder forward and backward + optimiser step;
  2. a cached epoch: read the features from the cache + the same PPN/decoder step (encoder calls are counted: 0);
  3. the PPN/decoder step alone on features already in memory (the floor a cache can reach);
and prints the ratios, the encoder time per image against the PPN/decoder time per image, and the peak memory.
SAM / SAM2 run with random weights when no checkpoint is given: the speed does not depend on the weights.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import tempfile
import time
from pathlib import Path

import torch

from sam2rad_monai.backbones import build_backbone
from sam2rad_monai.data import build_datalist
from sam2rad_monai.engine.cache import CachedFeatureDataset, FeatureCache
from sam2rad_monai.engine.handlers import prepare_batch
from sam2rad_monai.losses import Sam2RadLoss
from sam2rad_monai.model import Sam2Rad
from sam2rad_monai.transforms import augment_view


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_dir", default="bundle/data/usgra_sample")
    parser.add_argument("--backbone", default="litemedsam")
    parser.add_argument("--variant", default=None)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)

    backbone = build_backbone(args.backbone, args.variant, args.checkpoint, pretrained=args.checkpoint is not None
                              or args.backbone == "litemedsam")
    model = Sam2Rad(backbone, num_classes=2).to(device).train()
    loss_fn = Sam2RadLoss(backbone.image_size, dice_weight=1.0)
    optimiser = torch.optim.AdamW(model.trainable_parameter_groups())
    items = build_datalist(args.dataset_dir, split="train")[: args.images]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    encoder_calls = 0
    encode = backbone.encode

    def counting_encode(images: torch.Tensor) -> dict[str, torch.Tensor]:
        nonlocal encoder_calls
        encoder_calls += images.shape[0]
        return encode(images)

    backbone.encode = counting_encode
    timers = {"encode": 0.0, "step": 0.0}

    def ppn_step(batch: dict) -> None:
        inputs, targets = prepare_batch(batch, device)
        sync()
        t = time.perf_counter()
        loss = loss_fn(model(inputs), targets)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        sync()
        timers["step"] += time.perf_counter() - t

    with tempfile.TemporaryDirectory() as tmp:
        cache = FeatureCache(tmp, backbone, num_classes=2, seed=0)
        base = [cache.preprocess(dict(item)) for item in items]
        # warm-up (first-call allocations, lazy imports)
        warm = augment_view(base[0], 1, 0, num_classes=2, transform=cache.augment)
        ppn_step({"image": torch.as_tensor(warm["image"])[None], **{k: torch.as_tensor(warm[k])[None]
                                                                   for k in ("masks", "boxes", "present")}})

        # 1. uncached epoch: augmentation + encoder + step, batch by batch
        timers.update(encode=0.0, step=0.0)
        t0 = time.perf_counter()
        for start in range(0, len(base), args.batch_size):
            views = [augment_view(b, 1, 0, num_classes=2, transform=cache.augment) for b in base[start:start + args.batch_size]]
            images = torch.stack([torch.as_tensor(v["image"]).float() for v in views]).to(device)
            sync()
            te = time.perf_counter()
            features = model.encode(images)
            sync()
            timers["encode"] += time.perf_counter() - te
            batch = {"features": features, **{k: torch.stack([torch.as_tensor(v[k]) for v in views])
                                              for k in ("masks", "boxes", "present")}}
            ppn_step(batch)
        uncached = time.perf_counter() - t0
        encode_time, uncached_step = timers["encode"], timers["step"]

        # fill the cache (not timed as an epoch: it is paid once per view)
        dataset = CachedFeatureDataset(items, cache, num_views=2)
        dataset.prepare()
        loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=False)

        # 2. cached epoch
        calls_before = encoder_calls
        timers["step"] = 0.0
        t0 = time.perf_counter()
        in_memory = []
        for batch in loader:
            in_memory.append(batch)
            ppn_step(batch)
        cached = time.perf_counter() - t0
        cached_step = timers["step"]
        encoder_calls_cached = encoder_calls - calls_before

        # 3. the step alone on features already in memory
        timers["step"] = 0.0
        for batch in in_memory:
            ppn_step(batch)
        step_only = timers["step"]

    n = len(items)
    result = {
        "backbone": backbone.identity().rsplit(":", 1)[0], "device": str(device),
        "machine": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "threads": torch.get_num_threads(), "images": n, "classes": 2, "batch_size": args.batch_size,
        "uncached_epoch_s": round(uncached, 2), "cached_epoch_s": round(cached, 2),
        "step_only_epoch_s": round(step_only, 2), "speedup_cached_vs_uncached": round(uncached / cached, 2),
        "cached_over_step_only": round(cached / step_only, 3), "encoder_calls_in_cached_epoch": encoder_calls_cached,
        "encoder_s_per_image": round(encode_time / n, 3), "ppn_decoder_s_per_image": round(step_only / n, 3),
        "ppn_decoder_s_per_row": round(step_only / (2 * n), 3),
        "encoder_over_ppn_decoder": round(encode_time / step_only, 2), "peak_memory_mb": round(peak_memory_mb(device)),
    }
    for k, v in result.items():
        print(f"{k:32s} {v}")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
