"""Where do learned prompts lose against the ground-truth box? Component diagnostics of a trained PPN.

    uv run python benchmarks/prompt_diagnostics.py --model_path bundle/models/model.pt --box_source mask \
        --dataset_dir ../shared/datasets/usgra_nerve --cache_dir bundle/cache --output benchmarks/results/x.json

On the validation split (view 0 of the bundle's feature cache, seed 0: never the test split), for every
(image, class) with the class present, at the decoder's 256 x 256 grid of the padded input:

- ``objectness``: the PPN's presence probability;
- ``box_iou``: IoU of the box the decoder was given with the true box;
- ``mask_prompt``: Dice of the mask prompt (logit > 0);
- ``lp``: Dice of the autonomous prediction (the mean of the decoder's and the mask prompt's logits);
- ``lp_decoder_only``: the same prediction before that fusion (the decoder's own output);
- ``learned_box_only``: the frozen decoder prompted with the learned box alone (no tokens, no mask prompt);
- ``region_box_only``: the same with the box of the mask prompt's substantial regions (:func:`region_boxes`);
- ``gt_box_plus_lp``: learned prompts plus the true box (bb+lp);
- ``gt_box_only``: the true box alone (the zero-shot baseline).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from torchvision.ops import box_iou

from sam2rad_monai.backbones import build_backbone, read_state_dict
from sam2rad_monai.data import build_datalist
from sam2rad_monai.engine.cache import CachedFeatureDataset, FeatureCache
from sam2rad_monai.model import Prompts, Sam2Rad
from sam2rad_monai.ppn import region_boxes

CLASSES = ("nerve", "vessel")


def dice(pred: np.ndarray, true: np.ndarray) -> float:
    return float(2 * (pred & true).sum() / max(1, pred.sum() + true.sum()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", required=True)
    parser.add_argument("--box_source", default="mask", choices=["mask", "query"])
    parser.add_argument("--dataset_dir", default="../shared/datasets/usgra_nerve")
    parser.add_argument("--cache_dir", default="bundle/cache")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()

    torch.manual_seed(0)
    backbone = build_backbone("litemedsam")
    model = Sam2Rad(backbone, len(CLASSES), box_source=args.box_source).eval()
    model.load_ppn_state_dict(read_state_dict(args.model_path))  # takes a LoRA decoder update too
    data = build_datalist(args.dataset_dir, seed=0)["val"]
    dataset = CachedFeatureDataset(data, FeatureCache(args.cache_dir, backbone, len(CLASSES), seed=0), 1,
                                   random_view=False)
    dataset.prepare()
    size = backbone.image_size
    scores: dict[str, list[list[float]]] = {}

    def add(key: str, c: int, value: float) -> None:
        scores.setdefault(key, [[] for _ in CLASSES])[c].append(value)

    with torch.no_grad():
        for item in dataset:
            features = {k: v[None].float() for k, v in item["features"].items()}
            out = model(features)

            def decode(box: list[float], c: int, with_learned: bool) -> np.ndarray:
                boxes = torch.tensor(box, dtype=torch.float32).reshape(1, 1, 4).repeat(1, len(CLASSES), 1)
                res = model(features, Prompts(boxes=boxes), mode="refine" if with_learned else "manual")
                return res["logits"][0, c].numpy() > 0

            for c in range(len(CLASSES)):
                if item["present"][c] < 0.5:
                    continue
                true = item["masks"][c].numpy() > 0.5
                gt_box = item["boxes"][c].float().tolist()  # inclusive corner indices, as a user's box
                true_box = (item["boxes"][c].float() + torch.tensor([0.0, 0.0, 1.0, 1.0])).tolist()  # pixel edges
                learned_box = (out["boxes"][0, c] * size).tolist()
                region_box = (region_boxes(out["mask_prompts"][0, c][None] > 0)[0] * size).tolist()
                add("objectness", c, float(out["objectness"][0, c].sigmoid()))
                add("box_iou", c, float(box_iou(torch.tensor([learned_box]), torch.tensor([true_box]))[0, 0]))
                add("mask_prompt", c, dice(out["mask_prompts"][0, c].numpy() > 0, true))
                add("lp", c, dice(out["logits"][0, c].numpy() > 0, true))
                add("lp_decoder_only", c, dice(out["decoder_logits"][0, c].numpy() > 0, true))
                add("learned_box_only", c, dice(decode(learned_box, c, False), true))
                add("region_box_only", c, dice(decode(region_box, c, False), true))
                add("gt_box_plus_lp", c, dice(decode(gt_box, c, True), true))
                add("gt_box_only", c, dice(decode(gt_box, c, False), true))

    summary = {key: {name: round(float(np.mean(v[c])), 4) for c, name in enumerate(CLASSES)}
               for key, v in scores.items()}
    for key, row in summary.items():
        print(f"{key:18s} " + "  ".join(f"{name} {value:.3f}" for name, value in row.items()))
    if args.output:
        result = {"model_path": Path(args.model_path).name, "box_source": args.box_source, "split": "val",
                  "rows_per_class": {name: len(scores["lp"][c]) for c, name in enumerate(CLASSES)},
                  "mean": summary}
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
