"""TATL U-shape (FlexibleUNet effb0) and Link-shape (LinkNetEffB0) segmenters: shapes, shared encoder keys,
skip addition, the decoder stage of TATL section 4.1 layer by layer, local encoder weights (never
downloaded), parameter counts (closed form), gradients, layout."""

import re

import pytest
import torch

from medxfer.networks.effnet_unet import (EFFB0_CHANNELS, ENCODER_PREFIX, PAPER_UNET_KWARGS, effb0_layout,
                                          parameter_counts, unet_effb0)
from medxfer.networks.linknet import LinkNetEffB0
from medxfer.transfer.weights import init_from_checkpoint, load_encoder_weights

H, W = 64, 96  # non-square, multiples of 32
UNUSED = tuple(ENCODER_PREFIX + m + "." for m in ("_conv_head", "_bn1", "_fc"))  # ImageNet classifier


def _encoder_state(net):
    return {k: v for k, v in net.state_dict().items() if k.startswith(ENCODER_PREFIX)}


def _build(kind, seed=0, weights_file=None, strict_weights=False, **kwargs):
    """A U / Link segmenter, its encoder from ``weights_file`` through the one weight path when given."""
    torch.manual_seed(seed)
    net = unet_effb0(**kwargs) if kind == "unet" else LinkNetEffB0(**kwargs)
    if weights_file is not None:
        load_encoder_weights(net, weights_file, strict=strict_weights)
    return net


def _lukemelas_state(encoder):
    """The EfficientNet-PyTorch naming, written independently of lukemelas_key: flat block index, no
    num_batches_tracked counters (converted files may lack them)."""
    state = {}
    flat = [block for stack in encoder._blocks for block in stack]
    for i, block in enumerate(flat):
        for name, value in block.state_dict().items():
            state[f"_blocks.{i}.{name}"] = value.clone()
    for name, value in encoder.state_dict().items():
        if not name.startswith("_blocks."):
            state[name] = value.clone()
    return {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}


@pytest.mark.parametrize("kind", ["unet", "unet_paper", "link", "link_deconv", "link_linknet", "link_linknet_deconv"])
def test_both_shapes_map_bchw_to_b_out_h_w_on_non_square_input(kind):
    kwargs = {"upsample": "deconv"} if kind.endswith("deconv") else {}
    kwargs.update({"decoder_block": "linknet"} if "linknet" in kind else {})
    kwargs.update(PAPER_UNET_KWARGS if kind == "unet_paper" else {})
    net = _build(kind.split("_")[0], in_channels=3, out_channels=2, **kwargs).eval()
    with torch.no_grad():
        assert net(torch.randn(2, 3, H, W)).shape == (2, 2, H, W)


def test_linknet_rejects_sides_that_are_not_multiples_of_32():
    with pytest.raises(ValueError, match="multiple of 32"):
        LinkNetEffB0()(torch.randn(1, 3, 64, 80))


def test_encoder_keys_and_shapes_are_identical_in_u_link_and_monai_flexible_unet():
    from monai.networks.nets import FlexibleUNet

    unet, link = _build("unet"), _build("link")
    reference = FlexibleUNet(3, 1, backbone="efficientnet-b0", pretrained=False)  # built by MONAI itself
    shapes = [{k: tuple(v.shape) for k, v in _encoder_state(n).items()} for n in (unet, link, reference)]
    assert list(shapes[0]) == list(shapes[1]) == list(shapes[2])  # same keys, same order
    assert shapes[0] == shapes[1] == shapes[2]
    assert len(shapes[0]) == 360 and "encoder._blocks.1.1._expand_conv.weight" in shapes[0]


