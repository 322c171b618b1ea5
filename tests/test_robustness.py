"""Robustness (thesis ch. 4, eqs. 4.1-4.3) and the online stopping rule."""

import matplotlib.colors
import numpy as np
import pytest
import torch

from medxfer.transferability.robustness import (
    first_local_maximum,
    hooked_output,
    robustness_score,
    should_stop,
    triplet_views,
)
from medxfer.transforms.jitter import JitterConfig, color_jitter, intensity_jitter

NO_JITTER = JitterConfig(brightness=0, contrast=0, saturation=0, hue=0, scale=0, shift=0, gamma_range=(1, 1))


def _two_level_images(n, shape, channels=1, seed=0):
    """Distinct random binary masks with two random intensity levels per image (grey if RGB)."""
    g = torch.Generator().manual_seed(seed)
    masks = (torch.rand((n, 1, *shape), generator=g) < 0.5).double()
    lo = 0.1 + 0.2 * torch.rand((n, 1) + (1,) * len(shape), generator=g, dtype=torch.float64)
    hi = lo + 0.3
    return (lo + (hi - lo) * masks).repeat(1, channels, *([1] * len(shape)))


def _zscored_luma(batch):
    """A jitter-invariant 'encoder' for two-level images: the z-scored channel mean, per image."""
    m = batch.mean(1, keepdim=True)
    dims = tuple(range(1, m.ndim))
    return (m - m.mean(dims, keepdim=True)) / m.std(dims, keepdim=True)


@pytest.mark.parametrize("n", [3, 5])
def test_negative_is_always_a_view_of_a_different_image_for_odd_batches(n):
    images = torch.randn(n, 1, 6, 6)
    for seed in range(10):
        anchor, positive, negative, neg = triplet_views(images, seed=seed, jitter=NO_JITTER)
        assert sorted(neg.tolist()) == list(range(n))          # each image is used once as negative
        assert all(int(neg[i]) != i for i in range(n))
        torch.testing.assert_close(anchor, images)
        torch.testing.assert_close(negative, images[neg])


def test_a_single_image_has_no_negative_and_raises():
    with pytest.raises(ValueError, match="at least 2 images"):
        robustness_score(torch.rand(1, 1, 8, 8), lambda b: b)


@pytest.mark.parametrize("margin", [0.5, 0.25])
def test_features_identical_for_all_images_give_one_minus_margin(margin):
    images = torch.rand(5, 3, 8, 8)
    constant = lambda b: torch.ones(b.shape[0], 4, 2, 2)  # noqa: E731
    for pooled in (True, False):
        assert robustness_score(images, constant, pooled=pooled, margin=margin) == pytest.approx(1 - margin)


@pytest.mark.parametrize("channels,shape", [(1, (16, 16)), (3, (16, 16)), (1, (8, 8, 8))])
def test_jitter_invariant_encoder_on_distinct_images_scores_one(channels, shape):
    images = _two_level_images(6, shape, channels)
    score = robustness_score(images, _zscored_luma, pooled=False, seed=3)
    assert score == pytest.approx(1.0, abs=1e-6)
    # while the raw pixels are not invariant (views differ), so this is not trivial
    anchor, positive, _, _ = triplet_views(images, seed=3)
    assert (anchor - positive).abs().max() > 1e-3


def test_score_is_deterministic_under_seed_and_independent_of_batch_size():
    images = torch.rand(7, 3, 12, 12)
    conv = torch.nn.Conv2d(3, 4, 3).double().eval()
    fn = lambda b: conv(b.double())  # noqa: E731
    a = robustness_score(images, fn, seed=11, batch_size=2)
    assert a == robustness_score(images, fn, seed=11, batch_size=7)
    assert a == robustness_score(images, fn, seed=11, batch_size=3)
    assert a != robustness_score(images, fn, seed=12, batch_size=2)


def _numpy_score(fa, fp, fn, pooled, margin=0.5):
    def vec(f):
        f = f.detach().numpy().astype(np.float64)
        return f.mean(axis=tuple(range(2, f.ndim))) if pooled else f.reshape(len(f), -1)

    def dist(a, b):
        return 1 - np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))

    a, p, n = vec(fa), vec(fp), vec(fn)
    return 1 - np.mean(np.maximum(0.0, dist(a, p) - dist(a, n) + margin))


