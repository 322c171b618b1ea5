"""Networks researchers already have (issue 14): MONAI SegResNet / DynUNet / BasicUNet /
FlexibleUNet from a zoo bundle's ``network_def`` kwargs, nnU-Net v2's plans networks, any
``network_def``, and the layouts that go with them (known, automatic, read from a mapping, checked).

Reference computations are the libraries' own: the same MONAI class built directly, nnU-Net's
``get_network_from_plans`` with deep supervision (its state dict, its largest output), nnU-Net's
topology planner for strides and kernels, and medxfer's transfer contract (``required_keys``) for
what ``all_but_head`` keeps. Shapes are tiny; one torch thread (tests/conftest.py)."""

import json
import math

import pytest
import torch
from monai.networks.nets import BasicUNet, DynUNet, FlexibleUNet, SegResNet, UNet
from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

from medxfer.networks import (ArchLayout, LayoutError, arch_layout, auto_layout, build_network, check_layout,
                              fit_patch, layout_from_dict, size_divisor)
from medxfer.networks.registry import axis_divisors
from medxfer.transfer.weights import required_keys


# --- helpers -----------------------------------------------------------------------------------------

def _outputs(net, names, x):
    """Output shapes of the modules ``names`` in one eval forward pass (forward hooks)."""
    got = {}
    hooks = [net.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: got.__setitem__(n, o)) for n in names]
    try:
        with torch.no_grad():
            net.eval()(x)
    finally:
        for h in hooks:
            h.remove()
    return [tuple(got[n].shape) for n in names]


def _assert_partition(net, layout):
    """Every state-dict key is in exactly one place: one encoder level, the head, or neither (decoder);
    every level and the head hold keys; the layout passes check_layout."""
    check_layout(layout, net)
    keys = list(net.state_dict())
    for key in keys:
        levels = [k for k, level in enumerate(layout.encoder_levels) if ArchLayout._match(key, level)]
        assert len(levels) <= 1, (key, levels)
        assert not (levels and layout.in_head(key)), key
    for level in layout.encoder_levels:
        assert any(ArchLayout._match(k, level) for k in keys), level
    assert any(layout.in_head(k) for k in keys)
    assert any(layout.encoder_level(k) is None and not layout.in_head(k) for k in keys)  # a decoder


def _assert_stages_deepest_first(net, layout, x):
    shapes = _outputs(net, layout.decoder_stages + [layout.penultimate_encoder], x)
    stages, penultimate = shapes[:-1], shapes[-1]
    assert all(len(s) == x.ndim and s[0] == 1 for s in shapes)  # (B, C, *spatial) feature maps
    sizes = [math.prod(s[2:]) for s in stages]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes), stages  # deepest (smallest) first
    assert math.prod(penultimate[2:]) < math.prod(x.shape[2:])


def _same_network(ours, reference, x):
    """``reference``'s weights load strictly into ``ours`` and both compute the same output."""
    ours.load_state_dict(reference.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), reference.eval()(x))


# --- MONAI networks from a zoo bundle's network_def kwargs ----------------------------------------------

# (arch, MONAI class, network_def kwargs as a bundle holds them (sizes reduced), spatial dims, roi)
ZOO = [
    # wholeBody_ct_segmentation (init_filters 32 there)
    ("segresnet", SegResNet, {"init_filters": 8, "blocks_down": [1, 2, 2, 4], "blocks_up": [1, 1, 1],
                              "dropout_prob": 0.2}, 3, [16, 16, 16]),
    ("dynunet", DynUNet, {"kernel_size": [[3, 3, 3]] * 4, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]],
                          "upsample_kernel_size": [[2, 2, 2]] * 3, "filters": [4, 8, 16, 32], "norm_name": "instance",
                          "deep_supervision": True, "deep_supr_num": 2, "res_block": True}, 3, [16, 16, 16]),
    ("basicunet", BasicUNet, {"features": [4, 4, 8, 8, 16, 4], "dropout": 0.1}, 3, [32, 32, 32]),
    ("flexibleunet", FlexibleUNet, {"backbone": "efficientnet-b0", "pretrained": False, "is_pad": False}, 2, [64, 64]),
    ("flexibleunet", FlexibleUNet, {"backbone": "resnet10", "decoder_channels": [16, 8, 8, 4, 4]}, 3, [64, 64, 64]),
]


