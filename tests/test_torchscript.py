"""Every registered network exports for deployment (issue 15, item 3): TorchScript as MONAI's
``ckpt_export`` makes it (``monai.networks.utils.convert_to_torchscript``: ``torch.jit.script`` and
``torch.jit.save``), loaded back and giving eager's output; or, for the networks listed in
:data:`TORCH_EXPORT_ONLY` with the reason TorchScript cannot compile them, a ``torch.export``
program (saved and loaded) giving eager's output. Each network is tested in the configurations bank
entries use: the registry's tiny test shapes (tests/test_networks_registry.py ``TINY``), the thesis
2D networks also as their pretraining ``EncoderClassifier`` (``encoder_classifier=True``)."""

import copy
import io

import pytest
import torch
from monai.networks.blocks.patchembedding import PatchEmbed
from monai.networks.nets.swin_unetr import BasicLayer, PatchMergingV2, SwinTransformerBlock
from monai.networks.utils import convert_to_torchscript

from medxfer.networks import build_network, registered
from medxfer.networks.seg2d import THESIS_ARCHS
from medxfer.networks.swin_unet import PatchEmbed2D, PatchMerging2D, SwinBlock2D, SwinStage2D, SwinUNet
from test_networks_registry import TINY

#: Cases that TorchScript cannot compile, for reasons inside MONAI / dynamic_network_architectures
#: (code medxfer uses unchanged), each with the first error ``torch.jit.script`` reports. These are
#: deployed as ``torch.export`` programs (medxfer.workflows.zoo_export.export_program).
TORCH_EXPORT_ONLY = {
    "swinunetr": "MONAI's SwinTransformerBlock.forward calls torch.utils.checkpoint.checkpoint (compiled even with "
                 "use_checkpoint=False; TorchScript refuses its **kwargs), and behind it MONAI's Swin code serves 2D and "
                 "3D in one forward (len(x.size()) branches, einops rearrange, numpy.ceil, itertools.product, Python "
                 "slice objects in compute_mask); medxfer's swin_unet restates the 2D path, SwinUNETR stays MONAI's "
                 "class so that a zoo bundle needs MONAI only",
    "dynunet[deep_supervision]": "MONAI's DynUNetSkipLayer.forward assigns self.heads[i] on an Optional[List[Tensor]] "
                                 "attribute, which TorchScript cannot refine to a list (aten::_set_item does not match); "
                                 "without deep supervision (the registry's default) DynUNet scripts",
    "nnunet": "dynamic_network_architectures' PlainConvEncoder.forward returns a list (return_skips) or a tensor "
              "from one function; TorchScript needs one return type",
}


def _cases():
    cases = []
    for name in registered():
        in_ch, roi, kwargs = TINY[name]
        if name == "dynunet":  # the registry's default (no deep supervision), and TINY's deep supervision
            cases.append(("dynunet", name, in_ch, roi, {**kwargs, "deep_supervision": False}, 2))
            cases.append(("dynunet[deep_supervision]", name, in_ch, roi, kwargs, 2))
            continue
        cases.append((name, name, in_ch, roi, kwargs, 2))
        if name in THESIS_ARCHS:  # pretraining encoder entries: 3 classes
            cases.append((f"{name}[encoder_classifier]", name, in_ch, roi, {**kwargs, "encoder_classifier": True}, 3))
    # the deepest cuts (DenseNet121 level 4 ends with norm5 + ReLU)
    cases.append(("truncated_resnet50[level4]", "truncated_resnet50", 3, [32, 32], {"level": 4}, 2))
    cases.append(("truncated_densenet121[level4]", "truncated_densenet121", 3, [32, 32], {"level": 4}, 2))
    return cases


CASES = _cases()


def _outputs(y):
    return list(y) if isinstance(y, (list, tuple)) else [y]


def _build(case):
    _, name, in_ch, roi, kwargs, out = case
    torch.manual_seed(0)
    net = build_network(name, in_ch, out, roi, **kwargs).eval()
    x = torch.randn(2 if len(roi) == 2 else 1, in_ch, *roi)
    with torch.no_grad():
        expected = _outputs(net(x))
    return net, x, expected


def _assert_same(got, expected):
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.shape == e.shape
        assert torch.allclose(g, e, atol=1e-5), (g - e).abs().max()


def test_the_exceptions_are_real_cases():
    assert set(TORCH_EXPORT_ONLY) <= {case[0] for case in CASES}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_network_exports_as_torchscript_or_torch_export(case):
    net, x, expected = _build(case)
    if case[0] not in TORCH_EXPORT_ONLY:
        buffer = io.BytesIO()
        convert_to_torchscript(net, buffer)  # what monai.bundle ckpt_export runs (script + save)
        buffer.seek(0)
        loaded = torch.jit.load(buffer)
        with torch.no_grad():
            _assert_same(_outputs(loaded(x)), expected)
        return
    try:
        torch.jit.script(net)
    except Exception:
        pass
    else:
        pytest.fail(f"{case[0]} scripts now: remove it from TORCH_EXPORT_ONLY")
    program = torch.export.export(net, (x,))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    with torch.no_grad():
        _assert_same(_outputs(torch.export.load(buffer).module()(x)), expected)


@pytest.mark.parametrize("name", THESIS_ARCHS)
def test_scripted_thesis_networks_still_refuse_bad_sizes(name):
    in_ch, roi, kwargs = TINY[name]
    scripted = torch.jit.script(build_network(name, in_ch, 2, roi, **kwargs).eval())
    with pytest.raises(torch.jit.Error, match="ValueError: .*multiples of"):  # raised inside TorchScript
        scripted(torch.randn(1, in_ch, roi[0] + 8, roi[1]))


def test_swin_unet_2d_forwards_equal_monais_own():
    """The scriptable subclasses' forwards against MONAI's 2D/3D forwards on the same modules: a 64 x 96
    input gives 16 x 24 tokens (padded to whole 7 x 7 windows, shifted with MONAI's mask), 8 x 12, and
    4 x 6 / 2 x 3 (smaller than the window: one window, no shift); stochastic depth kept (eval)."""
    torch.manual_seed(0)
    net = SwinUNet(3, 2, img_size=(64, 96), embed_dim=12, num_heads=(1, 2, 2, 4), drop_path_rate=0.1).eval()
    monai_net = copy.deepcopy(net)
    swapped = 0
    for module in monai_net.modules():
        for ours, theirs in ((SwinStage2D, BasicLayer), (SwinBlock2D, SwinTransformerBlock),
                             (PatchMerging2D, PatchMergingV2), (PatchEmbed2D, PatchEmbed)):
            if type(module) is ours:
                module.__class__ = theirs
                swapped += 1
    assert swapped == 1 + 3 + 7 + 7 * 2  # patch embedding, merges, stages (4 encoder + 3 decoder), blocks
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        ours, theirs = net(x), monai_net(x)
    assert torch.equal(ours, theirs)
    assert list(net.state_dict()) == list(monai_net.state_dict())
