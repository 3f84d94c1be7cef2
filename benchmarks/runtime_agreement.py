"""Do the exported runtimes give PyTorch's masks? Frame-by-frame Dice between label maps on a test split.

    uv run python benchmarks/runtime_agreement.py --dataset_dir ../shared/datasets/usgra_nerve \\
        --model_path bundle/models/model.pt --runtimes onnx,openvino \\
        --output benchmarks/results/runtime_agreement.json

Every frame of the split is segmented in autonomous mode by PyTorch and by each exported runtime (the graphs are
exported next to the model file, or rebuilt there when stale); per class, the Dice between the two label maps is
taken frame by frame (1 where both are empty), and the minimum and mean over frames are printed, with the number
of pixels that differ in all. Agreement with the ground truth is ``configs/evaluate.json``'s job (run it with
``--runtime``); this checks that a runtime changes nothing.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from sam2rad_monai.data import build_datalist
from sam2rad_monai.engine.evaluation import load_frame
from sam2rad_monai.inference import Sam2RadPredictor


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean maps; 1 where both are empty."""
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset_dir", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--model_path", default="bundle/models/model.pt")
    p.add_argument("--class_names", default="nerve,vessel")
    p.add_argument("--runtimes", default="onnx")
    p.add_argument("--output", default=None)
    args = p.parse_args()
    names = args.class_names.split(",")
    data = build_datalist(args.dataset_dir, split=args.split, seed=0)
    frames = [load_frame(item)[0] for item in data]
    reference = Sam2RadPredictor.from_checkpoint(args.model_path, len(names))
    start = time.perf_counter()
    expected = reference.predict(frames)
    results: dict[str, dict] = {"frames": len(frames), "torch_s": round(time.perf_counter() - start, 1)}
    for runtime in args.runtimes.split(","):
        fast = Sam2RadPredictor(reference.model, runtime=runtime, model_path=args.model_path)
        start = time.perf_counter()
        got = fast.predict(frames)
        seconds = time.perf_counter() - start
        row: dict[str, object] = {"s": round(seconds, 1)}
        for k, name in enumerate(names, start=1):
            scores = [dice(e.label_map == k, g.label_map == k) for e, g in zip(expected, got)]
            row[name] = {"min_dice": round(min(scores), 5), "mean_dice": round(float(np.mean(scores)), 5)}
        row["pixels_differing"] = int(sum((e.label_map != g.label_map).sum() for e, g in zip(expected, got)))
        results[runtime] = row
        print(runtime, row, flush=True)
    print(json.dumps(results, indent=1))
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