@pytest.mark.parametrize("arch,cls,kwargs,dims,roi", ZOO, ids=[f"{z[0]}-{z[3]}d" for z in ZOO])
def test_zoo_network_builds_as_monai_and_its_layout_describes_it(arch, cls, kwargs, dims, roi):
    torch.manual_seed(0)
    net = build_network(arch, 1, 3, roi, spatial_dims=dims, **json.loads(json.dumps(kwargs)))
    assert type(net) is cls
    reference = cls(spatial_dims=dims, in_channels=1, out_channels=3, **kwargs)
    x = torch.randn(1, 1, *roi)
    _same_network(net, reference, x)  # the zoo's weights load strictly: same architecture, same output
    net.train()
    y = net(x)  # one tensor in training too (DynUNet's deep supervision is off)
    assert isinstance(y, torch.Tensor) and y.shape == (1, 3, *roi)
    layout = arch_layout(arch, net)
    assert arch_layout(arch, None, kwargs) == layout  # the same from the kwargs alone
    _assert_partition(net, layout)
    _assert_stages_deepest_first(net, layout, x)
    assert layout.decoder_stages and layout.penultimate_encoder


def test_dynunet_deep_supervision_heads_are_head_under_both_names():
    kwargs = dict(ZOO[1][2])
    net = build_network("dynunet", 1, 3, [16, 16, 16], **kwargs)
    layout = arch_layout("dynunet", net)
    heads = [k for k in net.state_dict() if "super_head" in k or k.startswith("deep_supervision_heads")]
    assert heads and all(layout.in_head(k) for k in heads)
    # skip_layers holds the encoder blocks under second names: same level as the first name
    assert layout.encoder_level("skip_layers.downsample.conv1.conv.weight") == 1
    assert layout.encoder_level("skip_layers.next_layer.next_layer.next_layer.conv1.conv.weight") == 4
    assert size_divisor("dynunet", kwargs) == 8
    strides = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]]
    anisotropic = dict(kwargs, strides=strides, upsample_kernel_size=strides[1:])
    assert axis_divisors("dynunet", anisotropic, 3) == [4, 8, 8] and size_divisor("dynunet", anisotropic) == 8
    assert build_network("dynunet", 1, 3, [12, 16, 16], **anisotropic)(torch.zeros(1, 1, 12, 16, 16)).shape[2:] == \
        (12, 16, 16)


def test_zoo_networks_refuse_what_they_cannot_do():
    with pytest.raises(ValueError, match="pretrained=True would download"):
        build_network("flexibleunet", 1, 2, [64, 64], spatial_dims=2, backbone="resnet18", pretrained=True)
    with pytest.raises(ValueError, match="use_conv_final=False"):
        build_network("segresnet", 1, 2, [16, 16, 16], init_filters=8, use_conv_final=False)
    with pytest.raises(ValueError, match="multiple of 8 on every side"):
        build_network("segresnet", 1, 2, [12, 16, 16], init_filters=8)
    with pytest.raises(ValueError, match="multiple of 16"):
        build_network("basicunet", 1, 2, [24, 32, 32])
    assert size_divisor("flexibleunet", {"backbone": "resnet18"}) == 32


# --- nnU-Net v2 plans networks -------------------------------------------------------------------------

