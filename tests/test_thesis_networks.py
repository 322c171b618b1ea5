"""The thesis' basic U-Net and ResNet50 Attention U-Net as the thesis builds them (issue 17 item 4):
3x3 stem, up step = x2 interpolation + 2x2 conv (thesis section 1.1.1), attention gate of eq. 1.1
computed at the coarse resolution and up-sampled. Layer types / kernels / order, the up-conv against
``F.interpolate`` + ``F.conv2d(padding="same")`` (the authors' layers), the gate against a direct
transcription of eq. 1.1 on a tiny tensor, and output shapes."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medxfer.networks.attention_unet import CoarseAttentionGate, ResNet50AttentionUNet
from medxfer.networks.unet2d import InterpUpCat, UNet2D, unet2d_layout, up_conv

NARROW = (4, 8, 16, 32, 64)


def _randomise_bn_(module, seed=0):
    """Random affine and running statistics for every batch norm (so eval-mode BN is not the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(torch.randn(c, generator=g) * 0.3)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
    return module


def _bn(x, bn):
    """Eval-mode batch norm written out: (x - mean) / sqrt(var + eps) * weight + bias."""
    shape = (1, -1, 1, 1)
    return ((x - bn.running_mean.view(shape)) / torch.sqrt(bn.running_var.view(shape) + bn.eps)
            * bn.weight.view(shape) + bn.bias.view(shape))


def _conv_bn_relu_order(block):
    """Layer types of a MONAI ``Convolution`` (conv -> norm -> act) in forward order."""
    return [type(m) for m in block.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.ReLU))]


def test_unet_has_a_3x3_stem_then_two_conv_bn_relu_blocks_per_level():
    net = UNet2D(in_channels=3, out_channels=2)  # thesis channels 64 .. 1024
    stem = net.encoder.stem
    assert isinstance(stem, nn.Conv2d) and stem.kernel_size == (3, 3) and stem.padding == (1, 1)
    assert (stem.in_channels, stem.out_channels) == (3, 64) and stem.bias is not None
    level0 = net.encoder.levels[0]
    assert (level0.conv_0.conv.in_channels, level0.conv_0.conv.out_channels) == (64, 64)  # after the stem
    assert _conv_bn_relu_order(level0) == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU] * 2
    for k, (cin, cout) in enumerate([(64, 128), (128, 256), (256, 512), (512, 1024)], 1):
        level = net.encoder.levels[k]
        assert isinstance(level.max_pooling, nn.MaxPool2d) and level.max_pooling.kernel_size == 2
        convs = [m for m in level.modules() if isinstance(m, nn.Conv2d)]
        assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
            (cin, cout, (3, 3), (1, 1)), (cout, cout, (3, 3), (1, 1))]
        assert _conv_bn_relu_order(level) == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU] * 2
    assert isinstance(net.head, nn.Conv2d) and net.head.kernel_size == (1, 1) and net.head.in_channels == 64
    assert unet2d_layout(net).encoder_levels[0] == ["encoder.stem", "encoder.levels.0"]


def test_unet_up_steps_are_interpolation_then_2x2_conv_then_relu():
    net = UNet2D(in_channels=3, out_channels=2)
    for stage, (cin, cout) in zip(net.decoder.stages, [(1024, 512), (512, 256), (256, 128), (128, 64)]):
        assert isinstance(stage, InterpUpCat)
        up, pad, conv, act = stage.up
        assert isinstance(up, nn.Upsample) and up.scale_factor == 2.0 and up.mode == "bilinear"
        assert isinstance(pad, nn.ZeroPad2d) and tuple(pad.padding) == (0, 1, 0, 1)
        assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (2, 2) and conv.stride == (1, 1)
        assert (conv.in_channels, conv.out_channels) == (cin, cout) and isinstance(act, nn.ReLU)
        first = stage.convs.conv_0.conv
        assert (first.in_channels, first.out_channels, first.kernel_size) == (2 * cout, cout, (3, 3))
    assert not any(isinstance(m, nn.ConvTranspose2d) for m in net.modules())


@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_up_conv_equals_interpolate_then_same_padded_2x2_conv(mode):
    torch.manual_seed(0)
    block = up_conv(3, 5, mode)
    x = torch.randn(2, 3, 4, 6)
    conv = block[2]
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    with torch.no_grad():
        expected = F.relu(F.conv2d(F.interpolate(x, scale_factor=2, mode=mode, **kwargs), conv.weight, conv.bias,
                                   padding="same"))
        assert torch.allclose(block(x), expected, atol=1e-6)
    assert block(x).shape == (2, 5, 8, 12)


def test_unet_stage_concatenates_up_then_skip():
    torch.manual_seed(1)
    stage = InterpUpCat(8, 4, 4).eval()
    x, skip = torch.randn(1, 8, 3, 3), torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        assert torch.allclose(stage(x, skip), stage.convs(torch.cat([stage.up(x), skip], 1)), atol=1e-6)
        assert not torch.allclose(stage(x, skip), stage.convs(torch.cat([skip, stage.up(x)], 1)), atol=1e-3)


@pytest.mark.parametrize("kwargs", [{}, {"up_mode": "nearest"}, {"up_mode": "deconv"},
                                    {"up_mode": "deconv", "stem": False}])
