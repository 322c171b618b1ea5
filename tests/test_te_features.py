"""Feature sampling for transferability estimation: values, memory bound, counts, determinism."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medxfer.networks.registry import arch_layout, build_network
from medxfer.transferability.features import (SamplingConfig, draw_voxels, pooled, sample_case, sample_dataset,
                                              window_starts)

KW = {"channels": (4, 8, 16, 32), "strides": (2, 2, 2), "num_res_units": 1}


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    net = build_network("unet", 1, 3, [16, 16, 16], **KW).eval()
    return net, arch_layout("unet", net).decoder_stages + ["model.2"]


def _label(shape, seed=0):
    rng = np.random.default_rng(seed)
    lab = np.zeros(shape, np.int64)
    lab[2:8, 3:9, 1:6] = 1
    lab[10:12, 10:13, 9:12] = 2
    lab[rng.random(shape) < 0.01] = 0
    return lab


def _reference(net, stages, image, coords, roi, starts):
    """Brute force: for each voxel, run its window, resize every hooked map to the window with
    F.interpolate (the SPEC's "each map resized to the window") and index the voxel."""
    out = {s: [] for s in stages}
    probs = []
    mods = dict(net.named_modules())
    for c in coords:
        st = [max(s for s in starts[d] if s <= c[d]) for d in range(3)]
        crop = image[:, st[0]:st[0] + roi[0], st[1]:st[1] + roi[1], st[2]:st[2] + roi[2]][None]
        got = {}
        hooks = [mods[s].register_forward_hook(lambda m, i, o, s=s: got.__setitem__(s, o)) for s in stages]
        with torch.no_grad():
            logits = net(crop)
        for h in hooks:
            h.remove()
        loc = tuple(int(c[d] - st[d]) for d in range(3))
        for s in stages:
            up = F.interpolate(got[s], size=roi, mode="trilinear", align_corners=False) if got[s].shape[2:] != tuple(roi) else got[s]
            out[s].append(up[0][(slice(None), *loc)].numpy())
        probs.append(torch.softmax(logits[0], 0)[(slice(None), *loc)].numpy())
    return out, np.array(probs)


def test_sampled_features_equal_resized_decoder_maps_at_the_drawn_voxels(unet):
    net, stages = unet
    shape, roi = (24, 20, 16), [16, 16, 16]  # two windows along x and y, the last ones shifted inside
    image = torch.randn(1, *shape)
    label = _label(shape)
    cfg = SamplingConfig(ratio=0.02, min_per_class=5, max_per_class=30, variety_samples=20, seed=3, sw_batch_size=3)
    case = sample_case(net, stages, image, label, roi, cfg)
    starts = [window_starts(s, r) for s, r in zip(shape, roi)]
    ref, probs = _reference(net, stages, image, case.coords, roi, starts)
    for lvl, s in enumerate(stages):
        np.testing.assert_allclose(case.levels[lvl], np.array(ref[s]), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(case.source_probs, probs, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(case.labels, label[tuple(case.coords.T)])
    assert [lv.shape[1] for lv in case.levels] == [8, 4, 3]
    assert case.meta["windows_total"] == 4


def test_the_network_never_sees_more_than_one_window_whatever_the_volume(unet):
    net, stages = unet
    seen = []
    h = net.register_forward_pre_hook(lambda m, inp: seen.append(tuple(inp[0].shape)))
    try:
        sample_case(net, stages, torch.randn(1, 48, 40, 33), _label((48, 40, 33)), [16, 16, 16],
                    SamplingConfig(variety_samples=300, sw_batch_size=2))
    finally:
        h.remove()
    assert seen and all(s[0] <= 2 and s[2:] == (16, 16, 16) for s in seen)


def test_a_volume_smaller_than_the_window_is_zero_padded(unet):
    net, stages = unet
    case = sample_case(net, stages, torch.randn(1, 12, 16, 10), _label((12, 16, 10)), [16, 16, 16])
    assert case.meta["shape"] == [16, 16, 16] and (case.coords < [12, 16, 10]).all()


def test_class_proportional_counts_respect_min_max_and_the_class_size():
    label = np.zeros((40, 40, 10), np.int64)
    label[:20, :20, :5] = 1      # 2000 voxels
    label[30:32, 30:32, 0] = 2   # 4 voxels
    cfg = SamplingConfig(ratio=0.05, min_per_class=10, max_per_class=150, variety_samples=77)
    coords, variety = draw_voxels(label, cfg, seed=1)
    lab = label[tuple(coords.T)]
    counts = {c: int(((lab == c) & ~variety).sum()) for c in (0, 1, 2)}
    assert counts == {0: 150, 1: 100, 2: 4}  # bg 14000*0.05 -> max 150; 2000*0.05 = 100; class 2 has only 4
    assert variety.sum() == 77
    assert len({tuple(c) for c in coords[~variety]}) == (~variety).sum()  # without replacement per class
    again, _ = draw_voxels(label, cfg, seed=1)
    other, _ = draw_voxels(label, cfg, seed=2)
    assert np.array_equal(coords, again) and not np.array_equal(coords, other)


def test_sample_dataset_seeds_each_case_and_pools_the_class_sample(unet):
    net, stages = unet
    cases = [{"id": f"c{i}", "image": torch.randn(1, 16, 16, 16), "label": torch.as_tensor(_label((16, 16, 16), i))[None]}
             for i in range(3)]
    cfg = SamplingConfig(min_per_class=4, max_per_class=20, variety_samples=10)
    a = sample_dataset(net, stages, cases, [16, 16, 16], cfg, progress=False)
    b = sample_dataset(net, stages, cases, [16, 16, 16], cfg, progress=False)
    assert [c.case_id for c in a] == ["c0", "c1", "c2"]
    assert all(np.array_equal(x.coords, y.coords) and np.allclose(x.levels[0], y.levels[0]) for x, y in zip(a, b))
    feats, labels = pooled(a, level=-1)
    assert feats.shape == (sum((~c.variety).sum() for c in a), 3) and labels.shape == (feats.shape[0],)


def test_unknown_stage_names_are_reported(unet):
    net, _ = unet
    with pytest.raises(ValueError, match="decoder stages"):
        sample_case(net, ["decoder9"], torch.randn(1, 16, 16, 16), _label((16, 16, 16)), [16, 16, 16])


def test_2d_networks_are_sampled_the_same_way():
    from monai.networks.nets import UNet

    torch.manual_seed(1)
    net = UNet(2, 3, 2, channels=(4, 8, 16), strides=(2, 2), num_res_units=1).eval()
    stages = ["model.1.submodule.2", "model.2"]
    image = torch.rand(3, 40, 24)
    label = np.zeros((40, 24), np.int64)
    label[5:20, 4:15] = 1
    case = sample_case(net, stages, image, label, [32, 32], SamplingConfig(min_per_class=8, max_per_class=20,
                                                                         variety_samples=10))
    assert case.coords.shape[1] == 2 and case.meta["windows_total"] == 2  # y: 40 -> windows at 0 and 8; x padded
    mods = dict(net.named_modules())
    got = {}
    hooks = [mods[s].register_forward_hook(lambda m, i, o, s=s: got.__setitem__(s, o)) for s in stages]
    padded = F.pad(image, [0, 8])
    for k, c in enumerate(case.coords[:5]):
        start = 0 if c[0] < 8 else 8  # the owner window: the largest start <= coordinate
        with torch.no_grad():
            net(padded[None, :, start:start + 32, :32])
        up = F.interpolate(got[stages[0]], size=(32, 32), mode="bilinear", align_corners=False)[0]
        np.testing.assert_allclose(case.levels[0][k], up[:, c[0] - start, c[1]].numpy(), rtol=1e-4, atol=1e-5)
    for h in hooks:
        h.remove()
