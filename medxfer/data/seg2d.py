"""2D segmentation datasets in the "folder pair" layout (Kvasir-SEG and many 2D medical datasets).

Layout::

    <root>/images/<id>.<png|jpg|jpeg|bmp|tif|tiff>   grey (PIL mode L) or colour (RGB) image
    <root>/masks/<id>.png                           8-bit single-channel (mode L) label map
    <root>/labels.json                              optional: {"0": "background", "1": "polyp", ...}

A mask has the size of its image and holds label indices: 0 background, 1..K classes. A binary
dataset (K = 1) may store its foreground as 255 instead of 1 (0/255 masks, as Kvasir-SEG and
ISIC); 255 reads as class 1 (:func:`mask_to_index`). Masks must be lossless PNG: JPEG masks (the
Kvasir-SEG download ships ``masks/*.jpg``) carry compression noise; threshold them at 127 and
save them as PNG first. Palette (mode P), 1-bit, 16-bit and RGB masks are reported: save the
indices as 8-bit grey (mode L).

The classes (``labels``, ``{value: name}``, background included, ``num_classes = len(labels)``):

* with ``labels.json``: its keys, which must be the integers 0..K (0 = background, K >= 1); a mask
  value outside them is a problem (for K = 1, 255 is allowed too);
* without it, from the values found in the masks (every mask is decoded; PNG masks are small):
  if any mask holds 255 the dataset is binary 0/255 and masks may hold only 0, 1 and 255;
  otherwise K is the largest value found (K = 1 if every mask is empty). Names: ``background``
  and ``foreground`` for a binary dataset, else ``class_1`` .. ``class_K``. A class absent from
  every mask cannot be seen: write ``labels.json`` to declare it.

Records are MONAI-style dicts sorted by id, ready for ``LoadImaged(keys=["image", "label"])``::

    {"id": "case_0000", "image": "/abs/.../images/case_0000.jpg",
     "label": "/abs/.../masks/case_0000.png", "grey": False}

``grey`` is True for mode L images (the 2D transforms repeat them to 3 channels).

Checked by :func:`scan_seg2d` (each problem one :class:`~medxfer.data.problems.Problem`,
``<file>: <reason>``): missing ``images/`` or ``masks/``, a bad ``labels.json``, files that are not
images, sub-folders, two images with one id, an image without mask, a mask without image, an
unreadable image or mask header, an image that is not L or RGB, a mask that is not 8-bit
single-channel, a mask whose size (width x height) differs from its image's, and mask values
outside the classes. Images are opened header-only (decoded with ``check_files``); masks are
decoded. Hidden files and ``Thumbs.db`` are ignored everywhere; other files at the root
(``README.txt``, Kvasir-SEG's ``kavsir_bboxes.json``) are ignored.
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path

import numpy as np

from .image_folder import IMAGE_SUFFIXES, is_ignored, is_image_file
from .problems import DatasetError, Problem, raise_if_problems, read_json

__all__ = [
    "LABELS_FILE",
    "IMAGE_MODES",
    "scan_seg2d",
    "load_seg2d",
    "check_seg2d_files",
    "mask_to_index",
    "read_mask",
    "DatasetError",
]

#: Name of the optional class-name file at the dataset root.
LABELS_FILE = "labels.json"
#: PIL modes an image may have: 8-bit grey or 8-bit RGB.
IMAGE_MODES = ("L", "RGB")
_EXAMPLE = '{"0": "background", "1": "polyp"}'


def _first_line(err: Exception) -> str:
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def _shown(values) -> str:
    values = [int(v) for v in values]
    return ", ".join(str(v) for v in values[:6]) + (", ..." if len(values) > 6 else "")


def _read_labels(path: Path, problems: list[Problem]) -> dict[int, str] | None:
    """``labels.json`` -> ``{value: name}``; None (and problems) if it is unusable."""
    try:
        data = read_json(path)
    except DatasetError as e:
        problems.append(e.problem)
        return None
    if not isinstance(data, dict) or not data:
        problems.append(Problem(str(path), f"must be a non-empty JSON object mapping label values to names, e.g. {_EXAMPLE}"))
        return None
    labels: dict[int, str] = {}
    for key, name in data.items():
        try:
            value = int(key)
        except (TypeError, ValueError):
            hint = " (it looks like name -> value, nnU-Net style; write value -> name)" if isinstance(name, int) else ""
            problems.append(Problem(str(path), f"key {key!r} is not a label value{hint}; expected e.g. {_EXAMPLE}"))
            return None
        if not isinstance(name, str) or not name:
            problems.append(Problem(str(path), f"label {key!r} must be named by a non-empty string, got {name!r}"))
            return None
        labels[value] = name
    values = sorted(labels)
    if values != list(range(len(values))) or len(values) < 2:
        problems.append(Problem(str(path), f"label values must be 0..K with 0 = background and K >= 1, got {values}"))
        return None
    return dict(sorted(labels.items()))


def _list(folder: Path, what: str, problems: list[Problem]) -> list[Path]:
    """Non-ignored files of ``folder``, sorted by name; sub-folders are problems."""
    files = []
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if is_ignored(entry.name):
            continue
        if entry.is_dir():
            problems.append(Problem(str(entry), f"unexpected folder inside {what}/"))
            continue
        files.append(entry)
    return files


def _header(path: Path, what: str, problems: list[Problem]):
    """``(mode, (width, height))`` from the file header, or None (and a problem)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.mode, img.size
    except Exception as err:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
        problems.append(Problem(str(path), f"cannot read {what}: {_first_line(err)}"))
        return None


