"""The thesis 2D segmenters (SPEC section 7): basic U-Net, ResNet50 Attention U-Net, Swin U-Net.

Shapes, encoder sizes against thesis Table 2.4 (the acceptance test), the earlier additive attention
gate at the skip's resolution (``gate="skip"``; the thesis gate is tested in tests/test_thesis_networks.py),
the layouts (every parameter in exactly one part; decoder stages and penultimate encoder level are
modules with 4-D outputs) and the ResNet50 encoder's MONAI parameter names.
"""

import copy

import pytest
import torch

from medxfer.networks.attention_unet import ResNet50AttentionUNet, resnet50_attention_unet_layout
from medxfer.networks.swin_unet import PatchExpand, SwinUNet, swin_unet_layout
from medxfer.networks.unet2d import UNet2D, unet2d_layout

OUT = 2  # out_channels of the test networks
#: arch -> (builder, layout function, test input side, thesis Table 2.4 encoder size)
ARCHS = {
    "unet2d": (lambda: UNet2D(in_channels=3, out_channels=OUT), unet2d_layout, 64, 19.9e6),
    "resnet50_attention_unet": (lambda: ResNet50AttentionUNet(in_channels=3, out_channels=OUT),
                                resnet50_attention_unet_layout, 64, 22.8e6),
    "swin_unet": (lambda: SwinUNet(in_channels=3, out_channels=OUT, img_size=224), swin_unet_layout, 224, 21.2e6),
}
#: penultimate encoder feature (C, h) at the test side
PENULTIMATE = {"unet2d": (512, 64 // 8), "resnet50_attention_unet": (1024, 64 // 16), "swin_unet": (384, 224 // 16)}


@pytest.fixture(scope="module")
def nets():
    built = {}
    for i, (arch, (build, *_)) in enumerate(ARCHS.items()):
        torch.manual_seed(i)
        built[arch] = build().eval()
    return built


@pytest.fixture(scope="module")
def runs(nets):
    """One forward per network at its test side (batch 1), with the decoder-stage and penultimate
    outputs captured by forward hooks: arch -> (logits, {module name: output})."""
    out = {}
    for arch, (_, layout_fn, side, _) in ARCHS.items():
        net, layout = nets[arch], layout_fn(nets[arch])
        captured = {}
        names = list(layout.decoder_stages) + [layout.penultimate_encoder]
        hooks = [net.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: captured.__setitem__(n, o))
                 for n in names]
        try:
            with torch.no_grad():
                logits = net(torch.randn(1, 3, side, side))
        finally:
            for h in hooks:
                h.remove()
        out[arch] = (logits, captured)
    return out


@pytest.mark.parametrize("arch", list(ARCHS))
def test_forward_maps_input_to_out_channel_logits_at_input_resolution(runs, arch):
    side = ARCHS[arch][2]
    logits, _ = runs[arch]
    assert logits.shape == (1, OUT, side, side)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", ["unet2d", "resnet50_attention_unet", "swin_unet"])
def test_non_square_inputs_work(nets, arch):
    h, w = (64, 96) if arch != "unet2d" else (48, 80)  # multiples of 32 (of 16 for the U-Net)
    with torch.no_grad():
        assert nets[arch](torch.randn(1, 3, h, w)).shape == (1, OUT, h, w)


@pytest.mark.parametrize("arch,side,divisor", [("unet2d", 72, 16), ("resnet50_attention_unet", 48, 32),
                                               ("swin_unet", 80, 32)])
def test_sides_that_are_not_multiples_of_the_divisor_raise(nets, arch, side, divisor):
    with pytest.raises(ValueError, match=f"multiples of {divisor}"):
        nets[arch](torch.randn(1, 3, side, 64))


def test_swin_unet_rejects_an_img_size_that_is_not_a_multiple_of_32():
    with pytest.raises(ValueError, match="multiple of 32"):
        SwinUNet(img_size=100)


def test_acceptance_encoder_sizes_within_10_percent_of_thesis_table_2_4(nets):
    """Thesis Table 2.4: U-Net encoder 19.9 M, ResNet50 22.8 M, Swin Transformer 21.2 M parameters.

    Counts are of parameters named ``encoder.*``; they do not depend on the input size (the Swin
    U-Net is built for 224 x 224, the size of Table 2.4; the other two are fully convolutional)."""
    for arch, (*_, ref) in ARCHS.items():
        net = nets[arch]
        n = net.encoder_parameters()
        assert n == sum(p.numel() for k, p in net.named_parameters() if k.startswith("encoder."))
        total = sum(p.numel() for p in net.parameters())
        print(f"{arch}: encoder {n:,} (thesis {ref / 1e6:.1f} M, {100 * (n - ref) / ref:+.1f} %), total {total:,}")
        assert abs(n - ref) / ref <= 0.10, (arch, n, ref)
    # exact values of this implementation (documented in the modules)
    assert nets["unet2d"].encoder_parameters() == 18_884_096  # with the 3x3 stem
    assert nets["resnet50_attention_unet"].encoder_parameters() == 23_508_032  # torchvision resnet50 - fc
    assert nets["swin_unet"].encoder_parameters() == 20_413_386


def _gated_stages(net):
    return [s for s in net.decoder.stages if s.gate is not None]


@pytest.fixture(scope="module")
def skip_gate_net():
    """medxfer's earlier Attention U-Net (MONAI gate at the skip's resolution, transposed-conv up steps)."""
    torch.manual_seed(7)
    return ResNet50AttentionUNet(in_channels=3, out_channels=OUT, up_mode="deconv", gate="skip").eval()


def test_earlier_attention_unet_keeps_its_parameter_count(skip_gate_net):
    assert sum(p.numel() for p in skip_gate_net.parameters()) == 31_337_837 + 17  # head 16 -> 2 (documented: -> 1)


def test_skip_resolution_gate_scales_each_skip_pixel_by_one_coefficient_in_0_1(skip_gate_net):
    # train mode: batch norm normalises with batch statistics, so the untrained gates are not saturated
    # (in eval mode the default running statistics let the random-init activations grow until
    # sigmoid rounds to exactly 0 or 1)
    net = copy.deepcopy(skip_gate_net).train()
    stages = _gated_stages(net)
    assert len(stages) == 4 and net.decoder.stages[4].gate is None  # the last stage gets no skip
    seen = []
    hooks = [s.gate.register_forward_hook(lambda m, i, o: seen.append((i[1], o))) for s in stages]
    try:
        with torch.no_grad():
            net(torch.randn(2, 3, 64, 64))
    finally:
        for h in hooks:
            h.remove()
    assert [tuple(x.shape[1:]) for x, _ in seen] == [(1024, 4, 4), (512, 8, 8), (256, 16, 16), (64, 32, 32)]
    for skip, gated in seen:
        assert gated.shape == skip.shape
        mask = skip.abs() > 1e-3
        ratio = torch.where(mask, gated / torch.where(mask, skip, torch.ones_like(skip)), torch.nan)
        assert (ratio[mask] > 0).all() and (ratio[mask] < 1).all()
        # one coefficient per pixel, shared by all channels (psi has one output channel)
        per_pixel = torch.nanmean(ratio, dim=1, keepdim=True)
        assert torch.allclose(torch.nan_to_num(ratio - per_pixel), torch.zeros_like(ratio), atol=1e-4)


def test_skip_resolution_gate_with_zero_psi_halves_the_skip_and_feeds_the_concatenation(skip_gate_net):
    """psi conv weights and bias 0 -> psi = sigmoid(BN(0)) = 0.5 in eval mode, so every stage must see
    ``[0.5 * skip, up(x)]``; fails if the gate were missing, gated the wrong signal, or were not concatenated."""
    net = copy.deepcopy(skip_gate_net).eval()
    stages = _gated_stages(net)
    with torch.no_grad():
        for s in stages:
            s.gate.psi[0].conv.weight.zero_()
            s.gate.psi[0].conv.bias.zero_()
    calls = {}
    hooks = []
    for k, s in enumerate(stages):
        hooks.append(s.register_forward_hook(lambda m, i, o, k=k: calls.__setitem__(k, (i[0], i[1], o))))
        hooks.append(s.gate.register_forward_hook(lambda m, i, o, k=k: calls.__setitem__(("gate", k), o)))
    try:
        with torch.no_grad():
            net(torch.randn(1, 3, 64, 64))
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        for k, s in enumerate(stages):
            x, skip, out = calls[k]
            assert torch.allclose(calls[("gate", k)], 0.5 * skip, atol=1e-6)
            expected = s.convs(torch.cat([0.5 * skip, s.up(x)], dim=1))
            assert torch.allclose(out, expected, atol=1e-5)
            assert not torch.allclose(out, s.convs(torch.cat([skip, s.up(x)], dim=1)), atol=1e-3)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_layout_puts_every_parameter_in_exactly_one_part(nets, arch):
    net, layout = nets[arch], ARCHS[arch][1](nets[arch])
    assert layout.arch == arch and layout.head
    used_levels = set()
    for name, _ in net.named_parameters():
        levels = [k for k, prefixes in enumerate(layout.encoder_levels, 1) if layout._match(name, prefixes)]
        in_head, in_decoder = layout.in_head(name), name.startswith("decoder.")
        assert len(levels) + in_head + in_decoder == 1, name
        assert (layout.encoder_level(name) is not None) == name.startswith("encoder."), name
        used_levels.update(levels)
    assert used_levels == set(range(1, len(layout.encoder_levels) + 1))  # no empty level
    modules = dict(net.named_modules())
    for name in [p for level in layout.encoder_levels for p in level] + layout.head + layout.decoder_stages:
        assert name in modules, name


@pytest.mark.parametrize("arch", list(ARCHS))
def test_layout_decoder_stages_and_penultimate_encoder_give_4d_feature_maps(runs, nets, arch):
    side = ARCHS[arch][2]
    layout = ARCHS[arch][1](nets[arch])
    _, captured = runs[arch]
    pen = captured[layout.penultimate_encoder]
    assert pen.shape == (1, PENULTIMATE[arch][0], PENULTIMATE[arch][1], PENULTIMATE[arch][1])
    assert layout._match(layout.penultimate_encoder, layout.encoder_levels[-2])  # second-to-last level
    sizes = []
    for name in layout.decoder_stages:  # deepest first: resolution grows
        out = captured[name]
        assert out.ndim == 4 and out.shape[0] == 1, name
        sizes.append(out.shape[-1])
    assert sizes == sorted(sizes) and sizes[-1] in (side, side // 4) and len(set(sizes)) == len(sizes)


def test_resnet50_encoder_is_torchvision_resnet50_with_monai_names(nets):
    from monai.networks.nets import resnet50

    net = nets["resnet50_attention_unet"]
    torch.manual_seed(123)
    classifier = resnet50(spatial_dims=2, n_input_channels=3, conv1_t_size=7, conv1_t_stride=2,
                          shortcut_type="B", bias_downsample=False, num_classes=1000)  # fc kept
    clf_keys = list(classifier.state_dict())
    enc_keys = list(net.encoder.state_dict())
    assert enc_keys == [k for k in clf_keys if not k.startswith("fc.")]
    assert not any(k.startswith(("fc.", "avgpool")) for k, _ in net.named_parameters())
    encoder = copy.deepcopy(net.encoder)
    result = encoder.load_state_dict(classifier.state_dict(), strict=False)
    assert result.missing_keys == [] and sorted(result.unexpected_keys) == ["fc.bias", "fc.weight"]
    assert torch.equal(encoder.layer4[2].conv3.weight, classifier.layer4[2].conv3.weight)
    # torchvision ResNet50 (v1.5): 7x7/2 stem, 3x3/2 max-pool, [3, 4, 6, 3], stride on the 3x3 conv, no conv bias
    e = net.encoder
    assert e.conv1.weight.shape == (64, 3, 7, 7) and e.conv1.stride == (2, 2) and e.conv1.bias is None
    assert (e.maxpool.kernel_size, e.maxpool.stride) == (3, 2)
    assert [len(getattr(e, f"layer{k}")) for k in range(1, 5)] == [3, 4, 6, 3]
    assert e.layer2[0].conv2.stride == (2, 2) and e.layer2[0].conv1.stride == (1, 1)
    assert e.layer2[0].downsample[0].bias is None
    assert sum(p.numel() for k, p in classifier.named_parameters() if not k.startswith("fc.")) == 23_508_032
    with torch.no_grad():
        feats = net.encode(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape[1:]) for f in feats] == [(64, 32, 32), (256, 16, 16), (512, 8, 8), (1024, 4, 4),
                                                     (2048, 2, 2)]


def test_patch_expand_rearranges_linear_outputs_into_a_2x_finer_grid():
    expand = PatchExpand(dim=8, scale=2, out_dim=4)
    expand.norm = torch.nn.Identity()  # check the rearrangement alone
    x = torch.randn(1, 8, 3, 5)
    with torch.no_grad():
        y = expand(x)
        tokens = expand.expand(x.permute(0, 2, 3, 1))  # (1, 3, 5, 2*2*4), order (p1, p2, c)
    assert y.shape == (1, 4, 6, 10)
    for p1 in range(2):
        for p2 in range(2):
            block = tokens[..., (p1 * 2 + p2) * 4:(p1 * 2 + p2 + 1) * 4].permute(0, 3, 1, 2)
            assert torch.equal(y[:, :, p1::2, p2::2], block)


def test_swin_unet_levels_have_the_paper_token_grids_and_channels_at_224(nets, runs):
    net = nets["swin_unet"]
    assert [layer.blocks[0].attn.num_heads for layer in net.encoder.layers] == [3, 6, 12, 24]
    assert [len(layer.blocks) for layer in net.encoder.layers] == [2, 2, 2, 2]
    assert [len(s.layer.blocks) for s in net.decoder.stages] == [2, 2, 2]
    assert [tuple(layer.window_size) for layer in net.encoder.layers] == [(7, 7)] * 4
    _, captured = runs["swin_unet"]
    assert [tuple(captured[n].shape[1:]) for n in swin_unet_layout().decoder_stages] == [
        (384, 14, 14), (192, 28, 28), (96, 56, 56)]
