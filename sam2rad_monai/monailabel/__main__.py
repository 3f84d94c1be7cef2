"""``python -m sam2rad_monai.monailabel --studies <folder>``: start MONAI Label with the Sam2Rad app.

Every option after ``--`` goes to ``monailabel start_server`` unchanged. ``--app_path`` prints the app folder (for
``monailabel start_server --app <it>``) and exits.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import APP_DIR

COMPAT_DIR = Path(__file__).resolve().parent / "compat"


def server_env() -> dict[str, str]:
    """The environment for MONAI Label: the pydicom 3 import shim first on PYTHONPATH (see compat/)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(COMPAT_DIR), env.get("PYTHONPATH")) if p)
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sam2rad_monai.monailabel", description=__doc__)
    parser.add_argument("--studies", help="folder of 2D ultrasound images (PNG, JPEG, NIfTI, DICOM)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model_path", help="trained PPN (default: the bundle's models/model.pt); training writes it")
    parser.add_argument("--class_names", help="comma-separated, in label order (default nerve,vessel)")
    parser.add_argument("--backbone", help="litemedsam (default), mobilesam, sam or sam2")
    parser.add_argument("--backbone_variant")
    parser.add_argument("--checkpoint", help="backbone weights file (mobilesam / sam / sam2)")
    parser.add_argument("--runtime", help="torch (default), onnx or openvino: the exported CPU runtime for "
                                          "autonomous inference (its extra must be installed)")
    parser.add_argument("--app_path", action="store_true", help="print the app folder and exit")
    args, extra = parser.parse_known_args(argv)
    if args.app_path:
        print(APP_DIR)
        return 0
    if not args.studies:
        parser.error("--studies is required")
    try:
        import monailabel  # noqa: F401
    except ImportError:
        parser.error("MONAI Label is not installed: install the project with its 'label' extra")
    cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(APP_DIR), "--studies", args.studies, "--host", args.host,
           "--port", str(args.port)]
    for key in ("model_path", "class_names", "backbone", "backbone_variant", "checkpoint", "runtime"):
        if getattr(args, key):
            cmd += ["--conf", key, str(getattr(args, key))]
    cmd += [a for a in extra if a != "--"]
    os.execve(sys.executable, cmd, server_env())  # the server replaces this process (signals reach it)
    return 0


if __name__ == "__main__":
    sys.exit(main())
