"""Non-SAM baseline: a MONAI UNet trained from scratch, scored with the project's split, preprocessing and metrics.

    uv run python benchmarks/unet_baseline.py --dataset_dir DATA --epochs 45 --output benchmarks/results/unet_full.json
    uv run python benchmarks/unet_baseline.py --dataset_dir DATA --num_images 10 --seed 1 --epochs 300 \\
        --val_every 5 --output benchmarks/results/unet_10img_seed1.json

Same pieces as Sam2Rad, so the comparison is fair:

- split: :func:`sam2rad_monai.data.build_datalist` (``train`` / ``val`` carved from train / ``test``); the best
  epoch is chosen on ``val`` (mean Dice over classes), never on ``test``;
- input: :func:`~sam2rad_monai.transforms.preprocessing_transforms` at 256 (resize longest side, scale to [0, 1],
  zero-pad), computed once and kept in memory; the paper's augmentation
  (:func:`~sam2rad_monai.transforms.augmentation_transforms`; ``--rotate_degrees`` / ``--no_vertical_flip`` give
  the ultrasound-geometry variant) is applied online to the training samples;
- scoring: at each frame's original resolution: predict at 256, crop the padding (``input_size``), resize the
  logits bilinearly to ``original_size``, argmax, and compare with the original mask using
  :class:`~sam2rad_monai.metrics.SegmentationScores` (a prediction on a frame without the class is a false
  positive).

Model: ``UNet(2D, 3 -> 3 channels, channels 16..256, strides 2 x 4, 2 residual units)``, ``DiceCELoss`` (softmax,
one-hot targets), AdamW lr 1e-3, batch 8. Runs on CPU by default; ``--threads`` caps torch's threads.
``--device cuda`` trains, predicts and resizes the logits on the GPU (augmentation and scoring stay on the CPU);
the GPU's name is recorded. cuDNN's defaults are kept (TF32 convolutions,
non-deterministic kernels), so a GPU run is not bit-identical to a CPU run or to a rerun.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import CacheDataset
from monai.losses import DiceCELoss
from monai.networks.nets import BasicUNetPlusPlus, UNet
from monai.transforms import Compose
from PIL import Image

from sam2rad_monai.data import build_datalist
from sam2rad_monai.metrics import SegmentationScores
from sam2rad_monai.transforms import augmentation_transforms, preprocessing_transforms

CLASS_NAMES = ("nerve", "vessel")
SIZE = 256


def build_unet(arch: str = "unet") -> torch.nn.Module:
    """The baseline network: 3-channel input, background + 2 classes out; ``unet`` or ``unetpp`` (MONAI's
    ``BasicUNetPlusPlus`` with its default features, no deep supervision)."""
    if arch == "unetpp":
        return _FirstOutput(BasicUNetPlusPlus(spatial_dims=2, in_channels=3, out_channels=len(CLASS_NAMES) + 1))
    if arch != "unet":
        raise ValueError(f"arch must be unet or unetpp, got {arch!r}")
    return UNet(
        spatial_dims=2,
        in_channels=3,
        out_channels=len(CLASS_NAMES) + 1,
        channels=(16, 32, 64, 128, 256),
        strides=(2, 2, 2, 2),
        num_res_units=2,
    )


class _FirstOutput(torch.nn.Module):
    """BasicUNetPlusPlus returns a list of outputs (one without deep supervision): the network as a tensor map."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[0]


def _plain(value: Any) -> Any:
    """A plain ``torch.Tensor`` (no MetaTensor metadata) for tensors, the value itself otherwise."""
    return value.as_tensor() if hasattr(value, "as_tensor") else value


def preprocess(entries: list[dict[str, str]]) -> list[dict[str, Any]]:
    """Run the deterministic preprocessing once; keep image, label, sizes, id and the mask path in memory."""
    pre = preprocessing_transforms(SIZE, (0, 0, 0), (255, 255, 255), len(CLASS_NAMES), with_targets=False)
    cached = CacheDataset(entries, transform=pre, cache_rate=1.0, num_workers=0, progress=False)
    out = []
    for entry, item in zip(entries, cached):
        out.append(
            {
                "id": entry["id"],
                "mask_path": entry["label"],
                "image": _plain(item["image"]).float(),
                "label": _plain(item["label"]),
                "input_size": tuple(int(v) for v in item["input_size"]),
                "original_size": tuple(int(v) for v in item["original_size"]),
            }
        )
    return out


def augmented_batch(samples: list[dict[str, Any]], augment: Compose) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment each cached sample (on a copy) and stack images (B, 3, S, S) and labels (B, 1, S, S)."""
    images, labels = [], []
    for s in samples:
        out = augment({"image": s["image"].clone(), "label": s["label"].clone()})
        images.append(_plain(out["image"]).float())
        labels.append(_plain(out["label"]).long())
    return torch.stack(images), torch.stack(labels)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, samples: list[dict[str, Any]], batch_size: int = 8, device: torch.device | str = "cpu"
) -> SegmentationScores:
    """Score the model (on ``device``) on ``samples`` at each frame's original resolution."""
    model.eval()
    scores = SegmentationScores(len(CLASS_NAMES), list(CLASS_NAMES))
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        logits = model(torch.stack([s["image"] for s in chunk]).to(device))
        for s, logit in zip(chunk, logits):
            h, w = s["input_size"]
            crop = logit[None, :, :h, :w]
            resized = F.interpolate(crop, size=s["original_size"], mode="bilinear", align_corners=False)
            # resize and argmax where the logits are: at full resolution they are most of an evaluation's CPU time
            pred = resized[0].argmax(0).to(torch.uint8).cpu().numpy()
            gt = np.array(Image.open(s["mask_path"]))
            if gt.shape != pred.shape:
                raise ValueError(f"{s['mask_path']}: mask {gt.shape} but original_size {s['original_size']}")
            scores.add(s["id"], pred, gt)
    return scores


