"""Network factory: output shapes, the arch layout (encoder levels / decoder stages / head), patch sizes."""

import re

import pytest
import torch

from medxfer.networks.registry import arch_layout, build_network, fit_patch, registered, size_divisor

ARCHS = ("unet", "unetr", "swinunetr")  # the MONAI 3D networks; every registered one: test_networks_registry.py

# Tiny networks (CPU, 2 cores). The UNet has 4 levels so that it has two decoder stages to order.
CONFIGS = {
    "unet": ([16, 16, 16], {"channels": (4, 8, 16, 32), "strides": (2, 2, 2)}),
    "unetr": ([32, 32, 32], {"feature_size": 8, "hidden_size": 48, "mlp_dim": 96, "num_heads": 4}),
    "swinunetr": ([64, 32, 32], {"feature_size": 12}),
}
IN_CHANNELS, OUT_CHANNELS = 1, 3
# SwinUNETR v2 adds swinViT.layers{1..4}c only with use_v2=True: these layout prefixes may be absent.
OPTIONAL_PREFIX = re.compile(r"^swinViT\.layers\dc$")


def _under(key, prefix):
    return key == prefix or key.startswith(prefix + ".")


@pytest.fixture(scope="module")
def nets():
    out = {}
    for seed, arch in enumerate(ARCHS):
        roi, kwargs = CONFIGS[arch]
        torch.manual_seed(seed)
        out[arch] = build_network(arch, IN_CHANNELS, OUT_CHANNELS, roi, **kwargs).eval()
    return out


def test_archs_cover_the_three_networks():
    assert set(ARCHS) == set(CONFIGS) == {"unet", "unetr", "swinunetr"}


@pytest.fixture(scope="module")
def traces(nets):
    """One forward pass (batch 2) per arch: output shape, every conv call, every decoder stage output."""
    out = {}
    convs = (torch.nn.Conv3d, torch.nn.ConvTranspose3d)
    for arch, net in nets.items():
        roi = CONFIGS[arch][0]
        layout = arch_layout(arch, net)
        modules = dict(net.named_modules())
        conv_calls, stage_calls = [], []

        def hook(calls, name):
            def record(module, inputs, output):  # returns None: the output is left as it is
                calls.append((name, tuple(output.shape)))
            return record

        handles = [m.register_forward_hook(hook(conv_calls, n)) for n, m in modules.items() if isinstance(m, convs)]
        handles += [modules[s].register_forward_hook(hook(stage_calls, s)) for s in layout.decoder_stages]
        try:
            with torch.no_grad():
                y = net(torch.randn(2, IN_CHANNELS, *roi, generator=torch.Generator().manual_seed(0)))
        finally:
            for h in handles:
                h.remove()
        out[arch] = {"output": tuple(y.shape), "convs": conv_calls, "stages": stage_calls}
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_gives_logits_of_roi_size_and_the_last_conv_run_is_in_the_head(arch, nets, traces):
    net, roi = nets[arch], CONFIGS[arch][0]
    layout = arch_layout(arch, net)
    assert traces[arch]["output"] == (2, OUT_CHANNELS, *roi)
    last_name, last_shape = traces[arch]["convs"][-1]
    assert any(_under(last_name, p) for p in layout.head), (last_name, layout.head)
    assert last_shape == (2, OUT_CHANNELS, *roi)
    module = dict(net.named_modules())[last_name]
    out_dim = 1 if isinstance(module, torch.nn.ConvTranspose3d) else 0
    assert module.weight.shape[out_dim] == OUT_CHANNELS


@pytest.mark.parametrize("arch", ARCHS)
def test_layout_partitions_the_state_dict_into_encoder_levels_decoder_and_head(arch, nets):
    net = nets[arch]
    layout = arch_layout(arch, net)
    assert len(layout.encoder_levels) == (len(CONFIGS["unet"][1]["channels"]) if arch == "unet" else 5)
    per_level = {level: [] for level in range(1, len(layout.encoder_levels) + 1)}
    head, decoder = [], []
    for key in net.state_dict():
        levels = [lv for lv, prefixes in enumerate(layout.encoder_levels, start=1)
                  if any(_under(key, p) for p in prefixes)]
        in_head = any(_under(key, p) for p in layout.head)
        assert len(levels) + in_head <= 1, f"{key} is in levels {levels} and head={in_head}"
        # the layout's own lookups agree with the prefix lists
        assert layout.encoder_level(key) == (levels[0] if levels else None)
        assert layout.in_head(key) == in_head
        if levels:
            per_level[levels[0]].append(key)
        elif in_head:
            head.append(key)
        else:
            decoder.append(key)
    assert all(per_level.values()), {lv: len(keys) for lv, keys in per_level.items()}
    assert head and decoder
    # everything that is neither encoder nor head is inside a decoder stage
    outside = [k for k in decoder if not any(_under(k, s) for s in layout.decoder_stages)]
    assert not outside, outside[:5]
    # the head holds a conv weight whose out dimension is the class count
    head_state = {k: v for k, v in net.state_dict().items() if k in head}
    assert any(k.endswith("conv.weight") and v.ndim == 5 and v.shape[0] == OUT_CHANNELS for k, v in head_state.items())


@pytest.mark.parametrize("arch", ARCHS)
def test_layout_names_are_modules_of_the_network(arch, nets):
    net = nets[arch]
    modules = dict(net.named_modules())
    layout = arch_layout(arch, net)
    for stage in layout.decoder_stages:
        assert stage in modules, stage
    for name in layout.head:
        assert name in modules, name
    missing = [p for prefixes in layout.encoder_levels for p in prefixes if p not in modules]
    if arch == "swinunetr":
        assert all(OPTIONAL_PREFIX.match(p) for p in missing), missing
    else:
        assert not missing


