"""Synthetic Medical Segmentation Decathlon tasks, written in the exact MSD layout (SPEC sections 2, 10).

One whole-body phantom is shared by every profile. It is built in millimetres on a canonical RAS
grid (+x towards the patient's Right, +y Anterior, +z Superior; the origin is mid-body at the level
of the upper abdomen). A profile chooses a field of view on that body (the anatomical level), a
modality (CT in Hounsfield units, or MR signal look-up tables), the structures that are labelled
and the lesions that are drawn. Because every profile is made of the same ingredients (body
outline, fat layer, muscle, spine, organs as perturbed implicit ellipsoids, lesions grown inside
their organ, per-tissue intensity tables, texture, noise) with different parameters, transfer
between them is graded for real, not by decree:

========  ===============  ===============  ================================  =====================  ===========
profile   folder           modality         labelled (value: structure)       level / field of view  spacing mm
========  ===============  ===============  ================================  =====================  ===========
spleen    Task09_Spleen    CT (HU)          1 spleen                          upper abdomen, body    4.8 4.8 12
liver     Task03_Liver     CT (HU)          1 liver, 2 cancer (hypodense)     upper abdomen, body    5.0 5.0 8
pancreas  Task07_Pancreas  CT (HU)          1 pancreas, 2 cancer (hypodense)  upper abdomen, body    4.8 4.8 7
colon     Task10_Colon     CT (HU)          1 colon cancer (wall thickening)  lower abdomen, body    5.0 5.0 15
lung      Task06_Lung      CT (HU)          1 cancer (nodule inside a lung)   thorax, body           5.2 5.2 6
heart     Task02_Heart     MR (bSSFP-like)  1 left atrium                     thorax, body           4.0 4.0 5
prostate  Task05_Prostate  4D MR T2 + ADC   1 PZ, 2 TZ                        pelvis, inside body    2.8 2.8 8.4
========  ===============  ===============  ================================  =====================  ===========

Intended similarity, closest first (from the spleen task's point of view):

1. **liver** -- same field of view and scanner model; a large soft-tissue organ of similar density
   (liver 95 HU, spleen 110 HU) in the same body; both tasks see the other's organ unlabelled.
2. **pancreas** -- same CT and body 20 mm lower; a small organ plus a hypodense tumour, so it is
   closest to liver among the lesion tasks (organ + tumour inside it).
3. **colon** -- CT, lower abdomen (overlapping view), a tubular target in gas-filled bowel.
4. **lung** -- CT, thorax: a small nodule in dark lung, a very different background histogram.
5. **heart** -- MR signal (positive arbitrary units, bias field, Rician noise), thorax.
6. **prostate** -- two-channel MR (T2 + ADC), small pelvic field of view, 4D file: farthest.

Every case varies the patient (size, organ positions, shapes through a smooth random perturbation
of each organ's implicit surface, lesion number/size/place), the scanner (noise level, MR gain and
bias field), the in-plane spacing (``spacing_jitter``, the voxel count follows so the field of view
stays constant), the field-of-view centre, the origin and the stored orientation (RAS, LPS, LAS,
RPI, and PLS with swapped in-plane axes). The stored array and affine always describe the same
world-space anatomy, so after ``nibabel.as_closest_canonical`` / MONAI ``Orientation("RAS")`` all
cases look alike.

At the profile's default ``shape`` x ``spacing`` the anatomy is life-size. A different ``shape`` or
``spacing`` changes the field of view; the phantom is then scaled with it (per in-plane / slice
axis), so every labelled structure stays in view however small the volume: ``shape=(32, 32, 12),
spacing=(1.5, 1.5, 4)`` gives a 48 mm miniature of the same task, with exactly that header spacing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform
from scipy import ndimage

from medxfer.atomic import atomic_directory

__all__ = ["MSDProfile", "MSD_PROFILES", "generate_msd_task", "generate_msd", "render_case", "RenderedCase",
           "TISSUES"]

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
# T2: peripheral zone bright, transition zone darker; ADC: fat and air dark, free water bright,
# PZ higher diffusivity than TZ (healthy gland), muscle bright relative to T2.
_MR_T2 = {**_MR_BSSFP, "blood": (150, 30), "fat": (700, 60), "fluid": (950, 30), "pz": (620, 60),
          "tz": (330, 50), "muscle": (140, 20), "bowel_wall": (300, 40), "tumour": (220, 30)}
_MR_ADC = {"air": (0, 0), "fat": (150, 60), "visceral": (1200, 150), "muscle": (1450, 120), "bone": (400, 100),
           "lung": (50, 20), "blood": (2600, 200), "liver": (1100, 100), "spleen": (900, 100), "kidney": (1900, 150),
           "pancreas": (1300, 120), "bowel_wall": (1300, 150), "gas": (30, 20), "fluid": (3000, 100),
           "pz": (1700, 120), "tz": (1150, 100), "tumour": (800, 80), "nodule": (900, 100), "myocardium": (1300, 100)}
_TABLES = {"ct": _CT, "bssfp": _MR_BSSFP, "t2": _MR_T2, "adc": _MR_ADC}

# Stored orientations cycled over cases (where each array axis points); PLS swaps the in-plane axes.
_ORIENTATIONS = (("R", "A", "S"), ("L", "P", "S"), ("L", "A", "S"), ("R", "P", "I"), ("P", "L", "S"))
# Every lesion / label keeps at least this many voxels (when its organ is big enough).
MIN_LESION_VOXELS = 40


@dataclass(frozen=True)
class MSDProfile:
    """One synthetic task.

    Attributes:
        key: short name (``"spleen"``); ``prefix``: file stem prefix (``spleen_1.nii.gz``; the heart
            task uses ``la`` like the real Task02_Heart).
        task_id, folder: MSD task number and folder (``Task09_Spleen``, one underscore).
        description: dataset.json description (the synthetic notice is appended).
        modality: dataset.json ``modality`` as ``((channel index, name), ...)``.
        sequences: intensity look-up table per channel (``"ct"``, ``"bssfp"``, ``"t2"``, ``"adc"``).
        labels: dataset.json ``labels`` as ``((value, name), ...)``, background included.
        label_masks: phantom structure painted for each label value > 0, in painting order.
        lesions: lesion kinds drawn in this profile (``"liver_tumour"``, ``"pancreas_tumour"``,
            ``"lung_nodule"``, ``"colon_tumour"``).
        base_shape: default voxels (X, Y, Z); base_spacing: default mm; their product is the
            life-size field of view.
        fov_z_mm: phantom z (mm, superior positive) of the field-of-view centre: the anatomical level.
        noise: Gaussian noise standard deviation in image units (HU for CT), before the per-case
            scanner jitter.
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

    @property
    def fov_mm(self) -> np.ndarray:
        """Life-size field of view (mm): ``base_shape * base_spacing``."""
        return np.asarray(self.base_shape) * np.asarray(self.base_spacing, float)


