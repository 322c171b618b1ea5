"""Generated ISIC-like dermoscopy data, written in the exact ISIC 2017 / 2018 on-disk layout.

Each case is an RGB dermoscopy-like image: skin background (beige/pink tone with smooth
low-frequency variation, fine noise, optional thin dark hairs and an optional dark
circular dermoscope vignette in the corners) with one pigmented lesion (an irregular
blob whose polar radius carries a few random harmonics, brown with a darker centre and a
soft border). Dermoscopic attributes (ISIC Task 2) are drawn only inside the lesion:

==================  ====================================================================
attribute           pattern (and the region its mask covers)
==================  ====================================================================
pigment_network     dark brown irregular honeycomb mesh over a sub-region of the lesion
                    (mask: the sub-region)
negative_network    light (hypopigmented) mesh around darker cells over a sub-region
                    (mask: the sub-region)
globules            clusters of round dark-brown dots (mask: the dots, dilated by 1 px)
milia_like_cyst     small bright white-yellow round spots (mask: the spots, dilated 1 px)
streaks             radial dark lines at the lesion periphery pointing outward
                    (mask: the lines, dilated by 1 px)
==================  ====================================================================

Every attribute mask lies inside the lesion mask and covers every pixel its pattern
changed; the Task 1 mask is the lesion blob (every pixel the lesion layer changed lies in
it). Attribute prevalence follows the training sets (SPEC section 6 for 2018, TATL paper
Table 2 for 2017): for each attribute exactly ``round(prevalence * num_images)`` images
carry it.

Layout written by :func:`generate_isic` (SPEC section 2)::

    2018: ISIC2018_Task1-2_Training_Input/ISIC_0000000.jpg
          ISIC2018_Task1_Training_GroundTruth/ISIC_0000000_segmentation.png
          ISIC2018_Task2_Training_GroundTruth_v3/ISIC_0000000_attribute_<name>.png
    2017: ISIC-2017_Training_Data/ISIC_0000000.jpg
          ISIC-2017_Training_Part1_GroundTruth/ISIC_0000000_segmentation.png
          ISIC-2017_Training_Part2_GroundTruth/ISIC_0000000_<name>.png

The official ISIC 2017 Part 2 release ships superpixel JSON files (plus
``*_superpixels.png`` beside the images) rather than one PNG per attribute; this layout
does not reproduce them and writes one 0/255 PNG per attribute instead, the same idea as
2018 (SPEC section 2).
"""

from __future__ import annotations

import math
import pathlib
from dataclasses import dataclass, field
from os import PathLike

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage
from scipy.spatial import cKDTree

from medxfer.data.isic import ISIC_LAYOUTS
from medxfer.data.synth.staging import staged_output

__all__ = [
    "ISIC_ATTRIBUTES",
    "ATTRIBUTE_PREVALENCE",
    "RenderedCase",
    "assign_attributes",
    "render_case",
    "generate_isic",
]

#: Attribute names per ISIC year, in the order of the official file names (alphabetical).
ISIC_ATTRIBUTES: dict[int, tuple[str, ...]] = {year: layout.attributes for year, layout in ISIC_LAYOUTS.items()}

#: Fraction of training images that carry each attribute (ISIC 2018: SPEC section 6,
#: 2594 images; ISIC 2017: TATL paper Table 2, 1416 images).
ATTRIBUTE_PREVALENCE: dict[int, dict[str, float]] = {
    2018: {
        "globules": 0.2321,
        "milia_like_cyst": 0.2625,
        "negative_network": 0.0732,
        "pigment_network": 0.5867,
        "streaks": 0.0386,
    },
    2017: {
        "milia_like_cyst": 0.3355,
        "negative_network": 0.0862,
        "pigment_network": 0.7903,
        "streaks": 0.0798,
    },
}

# Drawing order: networks first (they are textures of the lesion), then dots and lines,
# bright cysts last so they stay visible on top.
_DRAW_ORDER = ("pigment_network", "negative_network", "globules", "streaks", "milia_like_cyst")