@pytest.mark.parametrize("arch", ARCHS)
def test_decoder_stages_are_ordered_deep_to_shallow(arch, nets, traces):
    layout = arch_layout(arch, nets[arch])
    assert len(layout.decoder_stages) >= 2
    calls = traces[arch]["stages"]
    assert [name for name, _ in calls] == layout.decoder_stages  # each runs once, in that order
    sizes = [torch.Size(shape[2:]).numel() for _, shape in calls]
    assert sizes == sorted(sizes), dict(zip(layout.decoder_stages, sizes))
    assert sizes[0] < sizes[-1]


@pytest.mark.parametrize("arch", ["unet", "unetr"])
def test_layout_from_arch_kwargs_equals_layout_from_network(arch, nets):
    assert arch_layout(arch, arch_kwargs=CONFIGS[arch][1]) == arch_layout(arch, nets[arch])


@pytest.mark.parametrize("arch", ARCHS)
def test_layout_looks_through_dataparallel_and_compile_wrappers(arch, nets):
    class Compiled(torch.nn.Module):  # what torch.compile's OptimizedModule looks like
        def __init__(self, m):
            super().__init__()
            self._orig_mod = m

    net = nets[arch]
    expected = arch_layout(arch, net)
    wrapped = torch.nn.DataParallel(net)
    assert hasattr(wrapped, "module")
    assert arch_layout(arch, wrapped) == expected
    assert arch_layout(arch, Compiled(net)) == expected


def test_unet_layout_prefixes_follow_the_nested_skip_connections():
    layout = arch_layout("unet", arch_kwargs={"channels": (4, 8, 16, 32), "strides": (2, 2, 2)})
    assert layout.encoder_levels == [["model.0"], ["model.1.submodule.0"], ["model.1.submodule.1.submodule.0"],
                                     ["model.1.submodule.1.submodule.1.submodule"]]
    assert layout.decoder_stages == ["model.1.submodule.1.submodule.2", "model.1.submodule.2"]
    assert layout.head == ["model.2"]


@pytest.mark.parametrize("arch, kwargs, divisor", [
    ("unet", None, 16),
    ("unet", {"strides": (2, 2, 2, 2)}, 16),
    ("unet", {"channels": (4, 8, 16), "strides": (2, 2)}, 4),
    ("unet", {"channels": (4, 8, 16), "strides": (2, 3)}, 6),
    ("unetr", None, 16),
    ("swinunetr", None, 32),
    ("SwinUNETR", None, 32),
])
def test_size_divisor_is_the_total_downsampling(arch, kwargs, divisor):
    assert size_divisor(arch, kwargs) == divisor


@pytest.mark.parametrize("arch, kwargs, patch, expected", [
    ("unet", {"strides": (2, 2, 2, 2)}, [40, 40, 12], [48, 48, 16]),
    ("unet", None, [16, 32, 1], [16, 32, 16]),
    ("unet", {"channels": (4, 8, 16), "strides": (2, 2)}, [5, 8, 9], [8, 8, 12]),
    ("unetr", None, [96, 97, 17], [96, 112, 32]),
    ("swinunetr", None, [33, 64, 1], [64, 64, 32]),
])
def test_fit_patch_rounds_every_side_up_to_the_divisor(arch, kwargs, patch, expected):
    out = fit_patch(arch, patch, kwargs)
    assert out == expected
    assert all(isinstance(v, int) for v in out)


@pytest.mark.parametrize("arch, roi, kwargs", [
    ("unet", [16, 16, 12], {"channels": (4, 8, 16, 32), "strides": (2, 2, 2)}),
    ("unetr", [32, 32, 24], {"feature_size": 8, "hidden_size": 48, "mlp_dim": 96, "num_heads": 4}),
    ("swinunetr", [64, 32, 48], {"feature_size": 12}),
])
def test_non_divisible_roi_is_refused_with_the_fitted_size(arch, roi, kwargs):
    div = size_divisor(arch, kwargs)
    fitted = [-(-r // div) * div for r in roi]
    with pytest.raises(ValueError) as err:
        build_network(arch, 1, 2, roi, **kwargs)
    msg = str(err.value)
    assert f"multiple of {div}" in msg and str(roi) in msg and str(fitted) in msg


def test_roi_with_wrong_number_of_sides_is_refused():
    with pytest.raises(ValueError, match="3 sides"):
        build_network("unet", 1, 2, [16, 16], channels=(4, 8, 16), strides=(2, 2))


def test_swinunetr_with_a_one_voxel_bottleneck_under_instance_norm_is_refused():
    with pytest.raises(ValueError, match="bottleneck"):
        build_network("swinunetr", 1, 2, [32, 32, 32], feature_size=12)


@pytest.mark.parametrize("call", [
    lambda: build_network("vnet", 1, 2, [32, 32, 32]),
    lambda: arch_layout("highresnet"),
    lambda: size_divisor("unet++"),
    lambda: fit_patch("attention_unet", [32, 32, 32]),
])
def test_unknown_arch_is_refused_with_the_supported_list(call):
    with pytest.raises(ValueError) as err:
        call()
    msg = str(err.value)
    assert "unknown arch" in msg
    assert all(a in msg for a in registered())  # the 2D networks too
