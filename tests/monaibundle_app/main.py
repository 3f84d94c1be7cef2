"""MONAI Label's generic bundle app, inference part: every bundle named by ``--conf models`` under ``model/`` is
served by MONAI Label's own ``BundleInferTask``, nothing project-specific.

MONAI Label's ``monaibundle`` sample app does this; the pip package does not ship its sample apps, so the live test
(tests/test_standard_bundle.py) starts this one.
"""

from __future__ import annotations

from typing import Any

from monailabel.interfaces.app import MONAILabelApp
from monailabel.tasks.infer.bundle import BundleInferTask
from monailabel.utils.others.generic import get_bundle_models


class BundleApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict[str, Any]) -> None:
        self.models = get_bundle_models(app_dir, conf)  # local folders under model/ (zoo_source github: no download)
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="monaibundle",
                         description="MONAI Label generic bundle app", version="0.1.0")

    def init_infers(self) -> dict[str, BundleInferTask]:
        infers = {name: BundleInferTask(path, self.conf) for name, path in self.models.items()}
        return {name: task for name, task in infers.items() if task.is_valid()}
