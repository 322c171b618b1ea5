"""TATL stage logic: union target, stage 3 starts from stage 2, freeze keeps the encoder."""

import numpy as np
import pytest
import torch

from medxfer.losses import TverskyJaccardLoss
from medxfer.networks import arch_layout
from medxfer.networks.effnet_unet import unet_effb0
from medxfer.networks.linknet import LinkNetEffB0
from medxfer.transfer.weights import trainable_parameters
from medxfer.transfer.tatl import decoder_block_of, init_from_stage2, load_trained, stage3_attributes, tatl_network
from medxfer.transforms.dermoscopy import union_mask


def test_stage2_target_is_the_union_of_the_attribute_masks():
    masks = np.zeros((3, 4, 5), np.uint8)
    masks[0, 0, 0] = 255
    masks[2, 3, 4] = 1
    masks[1, 0, 0] = 255
    u = union_mask(masks)
    assert u.shape == (1, 4, 5) and u.sum() == 2 and u[0, 0, 0] == 1 and u[0, 3, 4] == 1
    t = union_mask(torch.as_tensor(masks[None]).float())
    assert t.shape == (1, 1, 4, 5) and torch.equal(t[0], torch.as_tensor(u).float())
    assert stage3_attributes(2018) == ("globules", "milia_like_cyst", "negative_network", "pigment_network", "streaks")
    assert len(stage3_attributes(2017)) == 4 and "globules" not in stage3_attributes(2017)


@pytest.mark.parametrize("arch,make", [("unet_effb0", unet_effb0), ("linknet_effb0", LinkNetEffB0)])
@pytest.mark.parametrize("mode", ["freeze", "non_freeze"])
def test_stage3_starts_from_stage2_and_freeze_keeps_the_encoder_after_a_step(arch, make, mode):
    torch.manual_seed(0)
    stage2 = make(in_channels=3, out_channels=1)
    with torch.no_grad():  # make stage 2 differ from any fresh initialisation
        for p in stage2.parameters():
            p.add_(0.01)
    torch.manual_seed(1)
    stage3 = make(in_channels=3, out_channels=1)
    report = init_from_stage2(stage3, stage2.state_dict(), arch, mode)
    s2, s3 = stage2.state_dict(), stage3.state_dict()
    assert all(torch.equal(s2[k], s3[k]) for k in s2)  # parameters equal before training
    assert not report.shape_mismatch and not report.skipped_by_mode

    layout = arch_layout(arch, stage3)
    encoder = {n: p.detach().clone() for n, p in stage3.named_parameters() if layout.encoder_level(n) is not None}
    stats = {n: b.clone() for n, b in stage3.named_buffers() if "running_mean" in n and layout.encoder_level(n) is not None}
    others = {n: p.detach().clone() for n, p in stage3.named_parameters() if layout.encoder_level(n) is None}
    params = trainable_parameters(stage3)
    assert len(params) == (len(others) if mode == "freeze" else len(encoder) + len(others))
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)  # TATL: SGD lr 0.01, momentum 0.9
    stage3.train()
    x = torch.randn(2, 3, 64, 64)
    y = (torch.rand(2, 1, 64, 64) > 0.7).float()
    loss = TverskyJaccardLoss()(stage3(x), y)
    loss.backward()
    opt.step()
    after = dict(stage3.named_parameters())
    enc_same = all(torch.equal(after[n], v) for n, v in encoder.items())
    assert enc_same == (mode == "freeze")
    buffers = dict(stage3.named_buffers())  # frozen: batch-norm statistics unchanged too
    assert stats and all(torch.equal(buffers[n], v) for n, v in stats.items()) == (mode == "freeze")
    assert any(not torch.equal(after[n], v) for n, v in others.items())  # the decoder trained


def test_stage2_weights_of_another_shape_are_refused():
    stage2 = unet_effb0(in_channels=3, out_channels=2)
    stage3 = unet_effb0(in_channels=3, out_channels=1)
    with pytest.raises(ValueError, match=r"transfer full loaded 369 of 371 required tensors.*"
                                         r"segmentation_head\.0\.weight \(2,16,3,3\) vs \(1,16,3,3\)"):
        init_from_stage2(stage3, stage2.state_dict(), "unet_effb0")  # full: every tensor, the head too
    with pytest.raises(ValueError, match="mode"):
        init_from_stage2(stage3, stage3.state_dict(), "unet_effb0", "frozen")


class _KnownLesion(torch.nn.Module):
    """Stand-in Segment-Net: logits +10 inside a fixed rectangle of the working frame, -10 outside."""

    def __init__(self, rect):
        super().__init__()
        self.rect = rect
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        out = torch.full((x.shape[0], 1, *x.shape[2:]), -10.0)
        r0, c0, r1, c1 = self.rect
        out[:, :, r0:r1, c0:c1] = 10.0
        return out


def test_stage1_boxes_are_mapped_to_each_image_own_height_and_width(tmp_path):
    from medxfer.data.isic import load_isic
    from medxfer.data.synth.isic import generate_isic
    from medxfer.transfer.tatl import segment_net_boxes
    from medxfer.transforms.lesion_crop import lesion_box, load_boxes, save_boxes

    root = generate_isic(tmp_path / "isic", year=2018, num_images=3, size=(90, 150), seed=1)  # non-square, H=90
    records = load_isic(root, year=2018, task=1)
    working = (64, 96)
    mask = torch.zeros(working)
    mask[10:30, 20:50] = 1
    boxes = segment_net_boxes(_KnownLesion((10, 20, 30, 50)), records, working_size=working, offset=4, progress=False)
    from PIL import Image

    for r in records:
        w, h = Image.open(r["image"]).size
        assert boxes[r["id"]] == lesion_box(mask, offset=4, image_size=(h, w))
        assert boxes[r["id"]].row1 <= h and boxes[r["id"]].col1 <= w and not boxes[r["id"]].fallback
    save_boxes(boxes, tmp_path / "boxes.json")
    assert load_boxes(tmp_path / "boxes.json") == boxes
    empty = segment_net_boxes(_KnownLesion((0, 0, 0, 0)), records[:1], working_size=working, progress=False)
    assert next(iter(empty.values())).fallback


@pytest.mark.parametrize("arch", ["unet_effb0", "linknet_effb0"])
def test_checkpoints_of_either_decoder_block_load_and_say_which_they_are(arch, tmp_path):
    """Runs trained before issue 17 (decoder_block linknet) keep loading: load_trained reads the
    block from the checkpoint's keys; a forced other block is refused, naming the file."""
    for block in ("paper", "linknet"):
        torch.manual_seed(0)
        net = tatl_network(arch, block)
        path = tmp_path / f"{block}.pt"
        torch.save(net.state_dict(), path)
        assert decoder_block_of(arch, net.state_dict()) == block
        loaded = load_trained(arch, path)
        assert all(torch.equal(v, net.state_dict()[k]) for k, v in loaded.state_dict().items())
        other = "linknet" if block == "paper" else "paper"
        with pytest.raises(ValueError, match=f"{block}.pt: not a {arch} checkpoint with decoder_block='{other}'"):
            load_trained(arch, path, decoder_block=other)