def _p(key, prefix, task_id, name, description, modality, sequences, labels, label_masks, lesions, shape, spacing, z, noise):
    return MSDProfile(key, prefix, task_id, f"Task{task_id:02d}_{name}", description, tuple(modality.items()),
                      sequences, tuple(labels.items()), tuple(label_masks.items()), lesions, shape, spacing, z, noise)


MSD_PROFILES: dict[str, MSDProfile] = {p.key: p for p in [
    _p("spleen", "spleen", 9, "Spleen", "Spleen segmentation, portal-venous CT", {0: "CT"}, ("ct",),
       {0: "background", 1: "spleen"}, {1: "spleen"}, (), (64, 64, 24), (4.8, 4.8, 12.0), 40.0, 14.0),
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
       (64, 64, 24), (5.0, 5.0, 15.0), -110.0, 14.0),
    _p("heart", "la", 2, "Heart", "Left atrium segmentation, bSSFP-like cardiac MR", {0: "MRI"}, ("bssfp",),
       {0: "background", 1: "left atrium"}, {1: "left_atrium"}, (), (56, 56, 32), (4.0, 4.0, 5.0), 235.0, 25.0),
    _p("prostate", "prostate", 5, "Prostate", "Prostate zone segmentation, multiparametric MR (T2, ADC)",
       {0: "T2", 1: "ADC"}, ("t2", "adc"), {0: "background", 1: "PZ", 2: "TZ"}, {1: "prostate_pz", 2: "prostate_tz"},
       (), (56, 56, 24), (2.8, 2.8, 8.4), -370.0, 30.0),
]}