def _plans_architecture(network_class: str, spacing, patch, base_features: int = 4) -> tuple[dict, list[int]]:
    """``configurations[c]["architecture"]`` as an nnU-Net 2.8 plans.json holds it: topology from
    nnU-Net's own planner (``get_pool_and_conv_props``, min edge 4 as ExperimentPlanner), the keys
    of ExperimentPlanner / ResEncUNetPlanner ``get_plans_for_configuration``; features start at
    ``base_features`` instead of 32 to stay small. Returns it and nnU-Net's patch."""
    _, strides, kernels, patch, _ = get_pool_and_conv_props(spacing, patch, 4, 999999)
    n = len(strides)
    dims = len(spacing)
    arch_kwargs = {"n_stages": n, "features_per_stage": [min(base_features * 2 ** i, 320) for i in range(n)],
                   "conv_op": f"torch.nn.modules.conv.Conv{dims}d", "kernel_sizes": kernels, "strides": strides}
    if network_class == "PlainConvUNet":
        arch_kwargs["n_conv_per_stage"] = [2] * n
        arch_kwargs["n_conv_per_stage_decoder"] = [2] * (n - 1)
    else:
        arch_kwargs["n_blocks_per_stage"] = [1, 3, 4, 6, 6, 6][:n]
        arch_kwargs["n_conv_per_stage_decoder"] = [1] * (n - 1)
    arch_kwargs.update({"conv_bias": True, "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dims}d",
                        "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
                        "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}})
    architecture = {"network_class_name": f"dynamic_network_architectures.architectures.unet.{network_class}",
                    "arch_kwargs": arch_kwargs, "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}
    return json.loads(json.dumps(architecture)), [int(p) for p in patch]  # as read back from plans.json


@pytest.mark.parametrize("network_class", ["PlainConvUNet", "ResidualEncoderUNet"])
def test_nnunet_network_is_nnunets_and_loads_its_deep_supervision_weights(network_class):
    architecture, patch = _plans_architecture(network_class, [3.0, 1.0, 1.0], [16, 32, 32])
    assert architecture["arch_kwargs"]["strides"][1] == [1, 2, 2]  # anisotropic: per-axis strides
    torch.manual_seed(0)
    net = build_network("nnunet", 1, 3, patch, **architecture)
    trained = get_network_from_plans(architecture["network_class_name"], architecture["arch_kwargs"],
                                     architecture["_kw_requires_import"], 1, 3, deep_supervision=True)
    net.load_state_dict(trained.state_dict(), strict=True)  # an nnU-Net checkpoint's network_weights
    x = torch.randn(1, 1, *patch)
    with torch.no_grad():
        theirs = trained.eval()(x)
        ours = net.eval()(x)
    assert isinstance(theirs, list) and isinstance(ours, torch.Tensor)
    torch.testing.assert_close(ours, theirs[0])  # nnU-Net's full-resolution output

    layout = arch_layout("nnunet", net)
    assert arch_layout("nnunet", None, architecture) == layout
    _assert_partition(net, layout)
    _assert_stages_deepest_first(net, layout, x)
    keys = list(net.state_dict())
    n = architecture["arch_kwargs"]["n_stages"]
    for i in range(n):  # UNetDecoder's reference to the encoder: the second name is in the same level
        for prefix in (f"encoder.stages.{i}.", f"decoder.encoder.stages.{i}."):
            ks = [k for k in keys if k.startswith(prefix)]
            assert ks and all(layout.encoder_level(k) == i + 1 for k in ks), prefix
    seg = [k for k in keys if k.startswith("decoder.seg_layers.")]
    assert len(seg) == 2 * (n - 1) and all(layout.in_head(k) for k in seg)  # every seg layer is class-specific
    stem = [k for k in keys if ".stem." in k]
    assert bool(stem) == (network_class == "ResidualEncoderUNet") and all(layout.encoder_level(k) == 1 for k in stem)


def test_nnunet_sizes_are_checked_per_axis():
    architecture, patch = _plans_architecture("PlainConvUNet", [3.0, 1.0, 1.0], [16, 32, 32])
    assert architecture["arch_kwargs"]["strides"] == [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]]
    assert size_divisor("nnunet", architecture) == 8  # the largest per-axis product
    assert axis_divisors("nnunet", architecture) == [4, 8, 8]
    assert fit_patch("nnunet", [18, 30, 30], architecture) == [20, 32, 32]
    net = build_network("nnunet", 1, 2, [20, 32, 32], **architecture)  # 20: a multiple of 4, not of 8
    assert net(torch.zeros(1, 1, 20, 32, 32)).shape == (1, 2, 20, 32, 32)
    with pytest.raises(ValueError, match=r"multiple of \[4, 8, 8\] \(per side\)"):
        build_network("nnunet", 1, 2, [18, 32, 32], **architecture)


def test_nnunet_2d_plans_build_in_2d_and_bad_plans_are_refused():
    architecture, patch = _plans_architecture("PlainConvUNet", [1.0, 1.0], [32, 32])
    net = build_network("nnunet", 1, 2, patch, **architecture)  # 2D from the plans' conv_op
    assert net(torch.zeros(1, 1, *patch)).shape == (1, 2, *patch)
    with pytest.raises(ValueError, match="conv_op is 2D, not 3D"):
        build_network("nnunet", 1, 2, patch + [32], spatial_dims=3, **architecture)
    bad = dict(architecture, network_class_name="mypackage.nets.MyUNet")
    with pytest.raises(ValueError, match="not one of nnU-Net's"):
        build_network("nnunet", 1, 2, patch, **bad)
    evil = dict(architecture, arch_kwargs=dict(architecture["arch_kwargs"], nonlin="os.system"))
    with pytest.raises(ValueError, match="nonlin.*only those are imported"):
        build_network("nnunet", 1, 2, patch, **evil)
    with pytest.raises(ValueError, match="unknown arch kwargs"):
        build_network("nnunet", 1, 2, patch, plans="plans.json", **architecture)
    short = dict(architecture, arch_kwargs=dict(architecture["arch_kwargs"], n_conv_per_stage_decoder=[2]))
    with pytest.raises(ValueError, match="PlainConvUNet cannot be built from these arch_kwargs \\(AssertionError"):
        build_network("nnunet", 1, 2, patch, **short)


# --- automatic layout ---------------------------------------------------------------------------------

KNOWN = [  # (arch, kwargs, roi): networks with a known layout the automatic rule must agree with
    ("unet", {"channels": (4, 8, 16, 32), "strides": (2, 2, 2), "num_res_units": 2}, [16, 16, 16]),
    ("unet", {"channels": (4, 8, 16), "strides": (2, 2), "num_res_units": 0}, [16, 16, 16]),
    ("segresnet", ZOO[0][2], [16, 16, 16]),
    ("basicunet", ZOO[2][2], [32, 32, 32]),
]


@pytest.mark.parametrize("arch,kwargs,roi", KNOWN, ids=[f"{k[0]}{i}" for i, k in enumerate(KNOWN)])
def test_auto_layout_agrees_with_the_known_layout(arch, kwargs, roi):
    net = build_network(arch, 1, 3, roi, **kwargs)
    known = arch_layout(arch, net)
    auto = auto_layout(net, 1, roi, arch=arch)
    assert auto.arch == arch
    assert auto.head == known.head
    x = torch.randn(1, 1, *roi)
    assert _outputs(net, auto.decoder_stages, x) == _outputs(net, known.decoder_stages, x)
    keys = list(net.state_dict())
    assert required_keys(keys, "all_but_head", auto) == required_keys(keys, "all_but_head", known)
    _assert_partition(net, auto)
    _assert_stages_deepest_first(net, auto, x)


def test_auto_layout_finds_nnunets_and_dynunets_decoder():
    architecture, patch = _plans_architecture("ResidualEncoderUNet", [1.0, 1.0, 1.0], [32, 32, 32])
    for arch, net, roi in (("nnunet", build_network("nnunet", 1, 3, patch, **architecture), patch),
                           ("dynunet", build_network("dynunet", 1, 3, [16, 16, 16], **ZOO[1][2]), [16, 16, 16])):
        known, auto = arch_layout(arch, net), auto_layout(net, 1, roi)
        x = torch.zeros(1, 1, *roi)
        assert auto.decoder_stages == known.decoder_stages
        assert _outputs(net, [auto.penultimate_encoder], x) == _outputs(net, [known.penultimate_encoder], x)
        assert [len(level) for level in auto.encoder_levels] == [len(level) for level in known.encoder_levels]
        # the head that runs; the unused deep-supervision heads are decoder for the automatic rule
        assert all(known.in_head(p) for p in auto.head)
        _assert_partition(net, auto)


def test_auto_layout_restores_modes_and_removes_its_hooks():
    net = build_network("unet", 1, 2, [16, 16, 16], channels=(4, 8, 16), strides=(2, 2), norm="batch")
    net.train()
    net.get_submodule("model.0").eval()
    before = {name: m.training for name, m in net.named_modules()}
    running = net.get_submodule("model.0.conv.unit0.adn.N").running_mean.clone()
    auto_layout(net, 1, [16, 16, 16])
    assert {name: m.training for name, m in net.named_modules()} == before
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())
    torch.testing.assert_close(net.get_submodule("model.0.conv.unit0.adn.N").running_mean, running)


class _NoDownsampling(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(4, 2, 1))

    def forward(self, x):
        return self.body(x)


class _Tuple(UNet):
    def forward(self, x):
        return super().forward(x), x


class _Classifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, stride=2, padding=1), torch.nn.ReLU())
        self.fc = torch.nn.Conv3d(4, 2, 1)

    def forward(self, x):
        return self.fc(self.features(x))


