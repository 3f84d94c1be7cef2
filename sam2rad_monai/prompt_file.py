"""The prompts file of bundle inference's ``refine`` and ``manual`` modes: boxes and points per input and class."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .inference import FramePrompts
from .inputs import one_line

__all__ = ["load_prompts"]



def _class_prompt(value: Any, where: str) -> tuple[list[float] | None, list[tuple[float, float, int]]]:
    if not isinstance(value, Mapping) or not set(value) <= {"box", "points"} or not value:
        raise ValueError(f"{where}: expected {{\"box\": [x1, y1, x2, y2], \"points\": [[x, y, 1|0], ...]}}")
    box = None
    if "box" in value:
        box = [float(v) for v in value["box"]]
        if len(box) != 4 or box[2] < box[0] or box[3] < box[1]:
            raise ValueError(f"{where}: box must be [x1, y1, x2, y2] with x1 <= x2, y1 <= y2, got {value['box']}")
    points = []
    for point in value.get("points", []):
        if len(point) not in (2, 3) or (len(point) == 3 and int(point[2]) not in (0, 1)):
            raise ValueError(f"{where}: a point is [x, y] or [x, y, 1 (positive) | 0 (negative)], got {point}")
        points.append((float(point[0]), float(point[1]), int(point[2]) if len(point) == 3 else 1))
    return box, points


def _frame_prompts(value: Any, class_names: Sequence[str], where: str) -> FramePrompts:
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: expected an object keyed by class name")
    prompts = FramePrompts()
    for cls, spec in value.items():
        if cls not in class_names:
            raise ValueError(f"{where}: unknown class {cls!r}; classes are {list(class_names)}")
        box, points = _class_prompt(spec, f"{where}.{cls}")
        index = list(class_names).index(cls)
        if box is not None:
            prompts.boxes[index] = box
        if points:
            prompts.points[index] = points
    return prompts


def load_prompts(path: str | os.PathLike[str], class_names: Sequence[str]
                 ) -> dict[str, dict[int | None, FramePrompts]]:
    """Read a prompts JSON file: ``{input name: {frame index or None (all frames): FramePrompts}}``.

    Format, coordinates in the frame's own pixels (x = column, y = row)::

        {
          "0004.png": {"nerve": {"box": [x1, y1, x2, y2]},
                       "vessel": {"points": [[x, y, 1], [x, y, 0]]}},
          "cine.dcm": {"frames": {"0": {"nerve": {"box": [...]}}, "12": {...}}},
          "series01": {"vessel": {"box": [...]}}
        }

    An input is named by its path relative to the input root (``png/0004.png``) or by its file / series folder
    name. Class prompts at the top level apply to every frame; ``frames`` holds 0-based per-frame prompts. A point
    label is 1 (positive, the default) or 0 (negative).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read the prompts file ({one_line(exc)})") from exc
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: expected an object keyed by input file name")
    out: dict[str, dict[int | None, FramePrompts]] = {}
    for name, value in data.items():
        where = f"{path}: {name}"
        if isinstance(value, Mapping) and "frames" in value:
            if set(value) != {"frames"} or not isinstance(value["frames"], Mapping):
                raise ValueError(f"{where}: 'frames' must be the only key, an object keyed by frame index")
            per_frame: dict[int | None, FramePrompts] = {}
            for index, spec in value["frames"].items():
                if not str(index).isdigit():
                    raise ValueError(f"{where}: frame index must be a 0-based integer, got {index!r}")
                per_frame[int(index)] = _frame_prompts(spec, class_names, f"{where}.frames.{index}")
            out[str(name)] = per_frame
        else:
            out[str(name)] = {None: _frame_prompts(value, class_names, where)}
    return out