def test_encoder_weights_move_from_u_to_link_shape_and_give_identical_features():
    unet, link = _build("unet", seed=1).eval(), _build("link", seed=2).eval()
    x = torch.randn(2, 3, H, W)
    with torch.no_grad():
        assert not torch.equal(unet.encoder(x)[-1], link.encoder(x)[-1])  # different random inits
    encoder_state = _encoder_state(unet)
    result = link.load_state_dict(encoder_state, strict=False)
    assert result.unexpected_keys == []
    assert not [k for k in result.missing_keys if k.startswith(ENCODER_PREFIX)]  # strict on the encoder subset
    link.encoder.load_state_dict(unet.encoder.state_dict(), strict=True)
    with torch.no_grad():
        for fu, fl in zip(unet.encoder(x), link.encoder(x)):
            assert torch.equal(fu, fl)
    assert [f.shape[1] for f in link.encoder(x)] == list(EFFB0_CHANNELS)


def _batch_statistics(net):
    """Eval mode (no drop-connect: deterministic) but BatchNorm on batch statistics: with untrained running
    statistics the deep EfficientNet features of a random init are ~1e-13 and would hide any skip."""
    net.eval()
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.train()
    return net


@pytest.mark.parametrize("decoder_block", ["paper", "linknet"])
def test_link_decoder_adds_the_encoder_feature_of_the_same_scale(decoder_block):
    link = _batch_statistics(_build("link", decoder_block=decoder_block))
    for block, channels in zip(link.decoder.blocks, list(EFFB0_CHANNELS[::-1][1:]) + [EFFB0_CHANNELS[0]]):
        last = [m for m in block.modules() if isinstance(m, torch.nn.Conv2d)][-1]
        assert last.out_channels == channels  # decoder output = encoder channels (addable)
    x = torch.randn(2, 3, H, W)
    captured = []
    link.decoder.blocks[0].register_forward_hook(lambda m, i, o: captured.append(o.detach().clone()))
    with torch.no_grad():
        reference = link(x)
        shift = link.encoder.register_forward_hook(lambda m, i, o: [f + 1.0 if f.shape[1] == 112 else f for f in o])
        link(x)  # feature H/16 (112 ch) + 1: block 0 = f(f5) + f4 must move by exactly 1
        shift.remove()
        assert torch.allclose(captured[1] - captured[0], torch.ones_like(captured[0]), atol=1e-5)
        for k in range(4):  # zeroing any skip feature changes the prediction
            zero = link.encoder.register_forward_hook(
                lambda m, i, o, k=k: [torch.zeros_like(f) if j == k else f for j, f in enumerate(o)])
            assert (link(x) - reference).abs().max() > 1e-3 * reference.abs().max(), k
            zero.remove()


def test_weights_file_in_efficientnet_pytorch_naming_loads_into_both_shapes(tmp_path):
    from monai.networks.nets import EfficientNetBNFeatures

    torch.manual_seed(5)
    source = EfficientNetBNFeatures("efficientnet-b0", pretrained=False).eval()
    with torch.no_grad():  # non-trivial BN statistics, so that buffers are checked too
        for m in source.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "efficientnet-b0-355c32eb.pth"
    torch.save(_lukemelas_state(source), path)
    x = torch.randn(1, 3, H, W)
    for kind in ("unet", "link"):
        net = _build(kind, seed=9, weights_file=path).eval()
        with torch.no_grad():
            for fs, fn in zip(source(x), net.encoder(x)):
                assert torch.equal(fs, fn)
        report = load_encoder_weights(net, path)
        assert report.naming == "lukemelas" and not report.not_in_network
        assert {k for k in report.initialised if k.startswith(ENCODER_PREFIX)} == \
            {k for k in net.state_dict() if k.startswith(ENCODER_PREFIX) and k.endswith("num_batches_tracked")}
        assert len(report.loaded) == 360 - 49  # every tensor but the 49 BN num_batches_tracked counters


def test_weights_file_of_a_wrapped_ddp_unet_checkpoint_loads_the_encoder_and_ignores_the_decoder(tmp_path):
    unet = _build("unet", seed=3)
    path = tmp_path / "segment_net.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in unet.state_dict().items()}, "epoch": 7}, path)
    link = _build("link", seed=4)
    report = load_encoder_weights(link, path, strict=True)
    assert report.naming == "monai" and not report.not_in_network
    assert not [k for k in report.initialised if k.startswith(ENCODER_PREFIX)]
    assert report.skipped_by_mode and all(k.startswith(("decoder.", "segmentation_head.")) for k in report.skipped_by_mode)
    own = link.state_dict()
    assert all(torch.equal(own[k], v) for k, v in _encoder_state(unet).items())


