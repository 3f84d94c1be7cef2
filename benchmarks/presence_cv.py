"""Presence thresholds from a K-fold cross-validation of the training split.

A validation split of a few dozen frames holds few frames without a given structure (usgra's holds one frame
without the vessel), too few to choose a presence threshold on. This pools the held-out folds instead: every
labelled training frame is scored once by a model that did not train on it.

Steps (from ``bundle/``):

1. ``--make_folds``: split train + validation into K folds stratified by which classes each frame holds (seeded)
   and write ``fold{k}.json`` datalists;
2. train one model per fold with the bundle, the fold's datalist replacing the default one::

       uv run python -m monai.bundle run training --config_file "['configs/train.json','configs/few_shot.json']" \\
           --dataset_dir <data> --num_train_images '$None' --cache_views 2 --max_steps 2000 --val_interval 250 \\
           --self_support 0.0 --datalist "\\$__import__('json').load(open('<out>/fold0.json'))" --output_dir <out>/fold0

   (the full-data recipe since bundle 0.13: the few-shot overlay's two trunks, without its self-support term).

3. ``--score``: score every fold model on its held-out fold (:func:`~sam2rad_monai.engine.presence.held_out_rows`),
   pool the rows, choose per-class thresholds (:func:`~sam2rad_monai.engine.presence.presence_thresholds`) and then
   minimum regions (:func:`~sam2rad_monai.engine.presence.region_minimums`), write ``presence_cv.json``, and with
   ``--apply_to`` store them in a model file (presence offset and minimum regions). With more than one fold scored,
   it also reports each fold's held-out Dice under the rule chosen on the other folds (leave one fold out).
"""

from __future__ import annotations

import argparse
import json
import random
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from sam2rad_monai.data import build_datalist
from sam2rad_monai.engine.evaluation import load_frame
from sam2rad_monai.backbones import read_state_dict
from sam2rad_monai.engine.presence import (MIN_REGION_KEY, OFFSET_KEY, PresenceRow, held_out_rows, presence_summary,
                                           presence_thresholds, region_minimums, write_presence_rule)
from sam2rad_monai.inference import Sam2RadPredictor


def make_folds(dataset_dir: str, folds: int, num_classes: int, seed: int = 0) -> list[dict[str, list]]:
    """K datalists (``train`` = the other folds, ``val`` = this fold, ``test`` unchanged) over train + validation,
    each fold holding about the same share of every class-presence pattern (patterns of several classes at once,
    which MONAI's ``partition_dataset_classes`` with one label per item does not stratify on)."""
    data = build_datalist(dataset_dir, seed=seed)
    groups: dict[tuple[bool, ...], list] = defaultdict(list)
    for item in data["train"] + data["val"]:
        label = load_frame(item)[1]
        groups[tuple(bool((label == k).any()) for k in range(1, num_classes + 1))].append(item)
    rng, assigned, count = random.Random(seed), [[] for _ in range(folds)], 0
    for pattern in sorted(groups):
        members = groups[pattern]
        rng.shuffle(members)
        for item in members:
            assigned[count % folds].append(item)
            count += 1
    out = []
    for k in range(folds):
        held = sorted(assigned[k], key=lambda x: x["id"])
        rest = sorted((x for j in range(folds) if j != k for x in assigned[j]), key=lambda x: x["id"])
        out.append({"train": rest, "val": held, "test": data["test"]})
    return out


