"""A real MONAI Label server with the Sam2Rad app on 127.0.0.1, driven over HTTP."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("monailabel")
requests = pytest.importorskip("requests")

from sam2rad_monai.clicks import error_click  # noqa: E402
from sam2rad_monai.inference import Sam2RadPredictor  # noqa: E402
from sam2rad_monai.inputs import read_frames  # noqa: E402
from sam2rad_monai.io import read_nifti_labelmap  # noqa: E402
from sam2rad_monai.metrics import per_class_scores  # noqa: E402
from sam2rad_monai.temporal import LoopState  # noqa: E402
from tests.label_server import label_server  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[1] / "bundle" / "data" / "usgra_sample"  # CC BY 4.0, see its README
MODEL = Path(__file__).resolve().parents[1] / "bundle" / "models" / "model.pt"
IMAGES = ["0017", "0031", "0175"]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("label")
    studies = root / "studies"
    studies.mkdir()
    for name in IMAGES:
        shutil.copy(SAMPLE / "images" / f"{name}.png", studies / f"{name}.png")
    # a cine study: 3 sample frames as a 2D+t NIfTI (stored as the frames are, rows first; 1; time), 40 ms apart
    loop = np.stack([np.asarray(Image.open(SAMPLE / "images" / f"{n}.png").convert("L"))
                     for n in ("0017", "0031", "0017")], axis=-1)[:, :, None, :]
    cine = nib.Nifti1Image(loop.astype(np.uint8), np.diag([-0.1, -0.1, 1.0, 1.0]))
    cine.header.set_zooms((0.1, 0.1, 1.0, 0.04))
    nib.save(cine, studies / "loop.nii.gz")
    model = root / "model" / "model.pt"
    model.parent.mkdir()
    shutil.copy(MODEL, model)
    cmd = [sys.executable, "-m", "sam2rad_monai.monailabel", "--studies", str(studies), "--port", "{port}",
           "--model_path", str(model)]  # the documented launcher
    with label_server(cmd, root / "server.log", timeout=180) as url:
        yield {"url": url, "studies": studies, "model": model, "root": root}


def _infer(server, model: str, image: str, params: dict) -> np.ndarray:
    r = requests.post(f"{server['url']}/infer/{model}", params={"image": image, "output": "image"},
                      data={"params": json.dumps(params)}, timeout=300)
    assert r.ok, r.text
    path = server["root"] / f"{model}_{image}_{uuid.uuid4().hex}.nii.gz"  # clients in threads ask the same
    path.write_bytes(r.content)
    return read_nifti_labelmap(path)


def _gt(name: str) -> np.ndarray:
    return np.asarray(Image.open(SAMPLE / "masks" / f"{name}.png"))


def test_label_app_over_http(server):
    info = requests.get(f"{server['url']}/info/", timeout=30).json()
    assert {"sam2rad", "sam2rad_interactive"} <= set(info["models"])
    assert info["labels"] == ["nerve", "vessel"] or set(info["labels"]) == {"nerve", "vessel"}
    assert "sam2rad" in info["trainers"] and "sam2rad_uncertainty" in info["strategies"]

    # auto inference == the bundle's own inference path with the same model
    predictor = Sam2RadPredictor.from_checkpoint(MODEL, 2)
    fp_case = None
    for name in IMAGES:
        served = _infer(server, "sam2rad", name, {})
        own = predictor.predict(read_frames(server["studies"] / f"{name}.png"))[0].label_map
        gt = _gt(name)
        assert served.shape == gt.shape
        assert per_class_scores(served, gt, 2) == per_class_scores(own, gt, 2)
        for k in (1, 2):
            false_positive = (served == k) & (gt != k)
            if fp_case is None and false_positive.sum() > 50:
                fp_case = (name, k, served, false_positive)
    assert fp_case is not None, "no false-positive region to click on in the sample"

    # a negative click in the middle of a false-positive region takes the label away there and shrinks the region
    # (refine mode keeps the learned prompts, so it need not vanish)
    name, k, served, false_positive = fp_case
    x, y, label = error_click(false_positive, np.zeros_like(false_positive))
    assert label == 0
    label_name = ["nerve", "vessel"][k - 1]
    clicked = _infer(server, "sam2rad_interactive", name, {"label": label_name, "foreground": [],
                                                           "background": [[int(x), int(y)]]})
    assert served[int(y), int(x)] == k and clicked[int(y), int(x)] != k
    assert ((clicked == k) & false_positive).sum() < 0.95 * false_positive.sum()

    # save a label, train on it: the model file changes, still loads, and the server keeps serving
    before = hashlib.sha256(server["model"].read_bytes()).hexdigest()
    keys = set(torch.load(server["model"], map_location="cpu", weights_only=True))
    with (SAMPLE / "masks" / f"{IMAGES[0]}.png").open("rb") as f:
        r = requests.put(f"{server['url']}/datastore/label", params={"image": IMAGES[0], "tag": "final"},
                         files={"label": (f"{IMAGES[0]}.png", f, "image/png")}, timeout=60)
    assert r.ok, r.text
    r = requests.post(f"{server['url']}/train/sam2rad", params={"run_sync": True},
                      json={"max_epochs": 1, "cache_views": 1}, timeout=600)
    assert r.ok, r.text
    assert hashlib.sha256(server["model"].read_bytes()).hexdigest() != before
    state = torch.load(server["model"], map_location="cpu", weights_only=True)
    assert set(state) == keys  # the file keeps every trunk (a two-trunk file trains each on its own views)
    after = _infer(server, "sam2rad", IMAGES[1], {})
    assert after.shape == _gt(IMAGES[1]).shape

    # active learning proposes one of the unlabelled images
    r = requests.post(f"{server['url']}/activelearning/sam2rad_uncertainty", json={}, timeout=300)
    assert r.ok, r.text
    assert r.json()["id"] in IMAGES[1:]


def test_a_cine_study_is_segmented_as_a_loop_over_http(server):
    r = requests.post(f"{server['url']}/infer/sam2rad", params={"image": "loop", "output": "image"},
                      data={"params": json.dumps({})}, timeout=300)
    assert r.ok, r.text
    path = server["root"] / f"loop_{uuid.uuid4().hex}.nii.gz"
    path.write_bytes(r.content)
    served = nib.load(path)
    assert served.shape == (512, 512, 1, 3)  # the study's own 2D+t layout and time step
    assert served.header.get_zooms()[3] == pytest.approx(0.04)
    predictor = Sam2RadPredictor.from_checkpoint(server["model"], 2)  # the file the server serves now
    own = [p.label_map for p in predictor.predict(read_frames(server["studies"] / "loop.nii.gz"), loop=LoopState())]
    np.testing.assert_array_equal(np.asanyarray(served.dataobj)[:, :, 0, :].transpose(2, 0, 1), np.stack(own))
    assert all({1, 2} <= set(np.unique(m)) for m in own)


def test_bad_requests_are_client_errors_and_the_server_keeps_serving(server):
    url = server["url"]
    outside = (SAMPLE / "images" / "0015.png").resolve()  # a readable image that is not in the studies folder

    def infer(model: str, image: str, params: dict) -> requests.Response:
        return requests.post(f"{url}/infer/{model}", params={"image": image, "output": "image"},
                             data={"params": json.dumps(params)}, timeout=300)

    bad = [  # (model, image, params, status, words the message must hold)
        ("sam2rad", "no_such_image", {}, 404, ["no_such_image", "not in the studies folder"]),
        ("sam2rad", str(outside), {}, 404, ["0015.png", "not in the studies folder"]),
        ("sam2rad_interactive", IMAGES[0], {"label": "liver"}, 400, ["unknown label", "liver"]),
        ("sam2rad_interactive", IMAGES[0], {"label": "9"}, 400, ["unknown label", "'9'"]),
        ("sam2rad_interactive", IMAGES[0], {"label": "nerve", "roi": [10, 20]}, 400, ["roi", "[10, 20]"]),
        ("sam2rad_interactive", IMAGES[0], {"label": "nerve", "roi": [50, 50, 10, 10]}, 400, ["x1 <= x2"]),
        ("sam2rad_interactive", IMAGES[0], {"label": "nerve", "foreground": [["a", 3]]}, 400, ["foreground"]),
        ("sam2rad_interactive", IMAGES[0], {"label": "nerve", "background": 7}, 400, ["background"]),
        ("sam2rad_interactive", IMAGES[0], {"label": "nerve", "mode": "autonomous"}, 400, ["mode"]),
    ]
    for model, image, params, status, words in bad:
        r = infer(model, image, params)
        assert r.status_code == status, (image, params, r.status_code, r.text)
        detail = r.json()["detail"]
        assert all(w in detail for w in words), (image, params, detail)

    # still serving: an id of the studies folder, and an upload (MONAI Label's own temporary file) are answered
    assert infer("sam2rad", IMAGES[0], {}).ok
    with outside.open("rb") as f:
        r = requests.post(f"{url}/infer/sam2rad", params={"output": "image"}, files={"file": ("x.png", f, "image/png")},
                          data={"params": "{}"}, timeout=300)
    assert r.ok, r.text


def test_concurrent_clients_get_the_answers_of_one_at_a_time(server):
    """Four clients at once, also while a train task runs and after it swaps the model file, get what the same
    requests get one at a time (MONAI Label runs an inference request at a time; the app reloads a swapped file
    between requests, never during one)."""
    url = server["url"]
    asks = [("sam2rad", IMAGES[1], {}), ("sam2rad", IMAGES[2], {}),
            ("sam2rad_interactive", IMAGES[2], {"label": "nerve", "foreground": [[200, 220]], "background": []})]

    def answer(i: int) -> np.ndarray:
        return _infer(server, *asks[i])

    def at_once(pool: ThreadPoolExecutor) -> list[tuple[int, np.ndarray]]:
        # each of 4 clients sends every request, each client in its own order
        futures = [(i, pool.submit(answer, i)) for c in range(4) for i in np.roll(np.arange(len(asks)), c)]
        return [(int(i), f.result(timeout=600)) for i, f in futures]

    with ThreadPoolExecutor(4) as pool:
        old = [answer(i) for i in range(len(asks))]
        assert all(np.array_equal(a, old[i]) for i, a in at_once(pool))

        with (SAMPLE / "masks" / f"{IMAGES[0]}.png").open("rb") as f:  # a final label to train on
            r = requests.put(f"{url}/datastore/label", params={"image": IMAGES[0], "tag": "final"},
                             files={"label": (f"{IMAGES[0]}.png", f, "image/png")}, timeout=60)
        assert r.ok, r.text
        before = server["model"].read_bytes()
        r = requests.post(f"{url}/train/sam2rad", params={"run_sync": False},
                          json={"max_epochs": 1, "cache_views": 1}, timeout=60)
        assert r.ok, r.text
        during: list[tuple[int, np.ndarray]] = []
        deadline = time.time() + 600
        while (state := requests.get(f"{url}/train/", timeout=30).json().get("status")) in ("SUBMITTED", "RUNNING"):
            if not during:  # one round of the four clients while the task runs, then wait for it
                during = at_once(pool)
            else:
                time.sleep(2)
            assert time.time() < deadline, "the train task did not finish"
        assert state == "DONE", state
        assert during, "the train task ended before a request was sent while it ran"
        assert server["model"].read_bytes() != before, "the train task did not write the model file"
        new = [answer(i) for i in range(len(asks))]
        assert all(np.array_equal(a, old[i]) or np.array_equal(a, new[i]) for i, a in during)
        assert all(np.array_equal(a, new[i]) for i, a in at_once(pool))