@dataclass
class RenderedCase:
    """One rendered dermoscopy-like case.

    Attributes:
        image: RGB image, shape (H, W, 3), dtype uint8, values 0..255.
        lesion: Task 1 lesion mask, shape (H, W), dtype bool.
        attributes: Task 2 mask per attribute of the year, shape (H, W), dtype bool; an
            attribute the case does not carry is all False. Each mask lies inside ``lesion``.
        drawn: per attribute, shape (H, W) bool, the pixels the pattern actually changed
            (by more than 0.5 grey level, before hairs, vignette and noise were added);
            all False for absent attributes. ``drawn[a]`` lies inside ``attributes[a]``.
        lesion_drawn: shape (H, W) bool, the pixels the lesion layer changed; lies inside
            ``lesion``.
    """

    image: np.ndarray
    lesion: np.ndarray
    attributes: dict[str, np.ndarray] = field(default_factory=dict)
    drawn: dict[str, np.ndarray] = field(default_factory=dict)
    lesion_drawn: np.ndarray | None = None


# --------------------------------------------------------------------------- helpers
def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Low-frequency noise field, shape ``shape``, float32, zero mean and unit std; ``sigma``
    is the smoothing scale in pixels. Large scales are filtered on a coarse grid (factor
    sigma / 3) and upsampled bilinearly, which is much cheaper on big images."""
    factor = max(1, int(sigma // 3))
    coarse = (max(2, -(-shape[0] // factor)), max(2, -(-shape[1] // factor)))
    noise = rng.standard_normal(coarse).astype(np.float32)
    field_ = ndimage.gaussian_filter(noise, sigma=sigma / factor, mode="reflect")
    if coarse != tuple(shape):
        field_ = ndimage.zoom(field_, (shape[0] / coarse[0], shape[1] / coarse[1]), order=1, mode="nearest")
        field_ = field_[: shape[0], : shape[1]]
        short = (shape[0] - field_.shape[0], shape[1] - field_.shape[1])  # guard against rounding
        if short != (0, 0):
            field_ = np.pad(field_, ((0, short[0]), (0, short[1])), mode="edge")
    std = float(field_.std())
    return (field_ - field_.mean()) / (std if std > 1e-8 else 1.0)


def _blend(img: np.ndarray, colour, alpha: np.ndarray) -> np.ndarray:
    """Blend ``colour`` (3,) or (H, W, 3) into float ``img`` (H, W, 3) in place with
    per-pixel ``alpha`` (H, W) in [0, 1]; return the pixels that changed (> 0.5 level)."""
    before = img.copy()
    img += alpha[..., None] * (np.asarray(colour, dtype=np.float32) - img)
    return np.any(np.abs(img - before) > 0.5, axis=-1)


def _polar_blob(
    rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r0: float, roughness: float
) -> tuple[np.ndarray, np.ndarray]:
    """Irregular star-shaped blob: radius r(theta) = r0 (1 + sum_k a_k cos(k theta + phi_k)).

    Returns (mask bool (H, W), t float32 (H, W)) where t = rho / r(theta) is the normalised
    radial position (0 at the centre, 1 on the border).
    """
    aspect = rng.uniform(0.75, 1.3)
    rot = rng.uniform(0.0, math.pi)
    dy, dx = yy - cy, xx - cx
    u = (dx * math.cos(rot) + dy * math.sin(rot)) / math.sqrt(aspect)
    v = (-dx * math.sin(rot) + dy * math.cos(rot)) * math.sqrt(aspect)
    rho = np.hypot(u, v)
    theta = np.arctan2(v, u)
    radius = np.ones_like(rho)
    for k in range(2, 6):
        radius += rng.uniform(0.0, roughness / k) * np.cos(k * theta + rng.uniform(0.0, 2 * math.pi))
    radius *= r0
    t = (rho / np.maximum(radius, 1e-6)).astype(np.float32)
    return t <= 1.0, t


def _disc_alpha(shape: tuple[int, int], centres: np.ndarray, radii: np.ndarray, soft: float = 1.0) -> np.ndarray:
    """Anti-aliased discs: alpha (H, W) float32 = max over discs of clip((r + 0.5 - d) / soft, 0, 1).

    ``centres`` (N, 2) as (y, x) pixel coordinates, ``radii`` (N,) in pixels.
    """
    h, w = shape
    alpha = np.zeros(shape, np.float32)
    for (cy, cx), r in zip(centres, radii):
        reach = r + soft + 1.0
        y0, y1 = max(0, int(cy - reach)), min(h, int(cy + reach) + 2)
        x0, x1 = max(0, int(cx - reach)), min(w, int(cx + reach) + 2)
        if y0 >= y1 or x0 >= x1:
            continue
        ly, lx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        a = np.clip((r + 0.5 - np.hypot(ly - cy, lx - cx)) / soft, 0.0, 1.0)
        np.maximum(alpha[y0:y1, x0:x1], a, out=alpha[y0:y1, x0:x1])
    return alpha


def _segment_alpha(
    yy: np.ndarray, xx: np.ndarray, p0: tuple[float, float], p1: tuple[float, float], half_width: float
) -> np.ndarray:
    """Anti-aliased line segment p0 -> p1 ((y, x) pixels): alpha = clip(half_width + 0.5 - dist, 0, 1)."""
    (y0, x0), (y1, x1) = p0, p1
    vy, vx = y1 - y0, x1 - x0
    length2 = vy * vy + vx * vx
    s = np.clip(((yy - y0) * vy + (xx - x0) * vx) / max(length2, 1e-6), 0.0, 1.0)
    dist = np.hypot(yy - (y0 + s * vy), xx - (x0 + s * vx))
    return np.clip(half_width + 0.5 - dist, 0.0, 1.0).astype(np.float32)


def _random_pixels(rng: np.random.Generator, region: np.ndarray, n: int) -> np.ndarray:
    """``n`` random (y, x) pixel coordinates (float, (n, 2)) drawn from the True pixels of ``region``."""
    ys, xs = np.nonzero(region)
    idx = rng.integers(0, len(ys), size=n)
    return np.stack([ys[idx], xs[idx]], axis=1).astype(np.float32)


def _core(lesion: np.ndarray, t: np.ndarray, limit: float) -> np.ndarray:
    """Lesion pixels with normalised radius below ``limit`` (the whole lesion if that is empty)."""
    core = lesion & (t < limit)
    return core if core.any() else lesion


def _mask_from_support(support: np.ndarray, lesion: np.ndarray, dilate: int = 1) -> np.ndarray:
    """Attribute mask = support dilated by ``dilate`` px, restricted to the lesion."""
    if dilate > 0:
        support = ndimage.binary_dilation(support, iterations=dilate)
    return support & lesion


# --------------------------------------------------------------------------- patterns
def _network(
    rng: np.random.Generator,
    img: np.ndarray,
    yy: np.ndarray,
    xx: np.ndarray,
    lesion: np.ndarray,
    t: np.ndarray,
    scale: float,
    negative: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Irregular honeycomb mesh (Voronoi edges of a jittered hexagonal lattice) over a
    blob-shaped sub-region of the lesion. Returns (mask, drawn), both (H, W) bool."""
    h, w = lesion.shape
    r_lesion = math.sqrt(lesion.sum() / math.pi)
    cy, cx = _random_pixels(rng, _core(lesion, t, 0.55), 1)[0]
    region, _ = _polar_blob(rng, yy, xx, cy, cx, max(3.0, r_lesion * rng.uniform(0.45, 0.85)), 0.5)
    region &= lesion
    if not region.any():  # cannot happen (the centre is a lesion pixel) but stay safe
        region = lesion.copy()

    spacing = max(3.5, scale * rng.uniform(4.5, 7.0)) * (1.2 if negative else 1.0)
    ys, xs = np.nonzero(region)
    y0, y1 = ys.min() - 2 * spacing, ys.max() + 2 * spacing
    x0, x1 = xs.min() - 2 * spacing, xs.max() + 2 * spacing
    row_step = spacing * math.sqrt(3) / 2
    rows = np.arange(y0, y1 + row_step, row_step)
    cols = np.arange(x0, x1 + spacing, spacing)
    py, px = np.meshgrid(rows, cols, indexing="ij")
    px = px + (np.arange(len(rows))[:, None] % 2) * spacing / 2
    points = np.stack([py.ravel(), px.ravel()], axis=1)
    points += rng.uniform(-0.25, 0.25, size=points.shape) * spacing
    d, _ = cKDTree(points).query(np.stack([ys, xs], axis=1).astype(np.float64), k=2)
    edge = (d[:, 1] - d[:, 0]) / 2.0  # ~ distance to the nearest Voronoi edge, pixels

    alpha = np.zeros((h, w), np.float32)
    colour = np.zeros((h, w, 3), np.float32)
    if negative:
        line_w = max(1.2, scale * rng.uniform(1.4, 2.0))
        line = np.clip(1.0 - edge / line_w, 0.0, 1.0)
        light = np.array([222, 186, 160], np.float32) * rng.uniform(0.95, 1.05)
        dark = np.array([95, 58, 40], np.float32) * rng.uniform(0.85, 1.1)
        # light serpiginous lines around darker cells
        alpha[ys, xs] = 0.35 + 0.55 * line
        colour[ys, xs] = dark + line[:, None] * (light - dark)
    else:
        line_w = max(0.9, scale * rng.uniform(0.9, 1.4))
        line = np.clip(1.0 - edge / line_w, 0.0, 1.0)
        alpha[ys, xs] = 0.9 * line
        colour[...] = np.array([58, 34, 22], np.float32) * rng.uniform(0.85, 1.15)
    drawn = _blend(img, colour, alpha) & region
    return region, drawn


