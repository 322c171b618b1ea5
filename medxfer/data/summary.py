"""What is in a dataset, in numbers (JSON) and in one picture (PNG).

* :func:`summarize_task` — MSD / nnU-Net task: cases, channels, shapes, spacings (mm),
  stored orientations (axis codes), foreground fraction per label.
* :func:`summarize_isic` — ISIC folder: images, image sizes, lesion area fraction and the
  measured prevalence of every attribute (share of images whose mask is not empty).
* :func:`save_preview` — one PNG: a mid-axial RAS slice per task with its label outlined, and
  a few dermoscopy images with lesion and attribute outlines.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from .msd import SegTask, image_files

__all__ = ["summarize_task", "summarize_isic", "save_preview"]


def summarize_task(task: SegTask, max_cases: int | None = None) -> dict:
    """Numbers describing a task; reads headers of every case and the labels of ``max_cases`` cases."""
    shapes, spacings, orientations = [], [], set()
    label_counts = {k: 0 for k in task.labels}
    total_voxels = 0
    records = task.training + task.test
    for i, record in enumerate(records):
        img = nib.load(image_files(record)[0])
        shapes.append(list(img.shape))
        spacings.append([float(z) for z in img.header.get_zooms()[:3]])
        orientations.add("".join(nib.aff2axcodes(img.affine)))
        if "label" in record and (max_cases is None or i < max_cases):
            label = np.asanyarray(nib.load(record["label"]).dataobj)
            values, counts = np.unique(label, return_counts=True)
            for v, c in zip(values.astype(int), counts):
                label_counts[int(v)] = label_counts.get(int(v), 0) + int(c)
            total_voxels += label.size
    spacing = np.asarray(spacings)
    return {
        "name": task.name,
        "folder": str(task.root),
        "layout": task.layout,
        "channels": {str(k): v for k, v in task.channel_names.items()},
        "labels": {str(k): v for k, v in task.labels.items()},
        "num_training": len(task.training),
        "num_test": len(task.test),
        "shape_min": np.min(shapes, axis=0).tolist(),
        "shape_max": np.max(shapes, axis=0).tolist(),
        "spacing_min_mm": spacing[:, :3].min(axis=0).round(4).tolist(),
        "spacing_max_mm": spacing[:, :3].max(axis=0).round(4).tolist(),
        "orientations": sorted(orientations),
        "label_fraction": {task.labels.get(k, str(k)): round(c / max(total_voxels, 1), 5)
                           for k, c in sorted(label_counts.items()) if k != 0},
    }


def _read_mask(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im) > 127


def summarize_isic(records: list[dict], year: int) -> dict:
    """Numbers describing ISIC records from :func:`medxfer.data.isic.load_isic`."""
    from PIL import Image

    sizes, lesion_fraction = [], []
    present: dict[str, int] = {}
    for record in records:
        with Image.open(record["image"]) as im:
            sizes.append([im.height, im.width])
        lesion = _read_mask(record["lesion"])
        lesion_fraction.append(float(lesion.mean()))
        for name, path in record.get("attributes", {}).items():
            present[name] = present.get(name, 0) + int(_read_mask(path).any())
    n = max(len(records), 1)
    return {
        "year": year,
        "num_images": len(records),
        "size_min_hw": np.min(sizes, axis=0).tolist() if sizes else None,
        "size_max_hw": np.max(sizes, axis=0).tolist() if sizes else None,
        "lesion_fraction_mean": round(float(np.mean(lesion_fraction)), 4) if records else None,
        "attribute_prevalence": {k: round(v / n, 4) for k, v in sorted(present.items())},
    }


def _mid_axial_ras(record: dict) -> tuple[np.ndarray, np.ndarray]:
    img = nib.as_closest_canonical(nib.load(image_files(record)[0]))
    lab = nib.as_closest_canonical(nib.load(record["label"]))
    data = np.asanyarray(img.dataobj)
    if data.ndim == 4:
        data = data[..., 0]
    label = np.asanyarray(lab.dataobj)
    z = int(np.argmax((label > 0).sum(axis=(0, 1)))) if label.any() else label.shape[2] // 2
    # RAS array: X grows to the patient's right, Y to anterior. Radiological display puts anterior
    # at the top and the patient's right on the image's left.
    def view(a):
        return np.fliplr(np.rot90(a))

    return view(data[:, :, z]), view(label[:, :, z])


def save_preview(tasks: list[SegTask], isic_sets: list[tuple[int, list[dict]]], path, n_isic: int = 4) -> Path:
    """Write a PNG: one mid-axial slice per task (label outlined) and ``n_isic`` images per ISIC set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    n_cols = max(len(tasks), n_isic, 1)
    n_rows = (1 if tasks else 0) + len(isic_sets)
    fig, axes = plt.subplots(max(n_rows, 1), n_cols, figsize=(2.6 * n_cols, 2.8 * max(n_rows, 1)), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    row = 0
    if tasks:
        for ax, task in zip(axes[0], tasks):
            image, label = _mid_axial_ras(task.training[0])
            ct = image.min() < -500  # Hounsfield units: soft-tissue window W 600 / L 50
            vmin, vmax = (-250, 350) if ct else (np.percentile(image, 1), np.percentile(image, 99.5))
            ax.imshow(image, cmap="gray", vmin=vmin, vmax=vmax)
            if label.max() > 0:
                ax.contour(label, levels=np.arange(0.5, label.max() + 0.5), colors=["yellow", "red", "cyan"][: int(label.max())], linewidths=0.8)
            ax.set_title(f"{task.root.name}\n{task.training[0]['id']}", fontsize=8)
        row = 1
    for year, records in isic_sets:
        for ax, record in zip(axes[row], records[:n_isic]):
            with Image.open(record["image"]) as im:
                ax.imshow(np.asarray(im.convert("RGB")))
            ax.contour(_read_mask(record["lesion"]), levels=[0.5], colors="white", linewidths=0.8)
            present = {n: m for n, m in ((n, _read_mask(p)) for n, p in record.get("attributes", {}).items()) if m.any()}
            for mask in present.values():
                ax.contour(mask, levels=[0.5], colors="lime", linewidths=0.6)
            names = list(present)
            ax.set_title(f"ISIC {year} {record['id']}\n{', '.join(names) or 'no attribute'}", fontsize=6)
        row += 1
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