# ----------------------------------------------------------------------------- geometry
class _Grid:
    """A canonical RAS voxel grid of shape (X, Y, Z).

    ``spacing`` is the real voxel size (mm, goes into the affine). The phantom is drawn in
    *anatomy* millimetres: world = ``scale`` * anatomy, so ``step = spacing / scale`` is the voxel
    size in anatomy mm and ``x, y, z`` (sparse, broadcastable) are anatomy coordinates of the voxel
    centres. ``scale`` is 1 at a profile's default field of view.
    """

    def __init__(self, shape, spacing, centre, scale=(1.0, 1.0, 1.0)):
        self.shape = tuple(int(s) for s in shape)
        self.spacing = np.asarray(spacing, float)
        self.scale = np.asarray(scale, float)
        self.step = self.spacing / self.scale
        self.origin = np.asarray(centre, float) - (np.asarray(self.shape) - 1) / 2 * self.step
        axes = [self.origin[i] + np.arange(self.shape[i]) * self.step[i] for i in range(3)]
        self.x, self.y, self.z = np.meshgrid(*axes, indexing="ij", sparse=True)

    @property
    def affine(self) -> np.ndarray:
        """Voxel index -> world mm (RAS), columns scaled by the spacing."""
        a = np.diag([*self.spacing, 1.0])
        a[:3, 3] = self.origin * self.scale
        return a

    def point(self, ijk) -> np.ndarray:
        """Anatomy coordinates (mm) of voxel ``ijk``."""
        return self.origin + np.asarray(ijk, float) * self.step


def _smooth_field(rng, shape, sigma_vox, coarse=4):
    """Zero-mean unit-std smooth random field of ``shape`` (X, Y, Z).

    Noise is filtered on a grid ``coarse`` times smaller, then zoomed up (cheap for large sigma).
    """
    small = tuple(max(2, int(np.ceil(s / coarse))) for s in shape)
    f = ndimage.gaussian_filter(rng.standard_normal(small), sigma=max(sigma_vox / coarse, 0.5), mode="wrap")
    if small != tuple(shape):
        f = ndimage.zoom(f, [s / m for s, m in zip(shape, small)], order=1, grid_mode=True, mode="grid-wrap")
        f = f[: shape[0], : shape[1], : shape[2]]
    return ((f - f.mean()) / (f.std() + 1e-8)).astype(np.float32)


