"""Generated 2D shape images: a class-per-folder set (pretraining) and a 2D segmentation set.

Every image is a noisy background (a random grey level or colour, a smooth low-frequency
variation of about 6 grey levels and pixel noise of 3) with objects painted on it. An object is
a shape of one *kind* at a random position, radius, rotation and colour; its luminance differs
from the background's by 80 to 140 grey levels (the second colour of a textured kind by 60 % of
that) and it carries a faint smooth texture (4 %). Kind and colour are independent, so the kind
can only be told from the shape or texture, and a small CNN learns it in a few epochs.

==========  =================================================================  ==========
kind        shape (r = radius, in a rotated frame)                             used by
==========  =================================================================  ==========
disc        filled circle of radius r                                          both
square      filled square of half-side 0.8 r                                   both
triangle    filled equilateral triangle, circumradius r                        both
ring        annulus, radii 0.55 r .. r (the hole is background)                both
cross       plus sign, arms r long and 0.6 r wide                              both
stripes     square of half-side 0.8 r, 4 stripes of two colours               both
star        five-pointed star, radius 0.55 r + 0.45 r cos(5 phi)             both
checker     square of half-side 0.8 r, 4 x 4 checkerboard of two colours      both
blob        irregular round blob (radius with 3 random harmonics), polyp-like  seg2d
==========  =================================================================  ==========

Layouts written (read them with :mod:`medxfer.data.image_folder` / :mod:`medxfer.data.seg2d`)::

    generate_classification_folder            generate_seg2d
    <out>/disc/disc_0000.png                  <out>/images/case_0000.png   (grey L or RGB)
    <out>/square/square_0000.png              <out>/masks/case_0000.png    (8-bit label map)
    ...                                       <out>/labels.json            {"0": "background", "1": "blob"}
    <out>/README.txt                          <out>/README.txt

Classification: class ``k`` of ``num_classes`` is the kind ``CLASS_KINDS[k]`` (folders disc,
square, triangle, ring, ...); one object per image. The loader indexes classes by sorted folder
name, so ``disc, ring, square, triangle`` are labels 0..3. Segmentation: class ``c`` (1..K) is
the kind ``SEG_KINDS[c - 1]`` (blob, stripes, triangle, ...); each image holds 0, 1 or 2 objects
of each class (probabilities 0.25, 0.55, 0.2), painted in random order; the mask holds the class
of the object visible at each pixel, so it covers exactly the pixels the objects changed. Binary
datasets (K = 1) are written as 0/255 masks, others as 0..K. Image sizes jitter per image
(``size_jitter``) as in real 2D datasets.

Both generators fix every byte by ``seed`` (image ``i`` uses its own ``SeedSequence``, so adding
images leaves the others unchanged) and refuse to write into a non-empty folder unless
``overwrite=True``. They write into a hidden staging folder and publish it by renames when
complete (:func:`medxfer.data.synth.staging.staged_output`): a full disk, an error or a kill
leaves the previous set (or none), never a half-written one.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from medxfer.data.image_folder import is_ignored
from medxfer.data.synth.staging import staged_output

__all__ = [
    "CLASS_KINDS",
    "SEG_KINDS",
    "Rendered2D",
    "shape_region",
    "render_shape_image",
    "render_seg2d_case",
    "generate_classification_folder",
    "generate_seg2d",
]

#: Object kinds of the classification set, in class order (folder names).
CLASS_KINDS = ("disc", "square", "triangle", "ring", "cross", "stripes", "star", "checker")
#: Object kind of segmentation class c (1..K) is ``SEG_KINDS[c - 1]``.
SEG_KINDS = ("blob", "stripes", "triangle", "ring", "cross", "checker", "star", "square", "disc")
_ALL_KINDS = tuple(dict.fromkeys(CLASS_KINDS + SEG_KINDS))
_CLASS_TAG, _SEG_TAG = 0xC1A55, 0x5E62D  # SeedSequence tags: the two generators never share streams
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)
README = "README.txt"


@dataclass
class Rendered2D:
    """One rendered image (nothing written yet).

    Attributes:
        image: ``(H, W)`` uint8 (grey) or ``(H, W, 3)`` uint8 (RGB): what is saved.
        label: ``(H, W)`` uint8, the class index of the object visible at each pixel, 0 elsewhere
            (for :func:`render_shape_image`: 1 on the object).
        background: ``(H, W, C)`` float32, the background before objects and pixel noise.
        clean: ``(H, W, C)`` float32, the image before pixel noise: it differs from
            ``background`` exactly where ``label > 0``.
    """

    image: np.ndarray
    label: np.ndarray
    background: np.ndarray
    clean: np.ndarray


# --------------------------------------------------------------------------- drawing
def _luminance(colour: np.ndarray) -> float:
    colour = np.asarray(colour, np.float32)
    return float(colour[0]) if colour.size == 1 else float(colour @ _LUMA)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Smooth random field, zero mean, unit standard deviation, float32."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    return (field - field.mean()) / (field.std() + 1e-6)


def shape_region(kind: str, shape: tuple[int, int], cy: float, cx: float, r: float, angle: float,
                 rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Pixels covered by one object (see the table in the module docstring).

    Args:
        kind: one of the kinds of :data:`CLASS_KINDS` / :data:`SEG_KINDS`.
        shape: image size (H, W); ``cy, cx`` centre (pixels), ``r`` radius (pixels), ``angle`` rotation (radians).
        rng: needed by ``blob`` only (its harmonics).

    Returns:
        ``(region, second)``: bool ``(H, W)`` arrays; ``second`` (within ``region``) marks the
        pixels of the second colour of ``stripes`` / ``checker``, None for the other kinds.
    """
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    cos, sin = math.cos(angle), math.sin(angle)
    u, v = (dx * cos + dy * sin) / r, (-dx * sin + dy * cos) / r
    rho, phi = np.hypot(u, v), np.arctan2(v, u)
    second = None
    if kind == "disc":
        region = rho <= 1.0
    elif kind in ("square", "stripes", "checker"):
        region = np.maximum(np.abs(u), np.abs(v)) <= 0.8
        bu, bv = np.floor((u + 0.8) / 0.4), np.floor((v + 0.8) / 0.4)
        if kind == "stripes":
            second = region & (bu % 2 == 1)
        elif kind == "checker":
            second = region & ((bu + bv) % 2 == 1)
    elif kind == "triangle":
        region = np.ones(shape, bool)
        for k in range(3):
            theta = 2 * math.pi * k / 3
            region &= u * math.cos(theta) + v * math.sin(theta) <= 0.5
    elif kind == "ring":
        region = (rho >= 0.55) & (rho <= 1.0)
    elif kind == "cross":
        region = ((np.abs(u) <= 0.3) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 1.0))
    elif kind == "star":
        region = rho <= 0.55 + 0.45 * np.cos(5 * phi)
    elif kind == "blob":
        if rng is None:
            raise ValueError("kind 'blob' needs rng")
        radius = np.ones(shape, np.float32)
        for k in (2, 3, 4):
            radius += rng.uniform(0.0, 0.12) * np.cos(k * phi + rng.uniform(0, 2 * math.pi))
        region = rho <= radius
    else:
        raise ValueError(f"unknown kind {kind!r}; known: {_ALL_KINDS}")
    return region, second


