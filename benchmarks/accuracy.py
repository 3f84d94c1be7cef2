"""Accuracy on the usgra-seg test split: zero-shot box vs learned prompts (lp) vs learned prompts + box (bb+lp).

    # train (optional) and evaluate every run through the bundle's own commands, then summarise
    uv run python benchmarks/accuracy.py --dataset_dir ../shared/datasets/usgra_nerve --runs_dir runs/accuracy \
        --full_steps 600 --seeds 0 1 2

Runs (each `python -m monai.bundle run ...` inside bundle/, logged to <runs_dir>/<name>.log):
  full        all training images of the split (validation carved out of train by the datalist, seed 0)
  10shot-s<k> the few-shot recipe (configs/few_shot.json, unchanged): 10 training images drawn with seed k
Each trained model is evaluated on the test split with configs/evaluate.json; a run whose model already exists
is not trained again. Results: <runs_dir>/accuracy.json and a markdown table on stdout (mean and spread over seeds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

BUNDLE = Path(__file__).resolve().parents[1] / "bundle"


def bundle(args: list[str], log: Path) -> None:
    cmd = [sys.executable, "-m", "monai.bundle", "run", *args]
    with log.open("a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        subprocess.run(cmd, cwd=BUNDLE, stdout=out, stderr=subprocess.STDOUT, check=True)


def train_and_evaluate(name: str, train_args: list[str], ns: argparse.Namespace,
                       configs: str = "configs/train.json") -> dict:
    run_dir = ns.runs_dir / name
    model = run_dir / "models" / "model.pt"
    log = ns.runs_dir / f"{name}.log"
    if not model.is_file() or (run_dir / "models" / "last.pt").is_file() and ns.resume:
        bundle(["--config_file", configs, "--dataset_dir", str(ns.dataset_dir), "--cache_dir",
                str(ns.cache_dir), "--output_dir", str(run_dir), *train_args], log)
    bundle(["--config_file", "configs/evaluate.json", "--dataset_dir", str(ns.dataset_dir), "--model_path",
            str(model), "--output_dir", str(run_dir / "eval"), "--split", "test"], log)
    return json.loads((run_dir / "eval" / "metrics.json").read_text())


def summarise(results: dict[str, dict]) -> dict:
    """Mean and population spread over the few-shot seeds, per mode and class."""
    few = [r for name, r in results.items() if name.startswith("10shot")]
    summary = {"full": results.get("full")}
    if few:
        summary["10shot"] = {
            mode: {cls: {metric: {"mean": round(statistics.mean(r[mode][cls][metric] for r in few), 2),
                                  "std": round(statistics.pstdev(r[mode][cls][metric] for r in few), 2)}
                         for metric in ("dice", "iou")} for cls in few[0][mode]} for mode in few[0]}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_dir", type=Path, required=True)
    parser.add_argument("--runs_dir", type=Path, default=BUNDLE / "runs" / "accuracy")
    parser.add_argument("--cache_dir", type=Path, default=BUNDLE / "cache")
    parser.add_argument("--full_steps", type=int, default=600)
    parser.add_argument("--learning_rate", type=float, default=3e-4, help="of the full-data run")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--skip_full", action="store_true")
    parser.add_argument("--resume", action="store_true", help="continue runs that have a last.pt")
    ns = parser.parse_args()
    ns.runs_dir, ns.dataset_dir, ns.cache_dir = ns.runs_dir.resolve(), ns.dataset_dir.resolve(), ns.cache_dir.resolve()
    ns.runs_dir.mkdir(parents=True, exist_ok=True)
    common = ["--learning_rate", str(ns.learning_rate)]
    results: dict[str, dict] = {}
    if not ns.skip_full:
        results["full"] = train_and_evaluate("full", ["--max_steps", str(ns.full_steps), "--cache_views", "2",
                                                      *common], ns)
    for seed in ns.seeds:
        results[f"10shot-s{seed}"] = train_and_evaluate(f"10shot-s{seed}", ["--seed", str(seed)], ns,
                                                        "['configs/train.json','configs/few_shot.json']")
    summary = {"runs": results, "summary": summarise(results)}
    (ns.runs_dir / "accuracy.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary["summary"], indent=2))


if __name__ == "__main__":
    main()