# ----------------------------------------------------------------------------- phantom
class _Phantom:
    """Paints tissue classes and named structure masks of one patient on a :class:`_Grid`."""

    def __init__(self, grid: _Grid, rng: np.random.Generator):
        self.g, self.rng = grid, rng
        self.scale = rng.uniform(0.9, 1.1)  # patient size
        self.wobble = _smooth_field(rng, grid.shape, sigma_vox=6)  # shared smooth perturbation
        self.tissue = np.full(grid.shape, T["air"], np.uint8)
        self.masks: dict[str, np.ndarray] = {}

    # --- ingredients
    def jit(self, c, mm=8.0):
        """A nominal position (mm) for this patient: scaled by body size, moved by up to ``mm``."""
        return np.asarray(c, float) * self.scale + self.rng.uniform(-mm, mm, 3)

    def ellipsoid(self, centre, radii, angle_deg=0.0, wobble=0.15, at=None):
        """Organ-like blob: implicit ellipsoid ``|R (p - c) / r|^2 + wobble * w(p) < 1``.

        Random radii (+-15 %), in-plane rotation (+-12 degrees) and centre (``jit(centre)``, or
        exactly ``at`` when given); ``w`` is the smooth random field, so the level set is irregular.
        """
        g = self.g
        c = self.jit(centre) if at is None else np.asarray(at, float)
        r = np.asarray(radii, float) * self.scale * self.rng.uniform(0.85, 1.15, 3)
        a = np.deg2rad(angle_deg + self.rng.uniform(-12, 12))
        dx, dy, dz = g.x - c[0], g.y - c[1], g.z - c[2]
        u = np.cos(a) * dx + np.sin(a) * dy
        v = -np.sin(a) * dx + np.cos(a) * dy
        return (u / r[0]) ** 2 + (v / r[1]) ** 2 + (dz / r[2]) ** 2 + wobble * self.wobble < 1.0

    def tube(self, points, radius):
        """Voxels within ``radius`` mm of a polyline through ``points`` (mm).

        Returns (mask, distance to the centre line in mm, arc length along the line in mm).
        """
        g = self.g
        p = np.asarray(points, float)
        best = np.full(g.shape, np.inf)
        arc = np.zeros(g.shape)
        run = 0.0
        for a, b in zip(p[:-1], p[1:]):
            ab = b - a
            length = float(np.linalg.norm(ab))
            t = np.clip(((g.x - a[0]) * ab[0] + (g.y - a[1]) * ab[1] + (g.z - a[2]) * ab[2]) / length**2, 0, 1)
            d = np.sqrt((g.x - a[0] - t * ab[0]) ** 2 + (g.y - a[1] - t * ab[1]) ** 2 + (g.z - a[2] - t * ab[2]) ** 2)
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

    def lesion_inside(self, region, radius_mm, min_voxels=MIN_LESION_VOXELS, max_fraction=0.4):
        """A lobulated sphere centred deep inside ``region`` and clipped to it (tumour / nodule).

        The radius is ``radius_mm`` (+-25 %), grown if needed so the lesion has at least
        ``min_voxels`` voxels, and shrunk so it never takes more than ``max_fraction`` of the region
        (the organ label keeps voxels too). Never empty when the region is not.
        """
        g = self.g
        n = int(region.sum())
        if n == 0:
            return np.zeros(g.shape, bool)
        depth = ndimage.distance_transform_edt(region, sampling=g.step)
        deep = region & (depth >= np.quantile(depth[region], 0.5))
        idx = np.argwhere(deep)
        centre_vox = idx[self.rng.integers(len(idx))]
        c = g.point(centre_vox)
        r = radius_mm * self.rng.uniform(0.8, 1.25)
        score = np.sqrt((g.x - c[0]) ** 2 + (g.y - c[1]) ** 2 + (g.z - c[2]) ** 2) + 0.15 * r * self.wobble
        inside = np.sort(score[region])
        most = max(1, int(max_fraction * n))
        least = min(max(1, min_voxels), most)
        r = min(max(r, inside[least - 1] + 1e-6), inside[most - 1] + 1e-6)
        lesion = (score < r) & region
        lesion[tuple(centre_vox)] = True
        return lesion

    # --- the body
    def build(self, lesions: tuple[str, ...]) -> None:
        g, ph = self.g, self
        ax, ay = 155.0 * self.scale, 112.0 * self.scale
        shape_xy = np.broadcast_to((g.x / ax) ** 2 + ((g.y - 5) / ay) ** 2, g.shape[:2] + (1,))
        body = shape_xy + 0.04 * self.wobble < 1.0  # elliptic cylinder
        inner = (g.x / (ax - 16)) ** 2 + ((g.y - 5) / (ay - 16)) ** 2 + 0.04 * self.wobble < 1.0  # inside the fat layer
        ph.paint(body, "fat")
        ph.paint(inner & body, "visceral")
        ph.paint(self.ellipsoid((40, -80, 0), (30, 22, 900)) | self.ellipsoid((-40, -80, 0), (30, 22, 900)), "muscle", body)
        spine = self.ellipsoid((0, -62, 0), (17, 17, 900), wobble=0.05)
        ph.paint(spine, "bone", body)
        aorta = self.ellipsoid((18, -38, 0), (11, 11, 900), wobble=0.02) & (g.z < 300)
        ph.paint(aorta, "blood", body)
        # thorax: lungs, heart (myocardium, ventricular blood pool), left atrium
        lungs = (self.ellipsoid((78, 0, 260), (62, 80, 170)) | self.ellipsoid((-78, 0, 260), (62, 80, 170))) & inner & ~spine
        heart = self.ellipsoid((-20, 30, 230), (62, 48, 58))
        ph.paint(lungs & ~heart, "lung")
        ph.paint(heart, "myocardium", body)
        ph.paint(self.ellipsoid((-20, 32, 225), (44, 32, 42)), "blood", heart)
        self.masks["left_atrium"] = ph.paint(self.ellipsoid((-8, -2, 262), (26, 17, 19), wobble=0.1), "blood", body)
        self.masks["lung"] = self.tissue == T["lung"]
        # upper abdomen: liver (patient right), spleen (left, posterior), stomach, kidneys, pancreas
        below_lung = ~self.masks["lung"] & ~heart
        liver = ph.paint(self.ellipsoid((72, 12, 60), (78, 82, 72), angle_deg=-15), "liver", body & below_lung & ~spine & ~aorta)
        spleen = ph.paint(self.ellipsoid((-88, -32, 70), (30, 46, 52), angle_deg=25), "spleen",
                          body & below_lung & ~liver & ~spine)
        stomach = self.ellipsoid((-45, 32, 65), (45, 34, 45)) & body & below_lung & ~liver & ~spleen
        ph.paint(stomach, "bowel_wall")
        ph.paint(ndimage.binary_erosion(stomach, iterations=1) & (g.y > 40), "gas")
        for side in (1, -1):
            ph.paint(self.ellipsoid((side * 66, -42, 0), (24, 26, 52)), "kidney", body & ~liver & ~spleen & ~spine)
        pancreas, _, _ = self.tube([self.jit((45, 2, 18), 5), self.jit((-5, 8, 25), 5), self.jit((-72, -18, 38), 5)],
                                   13.0 * self.scale)
        pancreas = ph.paint(pancreas, "pancreas", body & ~liver & ~spleen & ~stomach & ~aorta & ~spine)
        self.masks.update(liver=liver, spleen=spleen, pancreas=pancreas)
        # colon frame: ascending, transverse, descending, sigmoid (gas lumen, soft-tissue wall)
        path = [self.jit(p, 6) for p in ((72, 25, -170), (72, 25, -10), (40, 45, 5), (-40, 45, 5), (-72, 22, -10),
                                          (-72, 22, -170), (-20, 10, -250), (0, -20, -300))]
        colon, dist, arc = self.tube(path, 21.0 * self.scale)
        colon &= body & ~liver & ~spleen & ~spine
        wall = colon & (dist > 15.0 * self.scale)
        ph.paint(colon, "gas")
        ph.paint(wall, "bowel_wall")
        self.masks["colon"] = colon
        # pelvis: bladder, prostate (TZ inside, PZ the posterior/peripheral shell), rectum, femoral heads
        ph.paint(self.ellipsoid((0, 35, -330), (42, 32, 32)), "fluid", body)
        gland = self.jit((0, -2, -372))
        prostate = self.ellipsoid(None, (24, 19, 22), wobble=0.1, at=gland) & body
        tz_centre = gland + np.array([0.0, 5.0, 2.0]) * self.scale + self.rng.uniform(-2, 2, 3)
        tz = self.ellipsoid(None, (15, 11, 16), wobble=0.08, at=tz_centre) & prostate
        ph.paint(prostate, "pz")
        ph.paint(tz, "tz")
        self.masks.update(prostate_pz=prostate & ~tz, prostate_tz=tz)
        rectum, _, _ = self.tube([(0, -32, -420), (0, -32, -340), (0, -20, -300)], 14.0 * self.scale)
        ph.paint(rectum & ~prostate, "bowel_wall", body)
        for side in (1, -1):
            ph.paint(self.ellipsoid((side * 92, 0, -385), (26, 26, 26), wobble=0.05), "bone", body)
        # lesions of this profile (always inside their organ region)
        if "liver_tumour" in lesions:
            tumour = self.lesion_inside(liver, self.rng.uniform(12, 20))
            for _ in range(self.rng.integers(0, 2)):
                tumour |= self.lesion_inside(liver & ~tumour, self.rng.uniform(8, 14), min_voxels=1, max_fraction=0.15)
            self.masks["liver_tumour"] = ph.paint(tumour, "tumour")
        if "pancreas_tumour" in lesions:
            self.masks["pancreas_tumour"] = ph.paint(self.lesion_inside(pancreas, self.rng.uniform(13, 17)), "tumour")
        if "lung_nodule" in lesions:
            nodule = self.lesion_inside(self.masks["lung"], self.rng.uniform(15, 22))
            if self.rng.random() < 0.3:  # a second, smaller nodule
                nodule |= self.lesion_inside(self.masks["lung"] & ~ndimage.binary_dilation(nodule, iterations=2),
                                             self.rng.uniform(9, 13), min_voxels=8, max_fraction=0.02)
            self.masks["lung_nodule"] = ph.paint(nodule, "nodule")
        if "colon_tumour" in lesions:
            self.masks["colon_tumour"] = ph.paint(self._colon_tumour(colon, wall, dist, arc), "tumour")

    def _colon_tumour(self, colon, wall, dist, arc, min_voxels=MIN_LESION_VOXELS):
        """Annular wall thickening (lumen narrowed to ~7 mm) over a 30-50 mm stretch of the colon,
        lengthened if needed to reach ``min_voxels``."""
        cand = colon & (dist > 7.0 * self.scale)
        if not cand.any():
            cand = wall if wall.any() else colon
        if not cand.any():
            return cand
        arcs = np.sort(arc[cand])
        want = min(min_voxels, len(arcs))
        k0 = min(int(self.rng.uniform(0.1, 0.7) * len(arcs)), len(arcs) - want)
        start = arcs[k0]
        stop = max(start + self.rng.uniform(30, 50), arcs[k0 + want - 1] + 1e-6)
        return cand & (arc >= start) & (arc < stop)


