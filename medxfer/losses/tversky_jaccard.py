"""Tversky + soft Jaccard loss of TATL (SPEC section 6).

Nguyen et al., "TATL: Task Agnostic Transfer Learning for Skin Attributes Detection",
Medical Image Analysis 2022, section 3.1, equations (1)-(3).
"""

from __future__ import annotations

import torch

__all__ = ["TverskyJaccardLoss"]

_REDUCTIONS = ("mean", "sum", "none")


class TverskyJaccardLoss(torch.nn.Module):
    r"""``lambda_tversky * L_T + lambda_jaccard * L_J``, the segmentation loss of TATL, Eq. (1).

    With ``p`` the predicted probabilities and ``y`` the target of one channel, both flattened
    to vectors, ``<.,.>`` the inner product and ``|.|_1`` the L1 norm (paper Eq. (2) and (3))::

        L_T = 1 - (s + <y,p>) / (s + <y,p> + beta <1-p, y> + (1 - beta) <p, 1-y>)      (2)
        L_J = 1 - (s + <y,p>) / (s + |y|_1 + |p|_1 - <y,p>)                             (3)

    with the paper's values ``s`` (its "alpha") = 1, ``beta`` = 0.6 (false negatives weigh more
    than false positives, 0.4) and ``lambda_tversky = lambda_jaccard = 0.5``.

    Reduction (the paper does not say how a minibatch is reduced; this is our choice):
    by default (``batch=False``) each image and channel is one vector, as Eq. (1) writes the
    loss, ``1/n sum_j sum_i L(y_j^(i), p_j^(i))``: an image without the attribute (empty mask)
    then gets its own loss ``1 - 1 / (1 + (1 - beta) |p|_1)``, which pushes its false positives
    down however large the lesions of the other images are. ``batch=True`` sums the inner
    products over the whole batch per channel before the ratio (one "soft" ratio over all
    pixels of the batch, like MONAI's ``batch=True`` and segmentation_models' losses).
    The resulting ``(B, C)`` (or ``(C,)`` with ``batch=True``) values are averaged
    (``reduction="mean"``, default), summed (``"sum"``; Eq. (1) sums over attributes and
    averages over images, i.e. ``C`` times ``"mean"``) or returned (``"none"``). For the
    one-channel networks of TATL (one target segmenter per attribute) ``"mean"`` is exactly
    Eq. (1). With ``smooth = 1`` the terms are *not* scale-free: the values differ from
    MONAI's defaults (``smooth = 1e-5``) on small or empty masks.

    Equivalences (tested): the Tversky term is ``monai.losses.TverskyLoss(alpha=1 - beta,
    beta=beta, smooth_nr=smooth, smooth_dr=smooth)`` (MONAI's ``alpha`` weighs false
    positives); the Jaccard term is ``monai.losses.DiceLoss(jaccard=True, smooth_nr=2 * smooth,
    smooth_dr=2 * smooth)`` (MONAI writes ``1 - (2 tp + s_nr) / (2 (tp + fp + fn) + s_dr)``).

    Args:
        beta: weight of the false negatives ``<1-p, y>`` in ``L_T``; false positives get ``1 - beta``.
        smooth: ``s``, added to numerator and denominator of both ratios (the paper's alpha).
        lambda_tversky: weight of ``L_T``.
        lambda_jaccard: weight of ``L_J``.
        sigmoid: apply a sigmoid to the input (binary / multi-label masks, the TATL case).
        softmax: apply a softmax over the channels instead (mutually exclusive classes, ``C >= 2``).
            With neither, the input must already be probabilities.
        batch: sum over the batch before the ratio (see above); default False.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` over the per-(image,) channel losses.

    Shapes:
        input: logits ``(B, C, H, W[, D])`` (probabilities if ``sigmoid`` and ``softmax`` are False).
        target: ``(B, C, H, W[, D])``, values 0/1 (soft targets in [0, 1] are accepted: the
            formulas use inner products only).
        output: scalar for ``"mean"`` / ``"sum"``; ``(B, C)`` (``(C,)`` if ``batch``) for ``"none"``.
    """

    def __init__(
        self,
        beta: float = 0.6,
        smooth: float = 1.0,
        lambda_tversky: float = 0.5,
        lambda_jaccard: float = 0.5,
        sigmoid: bool = True,
        softmax: bool = False,
        batch: bool = False,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        if sigmoid and softmax:
            raise ValueError("sigmoid and softmax are mutually exclusive; choose one (or neither for probabilities)")
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        if smooth < 0:
            raise ValueError(f"smooth must be >= 0, got {smooth}")
        if lambda_tversky < 0 or lambda_jaccard < 0:
            raise ValueError(f"loss weights must be >= 0, got {lambda_tversky}, {lambda_jaccard}")
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        self.beta = float(beta)
        self.smooth = float(smooth)
        self.lambda_tversky = float(lambda_tversky)
        self.lambda_jaccard = float(lambda_jaccard)
        self.sigmoid = sigmoid
        self.softmax = softmax
        self.batch = batch
        self.reduction = reduction

    def _probabilities(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if input.ndim < 3:
            raise ValueError(f"input must be (B, C, H, W[, D]), got shape {tuple(input.shape)}")
        if target.shape != input.shape:
            raise ValueError(f"target shape {tuple(target.shape)} differs from input shape {tuple(input.shape)}")
        if self.sigmoid:
            return torch.sigmoid(input)
        if self.softmax:
            if input.shape[1] < 2:
                raise ValueError("softmax needs at least 2 channels; use sigmoid=True for one-channel masks")
            return torch.softmax(input, dim=1)
        return input

    def components(self, input: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unweighted, unreduced ``(L_T, L_J)``, each ``(B, C)`` (``(C,)`` with ``batch=True``)."""
        p = self._probabilities(input, target)
        y = target.to(p.dtype)
        dims = list(range(2, p.ndim))
        if self.batch:
            dims = [0] + dims
        tp = torch.sum(y * p, dim=dims)                  # <y, p>
        fn = torch.sum(y * (1.0 - p), dim=dims)          # <1-p, y>
        fp = torch.sum(p * (1.0 - y), dim=dims)          # <p, 1-y>
        y_l1 = torch.sum(y, dim=dims)                    # |y|_1 (y >= 0)
        p_l1 = torch.sum(p, dim=dims)                    # |p|_1 (p >= 0)
        numerator = self.smooth + tp
        tversky = 1.0 - numerator / (self.smooth + tp + self.beta * fn + (1.0 - self.beta) * fp)
        jaccard = 1.0 - numerator / (self.smooth + y_l1 + p_l1 - tp)
        return tversky, jaccard

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of logits ``input`` against ``target``, both ``(B, C, H, W[, D])``."""
        tversky, jaccard = self.components(input, target)
        loss = self.lambda_tversky * tversky + self.lambda_jaccard * jaccard
        if self.reduction == "mean":
            return loss.mean()
        if self.reduction == "sum":
            return loss.sum()
        return loss