@pytest.mark.parametrize("make,in_channels,match", [
    (_NoDownsampling, 1, "_NoDownsampling: .*no spatial downsampling"),
    (lambda: UNet(3, 2, 2, (4, 8), (2,)), 1, r"UNet: .*forward pass on a zero input \[1, 1, 16, 16, 16\] fails"),
    (lambda: _Tuple(3, 1, 2, (4, 8), (2,)), 1, "_Tuple: .*returns a tuple"),
    (_Classifier, 1, "_Classifier: .*nothing is upsampled"),
])
def test_no_automatic_layout_is_a_one_line_error_naming_the_network(make, in_channels, match):
    with pytest.raises(LayoutError, match=match) as err:
        auto_layout(make(), in_channels, [16, 16, 16])
    message = str(err.value)
    assert "\n" not in message and "--layout" in message
    assert isinstance(err.value, ValueError)


# --- layouts from a mapping, checked against a network ------------------------------------------------------

def test_layout_from_dict_round_trips_and_refuses_bad_mappings():
    net = build_network("segresnet", 1, 2, [16, 16, 16], init_filters=8)
    layout = arch_layout("segresnet", net)
    again = layout_from_dict(json.loads(json.dumps(layout.to_dict())), "segresnet")
    assert again == layout and ArchLayout.from_dict(layout.to_dict(), "segresnet") == layout
    short = layout_from_dict({"encoder_levels": ["convInit", ["down_layers.1"]], "head": "conv_final.2"}, "x")
    assert short.encoder_levels == [["convInit"], ["down_layers.1"]] and short.head == ["conv_final.2"]
    assert short.decoder_stages == [] and short.penultimate_encoder == ""
    for bad, match in (({"encoder_levels": [["a"]]}, "'head' is missing"),
                       ({"encoder_levels": [], "head": ["h"]}, "non-empty list"),
                       ({"encoder_levels": [["a"]], "head": ["h"], "decoders": ["d"]}, "unknown key 'decoders'"),
                       ({"encoder_levels": [["a", 3]], "head": ["h"]}, "encoder level 1 must be a list"),
                       ({"encoder_levels": [["a"]], "head": ["h"], "decoder_stages": "d"}, "decoder_stages"),
                       ({"encoder_levels": [["a"]], "head": ["h"], "arch": "unet"}, "says arch 'unet'"),
                       (["encoder_levels"], "is a mapping")):
        with pytest.raises(LayoutError, match=match):
            layout_from_dict(bad, "segresnet")