def test_unrelated_weights_file_raises_a_clear_error_naming_the_file(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save({"conv1.weight": torch.randn(64, 3, 7, 7), "fc.bias": torch.randn(1000)}, path)
    for kind in ("unet", "link"):
        with pytest.raises(ValueError, match=re.escape(str(path))):
            _build(kind, weights_file=path)
    pickled = tmp_path / "whole_module.pt"
    torch.save(torch.nn.Linear(2, 2), pickled)  # a module, not a state dict
    with pytest.raises(ValueError, match=re.escape(str(pickled))):
        _build("unet", weights_file=pickled)
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        _build("link", weights_file=tmp_path / "absent.pth")


def test_single_channel_network_refuses_the_stem_mismatch_unless_partial_is_allowed(tmp_path, caplog):
    path = tmp_path / "rgb_encoder.pt"
    torch.save(_build("unet").encoder.state_dict(), path)  # MONAI encoder naming, 3 input channels
    with pytest.raises(ValueError, match=re.escape(f"{path}: transfer encoder_only loaded")
                       + r".*encoder\._conv_stem\.weight \(32,3,3,3\) vs \(32,1,3,3\)"):
        load_encoder_weights(_build("link", in_channels=1), path)
    with caplog.at_level("WARNING", logger="medxfer.transfer"):
        report = load_encoder_weights(_build("link", in_channels=1), path, allow_partial=True)
    assert [r.levelname for r in caplog.records if r.name == "medxfer.transfer"] == ["WARNING"]
    assert "shape mismatch 1" in caplog.text
    assert list(report.shape_mismatch) == ["encoder._conv_stem.weight"]
    assert report.shape_mismatch["encoder._conv_stem.weight"] == [[32, 3, 3, 3], [32, 1, 3, 3]]
    with pytest.raises(ValueError, match="strict"):
        load_encoder_weights(_build("unet", in_channels=1), path, strict=True, allow_partial=True)


def test_pretrained_true_never_downloads(monkeypatch, tmp_path):
    import monai.networks.nets.efficientnet as effnet

    def no_network(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(effnet.model_zoo, "load_url", no_network)
    for kind in ("unet", "link"):
        with pytest.raises(ValueError, match="load_encoder_weights"):
            _build(kind, pretrained=True)
    path = tmp_path / "enc.pt"
    torch.save(_build("link").encoder.state_dict(), path)
    assert isinstance(_build("unet", weights_file=path), torch.nn.Module)


def _linknet_decoder_count_closed_form():
    """LinkNet blocks (in -> out, mid = in // 4): 1x1 + 3x3 + 1x1 convs without bias, BN (2 per channel)."""
    chans = list(EFFB0_CHANNELS)
    total = 0
    for cin, cout in zip(chans[::-1], chans[::-1][1:] + [chans[0]]):
        mid = cin // 4
        total += cin * mid + 2 * mid + 9 * mid * mid + 2 * mid + mid * cout + 2 * cout
    return total


def _two_conv_count(cin, cout):
    """3x3 conv cin -> cout, 3x3 conv cout -> cout, no bias, a BN (2 per channel) after each."""
    return 9 * cin * cout + 2 * cout + 9 * cout * cout + 2 * cout


def _paper_link_decoder_count_closed_form():
    chans = list(EFFB0_CHANNELS)
    return sum(_two_conv_count(cin, cout) for cin, cout in zip(chans[::-1], chans[::-1][1:] + [chans[0]]))


def _paper_unet_decoder_count_closed_form():
    """U stages: deeper input + the skip concatenated -> two 3x3 convs (decoder 256, 128, 64, 32, 16)."""
    ins, skips, outs = [320, 256, 128, 64, 32], [112, 40, 24, 16, 0], [256, 128, 64, 32, 16]
    return sum(_two_conv_count(i + s, o) for i, s, o in zip(ins, skips, outs))


def test_parameter_counts_link_shape_is_smaller_than_u_shape():
    # Measured (MONAI 1.6.1, in 3, out 1): U-shape 7,060,277 = encoder 5,288,548 (3,595,388 used; the
    # unused ImageNet classifier _conv_head/_bn1/_fc holds 1,693,160) + decoder 1,771,584 + head 145;
    # Link-shape (paper block) 5,803,893 = same encoder + decoder 515,200 + head 145; LinkNet block
    # 5,395,469 (decoder 106,776); U-shape without the 1x1 pre-conv (TATL section 4.1) 7,527,861.
    # (TATL Table 7, Keras: 10,115,501 and 6,096,333; the gap is explained in the tatl_skin model card.)
    u, link = parameter_counts(_build("unet")), parameter_counts(_build("link"))
    u_paper = parameter_counts(_build("unet", **PAPER_UNET_KWARGS))
    link_linknet = parameter_counts(_build("link", decoder_block="linknet"))
    assert u["encoder"] == link["encoder"] == u_paper["encoder"] == 5_288_548  # EfficientNet-b0 with its 1000-class _fc
    assert u["encoder_used"] == link["encoder_used"] == 5_288_548 - (320 * 1280 + 2 * 1280 + 1280 * 1000 + 1000)
    assert link["decoder"] == _paper_link_decoder_count_closed_form() == 515_200
    assert link_linknet["decoder"] == _linknet_decoder_count_closed_form() == 106_776
    assert u_paper["decoder"] == _paper_unet_decoder_count_closed_form() == 2_239_168
    assert u["head"] == link["head"] == 16 * 9 + 1
    assert u["total"] == 7_060_277 and link["total"] == 5_803_893 and link_linknet["total"] == 5_395_469
    assert u_paper["total"] == 7_527_861
    assert link["total"] < u["total"] and u_paper["decoder"] > 4 * link["decoder"]


def _layer_sequence(block, *inputs):
    """The leaf modules ``block`` runs, in execution order, as (type, kernel size / scale): what a
    forward pass actually does, whatever the attributes are called. MONAI's ``Dropout(p=0)`` (an
    identity FlexibleUNet inserts with ``dropout=0``) is left out."""
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(m)) for m in block.modules()
             if not list(m.children())]
    with torch.no_grad():
        block(*inputs)
    for h in hooks:
        h.remove()
    out = []
    for m in seen:
        if isinstance(m, torch.nn.Dropout) and m.p == 0:
            continue
        detail = None
        if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            detail = tuple(m.kernel_size)
        elif isinstance(m, torch.nn.Upsample):
            detail = tuple(float(f) for f in m.scale_factor)
        out.append((type(m).__name__, detail))
    return out


