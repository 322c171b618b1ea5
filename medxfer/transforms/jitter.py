"""Random-view jitter of the robustness score (:mod:`medxfer.transferability.robustness`):
colour jitter of RGB 2D images and intensity jitter of grey / multi-channel scans (2D or 3D).

The functions are deterministic: the caller draws the parameters (the robustness score draws them
up front from one ``torch.Generator``, within the ranges of a :class:`JitterConfig`).

Jitter (the parameters of the thesis's Algorithm 2.3 did not survive in our copy; ours follow
torchvision's ``ColorJitter``):

- ``"color"`` (RGB 2D images in ``[0, 1]``): brightness, contrast, saturation and hue jitter
  in a given order, each clamped to ``[0, 1]`` like torchvision. MONAI has no colour (hue /
  saturation) transforms, so this part is written by hand (:func:`color_jitter`).
- ``"intensity"`` (any value range): multiplicative scale ``v (1 + s)`` (MONAI
  ``ScaleIntensity(factor=s)``), shift by a multiple of the image's standard deviation
  ``v + t std(v)`` (MONAI ``StdShiftIntensity``, scale-free for HU and z-scored data), and gamma on
  the min-max range (MONAI ``AdjustContrast``) (:func:`intensity_jitter`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from monai.transforms import AdjustContrast, ScaleIntensity, StdShiftIntensity
from monai.utils import convert_to_tensor

__all__ = ["JitterConfig", "color_jitter", "intensity_jitter"]


@dataclass(frozen=True)
class JitterConfig:
    """Strength of the random jitter of one view.

    Colour (torchvision ``ColorJitter`` semantics): factors drawn uniformly from
    ``[max(0, 1 - brightness), 1 + brightness]`` (likewise contrast, saturation) and a hue shift
    from ``[-hue, hue]`` (fraction of the hue circle, ``hue <= 0.5``).
    Intensity: ``s ~ U[-scale, scale]`` (``v (1 + s)``), ``t ~ U[-shift, shift]``
    (``v + t std(v)``), ``gamma ~ U[gamma_range]``.
    """

    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    scale: float = 0.1
    shift: float = 0.1
    gamma_range: tuple[float, float] = (0.7, 1.5)

    def __post_init__(self):
        if min(self.brightness, self.contrast, self.saturation, self.hue, self.scale, self.shift) < 0:
            raise ValueError("jitter strengths must be >= 0")
        if self.hue > 0.5:
            raise ValueError(f"hue must be <= 0.5, got {self.hue}")
        lo, hi = self.gamma_range
        if not 0 < lo <= hi:
            raise ValueError(f"gamma_range must satisfy 0 < lo <= hi, got {self.gamma_range}")


# ----------------------------------------------------------------------------------------------
# Colour jitter (by hand: MONAI has no hue / saturation transforms)

def _grey(img: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma ``0.299 R + 0.587 G + 0.114 B`` of ``(3, *S)`` -> ``(1, *S)``."""
    return (0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2]).unsqueeze(0)


def _rgb_to_hsv(img: torch.Tensor) -> torch.Tensor:
    """``(3, *S)`` RGB in ``[0, 1]`` -> ``(3, *S)`` HSV, hue in ``[0, 1)`` (torchvision's algorithm)."""
    r, g, b = img.unbind(0)
    maxc, minc = img.max(0).values, img.min(0).values
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    div = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / div, (maxc - g) / div, (maxc - b) / div
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return torch.stack((h, s, maxc))


def _hsv_to_rgb(img: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_rgb_to_hsv`."""
    h, s, v = img.unbind(0)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.int64) % 6
    p = (v * (1.0 - s)).clamp(0.0, 1.0)
    q = (v * (1.0 - s * f)).clamp(0.0, 1.0)
    t = (v * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0)
    sector = torch.stack([(i == k) for k in range(6)]).to(img.dtype)     # (6, *S)
    table = torch.stack((torch.stack((v, q, p, p, t, v)),                # R per sector
                         torch.stack((t, v, v, q, p, p)),                # G
                         torch.stack((p, p, t, v, v, q))))               # B -> (3, 6, *S)
    return (table * sector.unsqueeze(0)).sum(1)


def color_jitter(img: torch.Tensor, brightness: float = 1.0, contrast: float = 1.0, saturation: float = 1.0,
                 hue: float = 0.0, order: Sequence[int] = (0, 1, 2, 3)) -> torch.Tensor:
    """Deterministic colour jitter of one RGB image ``(3, H, W[, D])`` with values in ``[0, 1]``.

    Ops (torchvision semantics, each followed by a clamp to ``[0, 1]``), applied in ``order``
    (0 = brightness, 1 = contrast, 2 = saturation, 3 = hue):
    brightness ``b x``; contrast ``c x + (1 - c) mean(grey(x))``; saturation ``s x + (1 - s) grey(x)``;
    hue: ``h <- (h + shift) mod 1`` in HSV. Identity factors are 1, 1, 1 and shift 0.
    """
    if img.shape[0] != 3:
        raise ValueError(f"color_jitter needs a (3, H, W[, D]) RGB image, got shape {tuple(img.shape)}")
    out = img
    for op in order:
        if op == 0 and brightness != 1.0:
            out = (brightness * out).clamp(0.0, 1.0)
        elif op == 1 and contrast != 1.0:
            out = (contrast * out + (1.0 - contrast) * _grey(out).mean()).clamp(0.0, 1.0)
        elif op == 2 and saturation != 1.0:
            out = (saturation * out + (1.0 - saturation) * _grey(out)).clamp(0.0, 1.0)
        elif op == 3 and hue != 0.0:
            hsv = _rgb_to_hsv(out)
            hsv = torch.stack((torch.remainder(hsv[0] + hue, 1.0), hsv[1], hsv[2]))
            out = _hsv_to_rgb(hsv)
    return out


# ----------------------------------------------------------------------------------------------
# Intensity jitter (MONAI transforms with parameters drawn by us)

def intensity_jitter(img: torch.Tensor, scale: float = 0.0, shift: float = 0.0, gamma: float = 1.0) -> torch.Tensor:
    """Deterministic intensity jitter of one image ``(C, H, W[, D])`` (any value range):
    ``x <- x (1 + scale)`` (MONAI ``ScaleIntensity``), ``x <- x + shift std(x)`` (MONAI
    ``StdShiftIntensity``), then gamma on the min-max range (MONAI ``AdjustContrast``), all over
    the whole image (not channel-wise). Identity: ``scale = shift = 0``, ``gamma = 1``.
    """
    out = img.clone()  # StdShiftIntensity works in place (MONAI 1.6)
    if scale != 0.0:
        out = ScaleIntensity(minv=None, maxv=None, factor=float(scale), dtype=None)(out)
    if shift != 0.0:
        out = StdShiftIntensity(float(shift), dtype=None)(out)
    if gamma != 1.0:
        out = AdjustContrast(float(gamma))(out)
    return convert_to_tensor(out, track_meta=False).to(img.dtype)