@pytest.mark.parametrize("spatial", [2, 3])
@pytest.mark.parametrize("pooled", [True, False])
def test_pooled_and_unpooled_scores_match_numpy_on_the_same_views_in_2d_and_3d(spatial, pooled):
    torch.manual_seed(0)
    shape = (10, 10) if spatial == 2 else (6, 6, 6)
    conv = (torch.nn.Conv2d if spatial == 2 else torch.nn.Conv3d)(1, 3, 3).double().eval()
    fn = lambda b: torch.relu(conv(b.double())) + 0.01  # noqa: E731
    images = torch.randn(5, 1, *shape) * 50 + 20   # HU-like range; intensity jitter
    anchor, positive, negative, _ = triplet_views(images, seed=5)
    with torch.no_grad():
        expected = _numpy_score(fn(anchor), fn(positive), fn(negative), pooled)
    assert robustness_score(images, fn, pooled=pooled, seed=5, batch_size=2) == pytest.approx(expected, rel=1e-9)


def test_pooled_and_unpooled_differ_for_spatially_structured_features():
    images = torch.rand(4, 1, 10, 10)
    fn = lambda b: b  # noqa: E731  (identity: pooled = a scalar per image)
    assert robustness_score(images, fn, pooled=True) != robustness_score(images, fn, pooled=False)


def test_hue_shift_matches_matplotlib_hsv_round_trip():
    img = torch.rand(3, 5, 7, dtype=torch.float64)
    shift = 0.23
    hsv = matplotlib.colors.rgb_to_hsv(img.permute(1, 2, 0).numpy())
    hsv[..., 0] = (hsv[..., 0] + shift) % 1.0
    expected = matplotlib.colors.hsv_to_rgb(hsv).transpose(2, 0, 1)
    np.testing.assert_allclose(color_jitter(img, hue=shift).numpy(), expected, atol=1e-10)
    red = torch.zeros(3, 1, 1, dtype=torch.float64)
    red[0] = 1
    np.testing.assert_allclose(color_jitter(red, hue=1 / 3).ravel().numpy(), [0, 1, 0], atol=1e-12)


def test_brightness_contrast_saturation_follow_the_colorjitter_formulas():
    img = torch.rand(3, 4, 4, dtype=torch.float64) * 0.6 + 0.2
    x = img.numpy()
    grey = 0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]
    np.testing.assert_allclose(color_jitter(img, brightness=1.3).numpy(), np.clip(1.3 * x, 0, 1))
    np.testing.assert_allclose(color_jitter(img, contrast=0.7).numpy(),
                               np.clip(0.7 * x + 0.3 * grey.mean(), 0, 1))
    np.testing.assert_allclose(color_jitter(img, saturation=1.4).numpy(),
                               np.clip(1.4 * x - 0.4 * grey[None], 0, 1))


def test_intensity_jitter_is_scale_then_std_shift_then_gamma_on_the_range():
    img = torch.randn(2, 5, 4, 3, dtype=torch.float64) * 100
    original = img.clone()
    x = img.numpy() * (1 + 0.08)
    x = x + (-0.05) * x.std()
    lo, rng = x.min(), x.max() - x.min()
    expected = ((x - lo) / (rng + 1e-7)) ** 1.3 * rng + lo
    got = intensity_jitter(img, scale=0.08, shift=-0.05, gamma=1.3)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)
    assert torch.equal(img, original) and got.dtype == img.dtype   # input untouched


def test_color_mode_needs_three_channels():
    with pytest.raises(ValueError, match="3 channels"):
        triplet_views(torch.rand(3, 1, 4, 4), mode="color")


def test_hooked_output_returns_the_submodule_output():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.Conv2d(2, 1, 1)).eval()
    x = torch.randn(2, 1, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(hooked_output(net, "1")(x), torch.relu(net[0](x)))


def test_first_local_maximum_of_scripted_curves():
    curve = [0.1, 0.3, 0.5, 0.4, 0.6]               # epochs 0..4
    assert first_local_maximum(curve) == 2
    assert [should_stop(curve[:e + 1]) for e in range(5)] == [False, False, False, True, True]  # stop at epoch 3
    assert first_local_maximum([0.1, 0.2, 0.3, 0.4, 0.5]) is None   # monotone: never stop
    assert not any(should_stop([0.1, 0.2, 0.3, 0.4][:k]) for k in range(5))
    assert first_local_maximum([0.9, 0.2, 0.3, 0.25]) == 2          # random-init maximum ignored
    assert first_local_maximum([0.5, 0.6, 0.4, 0.45, 0.3]) == 1     # epoch 1 may be chosen (thesis) ...
    assert first_local_maximum([0.5, 0.6, 0.4, 0.45, 0.3], start_epoch=2) == 3   # ... unless ignored
    assert first_local_maximum([0.1, 0.3, 0.3, 0.2]) == 2          # plateau continues
    assert first_local_maximum([0.9, 0.3, 0.4, 0.35, 0.5], epochs=[0, 1, 5, 20, 50]) == 5
    with pytest.raises(ValueError):
        first_local_maximum([0.1, float("nan"), 0.2])
