"""MONAI Label app for labelling 2D ultrasound with Sam2Rad: auto and interactive inference, training on the
datastore's labels, and an uncertainty-driven active-learning strategy.

Start it with ``python -m sam2rad_monai.monailabel --studies <folder>`` (or ``monailabel start_server --app
<path printed by python -m sam2rad_monai.monailabel --app_path> --studies <folder>``).
"""

from pathlib import Path

APP_DIR = Path(__file__).resolve().parent / "app"
