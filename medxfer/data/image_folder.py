"""Labelled 2D image folders for encoder pretraining (classification), torchvision "ImageFolder" layout.

The layout is the one of torchvision's ``ImageFolder`` and of the ImageNet training set::

    <root>/<class_name>/<any name>.<png|jpg|jpeg|bmp|tif|tiff>      (suffix case-insensitive:
    <root>/n01440764/n01440764_10026.JPEG                            ImageNet writes .JPEG)

The class index of an image is the position of its class folder name in the sorted list of
class folder names (Python string order, as torchvision), so ``classes[label] == record["class"]``.

Records are MONAI-style dicts, sorted by (label, id)::

    {"id": "disc/disc_0000", "image": "/abs/.../disc/disc_0000.png", "label": 0, "class": "disc"}

``id`` is ``<class>/<file name without suffix>``, unique over the dataset.

What is read and what is ignored (decided here, unlike torchvision which takes any folder):

* hidden entries (names starting with ``.``: macOS ``._*`` forks, ``.DS_Store``,
  ``.ipynb_checkpoints`` — which torchvision would take for a class) and the OS files
  ``Thumbs.db`` / ``desktop.ini`` are ignored everywhere;
* plain files at the root (``README.txt``, ``LICENSE``, ``LOC_synset_mapping.txt``, ...) are
  ignored, except images: an image at the root is a problem (images belong in a class folder);
* inside a class folder every other entry must be an image by suffix: a stray file (``notes.txt``,
  ``x.webp``, ``x.dcm``) or a sub-folder is a problem, not silently skipped, so that a wrong file
  format cannot shrink a class unnoticed.

Problems (each one :class:`~medxfer.data.problems.Problem`, ``<file>: <reason>``): root missing,
no class folder, a class folder without images, a non-image file or sub-folder in a class folder,
an image at the root, two images of one class with the same name but different suffixes, fewer
than 2 classes, and a root that is a 2D segmentation dataset (``images/`` + ``masks/``, read it
with :func:`medxfer.data.seg2d.load_seg2d`). No file is opened by :func:`scan_image_folder`;
:func:`check_image_folder_files` opens each image's header. Image modes are not checked: load
the images with ``.convert("RGB")`` (ImageNet holds a few CMYK and grey JPEGs).
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path
from typing import Sequence

from .problems import DatasetError, Problem, raise_if_problems

__all__ = [
    "IMAGE_SUFFIXES",
    "is_ignored",
    "is_image_file",
    "image_files",
    "scan_image_folder",
    "load_image_folder",
    "check_image_folder_files",
    "DatasetError",
]

#: Image file suffixes read by the 2D loaders (compared in lower case).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_OS_FILES = ("thumbs.db", "desktop.ini")


def is_ignored(name: str) -> bool:
    """Entries every 2D loader skips: hidden names (``.*``, macOS ``._*``) and ``Thumbs.db`` /
    ``desktop.ini``."""
    return name.startswith(".") or name.lower() in _OS_FILES


def is_image_file(name: str) -> bool:
    """True if ``name`` ends with one of :data:`IMAGE_SUFFIXES` (any case)."""
    return name.lower().endswith(IMAGE_SUFFIXES)


def image_files(input_path, suffixes: Sequence[str] = IMAGE_SUFFIXES, skip_stems: Sequence[str] = ()) -> list[Path]:
    """Images to predict: ``input_path`` itself if it is a file, else the files of the folder ending in
    one of ``suffixes`` (any case), sorted, hidden / OS files and stems containing any of
    ``skip_stems`` (e.g. ``"_overlay"``: outputs written next to the inputs) left out.

    Raises FileNotFoundError for a path that does not exist, DatasetError for a folder without images.
    """
    path = Path(input_path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such image file or folder")
    suffixes = tuple(s.lower() for s in suffixes)
    images = sorted(p for p in path.iterdir() if p.is_file() and not is_ignored(p.name)
                    and p.name.lower().endswith(suffixes) and not any(s in p.stem for s in skip_stems))
    if not images:
        raise DatasetError(path, f"no image files ({', '.join(suffixes)}) in the folder")
    return images


def _suffixes() -> str:
    return ", ".join(IMAGE_SUFFIXES)


def scan_image_folder(root: str | PathLike) -> tuple[list[dict], list[str], list[Problem]]:
    """Find the images of a class-per-folder dataset by file names (no file is opened).

    Args:
        root: the folder holding one sub-folder per class.

    Returns:
        ``(records, classes, problems)``: records (see module docstring) of every image found,
        sorted by (label, id); ``classes`` the sorted class folder names (a class folder
        without images is still a class, and reported); one :class:`Problem` per wrong entry.
    """
    root = Path(root).absolute()
    if not root.is_dir():
        return [], [], [Problem(str(root), "image folder does not exist")]
    problems: list[Problem] = []
    class_dirs = []
    for entry in sorted(root.iterdir()):
        if is_ignored(entry.name):
            continue
        if entry.is_dir():
            class_dirs.append(entry)
        elif is_image_file(entry.name):
            problems.append(Problem(str(entry), "image at the root of an image folder; images must lie in "
                                                "a class folder <root>/<class_name>/"))
    names = sorted(d.name for d in class_dirs)
    if not class_dirs:
        problems.append(Problem(str(root), "no class folder: expected <root>/<class_name>/<image>"
                                           f" with images ending in {_suffixes()}"))
        return [], [], problems
    if set(names) == {"images", "masks"}:
        problems.append(Problem(str(root), "this is a 2D segmentation dataset (images/ + masks/), not a "
                                           "class-per-folder image folder; read it with medxfer.data.seg2d.load_seg2d"))
        return [], names, problems

    records: list[dict] = []
    for label, name in enumerate(names):
        folder = root / name
        seen: dict[str, Path] = {}
        for entry in sorted(folder.iterdir(), key=lambda p: p.name):
            if is_ignored(entry.name):
                continue
            if entry.is_dir():
                problems.append(Problem(str(entry), f"unexpected folder inside class folder '{name}' "
                                                    "(images must lie directly in the class folder)"))
                continue
            if not is_image_file(entry.name):
                problems.append(Problem(str(entry), f"not an image file (expected a name ending in {_suffixes()})"))
                continue
            stem = entry.name[: -len(entry.suffix)]
            if stem in seen:
                problems.append(Problem(str(entry), f"two images with id '{name}/{stem}' ({seen[stem].name} "
                                                    f"and {entry.name}); rename one"))
                continue
            seen[stem] = entry
            records.append({"id": f"{name}/{stem}", "image": str(entry), "label": label, "class": name})
        if not seen:
            problems.append(Problem(str(folder), f"class folder '{name}' holds no image (expected files "
                                                 f"ending in {_suffixes()})"))
    if len(names) < 2:
        problems.append(Problem(str(root), f"only 1 class folder ({names[0]}); a classification dataset "
                                           "needs at least 2"))
    records.sort(key=lambda r: (r["label"], r["id"]))
    return records, names, problems


def load_image_folder(root: str | PathLike, check_files: bool = False) -> tuple[list[dict], list[str]]:
    """Records and class names of a class-per-folder dataset (see :func:`scan_image_folder`).

    Args:
        check_files: also open every image's header with :func:`check_image_folder_files`.

    Raises:
        DatasetError: for the first problem found (the message names the file and counts the others).
    """
    records, classes, problems = scan_image_folder(root)
    raise_if_problems(problems)
    if check_files:
        raise_if_problems(check_image_folder_files(records))
    return records, classes


def check_image_folder_files(records: list[dict]) -> list[Problem]:
    """Open each record's image with PIL, header only (no decoding: cheap), and report the files
    PIL cannot identify or that have no pixels. A truncated file whose header is intact passes."""
    from PIL import Image

    problems: list[Problem] = []
    for record in records:
        path = str(record["image"])
        try:
            with Image.open(path) as img:
                width, height = img.size
        except FileNotFoundError:
            problems.append(Problem(path, "image file does not exist"))
            continue
        except Exception as err:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
            message = str(err).splitlines()[0] if str(err) else type(err).__name__
            problems.append(Problem(path, f"cannot read image: {message}"))
            continue
        if width < 1 or height < 1:
            problems.append(Problem(path, f"image has no pixels ({width}x{height})"))
    return problems
