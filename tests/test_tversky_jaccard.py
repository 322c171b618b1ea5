"""TATL's Tversky + soft Jaccard loss: against numpy, MONAI's losses, limits and errors."""

import numpy as np
import pytest
import torch
from monai.losses import DiceLoss, TverskyLoss

from medxfer.losses import TverskyJaccardLoss


def _inputs(seed, shape=(3, 2, 12, 10), empty_image=True):
    """Random logits and hard 0/1 targets; image 0 has an empty mask in channel 0."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=g, dtype=torch.float64) * 2.0
    target = (torch.rand(shape, generator=g, dtype=torch.float64) > 0.7).to(torch.float64)
    if empty_image:
        target[0, 0] = 0.0
    return logits, target


def _numpy_losses(logits, target, beta=0.6, s=1.0, batch=False):
    """SPEC section 6 written out with numpy dot products, vector by vector: (L_T, L_J) arrays."""
    p = 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))
    y = np.asarray(target, dtype=np.float64)
    if batch:  # one vector per channel, over all images
        p, y = np.moveaxis(p, 1, 0)[None], np.moveaxis(y, 1, 0)[None]
    n, c = p.shape[:2]
    lt, lj = np.zeros((n, c)), np.zeros((n, c))
    for i in range(n):
        for k in range(c):
            pv, yv = p[i, k].ravel(), y[i, k].ravel()
            yp = np.dot(yv, pv)
            lt[i, k] = 1 - (s + yp) / (s + yp + beta * np.dot(1 - pv, yv) + (1 - beta) * np.dot(pv, 1 - yv))
            lj[i, k] = 1 - (s + yp) / (s + np.abs(yv).sum() + np.abs(pv).sum() - yp)
    return (lt[0], lj[0]) if batch else (lt, lj)


@pytest.mark.parametrize("batch", [False, True])
def test_loss_equals_numpy_spec_formulas_on_random_inputs(batch):
    logits, target = _inputs(0)
    lt, lj = _numpy_losses(logits.numpy(), target.numpy(), batch=batch)
    loss = TverskyJaccardLoss(batch=batch, reduction="none")
    got_t, got_j = loss.components(logits, target)
    np.testing.assert_allclose(got_t.numpy(), lt, rtol=1e-12)
    np.testing.assert_allclose(got_j.numpy(), lj, rtol=1e-12)
    np.testing.assert_allclose(loss(logits, target).numpy(), 0.5 * lt + 0.5 * lj, rtol=1e-12)
    mean = TverskyJaccardLoss(batch=batch)(logits, target)
    assert mean.ndim == 0 and float(mean) == pytest.approx(float(np.mean(0.5 * lt + 0.5 * lj)), rel=1e-12)


def test_custom_weights_and_beta_follow_the_formula():
    logits, target = _inputs(1)
    lt, lj = _numpy_losses(logits.numpy(), target.numpy(), beta=0.3, s=2.0)
    loss = TverskyJaccardLoss(beta=0.3, smooth=2.0, lambda_tversky=0.8, lambda_jaccard=0.2, reduction="sum")
    assert float(loss(logits, target)) == pytest.approx(float(np.sum(0.8 * lt + 0.2 * lj)), rel=1e-12)


@pytest.mark.parametrize("batch", [False, True])
def test_tversky_part_equals_monai_tversky_loss_with_alpha_on_false_positives(batch):
    logits, target = _inputs(2)
    ours = TverskyJaccardLoss(lambda_tversky=1.0, lambda_jaccard=0.0, batch=batch)(logits, target)
    monai = TverskyLoss(sigmoid=True, alpha=0.4, beta=0.6, smooth_nr=1.0, smooth_dr=1.0, batch=batch)(logits, target)
    assert float(ours) == pytest.approx(float(monai), rel=1e-12)


@pytest.mark.parametrize("batch", [False, True])
def test_jaccard_part_equals_monai_dice_loss_jaccard_with_doubled_smoothing(batch):
    # MONAI: 1 - (2 tp + s_nr) / (2 (tp + fp + fn) + s_dr); s_nr = s_dr = 2 gives (1 + tp) / (1 + |y| + |p| - tp)
    logits, target = _inputs(3)
    ours = TverskyJaccardLoss(lambda_tversky=0.0, lambda_jaccard=1.0, batch=batch)(logits, target)
    monai = DiceLoss(sigmoid=True, jaccard=True, smooth_nr=2.0, smooth_dr=2.0, batch=batch)(logits, target)
    assert float(ours) == pytest.approx(float(monai), rel=1e-12)


def test_softmax_option_equals_monai_with_softmax():
    logits, _ = _inputs(4, shape=(2, 3, 8, 8))
    labels = torch.randint(0, 3, (2, 8, 8), generator=torch.Generator().manual_seed(4))
    target = torch.nn.functional.one_hot(labels, 3).permute(0, 3, 1, 2).to(torch.float64)
    ours = TverskyJaccardLoss(sigmoid=False, softmax=True)(logits, target)
    t = TverskyLoss(softmax=True, alpha=0.4, beta=0.6, smooth_nr=1.0, smooth_dr=1.0)(logits, target)
    j = DiceLoss(softmax=True, jaccard=True, smooth_nr=2.0, smooth_dr=2.0)(logits, target)
    assert float(ours) == pytest.approx(0.5 * float(t) + 0.5 * float(j), rel=1e-12)


def test_false_negatives_cost_more_than_false_positives():
    target = torch.zeros(1, 1, 10, 10)
    target[..., :5, :] = 1.0
    miss = torch.full_like(target, -20.0)  # predicts nothing: 50 false negatives
    extra = torch.full_like(target, 20.0)  # predicts everything: 50 false positives
    loss = TverskyJaccardLoss(lambda_tversky=1.0, lambda_jaccard=0.0)
    assert float(loss(miss, target)) > float(loss(extra, target))


def test_perfect_prediction_gives_zero_only_for_hard_masks():
    _, target = _inputs(5)
    logits = (target * 2 - 1) * 40.0  # sigmoid saturates to exactly 0 / 1 in float64
    assert float(TverskyJaccardLoss()(logits, target)) == pytest.approx(0.0, abs=1e-12)
    empty = torch.zeros(2, 1, 6, 6, dtype=torch.float64)
    assert float(TverskyJaccardLoss()(torch.full_like(empty, -40.0), empty)) == pytest.approx(0.0, abs=1e-12)
    soft = torch.full((2, 1, 6, 6), 0.5, dtype=torch.float64)  # p = y = 0.5 is no zero of the soft losses
    assert float(TverskyJaccardLoss(sigmoid=False)(soft.clone(), soft)) > 0.2


def test_gradient_flows_to_the_logits():
    logits, target = _inputs(6)
    logits = logits.float().requires_grad_(True)
    loss = TverskyJaccardLoss()(logits, target.float())
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    # lowering the loss: pixels of the mask get a negative gradient (raise their logit)
    assert float(logits.grad[target > 0].mean()) < 0 < float(logits.grad[target == 0].mean())


def test_works_for_3d_volumes_too():
    logits, target = _inputs(7, shape=(2, 1, 4, 5, 6))
    lt, lj = _numpy_losses(logits.numpy(), target.numpy())
    assert float(TverskyJaccardLoss()(logits, target)) == pytest.approx(float(np.mean(0.5 * lt + 0.5 * lj)), rel=1e-12)


@pytest.mark.parametrize(
    "input_shape,target_shape",
    [((2, 1, 8, 8), (2, 8, 8)), ((2, 1, 8, 8), (2, 2, 8, 8)), ((8, 8), (8, 8)), ((2, 1, 8, 8), (1, 1, 8, 8))],
)
def test_bad_shapes_raise_value_error(input_shape, target_shape):
    with pytest.raises(ValueError, match="shape"):
        TverskyJaccardLoss()(torch.zeros(input_shape), torch.zeros(target_shape))


def test_bad_options_raise_value_error():
    with pytest.raises(ValueError, match="exclusive"):
        TverskyJaccardLoss(sigmoid=True, softmax=True)
    with pytest.raises(ValueError, match="beta"):
        TverskyJaccardLoss(beta=1.5)
    with pytest.raises(ValueError, match="reduction"):
        TverskyJaccardLoss(reduction="batchmean")
    with pytest.raises(ValueError, match="softmax"):
        TverskyJaccardLoss(sigmoid=False, softmax=True)(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4))