def test_unet_variants_keep_the_shapes_and_script(kwargs):
    torch.manual_seed(2)
    net = UNet2D(3, 2, channels=NARROW, **kwargs).eval()
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        y = net(x)
        assert y.shape == (2, 2, 32, 48) and torch.isfinite(y).all()
        assert torch.allclose(torch.jit.script(net)(x), y, atol=1e-5)
    assert hasattr(net.encoder.stem, "weight") == kwargs.get("stem", True)


def test_earlier_unet_parameter_count_is_unchanged():
    assert sum(p.numel() for p in UNet2D(3, 1, up_mode="deconv", stem=False).parameters()) == 31_037_633
    assert sum(p.numel() for p in UNet2D(3, 1).parameters()) == 31_074_561


def test_bad_up_mode_and_gate_raise_one_line_errors():
    with pytest.raises(ValueError, match="UNet2D: up_mode"):
        UNet2D(up_mode="bicubic")
    with pytest.raises(ValueError, match="AttentionUpBlock: gate"):
        ResNet50AttentionUNet(gate="global")
    with pytest.raises(ValueError, match="twice the size"):
        CoarseAttentionGate(4, 3)(torch.randn(1, 4, 2, 2), torch.randn(1, 3, 6, 6))


@pytest.mark.parametrize("coefficients", ["channel", "pixel"])
def test_coarse_gate_equals_a_direct_computation_of_eq_1_1(coefficients):
    """alpha = upsample(sigmoid(Psi(ReLU(Q + K)))) * V with Q from the coarse signal g (gating block,
    1x1 W_Q, BN), K = BN(2x2 stride-2 conv of the skip), Psi = 1x1 conv + BN; eval-mode BN written out."""
    torch.manual_seed(3)
    cg, cs = 4, 3
    gate = _randomise_bn_(CoarseAttentionGate(cg, cs, coefficients=coefficients)).eval()
    g, skip = torch.randn(2, cg, 2, 3), torch.randn(2, cs, 4, 6)

    def lin(x, conv):  # 1x1 conv as a matrix product over channels
        return torch.einsum("oc,bchw->bohw", conv.weight[:, :, 0, 0], x) + conv.bias.view(1, -1, 1, 1)

    with torch.no_grad():
        gs = torch.relu(_bn(lin(g, gate.gating[0]), gate.gating[1]))
        q = _bn(lin(gs, gate.w_q[0]), gate.w_q[1])
        wk = gate.w_k[0]
        blocks = skip.unfold(2, 2, 2).unfold(3, 2, 2)  # (B, C_s, h, w, 2, 2): the non-overlapping 2x2 cells
        k = _bn(torch.einsum("ocij,bchwij->bohw", wk.weight, blocks) + wk.bias.view(1, -1, 1, 1), gate.w_k[1])
        coarse = torch.sigmoid(_bn(lin(torch.relu(q + k), gate.psi[0]), gate.psi[1]))
        assert coarse.shape == (2, cs if coefficients == "channel" else 1, 2, 3)  # at g's resolution
        alpha = coarse.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # sigma_hat: then up-sampled
        expected = alpha * skip
        assert torch.allclose(gate.coefficients(g, skip), alpha, atol=1e-6)
        assert torch.allclose(gate(g, skip), expected, atol=1e-6)
        assert ((alpha > 0) & (alpha < 1)).all()
        # each coefficient is shared by a 2x2 cell of skip pixels (computed once per coarse pixel)
        assert torch.equal(alpha[..., 0::2, 0::2], alpha[..., 1::2, 1::2])


def test_attention_unet_stages_gate_with_the_coarse_signal_and_concatenate_up_then_gated():
    torch.manual_seed(4)
    net = ResNet50AttentionUNet(3, 2).eval()
    stages = [s for s in net.decoder.stages if s.gate is not None]
    assert len(stages) == 4 and net.decoder.stages[4].gate is None
    assert all(isinstance(s.gate, CoarseAttentionGate) for s in stages)
    # up-convs halve the channels (authors' channel_decrease_ratio 0.5), convs go to the thesis' 256 .. 16
    assert [s.up[2].out_channels for s in net.decoder.stages] == [1024, 128, 64, 32, 16]
    assert [s.convs.conv_1.conv.out_channels for s in net.decoder.stages] == [256, 128, 64, 32, 16]
    calls, gate_inputs = {}, {}
    hooks = []
    for k, s in enumerate(stages):
        hooks.append(s.register_forward_hook(lambda m, i, o, k=k: calls.__setitem__(k, (i[0], i[1], o))))
        hooks.append(s.gate.register_forward_hook(lambda m, i, o, k=k: gate_inputs.__setitem__(k, (i, o))))
    try:
        with torch.no_grad():
            y = net(torch.randn(1, 3, 64, 64))
    finally:
        for h in hooks:
            h.remove()
    assert y.shape == (1, 2, 64, 64)
    with torch.no_grad():
        for k, s in enumerate(stages):
            x, skip, out = calls[k]
            (g, gated_skip), gated = gate_inputs[k]
            assert torch.equal(g, x) and torch.equal(gated_skip, skip)  # gating signal = the coarse input
            assert torch.allclose(out, s.convs(torch.cat([s.up(x), gated], dim=1)), atol=1e-5)


def test_attention_unet_default_scripts_and_matches_eager():
    torch.manual_seed(5)
    net = ResNet50AttentionUNet(3, 1, up_mode="nearest").eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert torch.allclose(torch.jit.script(net)(x), net(x), atol=1e-5)
