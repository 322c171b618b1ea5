"""TATL inference step: image -> Segment-Net -> crop -> target segmenters (U + Link averaged) -> paste back.

Nguyen et al., TATL, section 4 ("Inference Step"; SPEC section 6): an image is segmented by the
Segment-Net, the lesion box (+ offset) crops it, each attribute's target segmenters (U- and
Link-shape) predict on the crop, their probabilities are averaged, and the masks are rescaled to
the original image size. The union of the attribute masks is returned too ("predicted union
regions", useful to clinicians).

:class:`TatlPredictor` holds the networks of one fold of a run; :func:`write_prediction` saves one
image's masks as ISIC-named PNGs (``ISIC_nnnnnnn_attribute_<name>.png``, 0/255, so the output can
be read back by :func:`medxfer.data.isic.load_isic`-style tools), the union map and an overlay PNG.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from monai.utils import convert_to_tensor

from medxfer.atomic import atomic_path
from medxfer.transfer.tatl import segment_net_box
from medxfer.transforms.dermoscopy import IMAGENET_MEAN, IMAGENET_STD, dermoscopy_transforms
from medxfer.transforms.lesion_crop import Box, paste_back

__all__ = ["TatlPrediction", "TatlPredictor", "write_prediction", "overlay_image", "ATTRIBUTE_COLOURS"]

#: Overlay colours (RGB) per attribute; the union map is drawn as a white outline.
ATTRIBUTE_COLOURS = {
    "pigment_network": (255, 80, 80),
    "negative_network": (80, 160, 255),
    "globules": (255, 220, 0),
    "milia_like_cyst": (0, 230, 120),
    "streaks": (230, 0, 230),
}


@dataclass
class TatlPrediction:
    """One image's prediction at its original size.

    Attributes:
        attributes: attribute names, in channel order.
        probabilities: float32 ``(A, H, W)``, the U/Link-averaged probabilities pasted back (0 outside the box).
        box: the lesion crop used (the whole image without a Segment-Net, or when it found nothing).
        threshold: probability threshold of :attr:`masks`.
    """

    attributes: Sequence[str]
    probabilities: np.ndarray
    box: Box
    threshold: float = 0.5

    @property
    def masks(self) -> np.ndarray:
        """bool ``(A, H, W)`` attribute masks."""
        return self.probabilities >= self.threshold

    @property
    def union(self) -> np.ndarray:
        """bool ``(H, W)``: pixels with at least one attribute."""
        return self.masks.any(axis=0)


class TatlPredictor:
    """The seven-network TATL pipeline of one fold (Segment-Net + per attribute U and Link).

    Args:
        targets: ``{attribute: [networks]}``; each maps ``(1, 3, h, w)`` to ``(1, 1, h, w)`` logits and
            their sigmoid probabilities are averaged.
        segment_net: the stage-1 network, or None (no crop: the Table 3 ablations without stage 1).
        working_size: ``(H, W)`` the networks run at.
        offset: box margin in working pixels. mean, std: the training normalisation.
        threshold: probability threshold (Segment-Net and final masks).
    """

    def __init__(self, targets: Mapping[str, Sequence[torch.nn.Module]], segment_net: torch.nn.Module | None = None,
                 working_size: Sequence[int] = (384, 512), offset: float = 40, mean=None, std=None,
                 threshold: float = 0.5, device="cpu") -> None:
        if not targets or any(not nets for nets in targets.values()):
            raise ValueError("every attribute needs at least one target segmenter")
        self.device = torch.device(device)
        self.targets = {a: [n.to(self.device).eval() for n in nets] for a, nets in targets.items()}
        self.segment_net = None if segment_net is None else segment_net.to(self.device).eval()
        self.working_size = tuple(int(s) for s in working_size)
        self.offset, self.threshold = offset, threshold
        self.mean = tuple(mean) if mean is not None else IMAGENET_MEAN
        self.std = tuple(std) if std is not None else IMAGENET_STD
        self._chain = dermoscopy_transforms("infer", size=self.working_size, mean=self.mean, std=self.std,
                                            box_key="box")

    @property
    def attributes(self) -> list[str]:
        return list(self.targets)

    @property
    def n_networks(self) -> int:
        return sum(len(n) for n in self.targets.values()) + (self.segment_net is not None)

    def lesion_box(self, image_path, image_size: Sequence[int]) -> Box:
        """Stage 1: the Segment-Net box (whole image without a Segment-Net). The Segment-Net sees the
        whole image through the same chain as the crops (no box: nothing cropped)."""
        if self.segment_net is None:
            return Box(0, 0, int(image_size[0]), int(image_size[1]))
        return segment_net_box(self.segment_net, self._chain({"image": str(image_path)})["image"], image_size,
                               self.working_size, self.offset, self.threshold)

    @torch.no_grad()
    def predict(self, image_path, box: Box | None = None) -> TatlPrediction:
        """Run the pipeline on one RGB image file; ``box`` skips stage 1 (e.g. saved boxes)."""
        from PIL import Image

        try:
            with Image.open(image_path) as img:
                width, height = img.size  # PIL: (W, H)
        except (OSError, ValueError) as e:
            raise ValueError(f"{image_path}: cannot read the image: {e}") from None
        if box is None:
            box = self.lesion_box(image_path, (height, width))
        image = self._chain({"image": str(image_path), "box": box.to_dict()})["image"]
        x = convert_to_tensor(image, track_meta=False)[None].to(self.device)  # plain tensor: MONAI's per-op
        # metadata dispatch would otherwise follow it through every layer (about 2x the time at 64x64)
        probs = torch.stack([torch.stack([torch.sigmoid(net(x))[0, 0] for net in nets]).mean(0)
                             for nets in self.targets.values()])
        full = paste_back(probs.float().cpu().numpy(), box, (height, width), mode="bilinear")
        return TatlPrediction(self.attributes, full.astype(np.float32), box, self.threshold)


def overlay_image(image: np.ndarray, prediction: TatlPrediction, alpha: float = 0.45) -> np.ndarray:
    """``(H, W, 3)`` uint8: the image with each attribute tinted in its colour, the union outlined
    in white and the lesion box drawn in grey (for a person to look at)."""
    from scipy import ndimage

    out = image.astype(np.float32).copy()
    for name, mask in zip(prediction.attributes, prediction.masks):
        colour = np.array(ATTRIBUTE_COLOURS.get(name, (255, 255, 255)), dtype=np.float32)
        out[mask] = (1 - alpha) * out[mask] + alpha * colour
    union = prediction.union
    outline = union & ~ndimage.binary_erosion(union)
    out[outline] = 255
    b = prediction.box
    grey = np.array((160, 160, 160), dtype=np.float32)
    out[b.row0, b.col0:b.col1] = out[b.row1 - 1, b.col0:b.col1] = grey
    out[b.row0:b.row1, b.col0] = out[b.row0:b.row1, b.col1 - 1] = grey
    return np.clip(out, 0, 255).astype(np.uint8)


def write_prediction(prediction: TatlPrediction, image_path, output_dir, case_id: str,
                     attribute_pattern: str = "{id}_attribute_{name}.png", overwrite: bool = False) -> list[Path]:
    """Save the masks (0/255 PNG, original size), ``<id>_union.png`` and ``<id>_overlay.png``.

    Refuses (FileExistsError naming the file) to replace an existing file unless ``overwrite``.
    Returns the written paths.
    """
    from PIL import Image

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    planned = {output_dir / attribute_pattern.format(id=case_id, name=name): mask
               for name, mask in zip(prediction.attributes, prediction.masks)}
    planned[output_dir / f"{case_id}_union.png"] = prediction.union
    overlay_path = output_dir / f"{case_id}_overlay.png"
    if not overwrite:
        for path in [*planned, overlay_path]:
            if path.exists():
                raise FileExistsError(f"{path}: exists; pass overwrite=True to replace the predictions")
    for path, mask in planned.items():  # each file atomically: never half a mask under its name
        with atomic_path(path) as tmp:
            Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(tmp, format="PNG")
    with Image.open(image_path) as img:
        rgb = np.asarray(img.convert("RGB"))
    with atomic_path(overlay_path) as tmp:
        Image.fromarray(overlay_image(rgb, prediction)).save(tmp, format="PNG")
    return [*planned, overlay_path]