# ----------------------------------------------------------------------------- rendering
@dataclass
class RenderedCase:
    """One generated case in canonical RAS voxel order (nothing written yet).

    Attributes:
        image: float32, (X, Y, Z) for one channel or (X, Y, Z, C) for a 4D profile; CT in HU
            (clipped to [-1024, 3071], not yet rounded), MR in arbitrary positive units.
        label: (X, Y, Z) uint8 with the profile's label values.
        tissue: (X, Y, Z) uint8 tissue class index into :data:`TISSUES`.
        masks: named structure masks (X, Y, Z) bool (``"liver"``, ``"liver_tumour"``, ...); an organ
            mask includes its tumour.
        affine: 4x4 voxel -> world mm (RAS), before the random origin shift of the written file.
    """

    image: np.ndarray
    label: np.ndarray
    tissue: np.ndarray
    masks: dict
    affine: np.ndarray


def _case_geometry(profile: MSDProfile, rng, shape, spacing, spacing_jitter) -> _Grid:
    """Per-case grid: jittered in-plane spacing, voxel count keeping the field of view, FOV centre."""
    base_shape = np.asarray(shape if shape is not None else profile.base_shape, int)
    base_spacing = np.asarray(spacing if spacing is not None else profile.base_spacing, float)
    if base_shape.shape != (3,) or base_spacing.shape != (3,) or (base_shape < 1).any() or (base_spacing <= 0).any():
        raise ValueError(f"shape and spacing must be three positive values, got {tuple(base_shape)}, {tuple(base_spacing)}")
    fov = base_shape * base_spacing
    # the phantom follows the field of view: life-size at the profile's default FOV
    life = profile.fov_mm
    s_xy = float(np.sqrt(fov[0] * fov[1] / (life[0] * life[1])))
    scale = (s_xy, s_xy, float(fov[2] / life[2]))
    factor = rng.uniform(1 - spacing_jitter, 1 + spacing_jitter) if spacing_jitter > 0 else 1.0
    case_spacing = base_spacing * np.array([factor, factor, 1.0])
    case_shape = np.maximum(np.round(fov / case_spacing).astype(int), 8) if spacing_jitter > 0 else base_shape
    centre = np.array([0.0, 5.0, profile.fov_z_mm]) + rng.uniform(-10, 10, 3)
    return _Grid(case_shape, case_spacing, centre, scale)