def _mask_values(path: Path, problems: list[Problem]) -> np.ndarray | None:
    """Pixel count per value 0..255 of a decoded mode-L mask, or None (and a problem)."""
    from PIL import Image, ImageFile

    tolerant = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # another library may have switched it on
    try:
        with Image.open(path) as img:
            array = np.asarray(img)
    except Exception as err:  # truncated file: fails while decoding
        problems.append(Problem(str(path), f"cannot read mask: {_first_line(err)}"))
        return None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = tolerant
    return np.bincount(array.ravel(), minlength=256)


def scan_seg2d(root: str | PathLike) -> tuple[list[dict], dict[int, str], list[Problem]]:
    """Find and check the image / mask pairs of a 2D segmentation dataset.

    Opens every image's header and decodes every mask (see the module docstring for what is
    checked and how the classes are determined).

    Returns:
        ``(records, labels, problems)``: records of the pairs without any problem, sorted by id;
        ``labels`` ``{value: name}`` with background (``{}`` if ``labels.json`` is unusable or
        there is no mask); one :class:`Problem` per wrong or missing file or folder.
    """
    root = Path(root).absolute()
    if not root.is_dir():
        return [], {}, [Problem(str(root), "dataset folder does not exist")]
    problems: list[Problem] = []
    labels_path = root / LABELS_FILE
    declared = _read_labels(labels_path, problems) if labels_path.exists() else None
    labels_ok = declared is not None or not labels_path.exists()
    image_dir, mask_dir = root / "images", root / "masks"
    missing = [d for d in (image_dir, mask_dir) if not d.is_dir()]
    for d in missing:
        problems.append(Problem(str(d), "missing folder of the 2D segmentation layout (<root>/images/<id>.<image> "
                                        "+ <root>/masks/<id>.png)"))
    if missing:
        return [], declared or {}, problems

    images: dict[str, Path] = {}
    for path in _list(image_dir, "images", problems):
        if not is_image_file(path.name):
            problems.append(Problem(str(path), f"not an image file (expected a name ending in {', '.join(IMAGE_SUFFIXES)})"))
            continue
        stem = path.name[: -len(path.suffix)]
        if stem in images:
            problems.append(Problem(str(path), f"two images with id '{stem}' ({images[stem].name} and {path.name}); rename one"))
            continue
        images[stem] = path

    masks: dict[str, Path] = {}
    bad_masks: set[str] = set()  # ids whose mask exists but is reported already
    for path in _list(mask_dir, "masks", problems):
        stem = path.name[: -len(path.suffix)] if path.suffix else path.name
        if path.suffix.lower() != ".png":
            if is_image_file(path.name):
                problems.append(Problem(str(path), "mask is not a PNG: masks must be lossless 8-bit PNG (JPEG masks, as "
                                                   "Kvasir-SEG ships, hold compression noise: threshold at 127 and save as PNG)"))
                bad_masks.add(stem)
            else:
                problems.append(Problem(str(path), "not a mask file (expected <id>.png)"))
            continue
        if stem not in images:
            problems.append(Problem(str(path), f"mask without image (no images/{stem}.<{'|'.join(s[1:] for s in IMAGE_SUFFIXES)}>)"))
            continue
        masks[stem] = path
    if not images and not any(p.path.startswith(str(image_dir)) for p in problems):
        problems.append(Problem(str(image_dir), f"holds no image (expected files ending in {', '.join(IMAGE_SUFFIXES)})"))

    # headers of every pair, values of every usable mask
    pairs: dict[str, dict] = {}
    counts: dict[str, np.ndarray] = {}
    for case_id in sorted(images):
        image = images[case_id]
        if case_id not in masks:
            if case_id not in bad_masks:
                problems.append(Problem(str(mask_dir / f"{case_id}.png"), f"missing mask of image {image.name}"))
            continue
        mask = masks[case_id]
        n_before = len(problems)
        image_header = _header(image, "image", problems)
        if image_header and image_header[0] not in IMAGE_MODES:
            problems.append(Problem(str(image), f"image mode {image_header[0]} is not supported: save it as 8-bit "
                                                "grey (PIL mode L) or RGB"))
        mask_header = _header(mask, "mask", problems)
        if mask_header is not None:
            mode, size = mask_header
            if mode != "L":
                from PIL import Image

                bands = Image.getmodebands(mode)
                kind = "not single-channel" if bands != 1 else "not 8-bit grey"
                problems.append(Problem(str(mask), f"mask is {kind} (PIL mode {mode}, {bands} channel(s)); masks must be "
                                                   "8-bit single-channel PNG (mode L) holding label indices"))
            elif image_header is not None and size != image_header[1]:
                (mw, mh), (iw, ih) = size, image_header[1]
                problems.append(Problem(str(mask), f"mask is {mw}x{mh} but image {image.name} is {iw}x{ih} (width x height)"))
            else:
                values = _mask_values(mask, problems)
                if values is not None:
                    counts[case_id] = values
        if len(problems) == n_before:
            pairs[case_id] = {"id": case_id, "image": str(image), "label": str(mask),
                              "grey": image_header[0] == "L"}

    # classes, and mask values outside them
    if not labels_ok:
        return [], {}, problems
    if declared is not None:
        labels = declared
        allowed = set(labels) | ({255} if len(labels) == 2 else set())
        declared_text = f"{LABELS_FILE} declares 0..{len(labels) - 1}" + (" (255 reads as 1)" if len(labels) == 2 else "")
        for case_id, values in counts.items():
            bad = [v for v in np.nonzero(values)[0] if v not in allowed]
            if bad:
                problems.append(Problem(str(masks[case_id]), f"mask has values not in {LABELS_FILE} ({_shown(bad)}) in "
                                                             f"{int(values[bad].sum())} pixels; {declared_text}"))
                pairs.pop(case_id, None)
    elif counts:
        found = np.stack(list(counts.values())).sum(axis=0)
        if found[255]:
            labels = {0: "background", 1: "foreground"}
            example = next(masks[c].name for c, v in counts.items() if v[255])
            for case_id, values in counts.items():
                bad = [v for v in np.nonzero(values)[0] if v not in (0, 1, 255)]
                if bad:
                    problems.append(Problem(str(masks[case_id]), (
                        f"mask has values {_shown(bad)} in {int(values[bad].sum())} pixels, but the dataset reads as "
                        f"binary 0/255 (masks such as {example} hold 255) with no {LABELS_FILE}; a resized or "
                        f"JPEG-compressed mask? For K classes use values 0..K and declare them in {LABELS_FILE}")))
                    pairs.pop(case_id, None)
        else:
            k = max(1, int(np.nonzero(found)[0].max()))
            labels = {0: "background", 1: "foreground"} if k == 1 else {0: "background", **{c: f"class_{c}" for c in range(1, k + 1)}}
    else:
        labels = {}
    return [pairs[c] for c in sorted(pairs)], labels, problems