def _background(rng: np.random.Generator, shape: tuple[int, int], channels: int) -> tuple[np.ndarray, np.ndarray]:
    """``(image (H, W, C) float32, base colour (C,))``: base luminance 45..210, smooth variation."""
    lum = rng.uniform(45, 210)
    tint = rng.uniform(0.85, 1.15, size=3).astype(np.float32) if channels == 3 else np.ones(1, np.float32)
    if channels == 3:
        tint /= _luminance(tint)
    base = np.clip(lum * tint, 0, 255).astype(np.float32)
    variation = 6.0 * _smooth_noise(rng, shape, sigma=max(2.0, min(shape) / 6))
    return base[None, None, :] + variation[..., None], base


def _object_colours(rng: np.random.Generator, base: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Main colour (luminance 80..140 away from the background's) and second colour (60 % of the way)."""
    bg = _luminance(base)
    up_ok, down_ok = bg + 80 <= 250, bg - 80 >= 5
    up = bool(rng.random() < 0.5) if up_ok and down_ok else up_ok
    if up:
        lum = rng.uniform(bg + 80, max(bg + 80, min(250.0, bg + 140)))
    else:
        lum = rng.uniform(min(bg - 80, max(5.0, bg - 140)), bg - 80)
    if base.size == 3:
        tint = rng.uniform(0.6, 1.4, size=3).astype(np.float32)
        colour = np.clip(lum * tint / _luminance(tint), 0, 255).astype(np.float32)
        if abs(_luminance(colour) - bg) < 75:  # clipping ate the contrast: fall back to grey
            colour = np.full(3, lum, np.float32)
    else:
        colour = np.full(1, lum, np.float32)
    return colour, base + 0.6 * (colour - base)


def _render(rng: np.random.Generator, height: int, width: int, objects: list[tuple[str, int]],
            radius: tuple[float, float], grey: bool) -> Rendered2D:
    """Background, then ``objects`` ``(kind, label value)`` painted in the given order, then noise."""
    shape = (int(height), int(width))
    background, base = _background(rng, shape, 1 if grey else 3)
    img = background.copy()
    label = np.zeros(shape, np.uint8)
    texture = 1.0 + 0.04 * _smooth_noise(rng, shape, sigma=max(1.0, min(shape) / 16))
    for kind, value in objects:
        r = max(2.0, min(shape) * rng.uniform(*radius))
        cy = rng.uniform(min(r, shape[0] / 2), max(shape[0] - r, shape[0] / 2))
        cx = rng.uniform(min(r, shape[1] / 2), max(shape[1] - r, shape[1] / 2))
        region, second = shape_region(kind, shape, cy, cx, r, rng.uniform(0, 2 * math.pi), rng)
        colour, colour2 = _object_colours(rng, base)
        img[region] = colour[None, :] * texture[region][:, None]
        if second is not None:
            img[second] = colour2[None, :] * texture[second][:, None]
        label[region] = value
    clean = img.copy()
    img += rng.normal(0.0, 3.0, size=img.shape).astype(np.float32)
    image = np.clip(np.round(img), 0, 255).astype(np.uint8)
    return Rendered2D(image=image[..., 0] if grey else image, label=label, background=background, clean=clean)


def render_shape_image(rng: np.random.Generator, size: int | tuple[int, int], kind: str, grey: bool = False) -> Rendered2D:
    """One classification image: a single object of ``kind``, radius 18-32 % of the short side,
    fully inside the image (pure function of ``rng``; writes nothing)."""
    height, width = (size, size) if isinstance(size, int) else size
    return _render(rng, height, width, [(kind, 1)], (0.18, 0.32), grey)


def render_seg2d_case(rng: np.random.Generator, height: int, width: int, num_classes: int = 1,
                      grey: bool = True) -> Rendered2D:
    """One segmentation case: 0-2 objects of each class c (kind ``SEG_KINDS[c - 1]``), radius
    10-22 % of the short side, painted in random order (pure function of ``rng``)."""
    if not 1 <= num_classes <= len(SEG_KINDS):
        raise ValueError(f"num_classes must be 1..{len(SEG_KINDS)}, got {num_classes}")
    objects = []
    for c in range(1, num_classes + 1):
        objects += [(SEG_KINDS[c - 1], c)] * int(rng.choice(3, p=[0.25, 0.55, 0.2]))
    objects = [objects[i] for i in rng.permutation(len(objects))]
    return _render(rng, height, width, objects, (0.10, 0.22), grey)


# --------------------------------------------------------------------------- writing
def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty ``out`` unless ``overwrite`` (the owned entries are replaced when the new
    set is complete, by :func:`staged_output`)."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(not is_ignored(p.name) for p in out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out}: folder is not empty; pass overwrite=True (--overwrite on the command "
                              "line) to replace the generated data")


def _write_readme(out: Path, function: str, command: str, params: dict, layout: str, reader: str) -> None:
    text = (f"Generated data (synthetic shapes), not patient data.\n\n"
            f"Written by medxfer.data.synth.shapes2d.{function} (`{command}`) with\n"
            f"{json.dumps(params)}\n\n"
            f"Layout: {layout}\nRead it with {reader}.\n")
    (out / README).write_text(text)


def _save_png(array: np.ndarray, path: Path) -> None:
    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).save(path, format="PNG")  # (H, W) -> L, (H, W, 3) -> RGB