def render_case(profile: MSDProfile, rng: np.random.Generator, shape=None, spacing=None, spacing_jitter=0.1,
                tissue_overrides: dict | None = None) -> RenderedCase:
    """Draw one case of ``profile`` on a canonical RAS grid (nothing is written).

    Args:
        profile: an :class:`MSDProfile`; rng: the case's generator (all randomness comes from it).
        shape, spacing, spacing_jitter: as for :func:`generate_msd_task`.
        tissue_overrides: ``{sequence: {tissue: (mean, texture amplitude)}}`` replacing entries of
            the profile's intensity tables for this case (``{"ct": {"spleen": (60, 10)}}``; used by
            :mod:`medxfer.data.synth.graded`); ``None`` (default) draws exactly the tables above.
            The random draws do not depend on it, so the anatomy is the same with or without.
    """
    grid = _case_geometry(profile, rng, shape, spacing, spacing_jitter)
    ph = _Phantom(grid, rng)
    ph.build(profile.lesions)
    texture = _smooth_field(rng, grid.shape, sigma_vox=1.5, coarse=2)
    noise_scale = rng.uniform(0.8, 1.25)  # scanner / dose variation
    gain = 1.0 if profile.is_ct else rng.uniform(0.75, 1.35)
    bias = np.exp(0.2 * _smooth_field(rng, grid.shape, sigma_vox=12))  # MR receive-coil bias field
    channels = []
    for seq in profile.sequences:
        table = {**_TABLES[seq], **((tissue_overrides or {}).get(seq) or {})}
        mean = np.array([table[t][0] for t in TISSUES], np.float32)
        amp = np.array([table[t][1] for t in TISSUES], np.float32)
        img = mean[ph.tissue] + amp[ph.tissue] * texture
        img = ndimage.gaussian_filter(img, sigma=0.6)  # partial-volume blur at tissue borders
        sigma = profile.noise * noise_scale * (1.0 if seq != "adc" else 4.0)
        if seq == "ct":
            img = np.clip(img + rng.normal(0, sigma, grid.shape), -1024, 3071)
        else:  # MR: gain, multiplicative bias field, Rician magnitude noise (non-negative)
            img = np.hypot(gain * img * bias + rng.normal(0, sigma, grid.shape), rng.normal(0, sigma, grid.shape))
        channels.append(img.astype(np.float32))
    image = channels[0] if len(channels) == 1 else np.stack(channels, axis=-1)
    label = np.zeros(grid.shape, np.uint8)
    for value, name in profile.label_masks:
        label[ph.masks[name]] = value
    return RenderedCase(image, label, ph.tissue, ph.masks, grid.affine)


