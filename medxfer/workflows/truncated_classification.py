"""Helpers of ``bundles/seg2d_transfer/configs/truncated_classifier.yaml``: image classification with a
truncated pretrained encoder (SPEC section 8; :mod:`medxfer.networks.truncated`), scored with AUROC
and AUPRC (:mod:`medxfer.metrics.classification`; AUPRC beside AUROC because medical labels are
imbalanced)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from monai.utils import convert_to_tensor

from medxfer.jsonfile import write_json
from medxfer.metrics.classification import classification_report
from medxfer.networks.truncated import TruncatedClassifier
from medxfer.transfer.bank import ModelBank
from medxfer.transfer.weights import truncated_encoder_weights
from medxfer.transforms.seg2d import classification_transforms

__all__ = ["truncated_classifier", "evaluate_classifier"]


def truncated_classifier(arch: str, level: int, num_classes: int, bank_root=None, init_entry: str | None = None,
                         weights_file=None, in_channels: int = 3, dropout: float = 0.0,
                         output_dir=None) -> TruncatedClassifier:
    """A :class:`~medxfer.networks.truncated.TruncatedClassifier` with pretrained encoder weights from a
    bank entry (e.g. a ``resnet50_attention_unet`` encoder pretrained by ``pretrain_encoder``: its
    ``encoder.*`` keys are MONAI ResNet50 keys), a file (torchvision / MONAI keys), or neither (random
    initialisation). Weights go through the one weight path (transfer mode ``encoder_only``: every
    kept layer is fine-tuned; the levels the cut dropped are skipped and reported); the report goes
    to ``output_dir/transfer_report.json``."""
    if init_entry is not None and weights_file is not None:
        raise ValueError("give init_entry (with bank_root) or weights_file, not both")
    network = TruncatedClassifier(arch, level, num_classes, in_channels, dropout)
    weights = weights_file
    if init_entry is not None:
        if bank_root is None:
            raise ValueError("init_entry needs bank_root")
        weights = ModelBank.open(bank_root).load_state_dict(init_entry)
    if weights is not None:
        report = truncated_encoder_weights(network, weights)
        if output_dir is not None:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            write_json(Path(output_dir) / "transfer_report.json", report.to_dict())
    return network


@torch.no_grad()
def evaluate_classifier(network: torch.nn.Module, records: Sequence[dict], class_names: Sequence[str], image_size,
                        output_dir, device="cpu") -> dict:
    """Softmax scores of every record's image -> accuracy, one-vs-rest AUROC and AUPRC per class and
    macro mean (:func:`medxfer.metrics.classification.classification_report`); written to
    ``output_dir/classification_metrics.json`` with the per-image scores."""
    if not records:
        raise ValueError("no records to evaluate")
    chain = classification_transforms("eval", image_size)
    network = network.to(device).eval()
    scores, labels = [], []
    for record in records:
        item = chain(record)
        x = item["image"]
        x = convert_to_tensor(x, track_meta=False)[None].to(device)
        scores.append(torch.softmax(network(x).float(), dim=1)[0].cpu().numpy())
        labels.append(int(record["label"]))
    scores, labels = np.stack(scores), np.asarray(labels)
    onehot = np.eye(len(class_names), dtype=np.int64)[labels]
    report = classification_report(onehot, scores, class_names)
    report["accuracy"] = float((scores.argmax(1) == labels).mean())
    report["images"] = [{"id": r["id"], "label": int(r["label"]), "scores": s.tolist()} for r, s in zip(records, scores)]
    write_json(Path(output_dir) / "classification_metrics.json", report)
    return report
