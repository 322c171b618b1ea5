"""MSD preprocessing chains: values against numpy, geometry, invertibility."""

import nibabel as nib
import numpy as np
import pytest
import torch

from medxfer.data.msd import load_task
from medxfer.data.synth.msd import generate_msd_task
from medxfer.transforms.msd import msd_transforms, normalization_transforms

CT_PLANS = {"target_spacing": [6.0, 6.0, 12.0], "patch_size": [32, 32, 16],
            "normalization": [{"channel": 0, "scheme": "CT", "clip": [-200.0, 180.0], "mean": 90.0, "std": 40.0}]}


@pytest.fixture(scope="module")
def spleen(tmp_path_factory):
    return load_task(generate_msd_task(tmp_path_factory.mktemp("t"), "spleen", num_training=3, num_test=0, seed=4))


def test_ct_normalisation_is_clip_then_zscore():
    x = np.random.default_rng(0).uniform(-1000, 1000, (1, 8, 8, 8)).astype(np.float32)
    out = normalization_transforms(CT_PLANS)[0]({"image": torch.as_tensor(x)})["image"]
    expected = (np.clip(x, -200, 180) - 90.0) / 40.0
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)


def test_mr_normalisation_is_per_channel_zscore():
    plans = {"normalization": [{"scheme": "zscore"}, {"scheme": "zscore"}]}
    rng = np.random.default_rng(1)
    x = np.stack([rng.normal(300, 50, (6, 6, 6)), rng.normal(1500, 200, (6, 6, 6))]).astype(np.float32)
    out = np.asarray(normalization_transforms(plans)[0]({"image": torch.as_tensor(x)})["image"])
    for c in range(2):
        np.testing.assert_allclose(out[c], (x[c] - x[c].mean()) / x[c].std(), rtol=1e-4, atol=1e-4)


def test_eval_chain_resamples_to_target_spacing_in_ras_and_keeps_organ_volume(spleen):
    chain = msd_transforms(CT_PLANS, mode="eval")
    for record in spleen.training:
        out = chain(record)
        affine = out["image"].affine.numpy()
        assert nib.aff2axcodes(affine) == ("R", "A", "S")
        assert np.allclose(np.sqrt((affine[:3, :3] ** 2).sum(0)), CT_PLANS["target_spacing"], rtol=1e-4)
        assert out["image"].shape[1:] == out["label"].shape[1:]
        lab = nib.load(record["label"])
        volume_in = (np.asanyarray(lab.dataobj) == 1).sum() * np.prod(lab.header.get_zooms()[:3])
        volume_out = (out["label"].numpy() == 1).sum() * np.prod(CT_PLANS["target_spacing"])
        assert volume_out == pytest.approx(volume_in, rel=0.2)
        assert set(np.unique(out["label"].numpy())) <= {0, 1}


def test_label_goes_back_to_the_file_geometry_with_invertd(spleen):
    from monai.transforms import Invertd

    record = spleen.training[1]
    ras = nib.as_closest_canonical(nib.load(record["image"])).header.get_zooms()[:3]
    plans = {**CT_PLANS, "target_spacing": [float(z) for z in ras]}  # no resampling: inversion must be exact
    chain = msd_transforms(plans, mode="eval")
    out = chain(record)
    out["pred"] = out["label"].clone()
    inverted = Invertd(keys="pred", transform=chain, orig_keys="label", nearest_interp=True)(out)["pred"]
    original = np.asanyarray(nib.load(record["label"]).dataobj)
    assert tuple(inverted.shape[1:]) == original.shape
    assert np.array_equal(inverted[0].numpy().astype(np.uint8), original)


def test_train_chain_gives_patches_of_plan_size_with_foreground(spleen):
    chain = msd_transforms(CT_PLANS, mode="train", num_samples=3, pos=1.0, neg=0.0)
    chain.set_random_state(0)
    patches = chain(spleen.training[0])
    assert len(patches) == 3
    for p in patches:
        assert tuple(p["image"].shape) == (1, 32, 32, 16) and tuple(p["label"].shape) == (1, 32, 32, 16)
        assert (p["label"] > 0).any()


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match="mode"):
        msd_transforms(CT_PLANS, mode="validate")