# ----------------------------------------------------------------------------- writing
def _reorient(array: np.ndarray, affine: np.ndarray, codes) -> tuple[np.ndarray, np.ndarray]:
    """Store a canonical RAS array (3D, or 4D channel-last) in orientation ``codes``.

    Returns the reordered/flipped array and the affine that maps it to the same world points.
    """
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
    data = np.round(case.image).astype(np.int16) if profile.is_ct else case.image.astype(np.float32)
    data, new_affine = _reorient(data, affine, orientation)
    nib.save(_nifti(data, new_affine), image_path)
    if label_path is not None:
        label, _ = _reorient(case.label, affine, orientation)
        nib.save(_nifti(label, new_affine), label_path)


def generate_msd_task(out_dir, profile: str = "spleen", num_training: int = 6, num_test: int = 2,
                      shape: tuple[int, int, int] | None = None, spacing: tuple[float, float, float] | None = None,
                      spacing_jitter: float = 0.1, seed: int = 0, overwrite: bool = False) -> Path:
    """Write ``out_dir/TaskNN_Name/`` in the MSD layout and return that folder.

    Writes ``dataset.json``, ``imagesTr/<prefix>_<i>.nii.gz`` + ``labelsTr/<prefix>_<i>.nii.gz`` for
    cases 1..num_training, ``imagesTs/<prefix>_<i>.nii.gz`` for the next ``num_test`` cases, and one
    macOS junk file ``imagesTr/._<prefix>_1.nii.gz`` (not NIfTI, not listed) that loaders must ignore.
    Images: CT int16 HU, MR float32; 3D (X, Y, Z) or, for a 4D profile, (X, Y, Z, C) channel-last.
    Labels: uint8 (X, Y, Z), same affine. qform = sform = the affine (code 1), units mm.

    Args:
        out_dir: parent folder (created if missing).
        profile: key of :data:`MSD_PROFILES`.
        num_training / num_test: cases in ``imagesTr``+``labelsTr`` / ``imagesTs``.
        shape: base voxel shape (X, Y, Z); spacing: base spacing (mm). Defaults from the profile.
            Their product is the field of view; the phantom is scaled to it (life-size at the defaults).
        spacing_jitter: relative per-case jitter of the in-plane spacing (0 = the header spacing is
            exactly ``spacing`` and the shape exactly ``shape``); the voxel count follows so the
            field of view stays the same.
        seed: case ``i`` uses ``SeedSequence([seed, task_id, i])``: the same arguments give the same
            arrays, and adding cases does not change existing ones.
        overwrite: replace an existing non-empty task folder (otherwise ``FileExistsError``); only
            that task folder is replaced.

    The task is written into a hidden temporary folder beside ``TaskNN_Name`` and renamed to it
    when complete (:func:`medxfer.atomic.atomic_directory`): a full disk, an error or a kill leaves
    no task folder (or the previous one, untouched, with ``overwrite``), never one without
    ``dataset.json``. Write errors come as :class:`medxfer.atomic.WriteError` (one line, path and
    cause, e.g. ``no space left on device``).
    """
    if profile not in MSD_PROFILES:
        raise ValueError(f"unknown MSD profile {profile!r}; choose from {sorted(MSD_PROFILES)}")
    if num_training < 1 or num_test < 0:
        raise ValueError("num_training must be >= 1 and num_test >= 0")
    if not 0 <= spacing_jitter < 1:
        raise ValueError(f"spacing_jitter must be in [0, 1), got {spacing_jitter}")
    prof = MSD_PROFILES[profile]
    task_dir = Path(out_dir) / prof.folder
    if task_dir.exists() and (not task_dir.is_dir() or any(task_dir.iterdir())) and not overwrite:
        raise FileExistsError(f"{task_dir}: task folder exists and is not empty; pass overwrite=True "
                              "(--overwrite on the command line) to replace it")
    with atomic_directory(task_dir, overwrite=True) as tmp:  # an empty folder is replaced silently
        _write_task(tmp, prof, num_training, num_test, shape, spacing, spacing_jitter, seed)
    return task_dir


