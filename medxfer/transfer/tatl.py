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

Decoder stages (:func:`tatl_arch_kwargs`, ``decoder_block``): ``"paper"`` (default) builds both
shapes with section 4.1's stage, x2 up-sampling + two 3x3 convs, the encoder feature added (Link,
:class:`~medxfer.networks.linknet.PaperDecoderBlock`) or concatenated (U, ``FlexibleUNet`` with
``pre_conv=None``); ``"linknet"`` builds the networks of medxfer before issue 17 (Link: LinkNet's
1x1 -> up + 3x3 -> 1x1 block; U: ``FlexibleUNet``'s default 1x1 pre-conv), which a run trained then
needs to be loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import torch

from medxfer.data.isic import ISIC_LAYOUTS
from medxfer.jsonfile import write_json
from medxfer.networks import arch_layout, build_network
from medxfer.networks.effnet_unet import PAPER_UNET_KWARGS
from medxfer.networks.linknet import DECODER_BLOCKS
from medxfer.transfer.tatl_inference import segment_net_box  # stage 1 of one image (the inference step's)
from medxfer.transfer.weights import TransferReport, init_from_checkpoint, load_encoder_weights, read_checkpoint
from medxfer.transforms.dermoscopy import dermoscopy_transforms

__all__ = ["TATL_ARCHS", "TATL_TRAIN_SIZE", "TATL_MODES", "DECODER_BLOCKS", "tatl_arch_kwargs", "tatl_network",
           "decoder_block_of", "init_from_stage2", "stage_network", "load_trained", "stage3_attributes", "segment_net_box",
           "segment_net_boxes"]

#: U-shape and Link-shape EfficientNet-b0 segmenters (stages 2-3 use both, averaged).
TATL_ARCHS = ("unet_effb0", "linknet_effb0")
#: Training size (H, W) of TATL (paper: 384x512); the networks take any multiple of 32.
TATL_TRAIN_SIZE = (384, 512)
#: Stage-3 initialisation modes: ``freeze`` = TATL-Freeze (encoder frozen), ``non_freeze`` = TATL-NF.
TATL_MODES = ("freeze", "non_freeze")


def tatl_arch_kwargs(arch: str, decoder_block: str = "paper") -> dict:
    """Registry arguments (:func:`medxfer.networks.build_network`) of a TATL network's decoder.

    ``decoder_block="paper"``: ``linknet_effb0`` with ``decoder_block="paper"``, ``unet_effb0`` with
    ``pre_conv=None`` (TATL section 4.1 for both shapes); ``"linknet"``: ``{"decoder_block":
    "linknet"}`` / ``{}`` (the LinkNet block and ``FlexibleUNet``'s default). Plain JSON values, so a
    bundle's ``network_def`` can carry them literally.
    """
    if arch not in TATL_ARCHS:
        raise ValueError(f"arch must be one of {TATL_ARCHS}, got {arch!r}")
    if decoder_block not in DECODER_BLOCKS:
        raise ValueError(f"decoder_block must be one of {DECODER_BLOCKS}, got {decoder_block!r}")
    if arch == "linknet_effb0":
        return {"decoder_block": decoder_block}
    return dict(PAPER_UNET_KWARGS) if decoder_block == "paper" else {}


def tatl_network(arch: str, decoder_block: str = "paper") -> torch.nn.Module:
    """A fresh 3-channel-in, 1-logit-out TATL network of shape ``arch`` (random init), decoder as
    :func:`tatl_arch_kwargs` says; what every stage trains and a bundle's ``*_def`` builds."""
    return build_network(arch, 3, 1, TATL_TRAIN_SIZE, **tatl_arch_kwargs(arch, decoder_block))


def decoder_block_of(arch: str, state: Mapping[str, torch.Tensor]) -> str:
    """The ``decoder_block`` a TATL ``state`` dict was trained with, read from its keys: the LinkNet
    block has ``decoder.blocks.0.reduce.*``, ``FlexibleUNet``'s default U stage
    ``decoder.blocks.0.upsample.preconv.*``; anything else is ``"paper"``."""
    marker = {"linknet_effb0": "decoder.blocks.0.reduce.conv.weight",
              "unet_effb0": "decoder.blocks.0.upsample.preconv.weight"}[arch]
    return "linknet" if marker in state else "paper"


def init_from_stage2(network: torch.nn.Module, stage2_state: Mapping[str, torch.Tensor], arch: str,
                     mode: str = "non_freeze", *, source: str = "", allow_partial: bool = False) -> TransferReport:
    """Initialise a stage-3 target segmenter from the stage-2 network's weights (SPEC section 6).

    Every tensor of the stage-2 state dict is loaded (encoder, decoder and head: transfer mode
    ``full`` of :func:`medxfer.transfer.weights.init_from_checkpoint`, whose contract requires every
    tensor: stage 2 and stage 3 have the same shape and channels, so anything less is a wrong
    checkpoint); ``mode="freeze"`` also freezes every encoder parameter (``requires_grad=False``)
    and keeps the encoder's batch-norm layers in inference mode (running statistics unchanged), so
    only decoder and head train. Build the optimizer afterwards with
    :func:`medxfer.transfer.weights.trainable_parameters`.

    Args:
        network: a freshly built stage-3 network of the same shape as the stage-2 one.
        stage2_state: the stage-2 network's state dict.
        arch: ``"unet_effb0"`` or ``"linknet_effb0"`` (its layout says which keys are encoder).
        mode: ``"freeze"`` or ``"non_freeze"``.
        source: the stage-2 file, named by errors and the report.
        allow_partial: accept a stage-2 checkpoint that fits only in part (logged at WARNING);
            default: :class:`~medxfer.transfer.weights.PartialTransferError` naming the first
            mismatched keys.
    """
    if mode not in TATL_MODES:
        raise ValueError(f"TATL stage-3 mode must be one of {TATL_MODES}, got {mode!r}")
    return init_from_checkpoint(network, stage2_state, "full", arch_layout(arch, network), freeze=mode == "freeze",
                                batchnorm_inference=True, source=source or f"stage-2 {arch} state dict",
                                allow_partial=allow_partial)


def stage_network(arch: str, imagenet_weights=None, init_checkpoint=None, tatl_mode: str = "freeze",
                  output_dir=None, allow_partial: bool = False, decoder_block: str = "paper") -> torch.nn.Module:
    """The network one TATL ``train.yaml`` run trains: a 3-channel-in, 1-logit-out EfficientNet-b0
    segmenter of shape ``arch`` (``unet_effb0`` / ``linknet_effb0``, from the registry).

    ``init_checkpoint`` None: encoder from ``imagenet_weights`` (ImageNet ``efficientnet-b0`` weights
    on disk, :func:`medxfer.transfer.weights.load_encoder_weights`) or random, decoder random
    (stages 1 and 2, and stage 3 without stage 2). Otherwise a stage-2 ``model.pt``: stage 3
    initialised from it with ``tatl_mode`` (:func:`init_from_stage2`). Either transfer must load
    every tensor its mode requires unless ``allow_partial`` (the bundle's ``allow_partial`` id).
    The per-key report goes to ``output_dir/transfer_report.json``. ``decoder_block``: see
    :func:`tatl_arch_kwargs`.
    """
    network = tatl_network(arch, decoder_block)
    report = None
    if init_checkpoint is not None:
        if not Path(init_checkpoint).is_file():
            raise FileNotFoundError(f"{init_checkpoint}: stage-2 checkpoint not found (train the attribute-agnostic "
                                    "segmenter first, or leave init_checkpoint null)")
        report = init_from_stage2(network, read_checkpoint(init_checkpoint), arch, tatl_mode,
                                  source=str(init_checkpoint), allow_partial=allow_partial)
    elif imagenet_weights is not None:
        report = load_encoder_weights(network, imagenet_weights, allow_partial=allow_partial)
    if output_dir is not None and init_checkpoint is not None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        write_json(Path(output_dir) / "transfer_report.json", report.to_dict())
    return network


def load_trained(arch: str, checkpoint, device="cpu", decoder_block: str | None = None,
                 network: torch.nn.Module | None = None) -> torch.nn.Module:
    """A trained TATL network from its ``model.pt`` (``weights_only``; every key must fit), in eval mode.

    ``decoder_block``: ``None`` (default) reads it from the checkpoint (:func:`decoder_block_of`), so
    runs trained before issue 17 (``"linknet"``) load too. ``network``: the (untrained) module to
    load into, e.g. a copy of a bundle's ``*_def``; default :func:`tatl_network`.
    """
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"{checkpoint}: trained network not found")
    if arch not in TATL_ARCHS:
        raise ValueError(f"arch must be one of {TATL_ARCHS}, got {arch!r}")
    state = read_checkpoint(checkpoint)
    decoder_block = decoder_block_of(arch, state) if decoder_block is None else decoder_block
    network = tatl_network(arch, decoder_block) if network is None else network
    own = network.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        raise ValueError(f"{checkpoint}: not a {arch} checkpoint with decoder_block={decoder_block!r} (missing "
                         f"{missing[:3]}, unexpected {unexpected[:3]}, other shapes {shapes[:3]}); a run trained "
                         "before issue 17 has decoder_block 'linknet'")
    network.load_state_dict(state)
    return network.to(device).eval()


