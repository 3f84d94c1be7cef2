"""The MONAI Label app: wiring only; the tasks live in :mod:`sam2rad_monai.monailabel.tasks`."""

from __future__ import annotations

import logging
from typing import Any

from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random

from sam2rad_monai.monailabel.tasks import (
    AppSettings,
    ModelHolder,
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

    def init_infers(self) -> dict[str, InferTask]:
        return {"sam2rad": Sam2RadAutoInfer(self.holder), "sam2rad_interactive": Sam2RadInteractiveInfer(self.holder)}

    def init_trainers(self) -> dict[str, TrainTask]:
        return {"sam2rad": Sam2RadTrain(self.holder)}

    def init_strategies(self) -> dict[str, Strategy]:
        return {"sam2rad_uncertainty": Sam2RadUncertainty(self.holder), "random": Random(), "first": First()}