def _write_task(task_dir: Path, prof: MSDProfile, num_training: int, num_test: int, shape, spacing,
                spacing_jitter: float, seed: int) -> None:
    """The files of :func:`generate_msd_task` in ``task_dir`` (``dataset.json`` last)."""
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (task_dir / sub).mkdir(parents=True, exist_ok=True)

    training, test = [], []
    for i in range(1, num_training + num_test + 1):
        rng = np.random.default_rng(np.random.SeedSequence([seed, prof.task_id, i]))
        case = render_case(prof, rng, shape, spacing, spacing_jitter)
        orientation = _ORIENTATIONS[(i + prof.task_id) % len(_ORIENTATIONS)]
        shift = rng.uniform(-30, 30, 3)  # random origin offset (mm)
        name = f"{prof.prefix}_{i}.nii.gz"
        if i <= num_training:
            _write_case(prof, case, orientation, shift, task_dir / "imagesTr" / name, task_dir / "labelsTr" / name)
            training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        else:
            _write_case(prof, case, orientation, shift, task_dir / "imagesTs" / name, None)
            test.append(f"./imagesTs/{name}")
    # macOS AppleDouble resource fork, as found in the real MSD archives: loaders must ignore it
    (task_dir / "imagesTr" / f"._{prof.prefix}_1.nii.gz").write_bytes(
        b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        \x00\x02" + b"\x00" * 14)

    meta = {
        "name": prof.folder.split("_", 1)[1],
        "description": f"{prof.description}. SYNTHETIC data generated by medxfer (profile '{prof.key}', "
                       f"seed {seed}); not patient data.",
        "reference": "medxfer synthetic decathlon (medxfer.data.synth.msd), imitating the Medical Segmentation Decathlon",
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


def generate_msd(out_dir, profiles: list[str] | None = None, **kwargs) -> list[Path]:
    """:func:`generate_msd_task` for several profiles (``None``: all of :data:`MSD_PROFILES`, in order).

    ``kwargs`` go to every call (num_training, num_test, shape, spacing, spacing_jitter, seed,
    overwrite). Returns the task folders. Unknown profiles are rejected before anything is written.
    """
    keys = list(profiles) if profiles else list(MSD_PROFILES)
    unknown = [k for k in keys if k not in MSD_PROFILES]
    if unknown:
        raise ValueError(f"unknown MSD profile(s) {unknown}; choose from {sorted(MSD_PROFILES)}")
    return [generate_msd_task(out_dir, profile=k, **kwargs) for k in keys]
