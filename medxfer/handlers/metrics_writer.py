"""Per-case, per-class Dice / HD95 of an evaluator, written to CSV and JSON."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Mapping

import torch
from ignite.engine import Engine, Events

from medxfer.atomic import atomic_path
from medxfer.jsonfile import write_json
from medxfer.metrics.segmentation import case_metrics, summarize_cases

__all__ = ["SegmentationMetricsWriter"]


def _case_id(item: dict, key: str, index: int) -> str:
    meta = getattr(item[key], "meta", {}) or {}
    name = meta.get("filename_or_obj")
    if not name:
        return f"case_{index}"
    name = Path(str(name)).name
    for ext in (".nii.gz", ".nii", ".mha", ".nrrd"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def _spacing(tensor) -> list[float]:
    pixdim = getattr(tensor, "pixdim", None)
    if pixdim is None:
        return [1.0, 1.0, 1.0]
    return [float(s) for s in torch.as_tensor(pixdim).flatten()[:3]]


class SegmentationMetricsWriter:
    """Collects :func:`medxfer.metrics.segmentation.case_metrics` for every case an evaluator sees.

    Expects the evaluator's decollated output items to hold ``pred_key`` and ``label_key`` as
    ``(1, X, Y, Z)`` integer label maps (MetaTensors) in the same grid — e.g. the prediction
    inverted to the original file geometry and the label as read from disk. Spacing (mm) comes
    from the label's affine. At ``COMPLETED`` writes ``<output_dir>/<name>.csv`` (one row per case,
    NaN = class absent from both) and ``<output_dir>/<name>.json`` (per-class mean/std/n and every
    case; NaN written as null) and puts the means into ``engine.state.metrics``.
    """

    def __init__(self, output_dir, class_names: Mapping, pred_key: str = "pred", label_key: str = "label",
                 name: str = "metrics", label_from_file: bool = False):
        self.output_dir = Path(output_dir)
        self.label_from_file = label_from_file
        self._load = None
        self.class_names = {int(k): str(v) for k, v in class_names.items()}
        self.pred_key, self.label_key, self.name = pred_key, label_key, name
        self.rows: list[dict] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda e: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _collect(self, engine: Engine) -> None:
        items = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
        for item in items:
            pred, label = item[self.pred_key], item[self.label_key]
            if self.label_from_file:
                label = self._read_label(label)
            row = {"case": _case_id(item, self.label_key, len(self.rows))}
            row.update(case_metrics(pred.detach().cpu(), label.detach().cpu(), _spacing(label), self.class_names))
            self.rows.append(row)

    def _read_label(self, label):
        from monai.transforms import Compose, EnsureChannelFirst, LoadImage

        path = (getattr(label, "meta", None) or {}).get("filename_or_obj")
        if not path:
            raise ValueError("label_from_file: the label carries no file name in its meta data")
        if self._load is None:
            self._load = Compose([LoadImage(image_only=True), EnsureChannelFirst()])
        return self._load(str(path))

    def _write(self, engine: Engine) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        summary = summarize_cases(self.rows)
        with atomic_path(self.output_dir / f"{self.name}.csv") as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(self.rows[0]) if self.rows else ["case"])
            writer.writeheader()
            writer.writerows(self.rows)
        report = {"classes": self.class_names, "summary": summary, "cases": self.rows,
                  "convention": "NaN/null = class absent from prediction and ground truth (excluded from means); "
                                "HD95 in mm, image diagonal when exactly one mask is empty"}
        write_json(self.output_dir / f"{self.name}.json", report)
        for col, stats in summary.items():
            engine.state.metrics[col] = stats["mean"]
        logging.getLogger("medxfer.metrics").info(
            "%s over %d case(s): %s", self.name, len(self.rows),
            ", ".join(f"{c} {s['mean']:.4f}" for c, s in summary.items()))