def leave_one_fold_out(by_fold: dict[int, list[PresenceRow]], num_classes: int) -> dict[str, dict]:
    """Per class: each fold's held-out mean Dice (%) with no rule and under the rule chosen on the other folds'
    rows, and the mean of folds of both."""
    out: dict[str, dict] = {str(c): {"folds": {}} for c in range(1, num_classes + 1)}
    for k, held in by_fold.items():
        others = [r for j, fold_rows in by_fold.items() if j != k for r in fold_rows]
        thresholds = presence_thresholds(others, num_classes)
        summary = presence_summary(held, thresholds, region_minimums(others, thresholds))
        for c, entry in summary.items():
            out[c]["folds"][k] = {key: entry[key] for key in ("threshold", "min_region", "dice_before", "dice_after",
                                                              "false_calls_after", "missed_after")}
    for entry in out.values():
        for key in ("dice_before", "dice_after"):
            entry[key] = float(np.mean([f[key] for f in entry["folds"].values()]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_dir", required=True)
    parser.add_argument("--output_dir", required=True, help="fold datalists, fold runs (fold{k}/) and results")
    parser.add_argument("--folds", type=int, default=4)
    parser.add_argument("--num_classes", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--make_folds", action="store_true")
    parser.add_argument("--score", action="store_true")
    parser.add_argument("--score_folds", type=int, nargs="*", default=None, help="folds to score (default: all)")
    parser.add_argument("--apply_to", nargs="*", default=[], help="model files whose presence offset to set")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.make_folds:
        for k, fold in enumerate(make_folds(args.dataset_dir, args.folds, args.num_classes, args.seed)):
            (out / f"fold{k}.json").write_text(json.dumps(fold, indent=1))
            print(f"fold {k}: {len(fold['train'])} training, {len(fold['val'])} held-out frames")
    if not args.score:
        return
    rows, encoder, by_fold = [], None, {}
    scored = args.score_folds if args.score_folds is not None else list(range(args.folds))
    for k in scored:
        saved = out / f"rows{k}.json"  # a fold's rows are kept, so a rerun scores only the folds it lacks
        kept = json.loads(saved.read_text()) if saved.is_file() else []
        if kept and all("region" in r for r in kept):  # rows saved before regions existed are scored again
            by_fold[k] = [PresenceRow(**r) for r in kept]
            rows += by_fold[k]
            continue
        held = json.loads((out / f"fold{k}.json").read_text())["val"]
        predictor = Sam2RadPredictor.from_checkpoint(out / f"fold{k}" / "models" / "model.pt", args.num_classes)
        if encoder is None:  # the frozen encoder is the same in every fold
            encoder = predictor
        frames = [load_frame(item)[0] for item in held]
        features, _ = encoder.encode(frames)
        fold_rows = held_out_rows(predictor, held, features)
        saved.write_text(json.dumps([asdict(r) for r in fold_rows]))
        by_fold[k] = fold_rows
        rows += fold_rows
        print(f"fold {k}: {len(held)} held-out frames scored")
    thresholds = presence_thresholds(rows, args.num_classes)
    minimums = region_minimums(rows, thresholds)
    report = {"folds": args.folds, "scored_folds": scored, "seed": args.seed,
              "classes": presence_summary(rows, thresholds, minimums), "rows": [asdict(r) for r in rows]}
    for c, entry in report["classes"].items():
        print(f"class {c}: threshold {entry['threshold']:.3f}, minimum region {entry['min_region']:.4f}; held-out "
              f"Dice {entry['dice_before']:.2f} -> {entry['dice_after']:.2f}; {entry}")
    if len(by_fold) > 1:  # how well the rule carries to frames it was not chosen on
        report["leave_one_fold_out"] = leave_one_fold_out(by_fold, args.num_classes)
        for c, entry in report["leave_one_fold_out"].items():
            print(f"class {c}, each fold's rule chosen on the others: held-out Dice, mean of folds "
                  f"{entry['dice_before']:.2f} (no rule) -> {entry['dice_after']:.2f}; by fold {entry['folds']}")
    (out / "presence_cv.json").write_text(json.dumps(report, indent=1))
    for path in args.apply_to:
        # the rule was measured on fold models without one, so it belongs on a file without one, never added to one
        state = read_state_dict(path)
        if any(bool(state.get(k, torch.zeros(1)).any()) for k in (OFFSET_KEY, MIN_REGION_KEY)):
            raise SystemExit(f"{path}: already carries a presence rule; apply the cross-validated one to an "
                             "uncalibrated model file")
        written = write_presence_rule(path, thresholds, minimums)
        print(f"presence offset += {thresholds.tolist()}, minimum regions {minimums.tolist()} in {written}")

if __name__ == "__main__":
    main()
