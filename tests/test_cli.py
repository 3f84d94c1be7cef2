"""The ``sam2rad`` command (sam2rad_monai.cli): jobs forward to the bundle configs with their overrides."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sam2rad_monai.cli import DEFAULT_BUNDLE, bundle_command

SAMPLE = DEFAULT_BUNDLE / "data" / "usgra_sample"  # CC BY 4.0, see its README


def test_jobs_map_to_bundle_configs_and_run_ids(tmp_path: Path) -> None:
    cmd = bundle_command("train", ["--few_shot", "--seed", "1"])
    at = cmd.index("run")
    assert cmd[at + 1] == "training" and cmd[-2:] == ["--seed", "1"] and "--few_shot" not in cmd
    config = cmd[cmd.index("--config_file") + 1]
    assert config.startswith("[") and config.endswith("few_shot.json']") and "train.json" in config
    assert cmd[cmd.index("--bundle_root") + 1] == DEFAULT_BUNDLE.as_posix()
    assert bundle_command("export", [])[at + 1] == "export"
    with pytest.raises(ValueError, match="unknown job 'evaluat'"):
        bundle_command("evaluat", [])
    with pytest.raises(ValueError, match="--few_shot applies to 'train' only"):
        bundle_command("evaluate", ["--few_shot"])
    with pytest.raises(ValueError, match="not a Sam2Rad bundle folder"):
        bundle_command("train", [], bundle=tmp_path)


def test_evaluate_from_another_folder_writes_metrics(tmp_path: Path) -> None:
    exe = shutil.which("sam2rad", path=str(Path(sys.executable).parent))
    assert exe, "the sam2rad console script is installed with the project"
    done = subprocess.run([exe, "evaluate", "--dataset_dir", str(SAMPLE), "--split", "test", "--modes", "['lp']",
                           "--output_dir", "eval"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())  # relative to where it was run
    assert set(metrics["lp"]) == {"nerve", "vessel"}
    assert all(0.0 <= v["dice"] <= 100.0 for v in metrics["lp"].values())
