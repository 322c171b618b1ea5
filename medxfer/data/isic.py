"""ISIC 2017 / 2018 skin-lesion datasets (Task 1 lesion masks, Task 2 attribute masks).

Reads the layouts exactly as published (SPEC section 2)::

    ISIC 2018                                          ISIC 2017
    ISIC2018_Task1-2_Training_Input/ISIC_0000000.jpg   ISIC-2017_Training_Data/ISIC_0000000.jpg
    ISIC2018_Task1_Training_GroundTruth/               ISIC-2017_Training_Part1_GroundTruth/
        ISIC_0000000_segmentation.png                      ISIC_0000000_segmentation.png
    ISIC2018_Task2_Training_GroundTruth_v3/            ISIC-2017_Training_Part2_GroundTruth/
        ISIC_0000000_attribute_<name>.png                  ISIC_0000000_<name>.png

Masks are 8-bit single-channel PNG with values 0/255; an absent attribute is an all-zero
mask, but its file exists. (The official 2017 Part 2 release ships superpixel JSON instead
of attribute PNGs; convert it to one PNG per attribute first.)

Records are MONAI-style dicts, sorted by id::

    {"id": "ISIC_0000000", "image": "/abs/.../ISIC_0000000.jpg",
     "lesion": "/abs/.../ISIC_0000000_segmentation.png",
     "attributes": {"globules": "/abs/...png", ...},          # task 2 only
     "attribute_globules": "/abs/...png", ...}                # same paths, flat keys

so that ``LoadImaged(keys=["image", "lesion", "attribute_globules", ...])`` works directly.
Every problem found is one :class:`~medxfer.data.problems.Problem` (file, one-line reason).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import numpy as np

from medxfer.atomic import atomic_path
from medxfer.data.problems import DatasetError, Problem, raise_if_problems

__all__ = [
    "ISIC_ID",
    "IsicLayout",
    "ISIC_LAYOUTS",
    "ISIC2017",
    "ISIC2018",
    "detect_isic_year",
    "scan_isic",
    "load_isic",
    "check_isic_record",
    "check_mask_sizes",
    "DatasetError",
]

#: An ISIC image id.
ISIC_ID = re.compile(r"ISIC_[0-9]{7}")
#: ISIC 2017 Part 2 as released: per-superpixel ground truth beside ``<id>_superpixels.png``.
SUPERPIXEL_JSON_SUFFIX = "_features.json"
SUPERPIXEL_PNG_SUFFIX = "_superpixels.png"


@dataclass(frozen=True)
class IsicLayout:
    """Folder and file names of one ISIC release (training set).

    Attributes:
        year: 2017 or 2018.
        image_dir: folder of the RGB JPEG images ``<id><image_suffix>``.
        task1_dir: folder of the lesion masks ``<id><lesion_suffix>``.
        task2_dir: folder of the attribute masks, named by ``attribute_pattern``.
        attributes: attribute names of the release, in file-name spelling.
        image_suffix: ``".jpg"``.
        lesion_suffix: ``"_segmentation.png"``.
        attribute_pattern: :meth:`str.format` pattern with fields ``id`` and ``name``.
    """

    year: int
    image_dir: str
    task1_dir: str
    task2_dir: str
    attributes: tuple[str, ...]
    image_suffix: str
    lesion_suffix: str
    attribute_pattern: str

    def image_name(self, case_id: str) -> str:
        return f"{case_id}{self.image_suffix}"

    def lesion_name(self, case_id: str) -> str:
        return f"{case_id}{self.lesion_suffix}"

    def attribute_name(self, case_id: str, name: str) -> str:
        return self.attribute_pattern.format(id=case_id, name=name)

    def parse_attribute(self, file_name: str) -> tuple[str, str] | None:
        """``(id, attribute name)`` of an attribute mask file name, or None if it does not
        follow ``attribute_pattern`` (the name is not checked against ``attributes``)."""
        prefix, suffix = self.attribute_pattern.split("{name}")
        regex = re.escape(prefix).replace(re.escape("{id}"), f"({ISIC_ID.pattern})") + "(.+)" + re.escape(suffix)
        match = re.fullmatch(regex, file_name)
        return (match.group(1), match.group(2)) if match else None

    @property
    def folders(self) -> tuple[str, str, str]:
        return (self.image_dir, self.task1_dir, self.task2_dir)


ISIC2018 = IsicLayout(
    year=2018,
    image_dir="ISIC2018_Task1-2_Training_Input",
    task1_dir="ISIC2018_Task1_Training_GroundTruth",
    task2_dir="ISIC2018_Task2_Training_GroundTruth_v3",
    attributes=("globules", "milia_like_cyst", "negative_network", "pigment_network", "streaks"),
    image_suffix=".jpg",
    lesion_suffix="_segmentation.png",
    attribute_pattern="{id}_attribute_{name}.png",
)
ISIC2017 = IsicLayout(
    year=2017,
    image_dir="ISIC-2017_Training_Data",
    task1_dir="ISIC-2017_Training_Part1_GroundTruth",
    task2_dir="ISIC-2017_Training_Part2_GroundTruth",
    attributes=("milia_like_cyst", "negative_network", "pigment_network", "streaks"),
    image_suffix=".jpg",
    lesion_suffix="_segmentation.png",
    attribute_pattern="{id}_{name}.png",
)
ISIC_LAYOUTS: dict[int, IsicLayout] = {2018: ISIC2018, 2017: ISIC2017}


def _expected_folders() -> str:
    return " or ".join(f"{layout.image_dir} (ISIC {year})" for year, layout in ISIC_LAYOUTS.items())


def _ignored(name: str) -> bool:
    """Files that come with the releases or the OS and are not data: hidden files, macOS
    ``._*`` resource forks, ISIC 2017 ``*_superpixels.png``, LICENSE / ATTRIBUTION texts and
    metadata CSV files."""
    upper = name.upper()
    return (
        name.startswith(".")
        or name.endswith("_superpixels.png")
        or upper.startswith(("LICENSE", "ATTRIBUTION", "README"))
        or upper.endswith(".CSV")
        or name in ("Thumbs.db", "desktop.ini")
    )


def detect_isic_year(root: str | PathLike) -> int | None:
    """The ISIC year whose folders ``root`` holds (2018 or 2017), judged by folder names;
    None if it holds neither. If both are present, the year with more of its three folders
    present wins, 2018 on a tie (pass ``year=`` to :func:`scan_isic` to choose)."""
    root = Path(root)
    found = {
        year: sum((root / folder).is_dir() for folder in layout.folders) for year, layout in ISIC_LAYOUTS.items()
    }
    best = max(found, key=lambda year: (found[year], year))
    return best if found[best] else None


def _list_files(folder: Path, problems: list[Problem]) -> list[Path]:
    """Non-ignored entries of ``folder``, sorted; sub-folders are reported as problems."""
    files = []
    for entry in sorted(folder.iterdir()):
        if _ignored(entry.name):
            continue
        if entry.is_dir():
            problems.append(Problem(str(entry), "unexpected folder inside an ISIC data folder"))
            continue
        files.append(entry)
    return files


def scan_isic(
    root: str | PathLike, year: int | None = None, task: int = 2
) -> tuple[list[dict], list[Problem]]:
    """Find the ISIC records under ``root`` by file names (no file is opened).

    Args:
        root: folder holding the year's folders (e.g. ``ISIC2018_Task1-2_Training_Input``).
        year: 2017 or 2018; None detects it with :func:`detect_isic_year`.
        task: 1 (image + lesion mask; the Task 2 folder is not needed) or 2 (also every
            attribute mask of the year).

    Returns:
        ``(records, problems)``: records (see module docstring) of the images whose files
        are all present, sorted by id; one :class:`Problem` per wrong or missing file or
        folder. Images with a problem have no record.
    """
    if task not in (1, 2):
        raise ValueError(f"task must be 1 or 2, got {task!r}")
    root = Path(root).absolute()
    if not root.is_dir():
        return [], [Problem(str(root), "dataset folder does not exist")]
    if year is None:
        year = detect_isic_year(root)
        if year is None:
            return [], [Problem(str(root), f"no ISIC layout found: expected folder {_expected_folders()}")]
    if year not in ISIC_LAYOUTS:
        raise ValueError(f"year must be one of {sorted(ISIC_LAYOUTS)}, got {year!r}")
    layout = ISIC_LAYOUTS[year]
    problems: list[Problem] = []

    dirs = {"image": root / layout.image_dir, "task1": root / layout.task1_dir}
    if task == 2:
        dirs["task2"] = root / layout.task2_dir
    missing = [d for d in dirs.values() if not d.is_dir()]
    for d in missing:
        problems.append(Problem(str(d), f"missing folder of the ISIC {year} layout"))
    if missing:
        return [], problems

    # images
    images: dict[str, Path] = {}
    for path in _list_files(dirs["image"], problems):
        stem = path.name[: -len(layout.image_suffix)] if path.name.endswith(layout.image_suffix) else None
        if stem is None or not ISIC_ID.fullmatch(stem):
            problems.append(Problem(str(path), f"file name is not an ISIC id ISIC_nnnnnnn{layout.image_suffix}"))
            continue
        images[stem] = path

    # task 1 lesion masks
    lesions: dict[str, Path] = {}
    for path in _list_files(dirs["task1"], problems):
        stem = path.name[: -len(layout.lesion_suffix)] if path.name.endswith(layout.lesion_suffix) else None
        if stem is None or not ISIC_ID.fullmatch(stem):
            problems.append(Problem(str(path), f"file name is not a lesion mask ISIC_nnnnnnn{layout.lesion_suffix}"))
        elif stem not in images:
            orphan = f"lesion mask of {stem} but there is no image {layout.image_name(stem)}"
            problems.append(Problem(str(path), orphan))
        else:
            lesions[stem] = path

    # task 2 attribute masks
    attributes: dict[str, dict[str, Path]] = {}
    superpixel_json: dict[str, Path] = {}  # ISIC 2017 Part 2 as released: ground truth per superpixel
    if task == 2:
        expected = layout.attribute_name("ISIC_nnnnnnn", "<attribute>")
        for path in _list_files(dirs["task2"], problems):
            parsed = layout.parse_attribute(path.name)
            if parsed is None and year == 2017 and path.name.endswith(SUPERPIXEL_JSON_SUFFIX):
                superpixel_json[path.name[: -len(SUPERPIXEL_JSON_SUFFIX)]] = path
                continue
            if parsed is None:
                problems.append(Problem(str(path), f"file name is not an attribute mask {expected}"))
                continue
            case_id, name = parsed
            if name not in layout.attributes:
                known = ", ".join(layout.attributes)
                problems.append(Problem(str(path), f"unknown attribute '{name}'; ISIC {year} attributes are {known}"))
            elif case_id not in images:
                orphan = f"attribute mask of {case_id} but there is no image {layout.image_name(case_id)}"
                problems.append(Problem(str(path), orphan))
            else:
                attributes.setdefault(case_id, {})[name] = path

    records = []
    for case_id in sorted(images):
        lesion = dirs["task1"] / layout.lesion_name(case_id)
        complete = case_id in lesions
        if not complete:
            problems.append(Problem(str(lesion), f"missing lesion mask of {case_id}"))
        record = {"id": case_id, "image": str(images[case_id]), "lesion": str(lesion)}
        if task == 2:
            # all of the year's attribute masks, or each missing one is reported
            found = attributes.get(case_id, {})
            if case_id in superpixel_json and len(found) < len(layout.attributes):
                reason = ("ISIC 2017 Part 2 superpixel ground truth without attribute PNGs; convert it "
                          f"with `medxfer convert-isic2017 {root}`")
                problems.append(Problem(str(superpixel_json[case_id]), reason))
                found = {name: None for name in layout.attributes}  # reported once, not per attribute
                complete = False
            for name in layout.attributes:
                if name not in found:
                    expected = dirs["task2"] / layout.attribute_name(case_id, name)
                    reason = (
                        f"missing attribute mask '{name}' of {case_id} (every image needs all "
                        f"{len(layout.attributes)} attribute masks; an absent attribute is an all-zero mask)"
                    )
                    problems.append(Problem(str(expected), reason))
                    complete = False
            record["attributes"] = {name: str(found[name]) for name in layout.attributes if found.get(name)}
            record.update({f"attribute_{name}": path for name, path in record["attributes"].items()})
        if complete:
            records.append(record)
    return records, problems


def load_isic(
    root: str | PathLike, year: int | None = None, task: int = 2, check_files: bool = False
) -> list[dict]:
    """Records of an ISIC dataset (see :func:`scan_isic`), sorted by id.

    Args:
        check_files: also open every file with :func:`check_isic_record` (slower).

    Raises:
        DatasetError: for the first problem found (the message names the file and counts
            the others), including a ``root`` that holds neither ISIC layout.
    """
    records, problems = scan_isic(root, year=year, task=task)
    raise_if_problems(problems)
    if check_files:
        for record in records:
            raise_if_problems(check_isic_record(record))
    return records


def _open(path: str, what: str):
    """Open and fully decode an image with PIL; (image, None) or (None, Problem)."""
    from PIL import Image, ImageFile

    tolerant = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # another library may have switched it on
    try:
        with Image.open(path) as img:  # leaving the block closes the file, keeps the pixels
            img.load()  # decodes everything: truncated files fail here
        return img, None
    except FileNotFoundError:
        return None, Problem(path, f"{what} file does not exist")
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        return None, Problem(path, f"cannot read {what}: {message}")
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = tolerant


def check_isic_record(record: dict) -> list[Problem]:
    """Open the files of one record and check them.

    Checks: the image decodes completely and is RGB; every mask (``lesion`` and each
    attribute) decodes, is single-channel 8-bit (PIL mode ``L``), has the size of the image
    and holds only the values 0 and 255. Sizes are written width x height, as PIL does.

    Returns:
        One :class:`Problem` per wrong file (empty list if all is well).
    """
    problems: list[Problem] = []
    image_size = None
    if "image" not in record:
        return [Problem(str(record.get("id", "?")), "record has no 'image' path")]
    image, problem = _open(str(record["image"]), "image")
    if problem:
        problems.append(problem)
    else:
        image_size = image.size
        if image.mode != "RGB":
            problems.append(Problem(str(record["image"]), f"image is not RGB (PIL mode {image.mode})"))

    masks = []
    if "lesion" in record:
        masks.append(str(record["lesion"]))
    masks.extend(str(p) for p in record.get("attributes", {}).values())
    for path in masks:
        mask, problem = _open(path, "mask")
        if problem:
            problems.append(problem)
            continue
        bands = mask.getbands()
        if len(bands) != 1:
            problems.append(Problem(path, f"mask is not single-channel (PIL mode {mask.mode}, {len(bands)} channels)"))
            continue
        if mask.mode != "L":
            problems.append(Problem(path, f"mask is not 8-bit grayscale (PIL mode {mask.mode}); expected values 0/255"))
            continue
        if image_size is not None and mask.size != image_size:
            problems.append(
                Problem(path, f"mask is {mask.size[0]}x{mask.size[1]} but image is {image_size[0]}x{image_size[1]}")
            )
        values = np.asarray(mask)
        bad = (values != 0) & (values != 255)
        if bad.any():
            others = np.unique(values[bad])
            shown = ", ".join(str(int(v)) for v in others[:5]) + (", ..." if len(others) > 5 else "")
            problems.append(Problem(path, f"mask has values other than 0/255 ({shown}) in {int(bad.sum())} pixels"))
    return problems


def check_mask_sizes(records) -> list[Problem]:
    """Masks whose size differs from their image's, reading file headers only (cheap: no decoding,
    so it runs before every training; :func:`check_isic_record` checks everything but decodes)."""
    from PIL import Image

    def size(path):
        try:
            with Image.open(path) as img:
                return img.size, None
        except Exception as err:  # unreadable files: PIL raises several types
            return None, Problem(str(path), f"cannot read: {str(err).splitlines()[0] if str(err) else type(err).__name__}")

    problems: list[Problem] = []
    for record in records:
        image_size, problem = size(record["image"])
        if problem:
            problems.append(problem)
            continue
        masks = ([record["lesion"]] if "lesion" in record else []) + list(record.get("attributes", {}).values())
        for path in masks:
            mask_size, problem = size(path)
            if problem:
                problems.append(problem)
            elif mask_size != image_size:
                problems.append(Problem(str(path), f"mask is {mask_size[0]}x{mask_size[1]} but image is "
                                                   f"{image_size[0]}x{image_size[1]} (width x height)"))
    return problems


def _superpixel_index(path: Path) -> np.ndarray:
    """Superpixel id per pixel of an ISIC 2017 ``*_superpixels.png``: R + 256 G + 65536 B, (H, W) int64."""
    image, problem = _open(str(path), "superpixel image")
    if problem is not None:
        raise DatasetError(problem.path, problem.reason)
    rgb = np.asarray(image.convert("RGB"), dtype=np.int64)
    return rgb[..., 0] + (rgb[..., 1] << 8) + (rgb[..., 2] << 16)


def convert_isic2017_superpixels(root: str | PathLike, overwrite: bool = False) -> list[Path]:
    """Turn ISIC 2017 Part 2 superpixel ground truth into one 0/255 PNG per attribute.

    The 2017 release gives, per image, ``ISIC-2017_Training_Part2_GroundTruth/<id>_features.json``
    (``{attribute: [0/1 per superpixel]}``) and ``ISIC-2017_Training_Data/<id>_superpixels.png``
    (superpixel id encoded as R + 256 G + 65536 B). A pixel belongs to an attribute when its
    superpixel is marked 1. Masks are written beside the JSON as ``<id>_<attribute>.png``, the
    layout :func:`scan_isic` reads. Written by hand: no maintained library reads this format.

    Returns:
        the mask files written. Raises :class:`DatasetError` naming the file for a missing
        superpixel image, bad JSON, an unknown attribute or a list shorter than the number of
        superpixels; :class:`FileExistsError` if a mask exists and ``overwrite`` is False.
    """
    import json

    from PIL import Image

    root = Path(root)
    layout = ISIC2017
    part2, images = root / layout.task2_dir, root / layout.image_dir
    if not part2.is_dir():
        raise DatasetError(part2, "missing folder of the ISIC 2017 layout")
    written = []
    for path in sorted(part2.glob(f"ISIC_*{SUPERPIXEL_JSON_SUFFIX}")):
        case_id = path.name[: -len(SUPERPIXEL_JSON_SUFFIX)]
        try:
            features = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DatasetError(path, f"invalid superpixel JSON: {e}") from None
        if not isinstance(features, dict):
            raise DatasetError(path, "superpixel JSON must map attribute names to 0/1 lists")
        unknown = sorted(set(features) - set(layout.attributes))
        if unknown:
            raise DatasetError(path, f"unknown attribute(s) {unknown}; ISIC 2017 attributes are {', '.join(layout.attributes)}")
        index = _superpixel_index(images / f"{case_id}{SUPERPIXEL_PNG_SUFFIX}")
        n_superpixels = int(index.max()) + 1
        for name in layout.attributes:
            marks = np.asarray(features.get(name, []), dtype=np.int64).ravel()
            if marks.size < n_superpixels:
                raise DatasetError(path, f"'{name}' has {marks.size} entries but the superpixel image has {n_superpixels} superpixels")
            out = part2 / layout.attribute_name(case_id, name)
            if out.exists() and not overwrite:
                raise FileExistsError(f"{out}: mask exists; pass overwrite=True (--overwrite) to replace it")
            mask = (marks[index] > 0).astype(np.uint8) * 255
            with atomic_path(out) as tmp:  # a kill or a full disk never leaves half a mask
                Image.fromarray(mask).save(tmp, format="PNG")
            written.append(out)
    return written