def test_check_layout_names_the_network_and_the_first_missing_name():
    net = build_network("segresnet", 1, 2, [16, 16, 16], init_filters=8)
    good = arch_layout("segresnet", net).to_dict()
    cases = [
        (dict(good, decoder_stages=["up_layers.0", "up_layers.7", "up_layers.8"]), "SegResNet: .*'up_layers.7'"),
        (dict(good, penultimate_encoder="down_layers.9"), "SegResNet: .*penultimate encoder 'down_layers.9'"),
        (dict(good, encoder_levels=good["encoder_levels"] + [["down_layers.4"]]), "'down_layers.4', which matches no"),
        (dict(good, head=["conv_final.2", "conv_fin"]), "head names 'conv_fin'"),
        (dict(good, head=["conv_final.2", "down_layers.3.1"]), "'down_layers.3.1.*' is in encoder level 4 and head"),
    ]
    for d, match in cases:
        with pytest.raises(LayoutError, match=match):
            check_layout(layout_from_dict(d, "segresnet"), net)
    # a module's second name (nnU-Net's decoder.encoder) is a name of the network
    architecture, patch = _plans_architecture("PlainConvUNet", [1.0, 1.0, 1.0], [16, 16, 16])
    nn_net = build_network("nnunet", 1, 2, patch, **architecture)
    check_layout(layout_from_dict({"encoder_levels": [["decoder.encoder.stages.0", "encoder.stages.0"]],
                                   "decoder_stages": ["decoder.stages.0"], "head": ["decoder.seg_layers"],
                                   "penultimate_encoder": "decoder.encoder.stages.0"}, "nnunet"), nn_net)