def _dots(
    rng: np.random.Generator,
    img: np.ndarray,
    lesion: np.ndarray,
    t: np.ndarray,
    scale: float,
    bright: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Globules (clusters of dark dots) or milia-like cysts (bright spots). Returns (mask, drawn)."""
    if bright:
        centres = _random_pixels(rng, _core(lesion, t, 0.85), int(rng.integers(1, 6)))
        radii = scale * rng.uniform(1.2, 2.6, size=len(centres))
        colour = np.array([243, 238, 200], np.float32) * rng.uniform(0.96, 1.03, size=3)
        strength, soft = 0.95, 1.5
    else:
        groups = []
        for c in _random_pixels(rng, _core(lesion, t, 0.8), int(rng.integers(1, 4))):
            n = int(rng.integers(3, 10))
            spread = scale * rng.uniform(2.5, 5.0)
            pts = c + rng.normal(0.0, spread, size=(n, 2))
            iy = np.clip(np.round(pts[:, 0]).astype(int), 0, lesion.shape[0] - 1)
            ix = np.clip(np.round(pts[:, 1]).astype(int), 0, lesion.shape[1] - 1)
            pts = pts[lesion[iy, ix]]
            groups.append(pts if len(pts) else c[None])
        centres = np.concatenate(groups).astype(np.float32)
        radii = scale * rng.uniform(1.1, 2.3, size=len(centres))
        colour = np.array([52, 32, 26], np.float32) * rng.uniform(0.8, 1.2, size=3)
        strength, soft = 0.92, 1.0
    alpha = _disc_alpha(lesion.shape, centres, radii, soft=soft) * lesion
    drawn = _blend(img, colour, strength * alpha)
    return _mask_from_support(alpha > 0, lesion), drawn


def _streaks(
    rng: np.random.Generator,
    img: np.ndarray,
    yy: np.ndarray,
    xx: np.ndarray,
    lesion: np.ndarray,
    centre: tuple[float, float],
    scale: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Radial dark lines at the lesion periphery, pointing outward, in one or two angular
    sectors; each ends at the lesion border. Returns (mask, drawn)."""
    h, w = lesion.shape
    cy, cx = centre
    steps = np.arange(0.0, math.hypot(h, w), 0.5)
    alpha = np.zeros((h, w), np.float32)
    for _ in range(int(rng.integers(1, 3))):
        phi0, width = rng.uniform(0, 2 * math.pi), rng.uniform(0.6, 2.0)
        n = int(rng.integers(4, 10))
        for phi in phi0 + np.sort(rng.uniform(-width / 2, width / 2, size=n)):
            ry, rx = cy + steps * math.sin(phi), cx + steps * math.cos(phi)
            iy, ix = np.round(ry).astype(int), np.round(rx).astype(int)
            inside = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
            inside[inside] = lesion[iy[inside], ix[inside]]
            outside = np.nonzero(~inside)[0]
            r_edge = steps[outside[0] - 1] if len(outside) and outside[0] > 0 else steps[-1]
            if r_edge < 3:
                continue
            r_in, r_out = r_edge * rng.uniform(0.5, 0.72), r_edge * rng.uniform(0.93, 1.0)
            bend = rng.normal(0.0, 0.06)
            p0 = (cy + r_in * math.sin(phi), cx + r_in * math.cos(phi))
            p1 = (cy + r_out * math.sin(phi + bend), cx + r_out * math.cos(phi + bend))
            half = scale * rng.uniform(0.35, 0.75)
            np.maximum(alpha, _segment_alpha(yy, xx, p0, p1, half), out=alpha)
            if rng.random() < 0.4:  # bulbous tip (pseudopod)
                np.maximum(alpha, _disc_alpha((h, w), np.array([p1]), np.array([half + 0.8 * scale])), out=alpha)
    alpha *= lesion
    if not alpha.any():  # tiny lesion: one short streak from the centre
        alpha = _disc_alpha((h, w), np.array([[cy, cx]]), np.array([1.0])) * lesion
    colour = np.array([46, 28, 22], np.float32) * rng.uniform(0.85, 1.15)
    drawn = _blend(img, colour, 0.92 * alpha)
    return _mask_from_support(alpha > 0, lesion), drawn


def _hairs(rng: np.random.Generator, img: np.ndarray, scale: float) -> None:
    """1-4 thin dark curved hairs (quadratic Bezier curves) crossing the image."""
    h, w = img.shape[:2]
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(1, 5))):
        p0 = rng.uniform((0, 0), (w, h))
        p2 = rng.uniform((0, 0), (w, h))
        p1 = (p0 + p2) / 2 + rng.normal(0, 0.2 * max(h, w), size=2)
        s = np.linspace(0, 1, 24)[:, None]
        curve = (1 - s) ** 2 * p0 + 2 * (1 - s) * s * p1 + s**2 * p2
        draw.line([tuple(p) for p in curve], fill=255, width=max(1, int(round(scale))))
    alpha = ndimage.gaussian_filter(np.asarray(canvas, np.float32) / 255.0, 0.4)
    _blend(img, np.array([38, 27, 22], np.float32) * rng.uniform(0.7, 1.2), 0.85 * np.clip(1.6 * alpha, 0.0, 1.0))