def generate_classification_folder(out_dir: str | PathLike, num_classes: int = 4, images_per_class: int = 20,
                                   size: int = 64, seed: int = 0, grey: bool = False,
                                   overwrite: bool = False) -> Path:
    """Write a class-per-folder image set (torchvision ImageFolder layout) under ``out_dir``.

    Args:
        out_dir: dataset root (created if missing).
        num_classes: 2..8; the classes are the first ``num_classes`` kinds of :data:`CLASS_KINDS`.
        images_per_class: PNG images per class, ``<kind>/<kind>_NNNN.png``.
        size: side of the square images in pixels (>= 16).
        seed: non-negative; image ``i`` of kind ``CLASS_KINDS[k]`` comes from
            ``SeedSequence([seed, tag, k, i])``, so ``seed`` fixes every byte and more classes or
            images leave the others unchanged.
        grey: write 8-bit grey (mode L) PNGs instead of RGB.
        overwrite: if False and ``out_dir`` holds anything (hidden files aside), raise
            :class:`FileExistsError`; if True, remove the folders named like a kind and
            ``README.txt`` first (any other entry is left in place, and would be read as a class).

    Returns:
        ``out_dir`` as a :class:`pathlib.Path`; it also holds ``README.txt`` saying the data is generated.
    """
    if not 2 <= num_classes <= len(CLASS_KINDS):
        raise ValueError(f"num_classes must be 2..{len(CLASS_KINDS)}, got {num_classes}")
    if images_per_class < 1 or seed < 0:
        raise ValueError("images_per_class must be >= 1 and seed >= 0")
    if size < 16:
        raise ValueError(f"size must be >= 16 pixels, got {size}")
    out = Path(out_dir)
    _check_out(out, overwrite)
    with staged_output(out, replace=_ALL_KINDS + (README,)) as stage:
        for k, kind in enumerate(CLASS_KINDS[:num_classes]):
            folder = stage / kind
            folder.mkdir()
            for i in range(images_per_class):
                rng = np.random.default_rng(np.random.SeedSequence([seed, _CLASS_TAG, k, i]))
                _save_png(render_shape_image(rng, int(size), kind, grey).image, folder / f"{kind}_{i:04d}.png")
        params = dict(num_classes=num_classes, images_per_class=images_per_class, size=size, seed=seed, grey=grey)
        _write_readme(stage, "generate_classification_folder", "medxfer synth classes", params,
                      "<class>/<class>_NNNN.png, one folder per class (" + ", ".join(CLASS_KINDS[:num_classes]) + ")",
                      "medxfer.data.image_folder.load_image_folder")
    return out


