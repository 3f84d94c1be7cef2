"""The MONAI Label app: wiring only; the tasks live in :mod:`sam2rad_monai.monailabel.tasks`."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from monailabel.config import settings as server_settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random

from sam2rad_monai.monailabel.tasks import (
    AppSettings,
    ModelHolder,
    RequestError,
    Sam2RadAutoInfer,
    Sam2RadInteractiveInfer,
    Sam2RadTrain,
    Sam2RadUncertainty,
)

logger = logging.getLogger(__name__)


class Sam2RadApp(MONAILabelApp):
    """Serve one Sam2Rad model (``--conf model_path``) over a local studies folder of 2D ultrasound images."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, Any]) -> None:
        self.settings = AppSettings.from_conf(conf, studies)
        self.holder = ModelHolder(self.settings)
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="sam2rad",
                         description="Sam2Rad: autonomous and click-refined ultrasound segmentation",
                         version="0.1.0", labels=self.settings.labels)

    def infer(self, request: dict[str, Any], datastore: Datastore | None = None) -> dict[str, Any]:
        """MONAI Label's inference, with the client's mistakes answered 4xx with a message naming them (MONAI Label
        answers every failure 500 and segments any file path the server can read given as the image id).

        The image must be an id of the studies folder, or the temporary file MONAI Label made of an upload or a
        session; anything else is 404. A :class:`RequestError` from a task (unknown label, malformed points or
        box, an image the app cannot label) is 400.
        """
        image = request.get("image")
        if isinstance(image, str) and not _server_file(image):
            store = datastore or self.datastore()
            if image not in store.list_images():
                raise HTTPException(status_code=404, detail=f"image {image!r} is not in the studies folder (ids "
                                    "are file names without their suffix: GET /datastore/?output=all)")
        try:
            return super().infer(request, datastore)
        except RequestError as err:
            raise HTTPException(status_code=400, detail=" ".join(str(err).split())) from None

    def init_infers(self) -> dict[str, InferTask]:
        return {"sam2rad": Sam2RadAutoInfer(self.holder), "sam2rad_interactive": Sam2RadInteractiveInfer(self.holder)}

    def init_trainers(self) -> dict[str, TrainTask]:
        return {"sam2rad": Sam2RadTrain(self.holder)}

    def init_strategies(self) -> dict[str, Strategy]:
        return {"sam2rad_uncertainty": Sam2RadUncertainty(self.holder), "random": Random(), "first": First()}


def _server_file(path: str) -> bool:
    """True for a file MONAI Label itself wrote for this request: an upload (a ``tmp*`` file in the temp folder,
    what its endpoint's ``NamedTemporaryFile`` makes) or a session's image."""
    candidate = Path(path)
    if not candidate.is_absolute() or not candidate.is_file():
        return False
    parent = candidate.resolve().parent
    if parent == Path(tempfile.gettempdir()).resolve() and candidate.name.startswith("tmp"):
        return True
    # MONAI Label's own default when no session path is set (monailabel.utils.sessions.Sessions)
    sessions = server_settings.MONAI_LABEL_SESSION_PATH.strip() or Path.home() / ".cache" / "monailabel" / "sessions"
    return Path(sessions).resolve() in candidate.resolve().parents