#: TATL section 4.1: "an up-sampling layer and a sequence of convolutional blocks where each block has
#: two 3x3 convolution filters with activation functions in between" (batch norm after each conv: our choice).
SECTION_4_1 = [("Upsample", (2.0, 2.0)), ("Conv2d", (3, 3)), ("BatchNorm2d", None), ("ReLU", None),
               ("Conv2d", (3, 3)), ("BatchNorm2d", None), ("ReLU", None)]


def test_link_decoder_block_has_exactly_the_layers_of_section_4_1_then_adds_the_skip():
    link = _build("link").eval()
    for i, block in enumerate(link.decoder.blocks):
        cin = block.convs.conv_0.conv.in_channels
        x = torch.randn(1, cin, 2, 3)
        assert _layer_sequence(block, x) == SECTION_4_1, i
        out = block(x)
        skip = torch.randn_like(out)
        with torch.no_grad():
            assert torch.allclose(block(x, skip), out + skip, atol=1e-6)  # the skip is added after the convs
    # the LinkNet block (named option) is the bottleneck: 1x1 -> up + 3x3 -> 1x1
    old = _build("link", decoder_block="linknet").eval().decoder.blocks[0]
    cbr = lambda k: [("Conv2d", (k, k)), ("BatchNorm2d", None), ("ReLU", None)]  # noqa: E731
    assert _layer_sequence(old, torch.randn(1, 320, 2, 3)) == cbr(1) + [("Upsample", (2.0, 2.0))] + cbr(3) + cbr(1)
    with pytest.raises(ValueError, match="decoder_block must be one of"):
        LinkNetEffB0(decoder_block="unet")


