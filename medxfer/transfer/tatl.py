"""TATL: transfer learning from an attribute-agnostic segmenter to skin-attribute segmenters.

Nguyen et al., TATL (sections 3-4; SPEC section 6). Three stages, seven networks:

1. **Segment-Net** (U-shape EfficientNet-b0) on ISIC Task 1 lesion masks; its prediction gives the
   lesion box + offset (:mod:`medxfer.transforms.lesion_crop`), the crop is the input of stages 2-3;
2. **attribute-agnostic segmenter** on the crops, target = the union (bitwise OR) of the attribute
   masks (:func:`medxfer.transforms.dermoscopy.union_mask`);
3. **one target segmenter per attribute**, initialised from the stage-2 network (encoder, decoder and
   head: :func:`init_from_stage2`), ``freeze`` (encoder frozen, TATL-Freeze) or ``non_freeze``.

U- and Link-shape networks share the encoder parameter names, so stage-to-stage transfer works
between networks of the same shape (stage 2 U -> stage 3 U, stage 2 Link -> stage 3 Link).
This module holds the stage logic; training loops come from the ``tatl_skin`` bundle.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from monai.utils import convert_to_tensor

from medxfer.transfer.finetune import TransferReport, apply_transfer
from medxfer.transforms.lesion_crop import lesion_box

__all__ = ["TATL_MODES", "init_from_stage2", "stage3_attributes", "segment_net_box", "segment_net_boxes"]

#: Stage-3 initialisation modes: ``freeze`` = TATL-Freeze (encoder frozen), ``non_freeze`` = TATL-NF.
TATL_MODES = ("freeze", "non_freeze")


def init_from_stage2(network: torch.nn.Module, stage2_state: Mapping[str, torch.Tensor], arch: str,
                     mode: str = "non_freeze") -> TransferReport:
    """Initialise a stage-3 target segmenter from the stage-2 network's weights (SPEC section 6).

    Every tensor of the stage-2 state dict whose shape matches is loaded (encoder, decoder and head:
    transfer mode ``full``); ``mode="freeze"`` then freezes every encoder parameter
    (``requires_grad=False``) and keeps the encoder's batch-norm layers in inference mode (running
    statistics unchanged), so only decoder and head train. Build the optimizer afterwards with
    :func:`medxfer.transfer.finetune.trainable_parameters`.

    Args:
        network: a freshly built stage-3 network of the same shape as the stage-2 one.
        stage2_state: the stage-2 network's state dict.
        arch: ``"unet_effb0"`` or ``"linknet_effb0"`` (its layout says which keys are encoder).
        mode: ``"freeze"`` or ``"non_freeze"``.
    """
    from medxfer.networks.factory import arch_layout

    if mode not in TATL_MODES:
        raise ValueError(f"TATL stage-3 mode must be one of {TATL_MODES}, got {mode!r}")
    layout = arch_layout(arch, network)
    report = apply_transfer(network, stage2_state, "full", arch, layout=layout)
    if report.shape_mismatch:
        raise ValueError(f"stage-2 weights do not fit the stage-3 {arch}: {sorted(report.shape_mismatch)[:3]} ... "
                         "(stage 2 and stage 3 must have the same shape and channels)")
    if mode == "freeze":
        for name, param in network.named_parameters():
            if layout.encoder_level(name) is not None:
                param.requires_grad_(False)
                report.frozen.append(name)
        _keep_batchnorm_in_inference(network, layout)
    return report


def _keep_batchnorm_in_inference(network: torch.nn.Module, layout) -> None:
    """A frozen encoder must stay frozen: its batch-norm layers keep their running statistics
    (inference mode) even while the network trains, as Keras does for non-trainable layers."""
    norms = [m for name, m in network.named_modules()
             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and layout.encoder_level(name) is not None]
    def inference_mode(module, args):
        for m in norms:
            m.eval()

    if norms:
        network.register_forward_pre_hook(inference_mode)


def stage3_attributes(year: int) -> Sequence[str]:
    """The attributes with a stage-3 segmenter: ISIC 2018 has five, ISIC 2017 four (no globules)."""
    from medxfer.data.isic import ISIC_LAYOUTS

    return tuple(ISIC_LAYOUTS[year].attributes)


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


def segment_net_boxes(network: torch.nn.Module, records: Sequence[dict], working_size: Sequence[int] = (384, 512),
                      offset: float = 40, threshold: float = 0.5, progress: bool = True, mean=None, std=None,
                      **box_kwargs) -> dict:
    """Stage 1 at inference: :func:`segment_net_box` of every record's image (``record["image"]``,
    an ISIC JPEG), mapped to the image's own ``(H, W)``. ``mean`` / ``std``: the normalisation the
    network was trained with (default ImageNet). Returns ``{image id: Box}``.
    """
    from PIL import Image
    from tqdm.auto import tqdm

    from medxfer.transforms.dermoscopy import dermoscopy_transforms

    norm = {k: v for k, v in (("mean", mean), ("std", std)) if v is not None}
    chain = dermoscopy_transforms("infer", size=working_size, **norm)
    boxes = {}
    for record in tqdm(records, desc="Segment-Net boxes", disable=not progress, leave=False):
        with Image.open(record["image"]) as img:
            width, height = img.size  # PIL gives (W, H)
        boxes[record["id"]] = segment_net_box(network, chain({"image": record["image"]})["image"], (height, width),
                                              working_size, offset, threshold, **box_kwargs)
    return boxes