def generate_seg2d(out_dir: str | PathLike, num_images: int = 20, size: tuple[int, int] = (64, 64),
                   num_classes: int = 1, grey: bool = True, seed: int = 0, size_jitter: float = 0.1,
                   overwrite: bool = False) -> Path:
    """Write a 2D segmentation set in the folder-pair layout of :mod:`medxfer.data.seg2d`.

    Args:
        out_dir: dataset root (created if missing).
        num_images: number of cases ``case_NNNN``.
        size: nominal image size (H, W), each >= 16.
        num_classes: foreground classes K (1..9); class c is the kind ``SEG_KINDS[c - 1]``.
        grey: 8-bit grey (mode L) images; False writes RGB.
        seed: non-negative; case ``i`` comes from ``SeedSequence([seed, tag, i])``: ``seed`` fixes
            every byte and more images leave the others unchanged.
        size_jitter: H and W are each multiplied per image by a factor drawn uniformly from
            [1 - size_jitter, 1 + size_jitter] (0: every image is exactly ``size``).
        overwrite: if False and ``out_dir`` holds anything (hidden files aside), raise
            :class:`FileExistsError`; if True, remove ``images/``, ``masks/``, ``labels.json``
            and ``README.txt`` first (other entries are left in place).

    Images and masks are PNG; masks are 0/255 when K = 1, else 0..K. ``labels.json`` names the
    classes (``{"0": "background", "1": "blob", ...}``) and ``README.txt`` says the data is generated.

    Returns:
        ``out_dir`` as a :class:`pathlib.Path`.
    """
    if not 1 <= num_classes <= len(SEG_KINDS):
        raise ValueError(f"num_classes must be 1..{len(SEG_KINDS)}, got {num_classes}")
    if num_images < 1 or seed < 0:
        raise ValueError("num_images must be >= 1 and seed >= 0")
    height, width = (int(s) for s in size)
    if height < 16 or width < 16:
        raise ValueError(f"images must be at least 16x16 pixels, got {height}x{width}")
    if not 0 <= size_jitter < 1:
        raise ValueError(f"size_jitter must be in [0, 1), got {size_jitter}")
    out = Path(out_dir)
    _check_out(out, overwrite)
    with staged_output(out, replace=("images", "masks", "labels.json", README)) as stage:
        _write_seg2d(stage, num_images, height, width, num_classes, grey, seed, size_jitter)
    return out


