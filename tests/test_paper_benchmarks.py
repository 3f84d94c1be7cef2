"""The paper's robustness benchmarks (heavy augmentation, noisy labels) on the bundle's embedded sample."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from PIL import Image

from benchmarks import noisy_labels, robustness
from tests.frames import SAMPLE, usgra_frame


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum())


@pytest.mark.parametrize("setting", ["hflip", "vflip", "translate", "rotate", "crop", "all"])
def test_perturbed_frame_and_mask_stay_aligned(setting):
    # a frame whose channels are its own class masks (0 / 255) at the original resolution: after the perturbation
    # each channel thresholded at half must match the perturbed mask (bilinear against nearest: only boundary
    # pixels may differ), better than the mask moved by 2 pixels matches it
    label = np.asarray(Image.open(SAMPLE / "masks" / "0017.png"))
    image = np.stack([(label == 1) * 255.0, (label == 2) * 255.0, np.zeros(label.shape)], axis=2)
    img, lab = robustness.perturb(image, label, robustness.settings([], [])[setting], np.random.default_rng(3))
    assert img.shape == image.shape and lab.shape == label.shape
    for cls in (1, 2):
        read_back, truth = img[..., cls - 1] > 127.5, lab == cls
        assert truth.sum() > 1000, (setting, cls)
        aligned = _dice(read_back, truth)
        assert aligned > 0.97, (setting, cls)
        assert all(aligned > _dice(read_back, np.roll(truth, 2, axis=a)) for a in (0, 1)), (setting, cls)


def test_flip_round_trip_gives_the_mask_back():
    image, label = usgra_frame("0015")
    once = robustness.perturb(image.astype(np.float32), label, [("hflip", None), ("vflip", None)],
                              np.random.default_rng(0))
    twice = robustness.perturb(once[0], once[1], [("vflip", None), ("hflip", None)], np.random.default_rng(0))
    assert not np.array_equal(once[1], label)
    np.testing.assert_array_equal(twice[1], label)
    np.testing.assert_array_equal(twice[0], image.astype(np.float32))


@pytest.mark.slow
def test_robustness_benchmark_runs_on_the_sample(tmp_path, monkeypatch):
    out = tmp_path / "robustness.json"
    monkeypatch.setattr(sys, "argv", ["robustness.py", "--dataset_dir", str(SAMPLE), "--num_frames", "2",
                                      "--model_path", str(SAMPLE.parents[1] / "models" / "model.pt"),
                                      "--angles", "--shifts", "--output", str(out)])
    result = robustness.run(robustness.parse_args())
    assert set(result["settings"]) == {"clean", "hflip", "vflip", "translate", "rotate", "crop", "all"}
    assert result["n_test"] == 2
    for name, row in result["settings"].items():
        for model in ("lp", "box"):
            assert set(row[model]) == {"nerve", "vessel"}
            assert all(0.0 <= v <= 100.0 for v in row[model].values())
        # the frozen backbone given each perturbed mask's own box finds the structure in the perturbed frame
        assert row["box"]["nerve"] > 30.0, name
    assert json.loads(out.read_text())["settings"] == result["settings"]
    # resumable: a rerun skips every setting already written; a rerun on other frames is refused
    rerun = robustness.run(robustness.parse_args())
    assert rerun["settings"] == result["settings"]
    monkeypatch.setattr(sys, "argv", sys.argv[:4] + ["1"] + sys.argv[5:])
    with pytest.raises(ValueError, match="scored 2 test frames"):
        robustness.run(robustness.parse_args())


def test_corruptions_are_what_they_say():
    _, label = usgra_frame("0022")
    nerve = label == 1
    rng = np.random.default_rng(0)
    eroded = noisy_labels.corrupt_structure(nerve, "erode", rng)
    assert not (eroded & ~nerve).any() and 0 < eroded.sum() < nerve.sum()
    cut = noisy_labels.corrupt_structure(nerve, "cut", rng)
    assert not (cut & ~nerve).any() and 0.45 <= cut.sum() / nerve.sum() <= 0.8
    shifted = noisy_labels.corrupt_structure(nerve, "shift", rng)
    assert shifted.sum() == nerve.sum() and _dice(shifted, nerve) < 0.9
    with pytest.raises(ValueError, match="unknown corruption 'blur'"):
        noisy_labels.corrupt_structure(nerve, "blur", rng)
    a, kinds_a = noisy_labels.corrupt_label(label, np.random.default_rng(5))
    b, kinds_b = noisy_labels.corrupt_label(label, np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)
    assert kinds_a == kinds_b and set(kinds_a) == {1, 2}


def test_noisy_copy_of_the_sample(tmp_path):
    clean = noisy_labels.make_noisy_dataset(SAMPLE, tmp_path / "f0", 0.0, seed=1)
    half = noisy_labels.make_noisy_dataset(SAMPLE, tmp_path / "f5", 0.5, seed=1)
    full = noisy_labels.make_noisy_dataset(SAMPLE, tmp_path / "f10", 1.0, seed=1)
    labelled = [line.split(",")[0] for line in (SAMPLE / "metadata.csv").read_text().splitlines()[1:]
                if line.split(",")[1] in ("train", "val")]
    assert (clean["corrupted"], half["corrupted"], full["corrupted"]) == (0, round(0.5 * len(labelled)),
                                                                          len(labelled))
    assert set(half["frames"]) < set(full["frames"]) == set(labelled)
    assert all(half["frames"][k] == full["frames"][k] for k in half["frames"])  # one draw per frame, any fraction
    for path in sorted((SAMPLE / "masks").iterdir()):
        assert (tmp_path / "f0" / "masks" / path.name).read_bytes() == path.read_bytes()
        noisy = np.asarray(Image.open(tmp_path / "f10" / "masks" / path.name))
        if path.stem in labelled:
            assert not np.array_equal(noisy, np.asarray(Image.open(path))), path.stem
            assert full["frames"][path.stem]["dice"]["1"] < 1.0
        else:  # the test split is never touched
            assert (tmp_path / "f10" / "masks" / path.name).read_bytes() == path.read_bytes()
    for path in (SAMPLE / "images").iterdir():
        assert (tmp_path / "f10" / "images" / path.name).read_bytes() == path.read_bytes()
    assert json.loads((tmp_path / "f10" / "corruption.json").read_text())["corrupted"] == len(labelled)
    with pytest.raises(ValueError, match="fraction must be in"):
        noisy_labels.make_noisy_dataset(SAMPLE, tmp_path / "bad", 1.5)
