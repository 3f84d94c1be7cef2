"""``sam2rad <job> [--key value ...]``: the everyday jobs without ``monai.bundle`` syntax.

Each job forwards to the bundle's own configs, so every ``--key value`` override of the bundle works unchanged and
relative paths stay relative to where the command is run::

    sam2rad train --dataset_dir /data/us                  # configs/train.json, run id "training"
    sam2rad train --few_shot --dataset_dir /data/us       # + configs/few_shot.json (10 labelled frames)
    sam2rad evaluate --model_path m.pt --dataset_dir /data/us --split test
    sam2rad infer --input /data/dicom --output_dir out --output_format dicomseg
    sam2rad export                                        # ONNX / OpenVINO graphs next to the model file
    sam2rad label --studies /data/frames                  # MONAI Label server (python -m sam2rad_monai.monailabel)

``--bundle <folder>`` names the bundle (default: the ``bundle`` folder of this checkout).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ["JOBS", "bundle_command", "main"]

#: job -> (config files, coarse first; the bundle's run id)
JOBS: dict[str, tuple[tuple[str, ...], str]] = {
    "train": (("train.json",), "training"),
    "evaluate": (("evaluate.json",), "run"),
    "infer": (("inference.json",), "run"),
    "export": (("inference.json",), "export"),
}
DEFAULT_BUNDLE = Path(__file__).resolve().parents[1] / "bundle"


def bundle_command(job: str, args: list[str], bundle: Path = DEFAULT_BUNDLE) -> list[str]:
    """The ``python -m monai.bundle run`` command line of ``job`` with ``args`` (bundle overrides) forwarded."""
    if job not in JOBS:
        raise ValueError(f"unknown job {job!r}; jobs are {sorted(JOBS) + ['label']}")
    configs, run_id = JOBS[job]
    if "--few_shot" in args:
        if job != "train":
            raise ValueError("--few_shot applies to 'train' only")
        args = [a for a in args if a != "--few_shot"]
        configs = (*configs, "few_shot.json")
    missing = [c for c in configs if not (bundle / "configs" / c).is_file()]
    if missing:
        raise ValueError(f"{bundle}: not a Sam2Rad bundle folder (no configs/{missing[0]}); pass --bundle <folder>")
    files = [(bundle / "configs" / c).as_posix() for c in configs]
    config = files[0] if len(files) == 1 else "[" + ",".join(repr(f) for f in files) + "]"
    return [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", config,
            "--bundle_root", bundle.as_posix(), *args]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    job, args = argv[0], argv[1:]
    bundle = DEFAULT_BUNDLE
    if "--bundle" in args:
        at = args.index("--bundle")
        if at + 1 >= len(args):
            print("ERROR --bundle needs a folder", file=sys.stderr)
            return 2
        bundle, args = Path(args[at + 1]).resolve(), args[:at] + args[at + 2:]
    if job == "label":
        from .monailabel.__main__ import main as label_main

        return label_main(args)
    try:
        command = bundle_command(job, args, bundle)
    except ValueError as err:
        print(f"ERROR {err}", file=sys.stderr)
        return 2
    os.execv(sys.executable, command)  # the bundle run replaces this process (its exit status is the job's)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
