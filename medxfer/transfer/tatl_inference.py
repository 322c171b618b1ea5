"""TATL inference step: image -> Segment-Net -> crop -> target segmenters (U + Link averaged) -> paste back.

Nguyen et al., TATL, section 4 ("Inference Step"; SPEC section 6): an image is segmented by the
Segment-Net, the lesion box (+ offset) crops it, each attribute's target segmenters (U- and
Link-shape) predict on the crop, their probabilities are averaged, and the masks are rescaled to
the original image size.

The union map (section 6, Fig. 9: "the union of all attributes provided by TATL", the "predicted
union regions") is, by default (``union="stage2"``), the prediction of the stage-2
attribute-agnostic segmenter(s), which were trained on exactly that target: the U- and Link-shape
segmenters' sigmoid probabilities averaged on the same crop (as the target segmenters are),
pasted back, thresholded. ``union="or_stage3"`` (medxfer's union before issue 17, and the only one
for runs without stage 2) is the pixel-wise OR of the thresholded attribute masks. The two differ:
the agnostic segmenter can mark regions where no single attribute passes the threshold.
Averaging over folds (a predictor holds one fold's networks) is the caller's: pass every fold's
stage-2 networks as ``union_networks``.

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
from medxfer.transforms.dermoscopy import IMAGENET_MEAN, IMAGENET_STD, dermoscopy_transforms
from medxfer.transforms.lesion_crop import Box, lesion_box, paste_back

__all__ = ["TatlPrediction", "TatlPredictor", "segment_net_box", "write_prediction", "overlay_image",
           "ATTRIBUTE_COLOURS", "UNION_MODES"]

#: Union map sources: the stage-2 attribute-agnostic segmenters (paper), or the OR of the stage-3 masks.
UNION_MODES = ("stage2", "or_stage3")

#: Overlay colours (RGB) per attribute; the union map is drawn as a white outline.
ATTRIBUTE_COLOURS = {
    "pigment_network": (255, 80, 80),
    "negative_network": (80, 160, 255),
    "globules": (255, 220, 0),
    "milia_like_cyst": (0, 230, 120),
    "streaks": (230, 0, 230),
}


@torch.no_grad()
def segment_net_box(network: torch.nn.Module, image, image_size: Sequence[int], working_size: Sequence[int],
                    offset: float = 40, threshold: float = 0.5, **box_kwargs):
    """Stage 1 for one image: the Segment-Net's lesion box in original pixels.

    Args:
        network: the Segment-Net (one sigmoid output), on its device.
        image: ``(3, Hw, Ww)`` the image through the dermoscopy ``infer`` chain at ``working_size``.
        image_size: the original ``(H, W)`` the box is mapped to.
        offset, threshold, box_kwargs: as :func:`medxfer.transforms.lesion_crop.lesion_box`.

    Returns:
        a :class:`~medxfer.transforms.lesion_crop.Box` (``fallback=True`` when nothing was found).
    """
    device = next((p.device for p in network.parameters()), torch.device("cpu"))
    network.eval()
    x = convert_to_tensor(image, track_meta=False)[None].to(device)  # plain tensor: no MetaTensor dispatch per layer
    prob = torch.sigmoid(network(x))[0, 0].cpu()
    return lesion_box(prob, threshold=threshold, offset=offset, image_size=tuple(image_size), mask_size=working_size,
                      **box_kwargs)


@dataclass
class TatlPrediction:
    """One image's prediction at its original size.

    Attributes:
        attributes: attribute names, in channel order.
        probabilities: float32 ``(A, H, W)``, the U/Link-averaged probabilities pasted back (0 outside the box).
        box: the lesion crop used (the whole image without a Segment-Net, or when it found nothing).
        threshold: probability threshold of :attr:`masks` and :attr:`union`.
        union_probability: float32 ``(H, W)``, the stage-2 segmenters' averaged probability pasted
            back, or None (``union="or_stage3"``).
    """

    attributes: Sequence[str]
    probabilities: np.ndarray
    box: Box
    threshold: float = 0.5
    union_probability: np.ndarray | None = None

    @property
    def masks(self) -> np.ndarray:
        """bool ``(A, H, W)`` attribute masks."""
        return self.probabilities >= self.threshold

    @property
    def union(self) -> np.ndarray:
        """bool ``(H, W)`` union map: the stage-2 prediction thresholded, or (without one) the pixels
        with at least one attribute mask."""
        if self.union_probability is not None:
            return self.union_probability >= self.threshold
        return self.masks.any(axis=0)


class TatlPredictor:
    """The TATL pipeline of one fold: Segment-Net, per attribute U and Link target segmenters, and
    the stage-2 attribute-agnostic segmenters for the union map.

    Args:
        targets: ``{attribute: [networks]}``; each maps ``(1, 3, h, w)`` to ``(1, 1, h, w)`` logits and
            their sigmoid probabilities are averaged.
        segment_net: the stage-1 network, or None (no crop: the Table 3 ablations without stage 1).
        working_size: ``(H, W)`` the networks run at.
        offset: box margin in working pixels. mean, std: the training normalisation.
        threshold: probability threshold (Segment-Net, final masks and union map).
        union_networks: the stage-2 attribute-agnostic segmenters (same input and output as a target
            segmenter), their probabilities averaged; required by ``union="stage2"``.
        union: ``"stage2"`` (default, the paper's union map) or ``"or_stage3"`` (OR of the attribute
            masks; ``union_networks`` are then not run).
        inferer: how a network is applied, ``inferer(x, network)`` (MONAI ``Inferer`` protocol);
            default ``network(x)`` (as MONAI's ``SimpleInferer``).
    """

    def __init__(self, targets: Mapping[str, Sequence[torch.nn.Module]], segment_net: torch.nn.Module | None = None,
                 working_size: Sequence[int] = (384, 512), offset: float = 40, mean=None, std=None,
                 threshold: float = 0.5, device="cpu", union_networks: Sequence[torch.nn.Module] | None = None,
                 union: str = "stage2", inferer=None) -> None:
        if not targets or any(not nets for nets in targets.values()):
            raise ValueError("every attribute needs at least one target segmenter")
        if union not in UNION_MODES:
            raise ValueError(f"union must be one of {UNION_MODES}, got {union!r}")
        if union == "stage2" and not union_networks:
            raise ValueError("union='stage2' needs the stage-2 attribute-agnostic segmenters (union_networks); "
                             "without stage 2 use union='or_stage3'")
        self.device = torch.device(device)
        self.union_mode = union
        self.targets = {a: [n.to(self.device).eval() for n in nets] for a, nets in targets.items()}
        self.union_networks = [n.to(self.device).eval() for n in union_networks] if union == "stage2" else []
        self.inferer = inferer
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
        return (sum(len(n) for n in self.targets.values()) + len(self.union_networks)
                + (self.segment_net is not None))

    def _probability(self, networks: Sequence[torch.nn.Module], x: torch.Tensor) -> torch.Tensor:
        """``(h, w)``: the networks' sigmoid probabilities on ``x`` averaged."""
        run = self.inferer if self.inferer is not None else (lambda inputs, network: network(inputs))
        return torch.stack([torch.sigmoid(run(x, net))[0, 0] for net in networks]).mean(0)

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
        maps = [self._probability(nets, x) for nets in self.targets.values()]
        if self.union_networks:
            maps.append(self._probability(self.union_networks, x))
        full = paste_back(torch.stack(maps).float().cpu().numpy(), box, (height, width), mode="bilinear")
        full = full.astype(np.float32)
        n = len(self.targets)
        return TatlPrediction(self.attributes, full[:n], box, self.threshold,
                              full[n] if self.union_networks else None)


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
