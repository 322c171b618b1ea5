"""Medical Segmentation Decathlon (MSD) and nnU-Net v2 dataset folders -> MONAI-style lists of dicts.

Two on-disk layouts are read exactly as published (SPEC section 2):

* **MSD** ``TaskNN_Name/dataset.json`` with ``training: [{"image": "./imagesTr/x_1.nii.gz",
  "label": "./labelsTr/x_1.nii.gz"}]`` and ``test: ["./imagesTs/x_2.nii.gz"]``. A 4D task
  (``tensorImageSize == "4D"``) stores all channels in one NIfTI, channel last.
* **nnU-Net v2** ``DatasetNNN_Name/dataset.json`` with ``channel_names``, ``labels`` (name -> int),
  ``numTraining`` and ``file_ending``; one file per channel ``case_0000.nii.gz`` in ``imagesTr``,
  labels ``case.nii.gz`` in ``labelsTr``.

Both give a :class:`SegTask` whose ``training`` records are dicts ``{"id", "image", "label"}`` with
absolute paths, ready for ``monai.transforms.LoadImaged(keys=["image", "label"])``. For nnU-Net
tasks with several channels ``image`` is the list of channel files (``LoadImaged`` stacks them).
macOS ``._*`` junk and other hidden files are ignored. Structural problems (bad JSON, missing keys,
files listed but absent, ...) come back as :class:`~medxfer.data.problems.Problem` from
:func:`scan_task`; :func:`load_task` raises :class:`~medxfer.data.problems.DatasetError` instead.
:func:`check_case` opens the files of one case and checks their content (``medxfer check-data``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .problems import DatasetError, Problem, raise_if_problems, read_json
from .volumes import read_header, read_volume

__all__ = [
    "SegTask",
    "scan_task",
    "load_task",
    "check_case",
    "inspect_case",
    "voxel_spacing",
    "plausibility_problems",
    "SPACING_RANGE_MM",
    "MAX_AXIS_VOXELS",
    "MAX_FILE_VOXELS",
    "load_msd_datalist",
    "is_hidden",
    "image_files",
    "MSD_REQUIRED_KEYS",
    "NNUNET_REQUIRED_KEYS",
]

MSD_REQUIRED_KEYS = ("name", "tensorImageSize", "modality", "labels", "numTraining", "training")
NNUNET_REQUIRED_KEYS = ("channel_names", "labels", "numTraining", "file_ending")
_NNUNET_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
AFFINE_RTOL, AFFINE_ATOL = 1e-4, 1e-3

#: Plausible voxel spacing per axis, mm (inclusive). Clinical CT / MR lie within 0.2-10 mm, micro-CT
#: reaches 0.01 mm; a voxel coarser than 5 cm cannot resolve an organ. A header written in metres
#: (1 mm -> 0.001) or with spacing x1000 (1.5 mm -> 1500: resampling to the plans' spacing would
#: ask for petabytes) falls outside and is refused before any voxel is read.
SPACING_RANGE_MM = (0.01, 50.0)
#: Largest length of one spatial axis, voxels: whole-body CT at 0.5 mm is ~4000 slices.
MAX_AXIS_VOXELS = 8192
#: Largest voxel count of one file (spatial x channels): 2**31 - 1, the int32 index limit of many
#: torch / CUDA kernels (8 GiB as float32).
MAX_FILE_VOXELS = 2**31 - 1


def is_hidden(name: str) -> bool:
    """True for macOS ``._*`` resource forks and other dot files, which every loader ignores."""
    return name.startswith(".")


def image_files(record: dict) -> list[str]:
    """The image file(s) of a record: one per channel for nnU-Net multi-file cases, else one."""
    image = record["image"]
    return list(image) if isinstance(image, list) else [image]


@dataclass
class SegTask:
    """A segmentation task read from disk.

    Attributes:
        root: the task folder.
        layout: ``"msd"`` or ``"nnunetv2"``.
        name: dataset name from dataset.json (or the folder name).
        channel_names: ``{channel index: modality}``, e.g. ``{0: "CT"}`` or ``{0: "T2", 1: "ADC"}``.
        labels: ``{label value: name}``, background included (``{0: "background", 1: "spleen"}``).
        training: records ``{"id": str, "image": str | list[str], "label": str}`` (absolute paths).
        test: records ``{"id": str, "image": str | list[str]}``.
        four_d: MSD 4D task (all channels in one channel-last NIfTI).
        meta: the parsed dataset.json.
    """

    root: Path
    layout: str
    name: str
    channel_names: dict[int, str]
    labels: dict[int, str]
    training: list[dict] = field(default_factory=list)
    test: list[dict] = field(default_factory=list)
    four_d: bool = False
    meta: dict = field(default_factory=dict)

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def num_classes(self) -> int:
        """Number of output channels of a segmentation network: labels incl. background."""
        return len(self.labels)


def _read_json(path: Path) -> tuple[dict | None, list[Problem]]:
    if not path.is_file():
        return None, [Problem(str(path), "dataset.json not found (expected an MSD TaskNN_Name or nnU-Net DatasetNNN_Name folder)")]
    try:
        data = read_json(path)
    except DatasetError as e:
        return None, [e.problem]
    if not isinstance(data, dict):
        return None, [Problem(str(path), "dataset.json must hold a JSON object")]
    return data, []


def _int_keyed(mapping, json_path: Path, key: str, problems: list[Problem]) -> dict[int, str]:
    """``{"0": "CT"}`` -> ``{0: "CT"}``; reports keys that are not integers."""
    out: dict[int, str] = {}
    if not isinstance(mapping, dict) or not mapping:
        problems.append(Problem(str(json_path), f"'{key}' must be a non-empty object"))
        return out
    for k, v in mapping.items():
        try:
            out[int(k)] = str(v)
        except (TypeError, ValueError):
            problems.append(Problem(str(json_path), f"'{key}' key {k!r} is not an integer"))
    return dict(sorted(out.items()))


def _nnunet_labels(mapping, json_path: Path, problems: list[Problem]) -> dict[int, str]:
    """nnU-Net v2 ``labels`` is name -> int (or name -> list of ints for region training)."""
    out: dict[int, str] = {}
    if not isinstance(mapping, dict) or not mapping:
        problems.append(Problem(str(json_path), "'labels' must be a non-empty object"))
        return out
    for name, value in mapping.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int):
                problems.append(Problem(str(json_path), f"label {name!r} has value {v!r}, expected an integer"))
            else:
                out.setdefault(v, str(name))
    return dict(sorted(out.items()))


def _check_labels_consecutive(labels: dict[int, str], json_path: Path, problems: list[Problem]) -> None:
    if labels and sorted(labels) != list(range(len(labels))):
        problems.append(Problem(str(json_path), f"label values must be 0..{len(labels) - 1} with 0 = background, got {sorted(labels)}"))


def _resolve(root: Path, rel, json_path: Path, where: str, problems: list[Problem]) -> Path | None:
    if not isinstance(rel, str) or not rel:
        problems.append(Problem(str(json_path), f"{where}: expected a relative file path, got {rel!r}"))
        return None
    path = (root / rel).resolve()
    if not path.is_file():
        problems.append(Problem(str(root / rel), f"listed in dataset.json ({where}) but the file does not exist"))
        return None
    return path


def _case_id(path: Path) -> str:
    name = path.name
    for ending in (".nii.gz", ".nii", ".mha", ".nrrd", ".nhdr", ".gz"):
        if name.endswith(ending):
            return name[: -len(ending)]
    return path.stem


def _missing_keys(meta: dict, required, json_path: Path, layout: str) -> list[Problem]:
    missing = [k for k in required if k not in meta]
    return [Problem(str(json_path), f"{layout} dataset.json lacks required key(s): {', '.join(missing)}")] if missing else []


def _scan_msd(root: Path, json_path: Path, meta: dict) -> tuple[SegTask | None, list[Problem]]:
    problems = _missing_keys(meta, MSD_REQUIRED_KEYS, json_path, "MSD")
    if problems:
        return None, problems
    channels = _int_keyed(meta["modality"], json_path, "modality", problems)
    labels = _int_keyed(meta["labels"], json_path, "labels", problems)
    _check_labels_consecutive(labels, json_path, problems)
    size = meta["tensorImageSize"]
    if size not in ("3D", "4D"):
        problems.append(Problem(str(json_path), f"tensorImageSize must be '3D' or '4D', got {size!r}"))
    if size == "3D" and len(channels) > 1:
        problems.append(Problem(str(json_path), f"tensorImageSize is 3D but {len(channels)} modalities are declared"))
    task = SegTask(root, "msd", str(meta["name"]), channels, labels, four_d=size == "4D", meta=meta)

    training = meta["training"]
    if not isinstance(training, list):
        problems.append(Problem(str(json_path), "'training' must be a list of {image, label} objects"))
        training = []
    seen: set[str] = set()
    for i, entry in enumerate(training):
        where = f"training[{i}]"
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            problems.append(Problem(str(json_path), f"{where} must be an object with 'image' and 'label'"))
            continue
        image = _resolve(root, entry["image"], json_path, where, problems)
        label = _resolve(root, entry["label"], json_path, where, problems)
        if image is None or label is None:
            continue
        case = _case_id(image)
        if case in seen:
            problems.append(Problem(str(image), f"{where}: case listed twice in dataset.json"))
            continue
        seen.add(case)
        if image.name != label.name:
            problems.append(Problem(str(label), f"{where}: label file name differs from image {image.name} (MSD pairs share the file name)"))
        task.training.append({"id": case, "image": str(image), "label": str(label)})
    if isinstance(meta["numTraining"], int) and meta["numTraining"] != len(training):
        problems.append(Problem(str(json_path), f"numTraining is {meta['numTraining']} but 'training' lists {len(training)} cases"))

    test = meta.get("test", [])
    if not isinstance(test, list):
        problems.append(Problem(str(json_path), "'test' must be a list of relative paths"))
        test = []
    for i, rel in enumerate(test):
        # The MSD release lists test images as plain strings; some copies use {"image": ...}.
        rel = rel.get("image") if isinstance(rel, dict) else rel
        image = _resolve(root, rel, json_path, f"test[{i}]", problems)
        if image is not None:
            task.test.append({"id": _case_id(image), "image": str(image)})
    if isinstance(meta.get("numTest"), int) and meta["numTest"] != len(test):
        problems.append(Problem(str(json_path), f"numTest is {meta['numTest']} but 'test' lists {len(test)} images"))
    return task, problems


def _files_with_ending(folder: Path, ending: str, problems: list[Problem]) -> list[tuple[str, Path]]:
    """``(name without ending, path)`` of the data files of ``folder``; other endings are problems."""
    out = []
    for f in sorted(folder.iterdir()):
        if is_hidden(f.name) or not f.is_file():
            continue
        if not f.name.endswith(ending):
            problems.append(Problem(str(f), f"file does not end with the dataset's file_ending {ending!r}"))
            continue
        out.append((f.name[: -len(ending)], f))
    return out


def _nnunet_cases(folder: Path, ending: str, n_channels: int, problems: list[Problem]) -> dict[str, list[str]]:
    """Group ``case_XXXX<ending>`` files of an nnU-Net images folder by case."""
    cases: dict[str, dict[int, Path]] = {}
    for stem, f in _files_with_ending(folder, ending, problems):
        m = _NNUNET_CHANNEL.match(stem)
        if m is None:
            problems.append(Problem(str(f), "image name must be <case>_<4-digit channel>" + ending))
            continue
        cases.setdefault(m["case"], {})[int(m["channel"])] = f
    out: dict[str, list[str]] = {}
    for case, chans in cases.items():
        missing = [c for c in range(n_channels) if c not in chans]
        extra = [c for c in chans if c >= n_channels]
        if missing:
            problems.append(Problem(str(folder / f"{case}_{missing[0]:04d}{ending}"), f"channel {missing[0]} of case {case} is missing"))
            continue
        if extra:
            problems.append(Problem(str(chans[extra[0]]), f"channel {extra[0]} is not declared in channel_names"))
            continue
        out[case] = [str(chans[c].resolve()) for c in range(n_channels)]
    return out


def _scan_nnunet(root: Path, json_path: Path, meta: dict) -> tuple[SegTask | None, list[Problem]]:
    problems = _missing_keys(meta, NNUNET_REQUIRED_KEYS, json_path, "nnU-Net v2")
    if problems:
        return None, problems
    channels = _int_keyed(meta["channel_names"], json_path, "channel_names", problems)
    labels = _nnunet_labels(meta["labels"], json_path, problems)
    _check_labels_consecutive(labels, json_path, problems)
    ending = str(meta["file_ending"])
    task = SegTask(root, "nnunetv2", str(meta.get("name", root.name)), channels, labels, meta=meta)
    images_tr, labels_tr = root / "imagesTr", root / "labelsTr"
    for folder in (images_tr, labels_tr):
        if not folder.is_dir():
            problems.append(Problem(str(folder), "folder missing"))
    if problems:
        return task, problems
    n = max(len(channels), 1)
    images = _nnunet_cases(images_tr, ending, n, problems)
    label_files = {stem: str(f.resolve()) for stem, f in _files_with_ending(labels_tr, ending, problems)}
    for case in sorted(set(images) | set(label_files)):
        if case not in label_files:
            problems.append(Problem(str(labels_tr / f"{case}{ending}"), f"label of case {case} is missing"))
        elif case not in images:
            problems.append(Problem(label_files[case], f"label has no image {case}_0000{ending} in imagesTr"))
        else:
            image = images[case] if n > 1 else images[case][0]
            task.training.append({"id": case, "image": image, "label": label_files[case]})
    if isinstance(meta["numTraining"], int) and meta["numTraining"] != len(task.training) and not problems:
        problems.append(Problem(str(json_path), f"numTraining is {meta['numTraining']} but {len(task.training)} cases were found"))
    images_ts = root / "imagesTs"
    if images_ts.is_dir():
        for case, files in sorted(_nnunet_cases(images_ts, ending, n, problems).items()):
            task.test.append({"id": case, "image": files if n > 1 else files[0]})
    return task, problems


def scan_task(path) -> tuple[SegTask | None, list[Problem]]:
    """Read an MSD or nnU-Net v2 task folder (or its dataset.json) without opening the images.

    Returns:
        the task (``None`` if dataset.json itself is unusable) and every structural problem found.
    """
    path = Path(path)
    root = path.parent if path.name == "dataset.json" else path
    json_path = root / "dataset.json"
    if not root.is_dir():
        return None, [Problem(str(root), "task folder does not exist")]
    meta, problems = _read_json(json_path)
    if meta is None:
        return None, problems
    if "training" in meta or "modality" in meta:
        return _scan_msd(root, json_path, meta)
    if "channel_names" in meta or "file_ending" in meta:
        return _scan_nnunet(root, json_path, meta)
    return None, [Problem(str(json_path), "neither an MSD dataset.json (needs 'training', 'modality') nor an nnU-Net v2 one (needs 'channel_names', 'file_ending')")]


def _label_problems(label_path: str, label: np.ndarray, labels: dict[int, str]) -> list[Problem]:
    if label.ndim != 3:
        return [Problem(label_path, f"label must be 3D, got shape {label.shape}")]
    if not np.issubdtype(label.dtype, np.integer):
        if not np.all(np.isfinite(label)):
            return [Problem(label_path, "label contains NaN or infinite values")]
        if not np.array_equal(label, np.round(label)):
            return [Problem(label_path, "label contains non-integer values")]
    values = np.unique(label).astype(np.int64)
    unknown = [int(v) for v in values if int(v) not in labels]
    if unknown:
        return [Problem(label_path, f"label value(s) {unknown} not declared in dataset.json labels {sorted(labels)}")]
    return []


def _image_problems(path: str, image: np.ndarray, expect_channels: int | None) -> list[Problem]:
    problems = []
    if expect_channels is None:  # one 3D volume per file
        if image.ndim != 3:
            problems.append(Problem(path, f"expected a 3D image, got shape {image.shape}"))
    elif image.ndim != 4 or image.shape[3] != expect_channels:
        problems.append(Problem(path, f"expected a 4D image with {expect_channels} channels last, got shape {image.shape}"))
    if np.issubdtype(image.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(image)))
        if bad:
            problems.append(Problem(path, f"{bad} voxel(s) are NaN or infinite"))
    return problems


def _geometry_problems(path: str, shape, affine, ref_path: str, ref_shape, ref_affine) -> list[Problem]:
    if tuple(shape[:3]) != tuple(ref_shape[:3]):
        return [Problem(path, f"spatial shape {tuple(shape[:3])} differs from {Path(ref_path).name} {tuple(ref_shape[:3])}")]
    if not np.allclose(affine, ref_affine, rtol=AFFINE_RTOL, atol=AFFINE_ATOL):
        worst = float(np.max(np.abs(affine - ref_affine)))
        return [Problem(path, f"affine differs from {Path(ref_path).name} (max abs difference {worst:.4g})")]
    return []


def voxel_spacing(affine) -> tuple[float, float, float]:
    """Voxel size (mm) along the file's three spatial axes: the norms of the affine's columns."""
    return tuple(float(v) for v in np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0))


def plausibility_problems(path: str, shape, affine) -> list[Problem]:
    """Header plausibility of one volume: spacing per axis within :data:`SPACING_RANGE_MM`, every
    spatial axis at most :data:`MAX_AXIS_VOXELS`, at most :data:`MAX_FILE_VOXELS` voxels."""
    lo, hi = SPACING_RANGE_MM
    spacing = voxel_spacing(affine)
    if not all(np.isfinite(spacing)) or any(not lo <= s <= hi for s in spacing):
        shown = ", ".join(f"{s:.6g}" for s in spacing)
        return [Problem(path, f"voxel spacing ({shown}) mm is outside the plausible {lo:g}-{hi:g} mm per axis; "
                              "the header is wrong (units? a factor of 1000?): fix its pixdim / affine")]
    spatial = tuple(int(s) for s in shape[:3])
    if any(s > MAX_AXIS_VOXELS for s in spatial):
        return [Problem(path, f"shape {tuple(shape)} has an axis longer than {MAX_AXIS_VOXELS} voxels")]
    if int(np.prod([int(s) for s in shape], dtype=np.float64)) > MAX_FILE_VOXELS:
        return [Problem(path, f"shape {tuple(shape)} holds more than {MAX_FILE_VOXELS} voxels (int32 index limit)")]
    return []


def inspect_case(record: dict, labels: dict[int, str] | None = None, expect_channels: int | None = None,
                 any_channels: bool = False) -> tuple[list[Problem], dict | None]:
    """Open every file of one record and check it; return ``(problems, facts)``.

    Checks (as ``medxfer check-data``): headers plausible (:func:`plausibility_problems`, before the
    voxels are read), readable (a truncated ``.nii.gz`` fails here), image and label shapes and affines
    agree (``rtol=1e-4``, ``atol=1e-3`` mm, as nnU-Net's integrity check), label values within ``labels``,
    finite intensities, channel count: ``expect_channels`` channels last (MSD 4D), else one 3D volume
    per file; ``any_channels`` accepts both (images of unknown tasks, for inference).

    ``facts`` (``None`` when there are problems): ``{"shape": spatial shape, "spacing": mm per axis,
    "channels": image channels, "foreground": label has a non-zero voxel (``None`` without label)}``,
    what the door checks of a run need later (memory, all-background) without reading again.
    """
    files = image_files(record)
    problems: list[Problem] = []
    volumes = []
    channels = 0
    for f in files:
        try:
            header_shape, header_affine = read_header(f)
        except DatasetError as e:
            problems.append(e.problem)
            continue
        found = plausibility_problems(f, header_shape, header_affine)
        if found:  # do not read (and allocate) the voxels of an implausible header
            problems += found
            continue
        try:
            image, affine = read_volume(f)
        except DatasetError as e:
            problems.append(e.problem)
            continue
        if any_channels and image.ndim in (3, 4):
            problems += _image_problems(f, image, None if image.ndim == 3 else image.shape[3])
        else:
            problems += _image_problems(f, image, expect_channels)
        channels += image.shape[3] if image.ndim == 4 else 1
        volumes.append((f, image.shape, affine))
    label_path = record.get("label")
    foreground = None
    if label_path is not None:
        try:
            label_shape, label_affine = read_header(label_path)
            found = plausibility_problems(label_path, label_shape, label_affine)
            if found:
                return problems + found, None
            label, label_affine = read_volume(label_path)
        except DatasetError as e:
            return problems + [e.problem], None
        if labels is not None:
            problems += _label_problems(label_path, label, labels)
        foreground = bool(np.any(label != 0))
        volumes.insert(0, (label_path, label.shape, label_affine))
    if volumes:
        ref = volumes[0]
        for f, shape, affine in volumes[1:]:
            problems += _geometry_problems(f, shape, affine, *ref)
    if problems or not volumes:
        return problems, None
    first = volumes[1] if label_path is not None else volumes[0]
    facts = {"shape": [int(s) for s in first[1][:3]], "spacing": list(voxel_spacing(first[2])),
             "channels": int(channels), "foreground": foreground}
    return problems, facts


def check_case(task: SegTask, record: dict) -> list[Problem]:
    """Open every file of one record of ``task`` and check it (as ``medxfer check-data``): header
    spacing and shape plausible (:data:`SPACING_RANGE_MM`, :data:`MAX_AXIS_VOXELS`,
    :data:`MAX_FILE_VOXELS`), readable, image and label shapes and affines agree (``rtol=1e-4``,
    ``atol=1e-3`` mm, as nnU-Net's integrity check), label values within the declared labels, finite
    intensities, channel count of 4D / multi-file images (:func:`inspect_case`). Volumes are read with
    :func:`medxfer.data.volumes.read_volume`."""
    return inspect_case(record, task.labels, task.num_channels if task.four_d else None)[0]


def load_task(path, check_files: bool = False) -> SegTask:
    """:func:`scan_task`, raising :class:`DatasetError` naming the first broken file.

    With ``check_files`` every case is also opened and checked as ``medxfer check-data`` does
    (readable, shapes/affines agree, declared label values, finite intensities).
    """
    task, problems = scan_task(path)
    raise_if_problems(problems)
    assert task is not None
    if check_files:
        raise_if_problems([p for record in task.training + task.test for p in check_case(task, record)])
    return task


def load_msd_datalist(path, section: str = "training") -> list[dict]:
    """The MONAI datalist of one section (``"training"`` or ``"test"``) of an MSD/nnU-Net task.

    Same role as ``monai.data.load_decathlon_datalist`` but with absolute paths, case ids, nnU-Net v2
    support and errors that name the file.
    """
    if section not in ("training", "test"):
        raise ValueError(f"section must be 'training' or 'test', got {section!r}")
    task = load_task(path)
    records = getattr(task, section)
    if not records:
        raise DatasetError(task.root / "dataset.json", f"section '{section}' lists no cases")
    return records
