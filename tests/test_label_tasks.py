"""Pieces of the MONAI Label app that need no server: frame reading, label files, settings, the pydicom shim."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("monailabel")

from sam2rad_monai.io import png_frames_to_dicom_series, read_nifti_labelmap  # noqa: E402
from sam2rad_monai.monailabel.__main__ import COMPAT_DIR, server_env  # noqa: E402
from sam2rad_monai.monailabel.tasks import AppSettings, read_frame, write_label  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[1] / "bundle" / "data" / "usgra_sample"  # CC BY 4.0, see its README


def test_dicom_and_png_frames_read_the_same(tmp_path):
    png = SAMPLE / "images" / "0017.png"
    (dicom,) = png_frames_to_dicom_series([png], tmp_path / "series")
    from_png, from_dicom = read_frame(png), read_frame(dicom)
    assert from_png.shape == from_dicom.shape == (*np.asarray(Image.open(png)).shape[:2], 3)
    assert np.array_equal(from_png, from_dicom)


def test_unreadable_study_names_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ValueError, match="broken.png"):
        read_frame(bad)


@pytest.mark.parametrize("extension", [".nii.gz", ".png"])
def test_label_files_read_back(extension):
    label_map = np.zeros((30, 40), np.uint8)
    label_map[5:10, 20:35] = 2
    path = Path(write_label(label_map, extension))
    try:
        back = read_nifti_labelmap(path) if extension == ".nii.gz" else np.asarray(Image.open(path))
        assert np.array_equal(back, label_map)
    finally:
        path.unlink()
    with pytest.raises(ValueError, match="result_extension"):
        write_label(label_map, ".jpg")


def test_settings_from_conf(tmp_path):
    s = AppSettings.from_conf({"model_path": str(tmp_path / "m.pt"), "class_names": "nerve, vessel, tendon"},
                              str(tmp_path))
    assert s.labels == {"nerve": 1, "vessel": 2, "tendon": 3}
    assert s.cache_dir == tmp_path / "cache"


def test_monailabel_imports_under_pydicom3_with_the_shim():
    code = "import monailabel.interfaces.app, pydicom_seg; print('ok')"
    env = server_env()
    assert env["PYTHONPATH"].split(":")[0] == str(COMPAT_DIR)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.stdout.strip() == "ok", done.stderr[-2000:]