def _write_seg2d(out: Path, num_images: int, height: int, width: int, num_classes: int, grey: bool, seed: int,
                 size_jitter: float) -> None:
    """The files of :func:`generate_seg2d` in ``out``."""
    (out / "images").mkdir()
    (out / "masks").mkdir()
    for i in range(num_images):
        rng = np.random.default_rng(np.random.SeedSequence([seed, _SEG_TAG, i]))
        h = max(16, int(round(height * rng.uniform(1 - size_jitter, 1 + size_jitter))))
        w = max(16, int(round(width * rng.uniform(1 - size_jitter, 1 + size_jitter))))
        case = render_seg2d_case(rng, h, w, num_classes, grey)
        _save_png(case.image, out / "images" / f"case_{i:04d}.png")
        _save_png(case.label * np.uint8(255) if num_classes == 1 else case.label, out / "masks" / f"case_{i:04d}.png")
    labels = {"0": "background", **{str(c): SEG_KINDS[c - 1] for c in range(1, num_classes + 1)}}
    (out / "labels.json").write_text(json.dumps(labels, indent=2) + "\n")
    params = dict(num_images=num_images, size=[height, width], num_classes=num_classes, grey=grey, seed=seed,
                  size_jitter=size_jitter)
    masks = "0/255" if num_classes == 1 else f"label indices 0..{num_classes}"
    _write_readme(out, "generate_seg2d", "medxfer synth seg2d", params,
                  f"images/case_NNNN.png ({'grey' if grey else 'RGB'}), masks/case_NNNN.png ({masks}), labels.json",
                  "medxfer.data.seg2d.load_seg2d")
