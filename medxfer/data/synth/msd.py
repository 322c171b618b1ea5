"""Synthetic Medical Segmentation Decathlon tasks, written in the exact MSD layout (SPEC sections 2, 10).

One whole-body phantom, built in world millimetres (RAS: x to the patient's right, y anterior,
z superior), is shared by every profile. A profile chooses a field of view on it (the anatomical
level), a modality (CT in Hounsfield units, or MR signal tables), the structures that are labelled,
and the lesions that are drawn. Because the profiles look at the same anatomy, transfer between
them is graded for real, not by decree:

=========  ===============  ======================  =========================================  ==========
profile    folder           modality                labelled                                   level (z)
=========  ===============  ======================  =========================================  ==========
spleen     Task09_Spleen    CT                      spleen                                     upper abdomen
liver      Task03_Liver     CT                      liver, cancer (hypodense, inside liver)    upper abdomen
pancreas   Task07_Pancreas  CT                      pancreas, cancer (inside pancreas)         upper abdomen
colon      Task10_Colon     CT                      colon cancer (thickened colon wall)        lower abdomen
lung       Task06_Lung      CT                      cancer (nodule inside a lung)              thorax
heart      Task02_Heart     MR (bSSFP-like)         left atrium                                thorax
prostate   Task05_Prostate  4D MR: T2 + ADC         PZ, TZ                                     pelvis
=========  ===============  ======================  =========================================  ==========

Intended similarity (most to least similar to the spleen task): liver (same field of view, a
large soft-tissue organ of similar density) > pancreas (same view, small organ + lesion) > colon
(CT, overlapping lower view, tubular target) > lung (CT, thorax, dark lung background) > heart
(MR signal, thorax) > prostate (two-channel MR, pelvis). Liver and pancreas are the closest pair
among lesion tasks (organ + hypodense tumour).

Each case varies the patient (size, organ positions and shapes through a smooth random
perturbation of each organ's implicit surface), the in-plane spacing (``spacing_jitter``), the
field of view offset, and the stored orientation (RAS, LPS, LAS, RPI, and a swapped in-plane
axis order when the in-plane spacings are equal): the array and affine always describe the same
world-space anatomy, so after ``Orientation("RAS")`` all cases look alike.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform
from scipy import ndimage

__all__ = ["MSDProfile", "MSD_PROFILES", "generate_msd_task", "generate_msd", "render_case", "RenderedCase"]

# ----------------------------------------------------------------------------- tissues
# Tissue classes of the phantom; images come from per-modality look-up tables.
TISSUES = ("air", "fat", "visceral", "muscle", "bone", "lung", "blood", "liver", "spleen", "kidney",
           "pancreas", "bowel_wall", "gas", "fluid", "pz", "tz", "tumour", "nodule", "myocardium")
T = {name: i for i, name in enumerate(TISSUES)}

# (mean, texture amplitude) per tissue. CT in HU (portal-venous-like contrast);
# MR in arbitrary units; ADC in 1e-6 mm^2/s.
_CT = {"air": (-1000, 0), "fat": (-95, 12), "visceral": (15, 35), "muscle": (50, 10), "bone": (600, 120),
       "lung": (-850, 40), "blood": (170, 8), "liver": (95, 8), "spleen": (110, 10), "kidney": (160, 25),
       "pancreas": (85, 14), "bowel_wall": (60, 10), "gas": (-900, 30), "fluid": (8, 4), "pz": (45, 6),
       "tz": (40, 6), "tumour": (45, 12), "nodule": (25, 20), "myocardium": (110, 8)}
_MR_BSSFP = {"air": (0, 0), "fat": (620, 60), "visceral": (300, 60), "muscle": (180, 25), "bone": (120, 30),
             "lung": (25, 10), "blood": (760, 40), "liver": (230, 25), "spleen": (300, 25), "kidney": (380, 40),
             "pancreas": (260, 30), "bowel_wall": (250, 30), "gas": (10, 5), "fluid": (820, 30), "pz": (400, 40),
             "tz": (260, 40), "tumour": (200, 30), "nodule": (220, 30), "myocardium": (160, 20)}
_MR_T2 = {**_MR_BSSFP, "blood": (150, 30), "fat": (700, 60), "fluid": (950, 30), "pz": (620, 60),
          "tz": (330, 50), "muscle": (140, 20), "bowel_wall": (300, 40), "tumour": (220, 30)}
_MR_ADC = {"air": (0, 0), "fat": (150, 60), "visceral": (1200, 150), "muscle": (1450, 120), "bone": (400, 100),
           "lung": (50, 20), "blood": (2600, 200), "liver": (1100, 100), "spleen": (900, 100), "kidney": (1900, 150),
           "pancreas": (1300, 120), "bowel_wall": (1300, 150), "gas": (30, 20), "fluid": (3000, 100),
           "pz": (1700, 120), "tz": (1150, 100), "tumour": (800, 80), "nodule": (900, 100), "myocardium": (1300, 100)}


@dataclass(frozen=True)
class MSDProfile:
    """One synthetic task.

    Attributes:
        key: short name (``"spleen"``); ``prefix``: file stem prefix (``spleen_1.nii.gz``).
        task_id, folder: MSD task number and folder (``Task09_Spleen``).
        modality: dataset.json ``modality`` (channel index -> name).
        sequences: look-up table per channel (``"ct"``, ``"bssfp"``, ``"t2"``, ``"adc"``).
        labels: dataset.json ``labels`` (value -> name), background included.
        label_masks: phantom structure painted for each label value > 0, in painting order.
        lesions: lesion kinds drawn in this profile (``"liver_tumour"``, ...).
        base_shape: voxels (X, Y, Z); ``base_spacing``: mm; the field of view is their product.
        fov_z_mm: world z of the field-of-view centre (anatomical level).
        noise: Gaussian noise standard deviation in image units.
    """

    key: str
    prefix: str
    task_id: int
    folder: str
    description: str
    modality: tuple[tuple[int, str], ...]
    sequences: tuple[str, ...]
    labels: tuple[tuple[int, str], ...]
    label_masks: tuple[tuple[int, str], ...]
    lesions: tuple[str, ...]
    base_shape: tuple[int, int, int]
    base_spacing: tuple[float, float, float]
    fov_z_mm: float
    noise: float

    @property
    def is_ct(self) -> bool:
        return self.sequences == ("ct",)

    @property
    def four_d(self) -> bool:
        return len(self.sequences) > 1


def _p(key, prefix, task_id, name, description, modality, sequences, labels, label_masks, lesions, shape, spacing, z, noise):
    return MSDProfile(key, prefix, task_id, f"Task{task_id:02d}_{name}", description, tuple(modality.items()),
                      sequences, tuple(labels.items()), tuple(label_masks.items()), lesions, shape, spacing, z, noise)


MSD_PROFILES: dict[str, MSDProfile] = {p.key: p for p in [
    _p("spleen", "spleen", 9, "Spleen", "Spleen segmentation, portal-venous CT", {0: "CT"}, ("ct",),
       {0: "background", 1: "spleen"}, {1: "spleen"}, (), (64, 64, 32), (4.8, 4.8, 9.0), 40.0, 14.0),
    _p("liver", "liver", 3, "Liver", "Liver and liver tumour segmentation, portal-venous CT", {0: "CT"}, ("ct",),
       {0: "background", 1: "liver", 2: "cancer"}, {1: "liver", 2: "liver_tumour"}, ("liver_tumour",),
       (64, 64, 32), (5.0, 5.0, 8.0), 40.0, 14.0),
    _p("pancreas", "pancreas", 7, "Pancreas", "Pancreas and pancreatic tumour segmentation, portal-venous CT",
       {0: "CT"}, ("ct",), {0: "background", 1: "pancreas", 2: "cancer"}, {1: "pancreas", 2: "pancreas_tumour"},
       ("pancreas_tumour",), (64, 64, 32), (4.8, 4.8, 7.0), 20.0, 14.0),
    _p("lung", "lung", 6, "Lung", "Lung nodule segmentation, CT", {0: "CT"}, ("ct",),
       {0: "background", 1: "cancer"}, {1: "lung_nodule"}, ("lung_nodule",), (64, 64, 40), (5.2, 5.2, 6.0),
       240.0, 16.0),
    _p("colon", "colon", 10, "Colon", "Colon cancer segmentation, CT", {0: "CT"}, ("ct",),
       {0: "background", 1: "colon cancer primaries"}, {1: "colon_tumour"}, ("colon_tumour",),
       (64, 64, 32), (5.0, 5.0, 11.0), -110.0, 14.0),
    _p("heart", "la", 2, "Heart", "Left atrium segmentation, bSSFP-like cardiac MR", {0: "MRI"}, ("bssfp",),
       {0: "background", 1: "left atrium"}, {1: "left_atrium"}, (), (56, 56, 32), (4.0, 4.0, 5.0), 235.0, 25.0),
    _p("prostate", "prostate", 5, "Prostate", "Prostate zone segmentation, multiparametric MR (T2, ADC)",
       {0: "T2", 1: "ADC"}, ("t2", "adc"), {0: "background", 1: "PZ", 2: "TZ"}, {1: "prostate_pz", 2: "prostate_tz"},
       (), (56, 56, 24), (2.8, 2.8, 8.4), -370.0, 30.0),
]}

_TABLES = {"ct": _CT, "bssfp": _MR_BSSFP, "t2": _MR_T2, "adc": _MR_ADC}
# Stored orientations cycled over cases (first three letters: where each array axis points).
_ORIENTATIONS = (("R", "A", "S"), ("L", "P", "S"), ("L", "A", "S"), ("R", "P", "I"), ("P", "L", "S"))


# ----------------------------------------------------------------------------- phantom
class _Grid:
    """World coordinates (mm, RAS) of a canonical voxel grid; shapes (X, Y, Z)."""

    def __init__(self, shape, spacing, centre):
        self.shape, self.spacing = tuple(shape), np.asarray(spacing, float)
        self.origin = np.asarray(centre, float) - (np.asarray(shape) - 1) / 2 * self.spacing
        axes = [self.origin[i] + np.arange(shape[i]) * self.spacing[i] for i in range(3)]
        self.x, self.y, self.z = np.meshgrid(*axes, indexing="ij", sparse=True)

    @property
    def affine(self) -> np.ndarray:
        a = np.diag([*self.spacing, 1.0])
        a[:3, 3] = self.origin
        return a


def _smooth_field(rng, shape, sigma_vox, coarse=4):
    """Zero-mean unit-std smooth random field (X, Y, Z): noise filtered on a coarse grid, then zoomed."""
    small = tuple(max(2, int(np.ceil(s / coarse))) for s in shape)
    f = ndimage.gaussian_filter(rng.standard_normal(small), sigma=max(sigma_vox / coarse, 0.5), mode="wrap")
    f = ndimage.zoom(f, [s / m for s, m in zip(shape, small)], order=1)[: shape[0], : shape[1], : shape[2]]
    return (f - f.mean()) / (f.std() + 1e-8)


class _Phantom:
    """Paints tissues and structure masks of one patient on a grid."""

    def __init__(self, grid: _Grid, rng: np.random.Generator):
        self.g, self.rng = grid, rng
        self.scale = rng.uniform(0.9, 1.1)
        self.wobble = _smooth_field(rng, grid.shape, sigma_vox=6)
        self.tissue = np.full(grid.shape, T["air"], np.uint8)
        self.masks: dict[str, np.ndarray] = {}

    def jit(self, c, mm=8.0):
        return np.asarray(c, float) * self.scale + self.rng.uniform(-mm, mm, 3)

    def ellipsoid(self, centre, radii, angle_deg=0.0, wobble=0.15):
        """Implicit ellipsoid ``|R (p - c) / r|^2 < 1`` with a smooth random perturbation of the level."""
        c = self.jit(centre)
        r = np.asarray(radii, float) * self.scale * self.rng.uniform(0.85, 1.15, 3)
        a = np.deg2rad(angle_deg + self.rng.uniform(-12, 12))
        dx, dy, dz = self.g.x - c[0], self.g.y - c[1], self.g.z - c[2]
        u = np.cos(a) * dx + np.sin(a) * dy
        v = -np.sin(a) * dx + np.cos(a) * dy
        return (u / r[0]) ** 2 + (v / r[1]) ** 2 + (dz / r[2]) ** 2 + wobble * self.wobble < 1.0

    def tube(self, points, radius):
        """Voxels within ``radius`` mm of a polyline through ``points`` (mm); returns (mask, distance, arc)."""
        p = np.asarray(points, float)
        best = np.full(self.g.shape, np.inf)
        arc = np.zeros(self.g.shape)
        run = 0.0
        for a, b in zip(p[:-1], p[1:]):
            ab = b - a
            length = float(np.linalg.norm(ab))
            t = ((self.g.x - a[0]) * ab[0] + (self.g.y - a[1]) * ab[1] + (self.g.z - a[2]) * ab[2]) / length**2
            t = np.clip(t, 0, 1)
            d = np.sqrt((self.g.x - a[0] - t * ab[0]) ** 2 + (self.g.y - a[1] - t * ab[1]) ** 2 + (self.g.z - a[2] - t * ab[2]) ** 2)
            closer = d < best
            best = np.where(closer, d, best)
            arc = np.where(closer, run + t * length, arc)
            run += length
        best = best + 2.0 * self.wobble
        return best < radius, best, arc

    def paint(self, mask, tissue, within=None):
        if within is not None:
            mask = mask & within
        self.tissue[mask] = T[tissue]
        return mask

    def sphere_inside(self, region, radius_mm):
        """A lobulated sphere centred on a random voxel of ``region``, clipped to it (a lesion)."""
        core = ndimage.binary_erosion(region, iterations=1)
        idx = np.argwhere(core if core.any() else region)
        centre_vox = idx[self.rng.integers(len(idx))]
        c = self.g.origin + centre_vox * self.g.spacing
        r = radius_mm * self.rng.uniform(0.8, 1.25)
        d = np.sqrt((self.g.x - c[0]) ** 2 + (self.g.y - c[1]) ** 2 + (self.g.z - c[2]) ** 2)
        lesion = (d + 0.15 * r * self.wobble < r) & region
        lesion[tuple(centre_vox)] = True  # never empty
        return lesion

    def build(self, lesions: tuple[str, ...]) -> None:
        g = self
        ax, ay = 155.0 * self.scale, 112.0 * self.scale
        body = ((self.g.x / ax) ** 2 + ((self.g.y - 5) / ay) ** 2 + 0.04 * self.wobble < 1.0) & (self.g.z > -1e9)
        inner = (self.g.x / (ax - 16)) ** 2 + ((self.g.y - 5) / (ay - 16)) ** 2 + 0.04 * self.wobble < 1.0
        g.paint(body, "fat")
        g.paint(inner & body, "visceral")
        g.paint(self.ellipsoid((40, -80, 0), (30, 22, 900)) | self.ellipsoid((-40, -80, 0), (30, 22, 900)), "muscle", body)
        spine = self.ellipsoid((0, -62, 0), (17, 17, 900), wobble=0.05)
        g.paint(spine, "bone", body)
        aorta = self.ellipsoid((18, -38, 0), (11, 11, 900), wobble=0.02) & (self.g.z < 300)
        g.paint(aorta, "blood", body)
        # thorax: lungs, heart with left atrium and myocardium
        lungs = (self.ellipsoid((78, 0, 260), (62, 80, 170)) | self.ellipsoid((-78, 0, 260), (62, 80, 170))) & inner & ~spine
        heart = self.ellipsoid((-20, 30, 230), (62, 48, 58))
        g.paint(lungs & ~heart, "lung")
        g.paint(heart, "myocardium", body)
        g.paint(self.ellipsoid((-20, 32, 225), (44, 32, 42)), "blood", heart)  # ventricular blood pool
        la = g.paint(self.ellipsoid((-8, -2, 262), (26, 17, 19), wobble=0.1), "blood", body)
        self.masks["left_atrium"] = la
        g.masks["lung"] = self.tissue == T["lung"]
        # upper abdomen
        below_lung = ~g.masks["lung"] & ~heart
        liver = g.paint(self.ellipsoid((72, 12, 60), (78, 82, 72), angle_deg=-15), "liver", body & below_lung & ~spine & ~aorta)
        spleen = g.paint(self.ellipsoid((-88, -32, 70), (30, 46, 52), angle_deg=25), "spleen", body & below_lung & ~liver & ~spine)
        stomach = self.ellipsoid((-45, 32, 65), (45, 34, 45)) & body & below_lung & ~liver & ~spleen
        g.paint(stomach, "bowel_wall")
        g.paint(ndimage.binary_erosion(stomach, iterations=1) & (self.g.y > 40), "gas")
        for side in (1, -1):
            g.paint(self.ellipsoid((side * 66, -42, 0), (24, 26, 52)), "kidney", body & ~liver & ~spleen & ~spine)
        pancreas, _, _ = self.tube([self.jit((45, 2, 18), 5), self.jit((-5, 8, 25), 5), self.jit((-72, -18, 38), 5)], 13.0 * self.scale)
        pancreas = g.paint(pancreas, "pancreas", body & ~liver & ~spleen & ~stomach & ~aorta & ~spine)
        self.masks.update(liver=liver, spleen=spleen, pancreas=pancreas)
        # colon frame: ascending, transverse, descending, sigmoid
        path = [self.jit(p, 6) for p in ((72, 25, -170), (72, 25, -10), (40, 45, 5), (-40, 45, 5), (-72, 22, -10),
                                          (-72, 22, -170), (-20, 10, -250), (0, -20, -300))]
        colon, dist, arc = self.tube(path, 21.0 * self.scale)
        colon &= body & ~liver & ~spleen & ~spine
        wall = colon & (dist > 15.0 * self.scale)
        g.paint(colon, "gas")
        g.paint(wall, "bowel_wall")
        self.masks["colon"] = colon
        # pelvis: bladder, prostate (TZ inside, PZ posterior shell), rectum, femoral heads
        g.paint(self.ellipsoid((0, 35, -330), (42, 32, 32)), "fluid", body)
        prostate = self.ellipsoid((0, -2, -372), (22, 18, 20), wobble=0.1) & body
        tz = self.ellipsoid((0, 3, -370), (13, 10, 14), wobble=0.08) & prostate
        g.paint(prostate, "pz")
        g.paint(tz, "tz")
        self.masks.update(prostate_pz=prostate & ~tz, prostate_tz=tz)
        rectum, _, _ = self.tube([(0, -32, -420), (0, -32, -340), (0, -20, -300)], 14.0 * self.scale)
        g.paint(rectum & ~prostate, "bowel_wall", body)
        for side in (1, -1):
            g.paint(self.ellipsoid((side * 92, 0, -385), (26, 26, 26), wobble=0.05), "bone", body)
        # lesions of this profile
        if "liver_tumour" in lesions:
            tumour = np.zeros(self.g.shape, bool)
            for _ in range(self.rng.integers(1, 3)):
                tumour |= self.sphere_inside(liver, self.rng.uniform(12, 20))
            self.masks["liver_tumour"] = g.paint(tumour, "tumour")
            self.masks["liver"] = liver  # tumour voxels stay inside the organ region
        if "pancreas_tumour" in lesions:
            self.masks["pancreas_tumour"] = g.paint(self.sphere_inside(pancreas, self.rng.uniform(13, 17)), "tumour")
        if "lung_nodule" in lesions:
            self.masks["lung_nodule"] = g.paint(self.sphere_inside(g.masks["lung"], self.rng.uniform(15, 22)), "nodule")
        if "colon_tumour" in lesions:
            # an annular wall thickening over a 30-50 mm stretch of the colon
            start = self.rng.uniform(0.15, 0.75) * float(arc[colon].max())
            stretch = (arc > start) & (arc < start + self.rng.uniform(30, 50))
            thick = colon & stretch & (dist > 7.0 * self.scale)
            if not thick.any():
                thick = wall & stretch
            self.masks["colon_tumour"] = g.paint(thick, "tumour")


# ----------------------------------------------------------------------------- rendering
@dataclass
class RenderedCase:
    """One generated case in canonical RAS voxel order.

    image: (X, Y, Z) for one channel or (X, Y, Z, C); CT in HU (float32 before rounding), MR a.u.
    label: (X, Y, Z) uint8; tissue: (X, Y, Z) tissue class index (see ``TISSUES``);
    masks: named structure masks; affine: 4x4 voxel -> world (mm, RAS).
    """

    image: np.ndarray
    label: np.ndarray
    tissue: np.ndarray
    masks: dict
    affine: np.ndarray


def _case_geometry(profile: MSDProfile, rng, shape, spacing, spacing_jitter):
    base_shape = np.asarray(shape or profile.base_shape)
    base_spacing = np.asarray(spacing or profile.base_spacing, float)
    factor = rng.uniform(1 - spacing_jitter, 1 + spacing_jitter) if spacing_jitter > 0 else 1.0
    case_spacing = base_spacing * np.array([factor, factor, 1.0])
    fov = base_shape * base_spacing
    case_shape = np.maximum(np.round(fov / case_spacing).astype(int), 8)
    centre = np.array([0.0, 5.0, profile.fov_z_mm]) + rng.uniform(-10, 10, 3)
    return _Grid(case_shape, case_spacing, centre)


def render_case(profile: MSDProfile, rng: np.random.Generator, shape=None, spacing=None, spacing_jitter=0.1) -> RenderedCase:
    """Draw one case of ``profile`` on a canonical RAS grid (nothing is written)."""
    grid = _case_geometry(profile, rng, shape, spacing, spacing_jitter)
    ph = _Phantom(grid, rng)
    ph.build(profile.lesions)
    texture = _smooth_field(rng, grid.shape, sigma_vox=1.5, coarse=1)
    channels = []
    bias = np.exp(0.2 * _smooth_field(rng, grid.shape, sigma_vox=12))
    for seq in profile.sequences:
        table = _TABLES[seq]
        mean = np.array([table[t][0] for t in TISSUES], np.float32)
        amp = np.array([table[t][1] for t in TISSUES], np.float32)
        img = mean[ph.tissue] + amp[ph.tissue] * texture
        img = ndimage.gaussian_filter(img, sigma=0.6)  # partial-volume blur at tissue borders
        noise = profile.noise * (1.0 if seq != "adc" else 4.0)
        if seq == "ct":
            img = np.clip(img + rng.normal(0, noise, grid.shape), -1024, 3071)
        else:  # MR: bias field and Rician magnitude noise, non-negative
            img = np.hypot(img * bias + rng.normal(0, noise, grid.shape), rng.normal(0, noise, grid.shape))
        channels.append(img.astype(np.float32))
    image = channels[0] if len(channels) == 1 else np.stack(channels, axis=-1)
    label = np.zeros(grid.shape, np.uint8)
    for value, name in profile.label_masks:
        label[ph.masks[name]] = value
    return RenderedCase(image, label, ph.tissue, ph.masks, grid.affine)


def _reorient(array: np.ndarray, affine: np.ndarray, codes) -> tuple[np.ndarray, np.ndarray]:
    """Store a canonical RAS array in orientation ``codes``; the new affine maps to the same world points."""
    ornt = ornt_transform(axcodes2ornt(("R", "A", "S")), axcodes2ornt(codes))
    new = apply_orientation(array, ornt)
    return np.ascontiguousarray(new), affine @ inv_ornt_aff(ornt, array.shape[:3])


def _nifti(array, affine) -> nib.Nifti1Image:
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, 1)
    img.set_sform(affine, 1)
    img.header.set_xyzt_units("mm")
    return img


def _write_case(profile: MSDProfile, case: RenderedCase, orientation, origin_shift, image_path: Path, label_path: Path | None):
    affine = case.affine.copy()
    affine[:3, 3] += origin_shift
    if profile.is_ct:
        data = np.round(case.image).astype(np.int16)
    else:
        data = case.image.astype(np.float32)
    data, new_affine = _reorient(data, affine, orientation)
    nib.save(_nifti(data, new_affine), image_path)
    if label_path is not None:
        label, _ = _reorient(case.label, affine, orientation)
        nib.save(_nifti(label, new_affine), label_path)


def generate_msd_task(out_dir, profile: str = "spleen", num_training: int = 6, num_test: int = 2,
                      shape: tuple[int, int, int] | None = None, spacing: tuple[float, float, float] | None = None,
                      spacing_jitter: float = 0.1, seed: int = 0, overwrite: bool = False) -> Path:
    """Write ``out_dir/TaskNN_Name/`` in the MSD layout and return that folder.

    Args:
        profile: key of :data:`MSD_PROFILES`.
        num_training / num_test: cases in ``imagesTr``+``labelsTr`` / ``imagesTs``.
        shape: base voxel shape (X, Y, Z); spacing: base spacing in mm. Defaults from the profile.
        spacing_jitter: relative per-case jitter of the in-plane spacing (0 = the header spacing is
            exactly ``spacing``); the voxel shape follows so the field of view stays the same.
        seed: case ``i`` uses ``SeedSequence([seed, task_id, i])``: the same arguments give the same
            files, and adding cases does not change existing ones.
        overwrite: replace an existing non-empty task folder (otherwise ``FileExistsError``).
    """
    if profile not in MSD_PROFILES:
        raise ValueError(f"unknown MSD profile {profile!r}; choose from {sorted(MSD_PROFILES)}")
    if num_training < 1 or num_test < 0:
        raise ValueError("num_training must be >= 1 and num_test >= 0")
    if not 0 <= spacing_jitter < 1:
        raise ValueError(f"spacing_jitter must be in [0, 1), got {spacing_jitter}")
    prof = MSD_PROFILES[profile]
    task_dir = Path(out_dir) / prof.folder
    if task_dir.exists() and any(task_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{task_dir}: task folder exists and is not empty; pass overwrite=True (--overwrite) to replace it")
        shutil.rmtree(task_dir)
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (task_dir / sub).mkdir(parents=True, exist_ok=True)

    training, test = [], []
    for i in range(1, num_training + num_test + 1):
        rng = np.random.default_rng(np.random.SeedSequence([seed, prof.task_id, i]))
        case = render_case(prof, rng, shape, spacing, spacing_jitter)
        in_plane_equal = np.isclose(case.affine[0, 0], case.affine[1, 1])
        choices = _ORIENTATIONS if in_plane_equal else _ORIENTATIONS[:4]
        orientation = choices[(i + prof.task_id) % len(choices)]
        shift = rng.uniform(-30, 30, 3)
        name = f"{prof.prefix}_{i}.nii.gz"
        if i <= num_training:
            _write_case(prof, case, orientation, shift, task_dir / "imagesTr" / name, task_dir / "labelsTr" / name)
            training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        else:
            _write_case(prof, case, orientation, shift, task_dir / "imagesTs" / name, None)
            test.append(f"./imagesTs/{name}")
    # macOS resource-fork junk, as found in the real MSD archives: loaders must ignore it
    (task_dir / "imagesTr" / f"._{prof.prefix}_1.nii.gz").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")

    meta = {
        "name": prof.folder.split("_", 1)[1],
        "description": f"{prof.description}. SYNTHETIC: generated by medxfer (profile '{prof.key}', seed {seed}); not patient data.",
        "reference": "medxfer synthetic decathlon (medxfer.data.synth.msd)",
        "licence": "CC-BY-SA 4.0",
        "release": "medxfer synthetic 1.0",
        "tensorImageSize": "4D" if prof.four_d else "3D",
        "modality": {str(k): v for k, v in prof.modality},
        "labels": {str(k): v for k, v in prof.labels},
        "numTraining": num_training,
        "numTest": num_test,
        "training": training,
        "test": test,
    }
    (task_dir / "dataset.json").write_text(json.dumps(meta, indent=4) + "\n")
    return task_dir


def generate_msd(out_dir, profiles: list[str] | None = None, **kwargs) -> list[Path]:
    """:func:`generate_msd_task` for several profiles (default: all of :data:`MSD_PROFILES`)."""
    from tqdm import tqdm

    keys = list(profiles) if profiles else list(MSD_PROFILES)
    return [generate_msd_task(out_dir, profile=k, **kwargs) for k in tqdm(keys, desc="synth msd", unit="task", leave=False)]
