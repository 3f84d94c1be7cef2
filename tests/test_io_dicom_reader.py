"""Tests for sam2rad_monai.io.dicom: real US DICOM files, series folders and bad input.

DICOM files are read from the shared folder beside the repository (../shared/datasets/dicom_us: pydicom / pydicom-data
files, MIT; those tests skip, saying so, where it is absent). usgra frames come from the bundle's embedded sample (CC BY
4.0, Timm M. Kandaouroff, usgra-seg, 2025) and are wrapped into DICOM in a temporary folder.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import convert_color_space, pixel_array
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import ExplicitVRLittleEndian, JPEGLosslessSV1, generate_uid

from sam2rad_monai.io import (
    UltrasoundReadError,
    png_frames_to_dicom_series,
    png_frames_to_multiframe_dicom,
    read_ultrasound,
)
from tests.frames import GREY_IDS, SAMPLE, WIDE_RGB

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
DICOM_US = SHARED / "dicom_us"

needs_dicom_us = pytest.mark.skipif(
    not (DICOM_US / "manifest.csv").is_file(), reason=f"dataset folder {DICOM_US} is absent"
)


def _manifest() -> list[dict[str, str]]:
    if not (DICOM_US / "manifest.csv").is_file():
        return []
    with open(DICOM_US / "manifest.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _usgra_pngs(ids: tuple[str, ...] = GREY_IDS) -> list[Path]:
    return [SAMPLE / "images" / f"{i}.png" for i in ids]


def _grey(png: Path) -> np.ndarray:
    with Image.open(png) as img:
        return np.asarray(img.convert("L"))


# ------------------------------------------------------------------ real files


@needs_dicom_us
@pytest.mark.parametrize("row", _manifest(), ids=lambda r: r["file"])
def test_every_file_in_dicom_us_reads_as_the_manifest_says(row: dict[str, str]) -> None:
    img = read_ultrasound(DICOM_US / row["file"])
    frames, rows, cols = int(row["frames"]), int(row["rows"]), int(row["cols"])
    colour = row["samples_per_pixel"] == "3" or row["photometric"] == "PALETTE COLOR"
    assert img.is_color is colour
    assert img.frames.shape == ((frames, rows, cols, 3) if colour else (frames, rows, cols))
    assert img.frames.dtype in (np.uint8, np.uint16)
    assert img.rgb_uint8().shape == (frames, rows, cols, 3)
    assert img.rgb_uint8().dtype == np.uint8
    assert len(img.sources) == 1 and "PixelData" not in img.sources[0]
    if row["physical_delta_x_cm"]:
        assert img.spacing_mm is not None
        assert img.spacing_mm[1] == pytest.approx(float(row["physical_delta_x_cm"]) * 10, rel=1e-4)
    else:
        assert img.spacing_mm is None
    if row["frame_time_ms"]:
        assert img.frame_time_ms == pytest.approx(float(row["frame_time_ms"]))


@needs_dicom_us
def test_ybr_is_converted_to_rgb_exactly_once() -> None:
    unc = read_ultrasound(DICOM_US / "US1_UNCR.dcm").frames.astype(int)
    j2kr = read_ultrasound(DICOM_US / "US1_J2KR.dcm").frames.astype(int)  # YBR_RCT, lossless
    j2ki = read_ultrasound(DICOM_US / "US1_J2KI.dcm").frames.astype(int)  # YBR_ICT, lossy
    assert np.abs(unc - j2kr).max() <= 1
    assert np.abs(unc - j2ki).mean() < 5
    # JPEG baseline YBR_FULL_422: our RGB equals one YBR->RGB conversion of the raw planes.
    ds = pydicom.dcmread(DICOM_US / "examples_ybr_color.dcm")
    raw = pixel_array(ds, index=0, as_rgb=False)
    once = convert_color_space(raw, "YBR_FULL", "RGB").astype(int)
    twice = convert_color_space(once.astype(np.uint8), "YBR_FULL", "RGB").astype(int)
    ours = read_ultrasound(DICOM_US / "examples_ybr_color.dcm").frames[0].astype(int)
    assert np.abs(ours - once).max() <= 1
    assert np.abs(ours - twice).mean() > 10


@needs_dicom_us
def test_palette_planar_endianness_and_rle_variants_agree() -> None:
    def frames(name: str) -> np.ndarray:
        return read_ultrasound(DICOM_US / name).frames

    # Big endian palette LUTs are byte-swapped by pydicom 3.0 apply_color_lut; we undo that.
    assert np.array_equal(frames("OBXXXX1A.dcm"), frames("OBXXXX1A_expb.dcm"))
    assert np.array_equal(frames("OBXXXX1A_2frame.dcm"), frames("OBXXXX1A_expb_2frame.dcm"))
    assert np.array_equal(frames("OBXXXX1A.dcm"), frames("OBXXXX1A_rle.dcm"))
    assert np.array_equal(frames("color-pl.dcm"), frames("color-px.dcm"))


@needs_dicom_us
def test_sixteen_bit_palette_and_lossless_jpeg_grey() -> None:
    aloka = read_ultrasound(DICOM_US / "gdcm-US-ALOKA-16.dcm")
    assert aloka.frames.dtype == np.uint16 and aloka.bits_stored == 16
    assert 0 < aloka.rgb_uint8().mean() < 255
    # Dual view: the largest calibrated 2D region gives the spacing.
    assert len(aloka.regions) == 3
    assert aloka.spacing_mm == pytest.approx((0.38265, 0.38265), rel=1e-4)
    grey = read_ultrasound(DICOM_US / "JPGLosslessP14SV1_1s_1f_8b.dcm")
    assert not grey.is_color and grey.frames.shape == (1, 768, 1024)
    rgb = grey.rgb_uint8()
    assert np.array_equal(rgb[..., 0], grey.frames) and np.array_equal(rgb[..., 2], grey.frames)


# -------------------------------------------------------------------- wrapped


def test_series_folder_reads_in_instance_number_order(tmp_path: Path) -> None:
    pngs = _usgra_pngs()
    paths = png_frames_to_dicom_series(pngs, tmp_path / "gen", spacing_mm=(0.08, 0.07))
    folder = tmp_path / "series"
    folder.mkdir()
    # File names sort opposite to InstanceNumber, so only the header can order them.
    for path, name in zip(paths, ("c.dcm", "b.dcm", "a.dcm")):
        shutil.copy(path, folder / name)
    (folder / "README.txt").write_text("not DICOM, ignored")
    img = read_ultrasound(folder)
    assert img.frames.shape == (3, 512, 512) and not img.is_color
    for i, png in enumerate(pngs):
        assert np.array_equal(img.frames[i], _grey(png))
    assert [int(s.InstanceNumber) for s in img.sources] == [1, 2, 3]
    assert [p.name for p in img.paths] == ["c.dcm", "b.dcm", "a.dcm"]
    assert img.spacing_mm == pytest.approx((0.08, 0.07))
    assert not img.is_multiframe_instance


def test_series_without_instance_numbers_falls_back_to_time(tmp_path: Path) -> None:
    pngs = _usgra_pngs()
    paths = png_frames_to_dicom_series(pngs, tmp_path / "gen", frame_time_ms=40.0)
    folder = tmp_path / "series"
    folder.mkdir()
    for path, name in zip(paths, ("z.dcm", "y.dcm", "x.dcm")):
        ds = pydicom.dcmread(path)
        del ds.InstanceNumber
        ds.save_as(folder / name)
    img = read_ultrasound(folder)
    for i, png in enumerate(pngs):
        assert np.array_equal(img.frames[i], _grey(png))


def test_wrapped_multiframe_reads_back(tmp_path: Path) -> None:
    pngs = _usgra_pngs()
    path = png_frames_to_multiframe_dicom(pngs, tmp_path / "cine.dcm", spacing_mm=(0.1, 0.2), frame_time_ms=25.0)
    img = read_ultrasound(path)
    assert img.is_multiframe_instance and img.frames.shape == (3, 512, 512)
    assert img.frame_time_ms == pytest.approx(25.0)
    assert img.spacing_mm == pytest.approx((0.1, 0.2))
    assert np.array_equal(img.frames[2], _grey(pngs[2]))


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    path = png_frames_to_multiframe_dicom(_usgra_pngs()[:1], tmp_path / "m1.dcm")
    ds = pydicom.dcmread(path)
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(path)
    img = read_ultrasound(path)
    assert np.array_equal(img.frames[0], 255 - _grey(_usgra_pngs()[0]))


# ------------------------------------------------------------------ bad input


def _assert_one_line(err: pytest.ExceptionInfo[UltrasoundReadError], path: Path, *words: str) -> None:
    msg = str(err.value)
    assert "\n" not in msg
    assert path.name in msg
    for word in words:
        assert word in msg, msg


def test_garbage_bytes_are_not_dicom(tmp_path: Path) -> None:
    bad = tmp_path / "garbage.dcm"
    bad.write_bytes(b"this is not a DICOM file" * 20)
    with pytest.raises(UltrasoundReadError) as err:
        read_ultrasound(bad)
    _assert_one_line(err, bad, "not a DICOM file")
    assert isinstance(err.value, ValueError)


@needs_dicom_us
@pytest.mark.parametrize("name", ["US1_UNCR.dcm", "examples_ybr_color.dcm"])
@pytest.mark.parametrize("keep", [0.5, 0.02])
def test_truncated_file(tmp_path: Path, name: str, keep: float) -> None:
    data = (DICOM_US / name).read_bytes()
    cut = tmp_path / f"cut_{name}"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(UltrasoundReadError) as err:
        read_ultrasound(cut)
    _assert_one_line(err, cut, "truncated")


def test_structured_report_has_no_pixel_data(tmp_path: Path) -> None:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "SR"
    ds.PatientID = "X"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.ValueType = "CONTAINER"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = tmp_path / "report.dcm"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(UltrasoundReadError) as err:
        read_ultrasound(path)
    _assert_one_line(err, path, "no pixel data", "Basic Text SR")


@needs_dicom_us
def test_missing_decoder_names_transfer_syntax_and_package(monkeypatch: pytest.MonkeyPatch) -> None:
    decoder = get_decoder(JPEGLosslessSV1)
    monkeypatch.setattr(decoder, "_available", {})
    monkeypatch.setattr(decoder, "_unavailable", {"pylibjpeg": ("pylibjpeg", "pylibjpeg-libjpeg")})
    path = DICOM_US / "JPGLosslessP14SV1_1s_1f_8b.dcm"
    with pytest.raises(UltrasoundReadError) as err:
        read_ultrasound(path)
    _assert_one_line(err, path, "JPEG Lossless", str(JPEGLosslessSV1), "install", "pylibjpeg-libjpeg")


def test_unknown_photometric_interpretation(tmp_path: Path) -> None:
    path = png_frames_to_multiframe_dicom(_usgra_pngs()[:1], tmp_path / "odd.dcm")
    ds = pydicom.dcmread(path)
    ds.PhotometricInterpretation = "CMYK"
    ds.save_as(path)
    with pytest.raises(UltrasoundReadError) as err:
        read_ultrasound(path)
    _assert_one_line(err, path, "photometric interpretation", "CMYK")


def test_empty_and_missing_folders(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UltrasoundReadError) as err:
        read_ultrasound(empty)
    _assert_one_line(err, empty, "no DICOM files")
    with pytest.raises(UltrasoundReadError) as err:
        read_ultrasound(tmp_path / "nowhere")
    _assert_one_line(err, tmp_path / "nowhere", "no such file")


def test_folder_mixing_series_names_both_uids(tmp_path: Path) -> None:
    a = png_frames_to_dicom_series(_usgra_pngs()[:2], tmp_path / "a")
    b = png_frames_to_dicom_series(_usgra_pngs()[:1], tmp_path / "b")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for i, path in enumerate(a + b):
        shutil.copy(path, mixed / f"{i}.dcm")
    uids = {pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID for p in (a[0], b[0])}
    with pytest.raises(UltrasoundReadError) as err:
        read_ultrasound(mixed)
    _assert_one_line(err, mixed, "mixes 2 series", *uids)


def test_series_with_frames_of_different_sizes(tmp_path: Path) -> None:
    small = png_frames_to_dicom_series(_usgra_pngs()[:1], tmp_path / "a")[0]
    big_png = SAMPLE / "images" / f"{WIDE_RGB}.png"  # 761 x 632
    folder = tmp_path / "series"
    folder.mkdir()
    shutil.copy(small, folder / "1.dcm")
    ds = pydicom.dcmread(png_frames_to_dicom_series([big_png], tmp_path / "b")[0])
    ds.SeriesInstanceUID = pydicom.dcmread(small).SeriesInstanceUID
    ds.StudyInstanceUID = pydicom.dcmread(small).StudyInstanceUID
    ds.InstanceNumber = 2
    ds.save_as(folder / "2.dcm")
    with pytest.raises(UltrasoundReadError) as err:
        read_ultrasound(folder)
    _assert_one_line(err, folder / "2.dcm", "differs")