# --------------------------------------------------------------------------- public API
def render_case(
    rng: np.random.Generator, height: int, width: int, attributes: set[str] | frozenset[str], year: int = 2018
) -> RenderedCase:
    """Render one dermoscopy-like case (pure function of ``rng``; writes nothing).

    Args:
        rng: random generator; all randomness of the case comes from it.
        height, width: image size in pixels (H, W), each >= 16.
        attributes: attribute names the case carries (subset of ``ISIC_ATTRIBUTES[year]``).
        year: 2017 or 2018; decides which attribute masks the result holds.

    Returns:
        :class:`RenderedCase` with ``image`` (H, W, 3) uint8 and bool (H, W) masks.
    """
    if year not in ISIC_ATTRIBUTES:
        raise ValueError(f"year must be one of {sorted(ISIC_ATTRIBUTES)}, got {year!r}")
    unknown = set(attributes) - set(ISIC_ATTRIBUTES[year])
    if unknown:
        raise ValueError(f"unknown ISIC {year} attribute(s) {sorted(unknown)}; known: {ISIC_ATTRIBUTES[year]}")
    height, width = int(height), int(width)
    if height < 16 or width < 16:
        raise ValueError(f"image must be at least 16x16 pixels, got {height}x{width}")
    shape = (height, width)
    scale = min(shape) / 96.0  # pattern sizes are tuned for a 96-pixel short side
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)

    # skin: beige/pink tone, smooth low-frequency variation, faint reddish blotches
    skin = np.array([rng.uniform(205, 240), rng.uniform(155, 195), rng.uniform(125, 170)], np.float32)
    low = _smooth_noise(rng, shape, sigma=max(4.0, min(shape) / 6))
    red = _smooth_noise(rng, shape, sigma=max(3.0, min(shape) / 10))
    img = skin + low[..., None] * np.array([9, 10, 9], np.float32) * rng.uniform(0.6, 1.4)
    img += np.clip(red, 0, None)[..., None] * np.array([4, -8, -6], np.float32)

    # lesion: irregular blob, brown with a darker centre, soft (inward) border
    cy, cx = height * rng.uniform(0.4, 0.6), width * rng.uniform(0.4, 0.6)
    lesion, t = _polar_blob(rng, yy, xx, cy, cx, min(shape) * rng.uniform(0.22, 0.36), 0.45)
    edge = np.array([168, 114, 84], np.float32) * rng.uniform(0.88, 1.08)
    centre = np.array([88, 54, 38], np.float32) * rng.uniform(0.75, 1.15)
    gamma = rng.uniform(0.6, 1.6)
    colour = centre + np.clip(t, 0, 1)[..., None] ** gamma * (edge - centre)
    mottle = 0.08 * _smooth_noise(rng, shape, sigma=max(2.0, min(shape) / 16))
    mottle += 0.04 * _smooth_noise(rng, shape, sigma=max(0.8, scale))  # fine granular texture
    colour *= (1.0 + mottle)[..., None]
    border = rng.uniform(1.5, 4.0) * scale
    alpha = np.clip(ndimage.distance_transform_edt(lesion) / border, 0.0, 1.0).astype(np.float32)
    lesion_drawn = _blend(img, colour, alpha)

    masks = {name: np.zeros(shape, bool) for name in ISIC_ATTRIBUTES[year]}
    drawn = {name: np.zeros(shape, bool) for name in ISIC_ATTRIBUTES[year]}
    for name in _DRAW_ORDER:
        if name not in attributes:
            continue
        if name in ("pigment_network", "negative_network"):
            masks[name], drawn[name] = _network(rng, img, yy, xx, lesion, t, scale, negative=name == "negative_network")
        elif name in ("globules", "milia_like_cyst"):
            masks[name], drawn[name] = _dots(rng, img, lesion, t, scale, bright=name == "milia_like_cyst")
        else:
            masks[name], drawn[name] = _streaks(rng, img, yy, xx, lesion, (cy, cx), scale)

    if rng.random() < 0.4:
        _hairs(rng, img, scale)
    if rng.random() < 0.5:  # dark circular dermoscope vignette in the corners
        half_diag = math.hypot(height, width) / 2
        d = np.hypot(yy - (height - 1) / 2, xx - (width - 1) / 2)
        r = half_diag * rng.uniform(0.84, 0.97)
        _blend(img, np.array([14, 12, 12], np.float32), np.clip((d - r) / (0.06 * half_diag), 0.0, 1.0))
    img += rng.normal(0.0, 2.5, size=img.shape).astype(np.float32)

    return RenderedCase(
        image=np.clip(np.round(img), 0, 255).astype(np.uint8),
        lesion=lesion,
        attributes=masks,
        drawn=drawn,
        lesion_drawn=lesion_drawn,
    )