def test_u_decoder_stage_without_pre_conv_is_section_4_1_with_the_skip_concatenated():
    paper = _build("unet", **PAPER_UNET_KWARGS).eval()
    for i, block in enumerate(paper.decoder.blocks):
        cin = block.convs.conv_0.conv.in_channels
        skip_ch = EFFB0_CHANNELS[::-1][1:][i] if i < 4 else 0
        x = torch.randn(1, cin - skip_ch, 2, 3)
        skip = torch.randn(1, skip_ch, 4, 6) if skip_ch else None
        assert _layer_sequence(block, x, skip) == SECTION_4_1, i
    # MONAI's default stage starts with a 1x1 conv halving the channels (not in section 4.1)
    default = _build("unet").eval().decoder.blocks[0]
    assert _layer_sequence(default, torch.randn(1, 320, 2, 3), torch.randn(1, 112, 4, 6))[0] == ("Conv2d", (1, 1))


@pytest.mark.parametrize("kind", ["unet", "link"])
def test_gradient_flows_from_the_loss_to_the_stem(kind):
    net = _build(kind).train()
    out = net(torch.randn(2, 3, H, W))
    torch.nn.functional.binary_cross_entropy_with_logits(out, (torch.rand_like(out) > 0.5).float()).backward()
    for name, p in net.named_parameters():
        if name.startswith(UNUSED):
            assert p.grad is None, name  # classifier of the ImageNet net: not part of the segmenter
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert net.encoder._conv_stem.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kind,arch", [("unet", "unet_effb0"), ("link", "linknet_effb0")])
def test_layout_partitions_parameters_and_names_real_modules(kind, arch):
    net, layout = _build(kind).eval(), effb0_layout(arch)
    for key in net.state_dict():
        parts = [layout.encoder_level(key) is not None, layout.in_head(key),
                 any(key.startswith(s + ".") for s in layout.decoder_stages)]
        assert sum(parts) == 1, key
    for name in layout.decoder_stages + [layout.penultimate_encoder] + layout.head:
        net.get_submodule(name)
    seen = {}
    net.get_submodule(layout.penultimate_encoder).register_forward_hook(lambda m, i, o: seen.update(f=o))
    with torch.no_grad():
        net(torch.randn(1, 3, H, W))
    assert seen["f"].shape == (1, 112, H // 16, W // 16)


def test_decoder_only_transfer_from_u_to_link_loads_exactly_the_encoder_and_frozen_encoder_is_refused():
    unet, link = _build("unet", seed=1), _build("link", seed=2)
    with pytest.raises(ValueError, match="transfer frozen_encoder loaded"):  # it requires the decoder too
        init_from_checkpoint(link, unet.state_dict(), "frozen_encoder", effb0_layout("linknet_effb0"))
    report = init_from_checkpoint(link, unet.state_dict(), "decoder_only", effb0_layout("linknet_effb0"))
    assert sorted(report.loaded) == sorted(_encoder_state(unet))
    assert all(not p.requires_grad for n, p in link.named_parameters() if n.startswith(ENCODER_PREFIX))
    assert all(p.requires_grad for n, p in link.named_parameters() if not n.startswith(ENCODER_PREFIX))


def test_linknet_exports_with_torch_export_and_gives_the_same_logits():
    link = _build("link").eval()
    x = torch.randn(1, 3, H, W)
    exported = torch.export.export(link, (x,))
    with torch.no_grad():
        assert torch.allclose(exported.module()(x), link(x), atol=1e-6)
