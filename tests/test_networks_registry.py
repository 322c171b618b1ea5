"""The network registry: every registered name builds through ``build_network``, maps its input to
the documented output shape, and ``arch_layout(name)`` describes that very network (its module
names exist, its parts partition the parameters, its penultimate encoder module yields a feature
map); sizes the network cannot take are refused; adding a network is one registration."""

import pytest
import torch

from medxfer.networks import (REGISTRY, NetworkSpec, arch_layout, build_network, network_spec, register, registered,
                              size_divisor)
from medxfer.networks.monai_nets import build_unet, unet_layout, unet_size_divisor

# A small configuration per registered network (CPU). A new registration must add one here.
TINY = {
    "unet": (1, [16, 16, 16], {"channels": (4, 8, 16), "strides": (2, 2)}),
    "unetr": (1, [32, 32, 32], {"feature_size": 4, "hidden_size": 24, "mlp_dim": 48, "num_heads": 2}),
    "swinunetr": (1, [64, 32, 32], {"feature_size": 12}),
    "unet_effb0": (3, [32, 64], {}),
    "linknet_effb0": (3, [32, 64], {}),
    "unet2d": (3, [32, 48], {"channels": (4, 8, 16, 32, 64)}),
    "resnet50_attention_unet": (3, [32, 64], {}),
    "swin_unet": (3, [32, 32], {"embed_dim": 12, "num_heads": (1, 1, 1, 1)}),
    "truncated_resnet50": (3, [40, 36], {"level": 2}),
    "truncated_densenet121": (3, [32, 32], {"level": 1}),
    "segresnet": (1, [16, 16, 16], {"init_filters": 8, "blocks_down": [1, 2, 2, 4], "blocks_up": [1, 1, 1], "dropout_prob": 0.2}),
    "dynunet": (1, [16, 16, 16], {"kernel_size": [3, 3, 3, 3], "strides": [1, 2, 2, 2], "upsample_kernel_size": [2, 2, 2],
                                  "filters": [4, 8, 16, 32], "deep_supervision": True, "deep_supr_num": 2}),
    "basicunet": (1, [32, 32, 32], {"features": [4, 4, 8, 8, 16, 4]}),
    "flexibleunet": (1, [64, 64, 64], {"backbone": "resnet10", "decoder_channels": [16, 8, 8, 4, 4]}),
    "nnunet": (1, [32, 32, 32], {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                                 "arch_kwargs": {"n_stages": 4, "features_per_stage": [4, 8, 16, 32],
                                                 "conv_op": "torch.nn.modules.conv.Conv3d", "kernel_sizes": [[3, 3, 3]] * 4,
                                                 "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]],
                                                 "n_conv_per_stage": [2] * 4, "n_conv_per_stage_decoder": [2] * 3,
                                                 "conv_bias": True, "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                                                 "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
                                                 "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                                                 "nonlin_kwargs": {"inplace": True}},
                                 "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}),
    "network_def": (1, [32, 32, 32], {"network_def": {"_target_": "BasicUNet", "spatial_dims": 3, "in_channels": 1,
                                                      "out_channels": 2, "features": [4, 4, 8, 8, 16, 4]}}),
}
OPTIONAL = ("swinViT.layers1c", "swinViT.layers2c", "swinViT.layers3c", "swinViT.layers4c")  # SwinUNETR v2 only


def test_every_registered_network_has_a_test_configuration():
    assert set(TINY) == set(registered())


@pytest.mark.parametrize("name", sorted(TINY))
def test_registered_network_builds_and_its_layout_describes_it(name):
    in_ch, roi, kwargs = TINY[name]
    torch.manual_seed(0)
    net = build_network(name, in_ch, 2, roi, **kwargs).eval()
    spec = network_spec(name)
    assert len(roi) == spec.spatial_dims
    x = torch.randn(1, in_ch, *roi)
    layout = arch_layout(name, net)
    seen = {}
    hook = net.get_submodule(layout.penultimate_encoder).register_forward_hook(lambda m, i, o: seen.update(f=o))
    with torch.no_grad():
        y = net(x)
    hook.remove()
    assert y.shape == (1, 2, *roi)
    feature = seen["f"][0] if isinstance(seen["f"], (list, tuple)) else seen["f"]
    assert feature.ndim == 2 + spec.spatial_dims and feature.shape[0] == 1
    names = [p for level in layout.encoder_levels for p in level] + layout.decoder_stages + layout.head
    for module in names:
        if module not in OPTIONAL:
            net.get_submodule(module)  # raises if the layout names a module the network lacks
    for key in net.state_dict():  # encoder, head and the rest (decoder) never overlap
        assert not (layout.encoder_level(key) is not None and layout.in_head(key)), key
    assert any(layout.encoder_level(k) is not None for k in net.state_dict())
    assert any(layout.in_head(k) for k in net.state_dict())


@pytest.mark.parametrize("name", sorted(TINY))
def test_sizes_the_network_cannot_take_are_refused(name):
    in_ch, roi, kwargs = TINY[name]
    div = size_divisor(name, kwargs)
    if div == 1:  # pads internally (truncated encoders): any size builds
        build_network(name, in_ch, 2, [r + 1 for r in roi], **kwargs)
        return
    with pytest.raises(ValueError, match=f"multiple of {div}"):
        build_network(name, in_ch, 2, [roi[0] + div // 2, *roi[1:]], **kwargs)


def test_adding_a_network_is_one_registration_and_duplicates_are_refused():
    spec = NetworkSpec("unet_tiny_test", build_unet, unet_layout, unet_size_divisor, 3,
                       {"channels": (2, 4), "strides": (2,), "num_res_units": 0})
    register(spec)
    try:
        net = build_network("unet_tiny_test", 1, 2, [8, 8, 8])
        assert net(torch.zeros(1, 1, 8, 8, 8)).shape == (1, 2, 8, 8, 8)
        assert arch_layout("unet_tiny_test", net).head == ["model.2"]
        with pytest.raises(ValueError, match="registered already"):
            register(spec)
    finally:
        REGISTRY.pop("unet_tiny_test")