def assign_attributes(num_images: int, year: int = 2018, seed: int = 0) -> list[frozenset[str]]:
    """Attributes of each of ``num_images`` images: for every attribute exactly
    ``round(prevalence * num_images)`` images (half rounds up) carry it, chosen by a seeded
    permutation, so the measured prevalence is within 1 / (2 num_images) of the table.
    Images may carry no attribute at all (as in the real data)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, year, 0x150C]))
    carried: list[set[str]] = [set() for _ in range(num_images)]
    for name in ISIC_ATTRIBUTES[year]:
        count = int(math.floor(ATTRIBUTE_PREVALENCE[year][name] * num_images + 0.5))
        for i in rng.permutation(num_images)[:count]:
            carried[int(i)].add(name)
    return [frozenset(c) for c in carried]


def generate_isic(
    out_dir: str | PathLike,
    year: int = 2018,
    num_images: int = 20,
    size: tuple[int, int] = (96, 128),
    size_jitter: float = 0.15,
    seed: int = 0,
    first_id: int = 0,
    overwrite: bool = False,
) -> pathlib.Path:
    """Write a generated ISIC ``year`` training set (Task 1 + Task 2) under ``out_dir``.

    Args:
        out_dir: dataset root; the year's three folders are created inside it.
        year: 2018 (5 attributes) or 2017 (4 attributes, no globules).
        num_images: number of images.
        size: nominal image size (H, W) in pixels.
        size_jitter: each of H and W is multiplied by a factor drawn uniformly from
            [1 - size_jitter, 1 + size_jitter] per image (real ISIC images vary in size and
            aspect); masks have the size of their image.
        seed: non-negative integer; image ``ISIC_n`` is rendered from
            ``np.random.default_rng(np.random.SeedSequence([seed, year, n]))``; which
            attributes it carries is drawn for the whole set (:func:`assign_attributes` with
            ``num_images`` and ``seed``). So ``seed`` fixes every byte written.
        first_id: number of the first id (``ISIC_%07d``).
        overwrite: if False and a folder of the year already holds ``ISIC_*`` files, raise
            :class:`FileExistsError`; if True, the year's three folders are removed and written
            anew (so no image of an earlier, larger set is left behind); the other year's
            folders and any other file in ``out_dir`` are left in place.

    The set is written into a hidden staging folder and published by renames when complete
    (:func:`medxfer.data.synth.staging.staged_output`): a full disk, an error or a kill leaves
    the previous folders (or none), never a half-written set.

    Images are RGB JPEG (quality 95); masks are 8-bit single-channel PNG with values 0/255;
    every attribute mask of the year is written, all-zero when the image lacks it.

    Returns:
        ``out_dir`` as a :class:`pathlib.Path`.
    """
    if year not in ISIC_LAYOUTS:
        raise ValueError(f"year must be one of {sorted(ISIC_LAYOUTS)}, got {year!r}")
    if num_images < 0 or first_id < 0 or seed < 0:
        raise ValueError("num_images, first_id and seed must be non-negative")
    if first_id + num_images > 10**7:
        raise ValueError("ISIC ids have 7 digits: first_id + num_images must be <= 10**7")
    if not 0 <= size_jitter < 1:
        raise ValueError(f"size_jitter must be in [0, 1), got {size_jitter}")
    layout = ISIC_LAYOUTS[year]
    out = pathlib.Path(out_dir)
    names = [layout.image_dir, layout.task1_dir, layout.task2_dir]
    if not overwrite:
        for folder in (out / n for n in names):
            if folder.is_dir() and any(p.name.startswith("ISIC_") for p in folder.iterdir()):
                raise FileExistsError(
                    f"{folder} already holds ISIC {year} files; pass overwrite=True to replace them"
                )
    # overwrite: the year's folders are replaced; else existing ones (without ISIC files) are kept
    with staged_output(out, replace=names, merge=() if overwrite else names) as stage:
        folders = [stage / n for n in names]
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
        _write_cases(folders, layout, year, num_images, size, size_jitter, seed, first_id)
    return out


def _write_cases(folders, layout, year, num_images, size, size_jitter, seed, first_id) -> None:
    """The images and masks of :func:`generate_isic` in ``folders`` (image, task 1, task 2)."""
    for index, attrs in enumerate(assign_attributes(num_images, year, seed)):
        number = first_id + index
        case_id = f"ISIC_{number:07d}"
        rng = np.random.default_rng(np.random.SeedSequence([seed, year, number]))
        h = max(16, int(round(size[0] * rng.uniform(1 - size_jitter, 1 + size_jitter))))
        w = max(16, int(round(size[1] * rng.uniform(1 - size_jitter, 1 + size_jitter))))
        case = render_case(rng, h, w, attrs, year)
        Image.fromarray(case.image).save(folders[0] / layout.image_name(case_id), format="JPEG", quality=95)
        Image.fromarray(case.lesion.astype(np.uint8) * 255).save(folders[1] / layout.lesion_name(case_id))
        for name, mask in case.attributes.items():
            Image.fromarray(mask.astype(np.uint8) * 255).save(folders[2] / layout.attribute_name(case_id, name))