def summarise(scores: SegmentationScores) -> dict[str, dict[str, Any]]:
    """Per class name: Dice/IoU (percent, empty-mask policy) and the extra fields of ``summary()``."""
    out = {}
    for stats in scores.summary().values():
        name = stats["name"]
        out[name] = {k: (round(v, 4) if isinstance(v, float) and not math.isnan(v) else v)
                     for k, v in stats.items() if k != "name"}
    return out


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Train on ``train``, keep the best ``val`` epoch, score it on ``test``; return the result record."""
    t0 = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but torch sees no CUDA device")
    lists = build_datalist(args.dataset_dir, num_images=args.num_images, seed=args.seed)
    train_set, val_set, test_set = (preprocess(lists[k]) for k in ("train", "val", "test"))
    print(f"train {len(train_set)}, val {len(val_set)}, test {len(test_set)}; "
          f"preprocessing {time.perf_counter() - t0:.1f}s", flush=True)

    torch.manual_seed(args.seed)
    model = build_unet(args.arch).to(device)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    # targets (boxes) are not needed by a UNet
    augment = augmentation_transforms(SIZE, rotate_degrees=args.rotate_degrees, vertical_flip=not args.no_vertical_flip)
    augment.set_random_state(seed=args.seed)
    order_rng = torch.Generator().manual_seed(args.seed)

    best = {"val_mean_dice": -1.0, "epoch": 0}
    best_state = copy.deepcopy(model.state_dict())
    history = []
    t_train = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        model.train()
        order = torch.randperm(len(train_set), generator=order_rng).tolist()
        losses = []
        for start in range(0, len(order), args.batch_size):
            images, labels = augmented_batch([train_set[i] for i in order[start : start + args.batch_size]], augment)
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(images), labels)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        record: dict[str, Any] = {"epoch": epoch, "loss": round(float(np.mean(losses)), 5)}
        if epoch % args.val_every == 0 or epoch == args.epochs:
            val_dice = evaluate(model, val_set, device=device).mean_dice()
            record["val_mean_dice"] = round(val_dice, 3)
            if val_dice > best["val_mean_dice"]:
                best = {"val_mean_dice": round(val_dice, 4), "epoch": epoch}
                best_state = copy.deepcopy(model.state_dict())
        record["elapsed_s"] = round(time.perf_counter() - t0, 1)
        history.append(record)
        print(json.dumps(record), flush=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_s = time.perf_counter() - t_train

    model.load_state_dict(best_state)
    if args.save_model:
        # CPU tensors, so the file loads without a GPU
        torch.save({k: v.cpu() for k, v in best_state.items()}, args.save_model)
    test_scores = evaluate(model, test_set, device=device)
    if args.per_image_csv:
        test_scores.write_csv(args.per_image_csv)
    result: dict[str, Any] = summarise(test_scores)
    result.update(
        {
            "mean_dice": round(test_scores.mean_dice(), 4),
            "units": "percent; per-class mean over test frames at original resolution, empty-mask policy",
            "model": ("monai UNet(16,32,64,128,256; strides 2x4; 2 res units)" if args.arch == "unet" else
                      "monai BasicUNetPlusPlus(default features 32,32,64,128,256,32)") + ", from scratch",
            "num_images": args.num_images if args.num_images is not None else len(train_set),
            "seed": args.seed,
            "n_train": len(train_set),
            "n_val": len(val_set),
            "n_test": len(test_set),
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "augmentation": {"rotate_degrees": args.rotate_degrees, "vertical_flip": not args.no_vertical_flip},
            "best_epoch": best["epoch"],
            "best_val_mean_dice": best["val_mean_dice"],
            "train_time_s": round(train_s, 1),
            "total_time_s": round(time.perf_counter() - t0, 1),
            "torch_threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(),
            "device": args.device,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "torch_version": torch.__version__,
            "history": history,
        }
    )
    return result


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset_dir", required=True, help="folder with images/, masks/ and metadata.csv")
    p.add_argument("--num_images", type=int, default=None, help="few-shot: this many training images")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, few-shot draw, init and augmentation")
    p.add_argument("--epochs", type=int, default=45)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--val_every", type=int, default=1, help="validate every N epochs (and after the last)")
    p.add_argument("--rotate_degrees", type=float, default=90.0, help="augmentation's rotation range (the paper: 90)")
    p.add_argument("--no_vertical_flip", action="store_true", help="augmentation without upside-down flips")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the network trains and predicts")
    p.add_argument("--arch", choices=("unet", "unetpp"), default="unet", help="UNet or UNet++ (BasicUNetPlusPlus)")
    p.add_argument("--save_model", default=None, help="write the best-validation state_dict here")
    p.add_argument("--output", required=True, help="result JSON path")
    p.add_argument("--per_image_csv", default=None, help="optional per-image test scores CSV")
    p.add_argument("--machine", default=None, help="machine description to record (e.g. lscpu model name)")
    return p.parse_args()


def main() -> None:
    """Run one benchmark configuration and write its JSON."""
    args = parse_args()
    torch.set_num_threads(args.threads)
    result = train(args)
    if args.machine:
        result["machine"] = args.machine
    if result["gpu"]:
        result["machine"] = f"{result['machine']}, GPU {result['gpu']}"
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    tmp.replace(out)
    print(json.dumps({k: result[k] for k in (*CLASS_NAMES, "mean_dice", "best_epoch", "total_time_s")}, indent=2))


if __name__ == "__main__":
    main()