def load_seg2d(root: str | PathLike, check_files: bool = False) -> tuple[list[dict], dict[int, str]]:
    """Records and classes of a 2D segmentation dataset (see :func:`scan_seg2d`).

    Args:
        check_files: also decode every image completely (:func:`check_seg2d_files`; slower).

    Returns:
        ``(records, labels)``; ``len(labels)`` is the number of classes with background.

    Raises:
        DatasetError: for the first problem found (the message names the file and counts the others).
    """
    records, labels, problems = scan_seg2d(root)
    raise_if_problems(problems)
    if check_files:
        raise_if_problems(check_seg2d_files(records))
    return records, labels


def check_seg2d_files(records: list[dict]) -> list[Problem]:
    """Decode every image of ``records`` completely (a truncated file fails here, not in training)."""
    from PIL import Image, ImageFile

    problems: list[Problem] = []
    tolerant = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # another library may have switched it on
    try:
        for record in records:
            try:
                with Image.open(record["image"]) as img:
                    img.load()
            except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ...
                problems.append(Problem(str(record["image"]), f"cannot read image: {_first_line(err)}"))
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = tolerant
    return problems


def mask_to_index(mask: np.ndarray, labels: dict[int, str]) -> np.ndarray:
    """Label indices 0..K (uint8) of a mask array: for a binary dataset (``len(labels) == 2``)
    every non-zero value (1 or 255) becomes 1; otherwise the values are the indices."""
    mask = np.asarray(mask)
    if len(labels) == 2:
        return (mask > 0).astype(np.uint8)
    return mask.astype(np.uint8, copy=False)


def read_mask(path: str | PathLike, labels: dict[int, str]) -> np.ndarray:
    """A mask file as ``(H, W)`` uint8 label indices (:func:`mask_to_index`)."""
    from PIL import Image

    with Image.open(path) as img:
        return mask_to_index(np.asarray(img), labels)