def stage3_attributes(year: int) -> Sequence[str]:
    """The attributes with a stage-3 segmenter: ISIC 2018 has five, ISIC 2017 four (no globules)."""
    return tuple(ISIC_LAYOUTS[year].attributes)


def segment_net_boxes(network: torch.nn.Module, records: Sequence[dict], working_size: Sequence[int] = (384, 512),
                      offset: float = 40, threshold: float = 0.5, progress: bool = True, mean=None, std=None,
                      **box_kwargs) -> dict:
    """Stage 1 at inference: :func:`segment_net_box` of every record's image (``record["image"]``,
    an ISIC JPEG), mapped to the image's own ``(H, W)``. ``mean`` / ``std``: the normalisation the
    network was trained with (default ImageNet). Returns ``{image id: Box}``.
    """
    from PIL import Image
    from tqdm.auto import tqdm

    norm = {k: v for k, v in (("mean", mean), ("std", std)) if v is not None}
    chain = dermoscopy_transforms("infer", size=working_size, **norm)
    boxes = {}
    for record in tqdm(records, desc="Segment-Net boxes", disable=not progress, leave=False):
        with Image.open(record["image"]) as img:
            width, height = img.size  # PIL gives (W, H)
        boxes[record["id"]] = segment_net_box(network, chain({"image": record["image"]})["image"], (height, width),
                                              working_size, offset, threshold, **box_kwargs)
    return boxes
