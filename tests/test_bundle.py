"""The MONAI bundle end to end on its embedded sample: train (and resume after a kill), evaluate, torchrun."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

BUNDLE = Path(__file__).resolve().parents[1] / "bundle"
TORCHRUN = Path(sys.executable).with_name("torchrun")
pytestmark = pytest.mark.slow  # subprocess runs of the bundle: minutes on a CPU
SMALL = ["--num_train_images", "2", "--cache_views", "2", "--batch_size", "2", "--val_interval", "2"]  # epoch = 2 steps


def bundle_run(*args: str, timeout: int = 600, launcher: list[str] | None = None) -> str:
    cmd = (launcher or [sys.executable]) + ["-m", "monai.bundle", "run", *args]
    proc = subprocess.run(cmd, cwd=BUNDLE, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    return out


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bundle")
    return {"cache": root / "cache", "train": root / "train", "eval": root / "eval", "ddp": root / "ddp"}


def test_training_shows_progress_checkpoints_and_resumes_after_kill(run_dirs):
    out_dir, cache = run_dirs["train"], run_dirs["cache"]
    last = out_dir / "models" / "last.pt"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", "configs/train.json",
           "--max_steps", "40", "--output_dir", str(out_dir), "--cache_dir", str(cache), *SMALL]
    proc = subprocess.Popen(cmd, cwd=BUNDLE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 400
    while not last.is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)  # killed mid-run, after at least one epoch
    log = proc.communicate()[0]
    assert last.is_file(), log[-3000:]
    assert "/40 [" in log and "step" in log and "epoch=1/20" in log, "the progress bar counts steps and epochs"
    assert (out_dir / "models" / "model.pt").is_file(), "the best-by-validation model is saved"
    assert list((out_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert not [p for p in (out_dir / "models").iterdir() if p.name.startswith(".")], "no partial checkpoint"

    import torch

    epoch_killed = torch.load(last, weights_only=True)["epoch"]
    assert epoch_killed < 20
    # the modern `run` entry resumes from last.pt and trains only the epochs left
    resumed = bundle_run("--config_file", "configs/train.json", "--max_steps", str(2 * (epoch_killed + 1)),
                         "--output_dir", str(out_dir), "--cache_dir", str(cache), *SMALL)
    assert f"resumed from {last} at epoch {epoch_killed}" in resumed
    assert f"Epoch[{epoch_killed + 1}] Complete" in resumed
    assert "Epoch[1] Complete" not in resumed
    assert "views encoded now" in resumed and "0 of 4 views encoded now" in resumed, "the cache was reused"
    assert torch.load(last, weights_only=True)["epoch"] == epoch_killed + 1


def test_evaluation_writes_metrics_for_three_modes(run_dirs):
    model = run_dirs["train"] / "models" / "model.pt"
    if not model.is_file():
        pytest.skip("needs the training test's model")
    out = run_dirs["eval"]
    bundle_run("--config_file", "configs/evaluate.json", "--model_path", str(model), "--output_dir", str(out),
               "--split", "test")
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"lp", "bb+lp", "box"}
    for mode in metrics.values():
        assert set(mode) == {"nerve", "vessel"}
        for scores in mode.values():
            assert set(scores) == {"dice", "iou"} and 0 <= scores["iou"] <= scores["dice"] <= 100
    rows = (out / "per_image_lp.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 4 * 2  # header + 4 test frames x 2 classes
    assert len(list((out / "overlays").glob("*.png"))) == 4


@pytest.mark.skipif(not TORCHRUN.is_file(), reason="torchrun not installed beside this python")
def test_torchrun_two_processes_on_cpu(run_dirs):
    out = bundle_run("--config_file", "['configs/train.json','configs/multi_gpu_train.json']", "--max_steps", "2",
                     "--output_dir", str(run_dirs["ddp"]), "--cache_dir", str(run_dirs["cache"]), *SMALL,
                     launcher=[str(TORCHRUN), "--standalone", "--nnodes=1", "--nproc_per_node=2"])
    assert out.count("Epoch[1] Complete") >= 2  # trainer and evaluator of rank 0 at least
    assert (run_dirs["ddp"] / "models" / "model.pt").is_file()
    assert (run_dirs["ddp"] / "models" / "last.pt").is_file()


def test_single_class_dataset_trains_with_the_few_shot_recipe_and_evaluates(tmp_path):
    """A folder of 0/1 masks (the sample's nerve only) with ``--class_names "['lesion']"`` and nothing else changed."""
    import numpy as np
    from PIL import Image

    data = tmp_path / "lesion"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    sample = BUNDLE / "data" / "usgra_sample"
    for path in sorted((sample / "images").glob("*.png"))[:6]:
        (data / "images" / path.name).write_bytes(path.read_bytes())
        label = np.asarray(Image.open(sample / "masks" / path.name)) == 1
        Image.fromarray(label.astype(np.uint8)).save(data / "masks" / path.name)
    out_dir = tmp_path / "run"
    names = "['lesion']"
    log = bundle_run("training", "--config_file", "['configs/train.json','configs/few_shot.json']",
                     "--dataset_dir", str(data), "--class_names", names, "--num_train_images", "3",
                     "--cache_views", "2", "--batch_size", "2", "--max_steps", "4", "--val_interval", "2",
                     "--output_dir", str(out_dir), "--cache_dir", str(tmp_path / "cache"))
    assert "dense PPN prototypes set from 3 training images" in log
    model = out_dir / "models" / "model.pt"
    state = torch.load(model, map_location="cpu", weights_only=True)
    # the recipe's two ensemble members, with the self-support term at evaluation
    assert {k.split(".")[2] for k in state if k.startswith("ppn.trunks.")} == {"0", "1"}
    assert float(state["ppn.self_support"]) > 0
    bundle_run("--config_file", "configs/evaluate.json", "--model_path", str(model), "--dataset_dir", str(data),
               "--class_names", names, "--split", "val", "--output_dir", str(tmp_path / "eval"))
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(metrics) == {"lp", "bb+lp", "box"}
    assert all(set(scores) == {"lesion"} for scores in metrics.values())


def test_dicom_frames_train_and_evaluate_as_their_pngs(tmp_path):
    """A dataset folder of single-frame ultrasound DICOMs (the sample's grey frames wrapped by the project's
    PNG-to-DICOM writer) with PNG masks trains, and evaluates to the same Dice as the PNG frames themselves."""
    import csv

    from sam2rad_monai.io import png_frames_to_dicom_series

    sample = BUNDLE / "data" / "usgra_sample"
    split = {"0015": "train", "0022": "train", "0032": "train", "0018": "val", "0017": "test", "0031": "test"}
    roots = {kind: tmp_path / kind for kind in ("png", "dicom")}
    for kind, root in roots.items():
        (root / "images").mkdir(parents=True)
        (root / "masks").mkdir()
        with (root / "metadata.csv").open("w", newline="") as fh:
            csv.writer(fh).writerows([("id", "split"), *split.items()])
        for ident in split:
            png = sample / "images" / f"{ident}.png"
            (root / "masks" / png.name).write_bytes((sample / "masks" / png.name).read_bytes())
            if kind == "png":
                (root / "images" / png.name).write_bytes(png.read_bytes())
            else:
                wrapped = png_frames_to_dicom_series([png], tmp_path / "wrap" / ident)[0]
                wrapped.rename(root / "images" / f"{ident}.dcm")
    log = bundle_run("training", "--config_file", "['configs/train.json','configs/few_shot.json']",
                     "--dataset_dir", str(roots["dicom"]), "--num_train_images", "3", "--cache_views", "1",
                     "--batch_size", "2", "--max_steps", "2", "--val_interval", "2",
                     "--output_dir", str(tmp_path / "run"), "--cache_dir", str(tmp_path / "cache"))
    assert "dense PPN prototypes set from 3 training images" in log
    model = tmp_path / "run" / "models" / "model.pt"
    metrics = {}
    for kind, root in roots.items():
        bundle_run("--config_file", "configs/evaluate.json", "--model_path", str(model), "--dataset_dir", str(root),
                   "--split", "test", "--modes", "['lp','box']", "--output_dir", str(tmp_path / f"eval_{kind}"))
        metrics[kind] = json.loads((tmp_path / f"eval_{kind}" / "metrics.json").read_text())
    assert metrics["dicom"] == metrics["png"]
    assert metrics["png"]["box"]["nerve"]["dice"] > 50.0  # the frames were really read (a ground-truth box works)