# --- any network_def ------------------------------------------------------------------------------------------

def test_network_def_builds_the_bundle_network_with_the_builders_channels():
    network_def = {"_target_": "SegResNet", "spatial_dims": 3, "in_channels": 4, "out_channels": 105,
                   "init_filters": 8, "blocks_down": [1, 2, 2, 4], "blocks_up": [1, 1, 1], "dropout_prob": 0.2}
    kwargs = {"network_def": network_def}
    torch.manual_seed(0)
    net = build_network("network_def", 1, 3, [16, 16, 16], **kwargs)
    assert network_def["in_channels"] == 4  # the caller's dict is not changed
    reference = SegResNet(spatial_dims=3, in_channels=1, out_channels=3, init_filters=8, blocks_down=[1, 2, 2, 4],
                          blocks_up=[1, 1, 1], dropout_prob=0.2)
    x = torch.randn(1, 1, 16, 16, 16)
    _same_network(net, reference, x)
    assert size_divisor("network_def", kwargs) == 8  # a class the registry knows: its divisor
    layout = arch_layout("network_def", net, kwargs)  # automatic
    known = arch_layout("segresnet", net)
    assert layout.arch == "network_def" and layout.head == known.head
    assert layout.decoder_stages == known.decoder_stages and layout.encoder_levels == known.encoder_levels
    assert arch_layout("network_def", net, kwargs) == layout
    with pytest.raises(LayoutError, match="needs the built network"):
        arch_layout("network_def", None, kwargs)


def test_network_def_of_a_class_medxfer_does_not_know():
    network_def = {"_target_": "monai.networks.nets.AttentionUnet", "spatial_dims": 2, "in_channels": 1,
                   "out_channels": 2, "channels": [4, 8, 16], "strides": [2, 2]}
    kwargs = {"network_def": network_def}
    assert size_divisor("network_def", kwargs) == 1
    net = build_network("network_def", 1, 2, [32, 32], **kwargs)  # 2D from the def's spatial_dims
    assert type(net).__name__ == "AttentionUnet" and net(torch.zeros(1, 1, 32, 32)).shape == (1, 2, 32, 32)
    layout = arch_layout("network_def", net, kwargs)
    _assert_partition(net, layout)
    _assert_stages_deepest_first(net, layout, torch.zeros(1, 1, 32, 32))


@pytest.mark.parametrize("network_def,match", [
    ({"_target_": "SegResNet", "init_filters": "$8 * 2"},
     "network_def#init_filters: '\\$8 \\* 2' is a bundle expression"),
    ({"_target_": "SegResNet", "init_filters": "@filters"}, "is a bundle expression / reference"),
    ({"_target_": "os.system", "command": "true"}, "'os.system' is not a torch.nn.Module class"),
    ({"_target_": "monai.transforms.LoadImage"}, "not a torch.nn.Module class"),
    ({"_target_": "no.such.Network"}, "not an importable class"),
    ({"_target_": "SegResNet", "_mode_": "callable"}, "_mode_ 'callable' is refused"),
    ({"_target_": "SegResNet", "init_filters": 6}, r"network_def \(SegResNet\): cannot build it: ValueError"),
    ({"_target_": "SegResNet", "spatial_dims": 2}, "spatial_dims is 2 there, not 3"),
    ({"init_filters": 8}, "network_def dict with _target_"),
])
def test_network_def_refuses_what_it_would_have_to_evaluate(network_def, match):
    with pytest.raises(ValueError, match=match):
        build_network("network_def", 1, 2, [16, 16, 16], spatial_dims=3, network_def=network_def)
