"""Tests for sam2rad_monai.data.build_datalist."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sam2rad_monai.data import build_datalist, write_datalist_json

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "usgra_nerve"


@pytest.fixture(scope="module")
def usgra() -> Path:
    if not (DATA / "metadata.csv").is_file():
        pytest.skip(f"usgra_nerve dataset not found under {DATA}")
    return DATA


def _png(path: Path, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((4, 5), value, dtype=np.uint8)).save(path)


def _folder(root: Path, ids: list[str], rows: list[dict[str, str]] | None = None) -> Path:
    for i in ids:
        _png(root / "images" / f"{i}.png", 100)
        _png(root / "masks" / f"{i}.png", 1)
    if rows is not None:
        with (root / "metadata.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return root


def _ids(entries: list[dict[str, str]]) -> list[str]:
    return [e["id"] for e in entries]


def test_real_dataset_keeps_test_split_and_carves_validation(usgra: Path) -> None:
    lists = build_datalist(usgra, seed=0)
    assert len(lists["test"]) == 40
    assert len(lists["train"]) + len(lists["val"]) == 204 and len(lists["val"]) == round(0.1 * 204)
    assert not set(_ids(lists["train"])) & set(_ids(lists["val"]))
    entry = lists["test"][0]
    assert set(entry) == {"image", "label", "id"}
    assert Path(entry["image"]).is_file() and Path(entry["image"]).stem == entry["id"]
    assert Path(entry["label"]).parent.name == "masks" and Path(entry["label"]).stem == entry["id"]
    assert build_datalist(usgra, split="val", seed=0) == lists["val"]
    assert _ids(build_datalist(usgra, split="val", seed=1)) != _ids(lists["val"])


def test_few_shot_draw_is_deterministic_nested_and_seed_dependent(usgra: Path) -> None:
    ten = _ids(build_datalist(usgra, split="train", num_images=10, seed=0))
    assert len(ten) == 10 and ten == _ids(build_datalist(usgra, split="train", num_images=10, seed=0))
    assert ten != _ids(build_datalist(usgra, split="train", num_images=10, seed=1))
    five = _ids(build_datalist(usgra, split="train", num_images=5, seed=0))
    assert set(five) <= set(ten)
    val = _ids(build_datalist(usgra, split="val", num_images=10, seed=0))
    assert not set(ten) & set(val)  # few-shot comes out of what is left after the validation carve-out
    with pytest.raises(ValueError, match="num_images"):
        build_datalist(usgra, split="train", num_images=10_000)


def test_validation_split_by_subject_never_shares_a_subject(tmp_path: Path) -> None:
    ids = [f"{i:03d}" for i in range(24)]
    rows = [{"id": i, "split": "test" if n >= 20 else "train", "subject_id": f"s{n % 7}"} for n, i in enumerate(ids)]
    root = _folder(tmp_path, ids, rows)
    subject = {r["id"]: r["subject_id"] for r in rows}
    seen = set()
    for seed in range(6):
        lists = build_datalist(root, seed=seed, val_fraction=0.3)
        train, val = {subject[i] for i in _ids(lists["train"])}, {subject[i] for i in _ids(lists["val"])}
        assert train and val and not train & val
        assert _ids(lists["test"]) == ids[20:]
        seen.add(tuple(_ids(lists["val"])))
        assert build_datalist(root, seed=seed, val_fraction=0.3) == lists
    assert len(seen) > 1


def test_explicit_val_rows_are_used_and_no_metadata_means_all_train(tmp_path: Path) -> None:
    ids = ["a", "b", "c", "d"]
    rows = [{"id": i, "split": s} for i, s in zip(ids, ["train", "VAL", "train", "test"])]
    lists = build_datalist(_folder(tmp_path / "with", ids, rows))
    assert (_ids(lists["train"]), _ids(lists["val"]), _ids(lists["test"])) == (["a", "c"], ["b"], ["d"])
    plain = build_datalist(_folder(tmp_path / "plain", ids), val_fraction=0.25)
    assert len(plain["train"]) == 3 and len(plain["val"]) == 1 and plain["test"] == []
    assert build_datalist(tmp_path / "plain", val_fraction=0.0)["val"] == []


def test_nifti_and_jpeg_pairs_match_by_stem(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for name in ("scan.one.nii.gz", "b.jpg"):
        (tmp_path / "images" / name).write_bytes(b"x")
    for name in ("scan.one.nii.gz", "b.png"):
        (tmp_path / "masks" / name).write_bytes(b"x")
    (tmp_path / "images" / ".DS_Store").write_bytes(b"x")
    entries = build_datalist(tmp_path, split="train", val_fraction=0.0)
    assert _ids(entries) == ["b", "scan.one"] and entries[1]["label"].endswith("scan.one.nii.gz")


def test_errors_name_the_file(tmp_path: Path) -> None:
    root = _folder(tmp_path / "orphans", ["a", "b"])
    (root / "masks" / "b.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"images/b\.png"):
        build_datalist(root)
    assert _ids(build_datalist(root, split="train", val_fraction=0.0, require_labels=False)) == ["a", "b"]
    _png(root / "masks" / "b.png")
    _png(root / "masks" / "c.png")
    with pytest.raises(FileNotFoundError, match=r"masks/c\.png"):
        build_datalist(root)

    bad = _folder(tmp_path / "bad_split", ["a", "b"], [{"id": "a", "split": "train"}, {"id": "b", "split": "holdout"}])
    with pytest.raises(ValueError, match=r"metadata\.csv.*holdout"):
        build_datalist(bad)
    missing = _folder(tmp_path / "missing_row", ["a", "b"], [{"id": "a", "split": "train"}])
    with pytest.raises(ValueError, match=r"metadata\.csv.*'b'"):
        build_datalist(missing)

    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    (empty / "masks").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty/images"):
        build_datalist(empty)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_datalist(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="split"):
        build_datalist(root, split="training")


def test_write_datalist_json_for_monai(tmp_path: Path) -> None:
    from monai.data import load_decathlon_datalist

    lists = build_datalist(_folder(tmp_path, ["a", "b", "c"]), val_fraction=0.34)
    path = write_datalist_json(lists, tmp_path / "datalist.json")
    assert set(json.loads(path.read_text())) == {"training", "validation", "testing"}
    assert load_decathlon_datalist(path, data_list_key="validation") == lists["val"]
