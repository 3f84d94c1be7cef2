"""Tests for the writers: atomic helper, NIfTI, DICOM-SEG (dciodvfy-clean) and the PNG wrapper.

DICOM files are read from the shared folder beside the repository (../shared/datasets/dicom_us: pydicom / pydicom-data
files, MIT; those tests skip, saying so, where it is absent). usgra frames and masks come from the bundle's embedded
sample (CC BY 4.0, Timm M. Kandaouroff, usgra-seg, 2025) and are wrapped into DICOM in temp folders.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from PIL import Image
from pydicom.sr.codedict import codes

from sam2rad_monai.io import (
    UltrasoundImage,
    atomic_write_bytes,
    atomic_write_path,
    png_frames_to_dicom_series,
    png_frames_to_multiframe_dicom,
    read_dicom_seg_labelmap,
    read_nifti_labelmap,
    read_ultrasound,
    segment_property_codes,
    write_dicom_seg,
    write_nifti,
    write_nifti_like,
)
from sam2rad_monai.io import dicomseg as dicomseg_module
from sam2rad_monai.io.atomic import TEMP_PREFIX
from sam2rad_monai.inputs import read_frames
from tests.frames import GREY_IDS, SAMPLE, WIDE_RGB

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
DICOM_US = SHARED / "dicom_us"
CLASSES = ["nerve", "blood vessel"]  # usgra label values 1 and 2
DCIODVFY = shutil.which("dciodvfy")

needs_dicom_us = pytest.mark.skipif(not DICOM_US.is_dir(), reason=f"dataset folder {DICOM_US} is absent")


def _png(kind: str, ident: str) -> np.ndarray:
    with Image.open(SAMPLE / kind / f"{ident}.png") as img:
        return np.asarray(img.convert("L") if kind == "images" else img, dtype=np.uint8)


def _usgra_masks() -> np.ndarray:
    return np.stack([_png("masks", i) for i in GREY_IDS])


def _usgra_pngs() -> list[Path]:
    return [SAMPLE / "images" / f"{i}.png" for i in GREY_IDS]


def _dciodvfy(path: Path) -> str:
    if DCIODVFY is None:
        pytest.skip("dciodvfy (Debian dicom3tools) is not installed")
    done = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    return done.stdout + done.stderr


def _assert_dciodvfy_clean(path: Path) -> None:
    report = _dciodvfy(path)
    errors = [line for line in report.splitlines() if line.startswith("Error")]
    assert not errors, report


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(TEMP_PREFIX)]


@pytest.fixture(scope="module")
def io_usgra_series(tmp_path_factory: pytest.TempPathFactory) -> UltrasoundImage:
    folder = tmp_path_factory.mktemp("series")
    png_frames_to_dicom_series(_usgra_pngs(), folder, spacing_mm=(0.075, 0.075))
    return read_ultrasound(folder)


@pytest.fixture(scope="module")
def io_usgra_multiframe(tmp_path_factory: pytest.TempPathFactory) -> UltrasoundImage:
    path = tmp_path_factory.mktemp("cine") / "cine.dcm"
    png_frames_to_multiframe_dicom(_usgra_pngs(), path, spacing_mm=(0.075, 0.075), frame_time_ms=40.0)
    return read_ultrasound(path)


# ---------------------------------------------------------------------- atomic


def test_atomic_write_leaves_nothing_when_the_writer_raises(tmp_path: Path) -> None:
    target = tmp_path / "out" / "seg.nii.gz"
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_write_path(target) as tmp:
            tmp.write_bytes(b"half a file")
            raise RuntimeError("killed mid-way")
    assert not target.exists()
    assert _leftovers(target.parent) == []


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path: Path) -> None:
    target = atomic_write_bytes(tmp_path / "x.bin", b"old")
    with pytest.raises(OSError):
        with atomic_write_path(target) as tmp:
            tmp.write_bytes(b"new, partial")
            raise OSError("disk full")
    assert target.read_bytes() == b"old"
    assert atomic_write_bytes(target, b"new").read_bytes() == b"new"
    assert _leftovers(tmp_path) == []


def test_nifti_writer_failing_mid_way_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_save(img: nib.Nifti1Image, filename: str) -> None:
        Path(filename).write_bytes(b"\x5c\x01\x00\x00 partial header")
        raise OSError("simulated crash while writing")

    monkeypatch.setattr(nib, "save", broken_save)
    target = tmp_path / "mask.nii.gz"
    with pytest.raises(OSError, match="simulated crash"):
        write_nifti(np.zeros((4, 5), np.uint8), target)
    assert not target.exists() and _leftovers(tmp_path) == []


def test_seg_that_fails_its_read_back_check_is_not_written(
    tmp_path: Path, io_usgra_series: UltrasoundImage, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_pack(labels: np.ndarray, n_segments: int) -> bytes:
        good = real_pack(labels, n_segments)
        return bytes(len(good))  # all-empty masks: must be caught before writing

    real_pack = dicomseg_module._pack_binary_frames
    monkeypatch.setattr(dicomseg_module, "_pack_binary_frames", broken_pack)
    target = tmp_path / "seg.dcm"
    with pytest.raises(RuntimeError, match="does not read back"):
        write_dicom_seg(_usgra_masks(), io_usgra_series, CLASSES, target, backbone="sam", algorithm_version="1")
    assert not target.exists() and _leftovers(tmp_path) == []


# ----------------------------------------------------------------------- NIfTI


def test_nifti_cine_round_trip_and_itk_orientation(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=(3, 40, 60), dtype=np.uint8)
    path = write_nifti(labels, tmp_path / "cine.nii.gz", spacing_mm=(0.5, 0.25), frame_time_ms=40.0)
    img = nib.load(path)
    # 2D+t: NIfTI's fourth axis is time, its step the frame time in seconds
    assert img.shape == (60, 40, 1, 3) and img.get_data_dtype() == np.uint8
    assert img.header.get_zooms() == pytest.approx((0.25, 0.5, 1.0, 0.04))
    assert img.header.get_xyzt_units() == ("mm", "sec")
    assert np.array_equal(np.asanyarray(img.dataobj)[:, :, 0].T, labels)  # the documented transpose
    assert np.array_equal(read_nifti_labelmap(path), labels)
    assert np.allclose(img.affine, np.diag([-0.25, -0.5, 1.0, 1.0]))
    # ITK (ITK-SNAP, Slicer) sees the PNG/DICOM pixel grid: identity direction, time as the fourth axis
    itk = sitk.ReadImage(str(path))
    assert itk.GetDimension() == 4
    assert itk.GetSpacing() == pytest.approx((0.25, 0.5, 1.0, 0.04))
    assert np.array_equal(sitk.GetArrayFromImage(itk)[:, 0], labels)
    direction = np.asarray(itk.GetDirection()).reshape(4, 4)
    assert np.allclose(direction, np.eye(4))
    # without a frame time the step is 1 and its unit says it is unknown
    unknown = nib.load(write_nifti(labels, tmp_path / "cine2.nii.gz"))
    assert unknown.header.get_zooms()[3] == 1.0 and unknown.header.get_xyzt_units() == ("mm", "unknown")
    with pytest.raises(ValueError, match="frame_time_ms must be > 0"):
        write_nifti(labels, tmp_path / "bad.nii.gz", frame_time_ms=0.0)


def test_nifti_single_frame_is_2d_and_matches_itk_own_writer(tmp_path: Path) -> None:
    labels = np.zeros((30, 50), np.uint8)
    labels[3:9, 10:20] = 1
    path = write_nifti(labels, tmp_path / "frame.nii")
    img = nib.load(path)
    assert img.shape == (50, 30)
    assert np.array_equal(read_nifti_labelmap(path), labels)
    reference = tmp_path / "itk.nii"
    sitk.WriteImage(sitk.GetImageFromArray(labels), str(reference))
    assert np.allclose(img.affine, nib.load(reference).affine)
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(path))), labels)


def test_nifti_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="0..255"):
        write_nifti(np.full((2, 2), 300, np.int32), tmp_path / "a.nii")
    with pytest.raises(ValueError, match="integer"):
        write_nifti(np.zeros((2, 2), np.float32), tmp_path / "a.nii")
    with pytest.raises(ValueError, match=".nii"):
        write_nifti(np.zeros((2, 2), np.uint8), tmp_path / "a.png")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------- DICOM-SEG


def _check_seg_header(path: Path, source: UltrasoundImage, *, algorithm_type: str = "AUTOMATIC") -> pydicom.Dataset:
    ds = pydicom.dcmread(path)
    src = source.sources[0]
    assert ds.Modality == "SEG" and ds.SegmentationType == "BINARY"
    assert ds.Manufacturer == "sam2rad-monai"
    assert ds.PatientID == src.PatientID and ds.StudyInstanceUID == src.StudyInstanceUID
    assert "FrameOfReferenceUID" not in ds
    assert [int(s.SegmentNumber) for s in ds.SegmentSequence] == [1, 2]
    for segment in ds.SegmentSequence:
        assert segment.SegmentAlgorithmType == algorithm_type
        algo = segment.SegmentationAlgorithmIdentificationSequence[0]
        assert algo.AlgorithmName == "Sam2Rad" and algo.AlgorithmVersion == "0.3.1"
        assert "vit_b" in algo.AlgorithmParameters
    referenced = {r.ReferencedSOPInstanceUID for r in ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == {s.SOPInstanceUID for s in source.sources}
    assert int(ds.NumberOfFrames) == 2 * source.n_frames  # no empty frame omitted
    return ds


@needs_dicom_us
def test_seg_on_a_real_single_frame_file(tmp_path: Path) -> None:
    source = read_ultrasound(DICOM_US / "examples_rgb_color.dcm")
    labels = np.zeros((1, *source.shape_hw), np.uint8)
    labels[0, 40:90, 100:180] = 1
    labels[0, 120:160, 30:60] = 2
    path = write_dicom_seg(labels, source, CLASSES, tmp_path / "seg.dcm", backbone="sam_vit_b",
                           algorithm_version="0.3.1")
    _assert_dciodvfy_clean(path)
    assert np.array_equal(read_dicom_seg_labelmap(path, 2), labels)
    _check_seg_header(path, source)


def test_seg_on_a_wrapped_series(tmp_path: Path, io_usgra_series: UltrasoundImage) -> None:
    masks = _usgra_masks()
    path = write_dicom_seg(masks, io_usgra_series, CLASSES, tmp_path / "seg.dcm", backbone="sam_vit_b",
                           algorithm_version="0.3.1", semiautomatic=True)
    _assert_dciodvfy_clean(path)
    assert np.array_equal(read_dicom_seg_labelmap(path, 2), masks)
    ds = _check_seg_header(path, io_usgra_series, algorithm_type="SEMIAUTOMATIC")
    # Each SEG frame references its own source instance, in InstanceNumber order.
    refs = [f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
            for f in ds.PerFrameFunctionalGroupsSequence[:3]]
    assert refs == [s.SOPInstanceUID for s in io_usgra_series.sources]


def test_seg_on_a_wrapped_multiframe_references_frames(tmp_path: Path, io_usgra_multiframe: UltrasoundImage) -> None:
    masks = _usgra_masks()
    path = write_dicom_seg(masks, io_usgra_multiframe, CLASSES, tmp_path / "seg.dcm", backbone="sam_vit_b",
                           algorithm_version="0.3.1")
    _assert_dciodvfy_clean(path)
    assert np.array_equal(read_dicom_seg_labelmap(path, 2), masks)
    ds = _check_seg_header(path, io_usgra_multiframe)
    frames = [int(f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber)
              for f in ds.PerFrameFunctionalGroupsSequence]
    assert frames == [1, 2, 3, 1, 2, 3]
    pointers = [d.DimensionIndexPointer for d in ds.DimensionIndexSequence]
    assert pointers == [0x0062000B, 0x00209128]  # segment number, temporal position


@needs_dicom_us
@pytest.mark.filterwarnings("ignore:The string \"PLA\" is unlikely:UserWarning")  # the source's PatientName
def test_seg_on_a_real_cine(tmp_path: Path) -> None:
    source = read_ultrasound(DICOM_US / "examples_ybr_color.dcm")  # 30 frames, YBR JPEG
    labels = np.zeros((source.n_frames, *source.shape_hw), np.uint8)
    for f in range(source.n_frames):
        labels[f, 50 + f : 80 + f, 100:140] = 1 + f % 2
    path = write_dicom_seg(labels, source, ["artery", "other tissue"], tmp_path / "cine_seg.dcm",
                           backbone="sam2_hiera_t", algorithm_version="0.3.1")
    _assert_dciodvfy_clean(path)
    assert np.array_equal(read_dicom_seg_labelmap(path, 2), labels)


@pytest.mark.parametrize("n_frames", [1, 3])
def test_seg_with_a_single_class_on_multiframe_sources(tmp_path: Path, n_frames: int) -> None:
    # One segment: highdicom moves the segment identification to the shared
    # functional groups, and a 1-frame US Multi-frame still needs frame references.
    source = read_ultrasound(
        png_frames_to_multiframe_dicom(_usgra_pngs()[:n_frames], tmp_path / "cine.dcm")
    )
    nerve = (_usgra_masks()[:n_frames] == 1).astype(np.uint8)
    path = write_dicom_seg(nerve, source, ["nerve"], tmp_path / "seg.dcm", backbone="sam", algorithm_version="1")
    _assert_dciodvfy_clean(path)
    assert np.array_equal(read_dicom_seg_labelmap(path, 1), nerve)
    ds = pydicom.dcmread(path)
    assert int(ds.NumberOfFrames) == n_frames
    assert int(ds.PerFrameFunctionalGroupsSequence[-1].DerivationImageSequence[0]
               .SourceImageSequence[0].ReferencedFrameNumber) == n_frames


def test_segment_codes_match_class_names() -> None:
    assert segment_property_codes("Median nerve")[1].value == codes.SCT.Nerve.value
    assert segment_property_codes("blood_vessel")[1].value == codes.SCT.BloodVessel.value
    assert segment_property_codes("ARTERY")[1].value == codes.SCT.Artery.value
    category, prop = segment_property_codes("tendon-ish thing")
    assert category.value == prop.value == codes.SCT.Tissue.value
    assert segment_property_codes("nerve")[0].value == codes.SCT.AnatomicalStructure.value


def test_seg_rejects_mismatched_input(tmp_path: Path, io_usgra_series: UltrasoundImage) -> None:
    masks = _usgra_masks()
    kw = {"backbone": "sam", "algorithm_version": "1"}
    with pytest.raises(ValueError, match="does not match the source"):
        write_dicom_seg(masks[:2], io_usgra_series, CLASSES, tmp_path / "a.dcm", **kw)
    with pytest.raises(ValueError, match=r"0\.\.1"):
        write_dicom_seg(masks, io_usgra_series, ["nerve"], tmp_path / "a.dcm", **kw)
    with pytest.raises(ValueError, match="background"):
        write_dicom_seg(masks, io_usgra_series, ["background", *CLASSES], tmp_path / "a.dcm", **kw)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------ wrap


def test_wrapped_files_pass_dciodvfy(io_usgra_series: UltrasoundImage, io_usgra_multiframe: UltrasoundImage) -> None:
    for path in (*io_usgra_series.paths, *io_usgra_multiframe.paths):
        _assert_dciodvfy_clean(path)
    src = io_usgra_series.sources
    assert len({s.SeriesInstanceUID for s in src}) == 1 and len({s.StudyInstanceUID for s in src}) == 1
    assert [int(s.InstanceNumber) for s in src] == [1, 2, 3]
    assert str(src[0].SOPClassUID) == "1.2.840.10008.5.1.4.1.1.6.1"
    assert str(io_usgra_multiframe.sources[0].SOPClassUID) == "1.2.840.10008.5.1.4.1.1.3.1"
    region = src[0].SequenceOfUltrasoundRegions[0]
    assert region.PhysicalDeltaX == pytest.approx(0.0075) and region.PhysicalUnitsXDirection == 3


def test_wrap_refuses_frames_of_different_sizes(tmp_path: Path) -> None:
    pngs = [SAMPLE / "images" / f"{GREY_IDS[0]}.png", SAMPLE / "images" / f"{WIDE_RGB}.png"]  # 512x512 vs 632x761
    with pytest.raises(ValueError, match="differ in size"):
        png_frames_to_dicom_series(pngs, tmp_path / "s")
    with pytest.raises(ValueError, match="differ in size"):
        png_frames_to_multiframe_dicom(pngs, tmp_path / "m.dcm")
    assert not (tmp_path / "s").exists() and not (tmp_path / "m.dcm").exists()


def test_a_2d_plus_t_nifti_loop_reads_as_frames_and_gets_labels_in_its_layout(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    volume = rng.integers(0, 200, size=(50, 30, 1, 4)).astype(np.int16)  # (i, j, 1, t)
    source = nib.Nifti1Image(volume, np.diag([0.3, 0.2, 1.0, 1.0]))
    source.header.set_zooms((0.3, 0.2, 1.0, 0.05))
    source.header.set_xyzt_units("mm", "sec")
    nib.save(source, tmp_path / "loop.nii.gz")
    frames = read_frames(tmp_path / "loop.nii.gz")
    assert len(frames) == 4 and frames[0].shape == (50, 30, 3)
    assert not np.array_equal(frames[0], frames[1])  # the time axis, not a repeated frame
    labels = rng.integers(0, 3, size=(4, 50, 30)).astype(np.uint8)
    out = nib.load(write_nifti_like(labels, nib.load(tmp_path / "loop.nii.gz"), tmp_path / "loop_seg.nii.gz"))
    assert out.shape == (50, 30, 1, 4)
    assert out.header.get_zooms() == pytest.approx((0.3, 0.2, 1.0, 0.05))
    assert out.header.get_xyzt_units() == ("mm", "sec")
    np.testing.assert_array_equal(np.asanyarray(out.dataobj)[:, :, 0, 2], labels[2])
