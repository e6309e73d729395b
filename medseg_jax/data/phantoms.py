"""Synthetic 3D phantoms (CT abdomen, T1 MRI head, abdominal ultrasound), written as a Decathlon (MSD) dataset.

Each case is drawn from its own seed and is deterministic for that seed (on one NumPy build). Anatomy is built from
implicit shapes (ellipsoids, superellipsoids, tubes) evaluated at warped world coordinates in millimetres, so shapes,
sizes and positions vary between cases the way anatomy does. The structures to segment are defined by shape and
context, not by intensity: CT liver and spleen share an intensity range and are told apart by side and shape, the
aorta shares the kidney cortex's range, and unlabelled structures (inferior vena cava, bowel, deep brain nuclei,
brainstem, hepatic veins) look like labelled ones.

World coordinates follow nibabel's RAS+ convention: +x points to the patient's Right, +y to Anterior, +z to Superior.
So the liver (patient's right) lies at positive x, the spleen and the aorta at negative x. Every case is first built
on a RAS-ordered voxel grid and then stored in a voxel order of its own (RAS, LPS, or any permutation with flips),
about a third of them on an oblique grid, so that readers have to honour the affine.

A scanner profile (`SCANNERS`) renders a case the way another scanner or protocol would (intensity calibration, a
softer reconstruction kernel or thicker slices, more noise, CT streaks, a stronger MRI bias field) on top of the
case's own variation: datasets drawn with different profiles simulate sites whose images differ (federated training,
domain shift). The anatomy and labels of a seed do not depend on the profile.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from medseg_jax.errors import MedsegError
from medseg_jax.fileio import atomic_dir, write_json

MODALITIES = ("ct", "mri", "us")  # volumes (generate_case)
FRAME_MODALITIES = ("us2d",)  # 2D pictures (generate_frame), for write_demo_dataset

LABELS: dict[str, dict[int, str]] = {
    "ct": {0: "background", 1: "liver", 2: "spleen", 3: "kidney", 4: "aorta"},
    "mri": {0: "background", 1: "white_matter", 2: "grey_matter", 3: "ventricles", 4: "lesion"},
    "us": {0: "background", 1: "liver", 2: "gallbladder", 3: "portal_vein"},
}
LABELS["us2d"] = LABELS["us"]  # frames of the ultrasound phantoms

_MODALITY_NAMES = {"ct": "CT", "mri": "MRI", "us": "US", "us2d": "US"}
_DESCRIPTIONS = {
    "ct": "contrast-enhanced abdominal CT in Hounsfield units",
    "mri": "T1-weighted head MRI in arbitrary units with bias field and Rician noise",
    "us": "3D abdominal ultrasound (B-mode, log-compressed, roughly 0..1) with speckle and acoustic shadows",
    "us2d": "2D abdominal ultrasound frames (B-mode, 8-bit PNG, probe at the top) with speckle and acoustic shadows",
}

# Stored voxel orders are chosen per case; RAS and LPS (the DICOM order) are the common ones in practice.
_PLAIN_RAS_PROBABILITY = 0.35
_LPS_PROBABILITY = 0.25
_OBLIQUE_PROBABILITY = 1 / 3



@dataclass(frozen=True)
class Scanner:
    """How one scanner or protocol renders a phantom, applied to the drawn image (labels are unchanged).

    Intensities map to `gain * value + offset`; `blur_voxels` are Gaussian sigmas (a softer kernel in-plane, thicker
    slices along z); `noise` adds spatially correlated noise of that standard deviation; `streaks` (CT) adds streak
    artifacts of that amplitude radiating from the bone in each axial slice; `bias` (MRI) multiplies by one more
    smooth field of that maximum deviation. Offsets and noise are in Hounsfield units for CT and in units of the
    image's 99th percentile for MRI and ultrasound (whose scales are arbitrary).
    """
    description: str
    gain: float = 1.0
    offset: float = 0.0
    blur_voxels: tuple[float, float, float] = (0.0, 0.0, 0.0)
    noise: float = 0.0
    streaks: float = 0.0
    bias: float = 0.0


SCANNERS: dict[str, dict[str, Scanner]] = {
    "ct": {
        "reference": Scanner("the phantoms as drawn"),
        "soft-kernel": Scanner("a soft reconstruction kernel and thicker slices, calibrated 4% low and +40 HU",
                               gain=0.96, offset=40.0, blur_voxels=(0.9, 0.9, 1.3)),
        "low-dose": Scanner("a low-dose protocol: strong noise and streak artifacts", noise=35.0, streaks=80.0),
    },
    "mri": {
        "reference": Scanner("the phantoms as drawn"),
        "low-field": Scanner("a low-field scanner: more noise, a stronger bias field", noise=0.05, bias=0.3),
        "thick-slice": Scanner("a fast protocol with thick slices and another receive gain", gain=2.5,
                               blur_voxels=(0.3, 0.3, 1.5)),
    },
    "us": {
        "reference": Scanner("the phantoms as drawn"),
        "low-gain": Scanner("a lower overall gain and a brighter noise floor", gain=0.7, offset=0.06),
        "coarse": Scanner("a lower-frequency probe: coarser speckle and more noise", blur_voxels=(1.0, 0.6, 1.0),
                          noise=0.04),
    },
}


# ----------------------------------------------------------------------------------------------------------------
# Public API


def case_seed(dataset_seed: int, case_index: int) -> int:
    """The seed of case `case_index` in a dataset drawn with `dataset_seed`.

    Derived from both numbers (not from the number of cases), so case 3 is the same whether 5 or 20 are written.
    """
    return int(np.random.SeedSequence([dataset_seed, case_index]).generate_state(1)[0])


def generate_case(modality: str, seed: int, scanner: str = "reference") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One phantom as it is stored on disk: (image float32 (X,Y,Z), label uint8 (X,Y,Z), affine 4x4 float64).

    The arrays are in the case's own voxel order (possibly not RAS, possibly oblique); the affine maps voxel indices
    to RAS+ world millimetres. `scanner` names a profile of `SCANNERS[modality]`; anatomy, label and geometry depend
    on the seed alone.
    """
    _check_modality(modality)
    _check_integer("phantom seed", seed, minimum=0)
    profile = scanner_profile(modality, scanner)
    # A third child seeds the scanner's noise; the first two are those of the cases drawn before profiles existed.
    anatomy_seed, storage_seed, scanner_seed = np.random.SeedSequence(int(seed)).spawn(3)
    anatomy_rng = np.random.default_rng(anatomy_seed)
    builders = {"ct": _build_ct, "mri": _build_mri, "us": _build_us}
    ras_image, ras_label, grid = builders[modality](anatomy_rng)
    if profile != SCANNERS[modality]["reference"]:
        ras_image = _render_with(profile, modality, ras_image, grid, np.random.default_rng(scanner_seed))
    storage_rng = np.random.default_rng(storage_seed)
    # Where the anatomy centre sits in scanner coordinates differs between scans, so origins differ too.
    anatomy_centre_world = storage_rng.uniform([-40.0, -60.0, -400.0], [40.0, 60.0, 200.0])
    ras_affine = grid.ras_affine(anatomy_centre_world)
    axcodes = _random_axcodes(storage_rng)
    oblique_degrees = storage_rng.uniform(5.0, 20.0) if storage_rng.random() < _OBLIQUE_PROBABILITY else 0.0
    oblique_axis = _random_unit_vector(storage_rng)
    image, label, affine = _store_in_voxel_order(ras_image, ras_label, ras_affine, axcodes)
    if oblique_degrees:
        affine = _rotate_grid_about_its_centre(affine, image.shape, oblique_axis, oblique_degrees)
    return (np.ascontiguousarray(image, dtype=np.float32), np.ascontiguousarray(label, dtype=np.uint8),
            affine.astype(np.float64))


FRAME_SPACING_MM = 2.5  # the 2D frames' pixel size (lateral and depth)


def generate_frame(seed: int, scanner: str = "reference") -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """One 2D B-mode frame: (8-bit picture (rows = depth, columns = lateral), label uint8 of the same shape, (lateral,
    depth) mm per pixel). The frame is the plane of a 3D ultrasound phantom's beam (x lateral, y depth) through the
    slice that shows every structure best (the most classes, then the largest smallest one), the probe at the top."""
    _check_integer("phantom seed", seed, minimum=0)
    profile = scanner_profile("us", scanner)
    anatomy_seed, _, scanner_seed = np.random.SeedSequence(int(seed)).spawn(3)
    ras_image, ras_label, grid = _build_us(np.random.default_rng(anatomy_seed))
    if profile != SCANNERS["us"]["reference"]:
        ras_image = _render_with(profile, "us", ras_image, grid, np.random.default_rng(scanner_seed))
    counts = np.stack([(ras_label == c).sum(axis=(0, 1)) for c in range(1, len(LABELS["us"]))], axis=1)
    best = max(range(counts.shape[0]), key=lambda z: ((counts[z] > 0).sum(), counts[z].min(), counts[z].sum()))
    # RAS y grows towards the probe (anterior): rows from the probe down are y descending
    frame, frame_label = ras_image[:, ::-1, best].T, ras_label[:, ::-1, best].T
    # every frame on one pixel grid (the phantoms' in-plane spacing varies), as one probe setting gives
    zoom = (grid.spacing[1] / FRAME_SPACING_MM, grid.spacing[0] / FRAME_SPACING_MM)
    frame = ndimage.zoom(frame, zoom, order=1, mode="nearest", grid_mode=True)
    frame_label = ndimage.zoom(frame_label, zoom, order=0, mode="nearest", grid_mode=True)
    picture = np.round(255 * np.clip(frame, 0.0, 1.0)).astype(np.uint8)
    return picture, frame_label.astype(np.uint8), (FRAME_SPACING_MM, FRAME_SPACING_MM)


def scanner_profile(modality: str, scanner: str) -> Scanner:
    """The profile `scanner` of `modality`'s phantoms; an unknown name is a one-line error listing the known ones."""
    _check_modality(modality)
    profiles = SCANNERS[modality]
    if scanner not in profiles:
        raise MedsegError(f"unknown {modality} scanner profile {scanner!r}; choose one of {', '.join(profiles)}")
    return profiles[scanner]


def write_demo_dataset(out_dir, modality: str = "ct", num_train: int = 20, num_test: int = 5, seed: int = 0,
                       num_unlabelled: int = 0, scanner: str = "reference") -> Path:
    """Writes a Decathlon-layout dataset of phantoms into `out_dir` and returns `out_dir`.

    `out_dir` must not exist or be an empty folder. Everything is written into a temporary sibling folder that is
    renamed into place at the end, so an interrupted run leaves nothing half-written. Test cases continue the
    numbering after the training cases and come with labels (labelsTs) for evaluation; `num_unlabelled` more cases
    follow as images only (imagesUnlabelled/, dataset.json's "unlabelled" list), for pretraining. Every case is
    rendered with the `scanner` profile (`SCANNERS`).
    """
    if modality not in FRAME_MODALITIES:
        _check_modality(modality)
    profile = scanner_profile("us" if modality == "us2d" else modality, scanner)
    _check_integer("num_train", num_train, minimum=1)
    _check_integer("num_test", num_test, minimum=0)
    _check_integer("num_unlabelled", num_unlabelled, minimum=0)
    _check_integer("seed", seed, minimum=0)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise MedsegError(f"{out_dir} exists and is not a folder; writing the demo dataset there would overwrite it. "
                          f"Choose a new folder.")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise MedsegError(f"{out_dir} is not empty; writing the demo dataset there would overwrite it. "
                          f"Choose a new or empty folder.")

    prefix = modality
    training, test, unlabelled = [], [], []
    with atomic_dir(out_dir) as tmp:
        for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs") + (("imagesUnlabelled",) if num_unlabelled else ()):
            (tmp / sub).mkdir()
        spacing_2d = None
        for case_index in range(num_train + num_test + num_unlabelled):
            if modality == "us2d":  # PNG frames (pictures carry no spacing: dataset.json's spacing_2d does)
                image, label, spacing_2d = generate_frame(case_seed(seed, case_index), scanner)
                affine, file_name = None, f"{prefix}_{case_index:03d}.png"
            else:
                image, label, affine = generate_case(modality, case_seed(seed, case_index), scanner)
                file_name = f"{prefix}_{case_index:03d}.nii.gz"
            if case_index >= num_train + num_test:
                _save_file(image, affine, tmp / "imagesUnlabelled" / file_name)
                unlabelled.append(f"./imagesUnlabelled/{file_name}")
                continue
            is_test = case_index >= num_train
            image_dir, label_dir = ("imagesTs", "labelsTs") if is_test else ("imagesTr", "labelsTr")
            _save_file(image, affine, tmp / image_dir / file_name)
            _save_file(label, affine, tmp / label_dir / file_name)
            if is_test:
                test.append(f"./imagesTs/{file_name}")
            else:
                training.append({"image": f"./imagesTr/{file_name}", "label": f"./labelsTr/{file_name}"})
        channel = _MODALITY_NAMES[modality]
        write_json(tmp / "dataset.json", {
            "name": f"Demo{channel}",
            "description": f"Synthetic {_DESCRIPTIONS[modality]} phantoms made by medseg-jax "
                           f"(medseg_jax.data.phantoms, seed {int(seed)}"
                           + (f", scanner profile {scanner}: {profile.description}" if scanner != "reference" else "")
                           + "); not patient data.",
            "reference": "medseg_jax.data.phantoms",
            "tensorImageSize": "2D" if modality == "us2d" else "3D",
            "modality": {"0": channel},
            "channel_names": {"0": channel},
            "labels": {str(value): name for value, name in LABELS[modality].items()},
            "numTraining": int(num_train),
            "numTest": int(num_test),
            "file_ending": ".png" if modality == "us2d" else ".nii.gz",
            **({"spacing_2d": list(spacing_2d)} if spacing_2d else {}),
            "training": training,
            "test": test,
            **({"unlabelled": unlabelled} if unlabelled else {}),
        })
        # atomic_dir renames onto out_dir; an empty out_dir left by the user is removed only now, at the last moment.
        if out_dir.is_dir():
            out_dir.rmdir()
    return out_dir


# ----------------------------------------------------------------------------------------------------------------
# Grids, random fields and implicit shapes


@dataclass(frozen=True)
class _Grid:
    """An axis-aligned RAS voxel grid; `axes` are voxel-centre coordinates (mm) relative to the anatomy centre."""

    axes: tuple[np.ndarray, np.ndarray, np.ndarray]
    spacing: tuple[float, float, float]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(len(a) for a in self.axes)

    def mesh(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x, y, z = self.axes
        return x[:, None, None], y[None, :, None], z[None, None, :]

    def ras_affine(self, anatomy_centre_world: np.ndarray) -> np.ndarray:
        affine = np.diag([*map(float, self.spacing), 1.0])
        affine[:3, 3] = [float(a[0]) + c for a, c in zip(self.axes, anatomy_centre_world)]
        return affine


def _grid_around_anatomy(rng, field_of_view_mm, spacing_mm, centre_jitter_mm, centre_mm=(0.0, 0.0, 0.0)) -> _Grid:
    """A grid covering `field_of_view_mm` centred at `centre_mm` (relative to the anatomy) give or take a few mm."""
    shape = np.maximum(np.round(np.asarray(field_of_view_mm) / spacing_mm).astype(int), 8)
    offset = np.asarray(centre_mm) + rng.normal(0.0, centre_jitter_mm)
    axes = tuple(((np.arange(n) - (n - 1) / 2) * s + o).astype(np.float32)
                 for n, s, o in zip(shape, spacing_mm, offset))
    return _Grid(axes, tuple(float(s) for s in spacing_mm))


def _smooth_noise(rng, grid: _Grid, correlation_mm: float) -> np.ndarray:
    """A smooth Gaussian random field with unit variance and features about `correlation_mm` across.

    Random coefficients on a coarse lattice are spread by separable Gaussian kernels: three small matrix products
    instead of a full-volume filter, and features keep their size in millimetres whatever the voxel spacing.
    """
    kernels = []
    for coords in grid.axes:
        lattice = np.arange(coords.min() - 1.5 * correlation_mm, coords.max() + 1.5 * correlation_mm + 1e-3,
                            correlation_mm)
        weights = np.exp(-0.5 * ((coords[:, None] - lattice[None, :]) / (0.75 * correlation_mm)) ** 2)
        # Unit row norm makes every voxel's variance exactly 1, edges included.
        weights /= np.linalg.norm(weights, axis=1, keepdims=True)
        kernels.append(weights.astype(np.float32))
    coefficients = rng.standard_normal(tuple(k.shape[1] for k in kernels), dtype=np.float32)
    field = np.tensordot(kernels[0], coefficients, axes=(1, 0))  # (X, b, c)
    field = np.tensordot(field, kernels[1], axes=(1, 1))  # (X, c, Y)
    return np.tensordot(field, kernels[2], axes=(1, 1))  # (X, Y, Z)


def _warped_coordinates(rng, grid: _Grid, scales: Sequence[tuple[float, float]]):
    """World coordinates plus a smooth random displacement, one (correlation_mm, amplitude_mm) term per scale.

    Shapes evaluated at warped coordinates are no longer perfect ellipsoids, and neighbours bend together.
    """
    warped = [np.broadcast_to(c, grid.shape).astype(np.float32) for c in grid.mesh()]
    for correlation_mm, amplitude_mm in scales:
        for axis in range(3):
            warped[axis] += np.float32(amplitude_mm) * _smooth_noise(rng, grid, correlation_mm)
    return tuple(warped)


def _rotation(axis: str, degrees: float) -> np.ndarray:
    return Rotation.from_euler(axis, degrees, degrees=True).as_matrix()


def _random_unit_vector(rng) -> np.ndarray:
    v = rng.standard_normal(3)
    return v / np.linalg.norm(v)


def _small_rotation(rng, max_degrees: float) -> np.ndarray:
    return Rotation.from_rotvec(_random_unit_vector(rng) * np.deg2rad(rng.uniform(-max_degrees, max_degrees))
                                ).as_matrix()


def _local(q, centre, rotation=None):
    """Coordinates in a shape's own frame; `rotation`'s columns are the shape's axes in world coordinates."""
    d = [q[k] - np.float32(centre[k]) for k in range(3)]
    if rotation is None:
        return d
    r = np.asarray(rotation, dtype=np.float32)
    return [r[0, j] * d[0] + r[1, j] * d[1] + r[2, j] * d[2] for j in range(3)]


def _ellipsoid_radius(local, radii, exponent: float = 2.0) -> np.ndarray:
    """Normalised radius of a (super)ellipsoid: below 1 inside, 1 on the surface."""
    if exponent == 2.0:
        return np.sqrt(sum((c / np.float32(r)) ** 2 for c, r in zip(local, radii)))
    total = sum(np.abs(c / np.float32(r)) ** np.float32(exponent) for c, r in zip(local, radii))
    return total ** np.float32(1.0 / exponent)


def _segment_distance(q, start, end) -> np.ndarray:
    """Distance (mm) from each point to the segment start-end: a capsule is `distance < radius`."""
    start, end = np.asarray(start, np.float32), np.asarray(end, np.float32)
    direction = end - start
    d = [q[k] - start[k] for k in range(3)]
    t = np.clip(sum(d[k] * direction[k] for k in range(3)) / np.float32(direction @ direction), 0.0, 1.0)
    return np.sqrt(sum((d[k] - t * direction[k]) ** 2 for k in range(3)))


def _polyline_distance(q, points) -> np.ndarray:
    return np.minimum.reduce([_segment_distance(q, a, b) for a, b in zip(points[:-1], points[1:])])


class _Canvas:
    """An image and its label map painted in order: later structures cover earlier ones, as in the body."""

    def __init__(self, shape, background: float):
        self.image = np.full(shape, background, dtype=np.float32)
        self.label = np.zeros(shape, dtype=np.uint8)

    def paint(self, mask, value, label: int = 0):
        self.image[mask] = value[mask] if isinstance(value, np.ndarray) else value
        self.label[mask] = label


def _rim(mask: np.ndarray) -> np.ndarray:
    """The voxels just outside `mask`: painted with fat first, they keep an organ's outline visible, as the fat
    planes between abdominal organs do."""
    return ndimage.binary_dilation(mask) & ~mask


def _correlated_noise(rng, shape, sigma_voxels: float) -> np.ndarray:
    """Unit-variance Gaussian noise with a little spatial correlation, as reconstructed scanner noise has."""
    noise = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma_voxels)
    return noise / noise.std()


# ----------------------------------------------------------------------------------------------------------------
# CT abdomen (Hounsfield units, portal-venous-like contrast)


def _build_ct(rng):
    in_plane = rng.uniform(3.0, 4.0)
    spacing = np.array([in_plane, in_plane, rng.uniform(4.0, 6.0)])
    fov = rng.uniform([300.0, 240.0, 180.0], [350.0, 280.0, 220.0])
    grid = _grid_around_anatomy(rng, fov, spacing, centre_jitter_mm=[6.0, 5.0, 8.0], centre_mm=[0.0, 0.0, 15.0])
    q = _warped_coordinates(rng, grid, [(70.0, rng.uniform(3.0, 6.0)), (30.0, rng.uniform(1.5, 3.0))])
    x, y, z = q
    texture = _smooth_noise(rng, grid, 12.0)  # organ parenchyma is not perfectly uniform
    canvas = _Canvas(grid.shape, -1000.0)

    # Body wall: a slightly squarish cross-section, subcutaneous fat, a muscle layer, then the abdominal cavity.
    body_a, body_b = rng.uniform(0.40, 0.46) * fov[0], rng.uniform(0.38, 0.43) * fov[1]
    fat_thickness = rng.uniform(10.0, 25.0)
    wall_thickness = rng.uniform(7.0, 12.0)

    def cross_section(shrink_mm):
        return _ellipsoid_radius([x, y], [body_a - shrink_mm, body_b - shrink_mm], exponent=2.3)

    body = cross_section(0.0) < 1
    inside_fat = cross_section(fat_thickness) < 1
    inside_wall = cross_section(fat_thickness + wall_thickness) < 1
    cavity = cross_section(fat_thickness + wall_thickness + rng.uniform(5.0, 9.0)) < 1  # properitoneal fat
    muscle_hu = rng.uniform(45.0, 60.0)
    fat_hu = rng.uniform(-110.0, -85.0)

    # CT table under the patient: dense, curved, unlabelled.
    table_y = -body_b - rng.uniform(4.0, 12.0)
    table = (np.abs(y - (table_y - 0.002 * x ** 2)) < 3.0) & (np.abs(x) < 0.8 * body_a)
    canvas.paint(table, rng.uniform(100.0, 250.0))
    canvas.paint(body, fat_hu + 8.0 * texture)
    canvas.paint(inside_fat, muscle_hu + 5.0 * texture)
    canvas.paint(inside_wall, fat_hu + 10.0 + 12.0 * texture)  # visceral fat with some stranding

    # Spine landmarks first: other organs are placed relative to the vertebral body.
    vertebra_y = -body_b + 0.6 * fat_thickness + rng.uniform(72.0, 82.0)
    canal_y = vertebra_y - rng.uniform(24.0, 28.0)
    vertebra_radii = np.array([rng.uniform(18.0, 22.0), rng.uniform(14.0, 17.0)])
    level_period, level_phase = rng.uniform(30.0, 36.0), rng.uniform(0.0, 36.0)
    level_position = np.mod(z - level_phase, level_period)

    # Back muscles and psoas (unlabelled soft tissue with the organs' intensity range).
    for side in (-1.0, 1.0):
        paraspinal = _ellipsoid_radius(_local(q, [side * rng.uniform(34.0, 42.0), canal_y - 18.0, 0.0])[:2],
                                       [rng.uniform(24.0, 30.0), rng.uniform(18.0, 24.0)]) < 1
        canvas.paint(paraspinal & inside_fat, muscle_hu + 5.0 * texture)
        psoas_top = rng.uniform(-10.0, 20.0)
        psoas_radius = np.clip(5.0 + 0.2 * (psoas_top - z), 0.0, 24.0)
        psoas_x = side * (vertebra_radii[0] + 0.8 * psoas_radius + 2.0)
        psoas = ((x - psoas_x) ** 2 + (y - vertebra_y - 4.0) ** 2 < psoas_radius ** 2) & (z < psoas_top)
        canvas.paint(psoas & inside_wall, muscle_hu + 5.0 * texture)

    # Bowel: tortuous tubes where two smooth fields are both near zero; lumen with fluid or gas.
    bowel_region = (_ellipsoid_radius(_local(q, [0.0, rng.uniform(10.0, 30.0), rng.uniform(-80.0, -55.0)]),
                                      [0.9 * body_a, 0.8 * body_b, rng.uniform(70.0, 90.0)]) < 1)
    bowel_region &= cavity & (y > vertebra_y + 20.0)
    bowel_correlation = rng.uniform(13.0, 17.0)
    g1, g2 = _smooth_noise(rng, grid, bowel_correlation), _smooth_noise(rng, grid, bowel_correlation)
    tube = np.sqrt(g1 ** 2 + g2 ** 2)
    gas = _smooth_noise(rng, grid, 20.0) > rng.uniform(0.3, 0.8)
    wall_radius = rng.uniform(0.9, 1.1)
    canvas.paint(bowel_region & (tube < wall_radius), rng.uniform(35.0, 60.0) + 6.0 * texture)
    lumen = bowel_region & (tube < 0.6 * wall_radius)
    canvas.paint(lumen, rng.uniform(5.0, 25.0))
    canvas.paint(lumen & gas, -950.0)

    # Colon: ascending (right) and descending (left) along z, faeces mottled with gas.
    colon_top = rng.uniform(-20.0, 10.0)
    faeces = np.where(_smooth_noise(rng, grid, 10.0) > 0.2, -900.0, -40.0 + 30.0 * texture).astype(np.float32)
    cavity_a = body_a - fat_thickness - wall_thickness
    for side in (-1.0, 1.0):
        colon_radius = rng.uniform(15.0, 21.0)
        colon_r = np.sqrt((x - side * (cavity_a - colon_radius - rng.uniform(5.0, 12.0))) ** 2
                          + (y - rng.uniform(-10.0, 15.0)) ** 2)
        colon = (z < colon_top) & cavity
        canvas.paint(colon & (colon_r < colon_radius), rng.uniform(35.0, 55.0))
        canvas.paint(colon & (colon_r < colon_radius - 3.0), faeces)

    # Stomach (left upper quadrant): wall, fluid, and gas rising to the anterior (non-dependent, patient supine).
    stomach_centre = [-rng.uniform(50.0, 65.0), rng.uniform(0.0, 20.0), rng.uniform(30.0, 50.0)]
    stomach_local = _local(q, stomach_centre, _small_rotation(rng, 15.0))
    stomach_radii = rng.uniform([35.0, 28.0, 40.0], [45.0, 38.0, 50.0])
    stomach_r = _ellipsoid_radius(stomach_local, stomach_radii)
    wall_fraction = rng.uniform(4.0, 6.0) / stomach_radii.min()
    canvas.paint((stomach_r < 1) & cavity, rng.uniform(40.0, 70.0) + 5.0 * texture)
    stomach_lumen = (stomach_r < 1 - wall_fraction) & cavity
    canvas.paint(stomach_lumen, rng.uniform(0.0, 20.0) + 3.0 * texture)
    air_level = stomach_centre[1] + rng.uniform(0.1, 0.5) * stomach_radii[1]
    canvas.paint(stomach_lumen & (y > air_level), -960.0)

    # Liver (label 1): a wedge, thick on the right and thinning towards the left lobe, which lies anterior and
    # higher; brighter vessels inside are still liver.
    liver_radii = rng.uniform([95.0, 70.0, 65.0], [110.0, 80.0, 75.0]) * rng.uniform(0.85, 1.15)
    liver_centre = np.array([rng.uniform(30.0, 45.0), rng.uniform(0.0, 12.0), rng.uniform(35.0, 50.0)])
    liver_local = _local(q, liver_centre, _small_rotation(rng, 8.0))
    towards_right = np.clip((liver_local[0] / np.float32(liver_radii[0]) + 1.0) / 2.0, 0.0, 1.0)
    taper = np.float32(0.3) + np.float32(0.7) * np.sqrt(towards_right)
    left_shift = 1.0 - towards_right
    liver_r = _ellipsoid_radius([liver_local[0], (liver_local[1] - rng.uniform(15.0, 30.0) * left_shift) / taper,
                                 (liver_local[2] - rng.uniform(5.0, 15.0) * left_shift) / taper],
                                liver_radii, exponent=2.4)
    liver = (liver_r < 1) & cavity
    liver_hu = rng.uniform(55.0, 65.0)
    visceral_fat = fat_hu + 10.0 + 12.0 * texture
    canvas.paint(_rim(liver) & cavity, visceral_fat)
    canvas.paint(liver, liver_hu + 4.0 * texture, label=1)
    h1, h2 = _smooth_noise(rng, grid, 35.0), _smooth_noise(rng, grid, 35.0)
    hepatic_vessels = liver & (liver_r < 0.9) & (np.sqrt(h1 ** 2 + h2 ** 2) < rng.uniform(0.10, 0.14))
    canvas.paint(hepatic_vessels, rng.uniform(110.0, 140.0), label=1)

    # Lung bases above the diaphragm (the right dome sits on the liver), with small vessels; unlabelled.
    diaphragm_gap = rng.uniform(4.0, 8.0)
    mediastinum_half_width = rng.uniform(38.0, 45.0)
    vessel_a, vessel_b = _smooth_noise(rng, grid, 12.0), _smooth_noise(rng, grid, 12.0)
    for side in (-1.0, 1.0):
        lung_radii = rng.uniform([60.0, 75.0, 90.0], [70.0, 85.0, 110.0])
        lung_bottom = liver_centre[2] + liver_radii[2] * (0.75 if side > 0 else 0.55) + diaphragm_gap
        lung_centre = [side * rng.uniform(60.0, 75.0), rng.uniform(-35.0, -20.0), lung_bottom + lung_radii[2]]
        lung_r = _ellipsoid_radius(_local(q, lung_centre, _small_rotation(rng, 8.0)), lung_radii)
        lateral = side * x > mediastinum_half_width  # the aorta, oesophagus and spine stay out of the lungs
        canvas.paint((lung_r < 1 + diaphragm_gap / lung_radii[2]) & inside_wall & lateral, muscle_hu + 5.0 * texture)
        lung = (lung_r < 1) & inside_wall & (side * x > mediastinum_half_width + diaphragm_gap)
        canvas.paint(lung, rng.uniform(-880.0, -820.0) + 15.0 * texture)
        canvas.paint(lung & (np.sqrt(vessel_a ** 2 + vessel_b ** 2) < 0.25), rng.uniform(-100.0, 20.0))

    # Gallbladder: fluid under the liver's inferior-anterior surface; not liver.
    gallbladder_centre = liver_centre + [rng.uniform(5.0, 20.0), rng.uniform(25.0, 40.0), -rng.uniform(40.0, 55.0)]
    gallbladder = _ellipsoid_radius(_local(q, gallbladder_centre, _small_rotation(rng, 20.0)),
                                    rng.uniform([12.0, 14.0, 25.0], [18.0, 20.0, 35.0])) < 1
    canvas.paint(gallbladder & cavity, rng.uniform(0.0, 20.0))

    # Spleen (label 2): a crescent against the left posterolateral wall, in the liver's intensity range.
    spleen_scale = rng.uniform(0.85, 1.15)
    spleen_radii = rng.uniform([24.0, 45.0, 42.0], [30.0, 55.0, 52.0]) * spleen_scale
    wall_angle = np.deg2rad(rng.uniform(35.0, 50.0))  # from the left lateral direction towards posterior
    cavity_b = body_b - fat_thickness - wall_thickness
    spleen_centre = [-(cavity_a - spleen_radii[0] - 4.0) * np.cos(wall_angle),
                     -(cavity_b - spleen_radii[0] - 4.0) * np.sin(wall_angle), rng.uniform(30.0, 50.0)]
    # Local x points out of the body through the spleen's convex surface.
    spleen_rotation = _rotation("z", 180.0 + np.rad2deg(wall_angle)) @ _small_rotation(rng, 8.0)
    spleen_local = _local(q, spleen_centre, spleen_rotation)
    spleen_hilum = _ellipsoid_radius([spleen_local[0] + 1.35 * spleen_radii[0], spleen_local[1], spleen_local[2]],
                                     spleen_radii * [0.8, 0.9, 0.9])
    spleen = (_ellipsoid_radius(spleen_local, spleen_radii) < 1) & (spleen_hilum > 1) & cavity
    canvas.paint(_rim(spleen) & cavity, visceral_fat)
    canvas.paint(spleen, rng.uniform(45.0, 55.0) + 2.0 * texture, label=2)

    # Great vessels: aorta (label 4) anterior-left of the vertebral body; inferior vena cava (unlabelled) right of it.
    aorta_radius = rng.uniform(11.0, 13.5)
    aorta_x0 = -rng.uniform(14.0, 22.0)
    aorta_y0 = vertebra_y + vertebra_radii[1] + aorta_radius + rng.uniform(4.0, 8.0)  # a fat plane in between
    aorta_phase = rng.uniform(0.0, 2 * np.pi)
    aorta_x = aorta_x0 + 3.0 * np.sin(z / 80.0 + aorta_phase)
    aorta_y = aorta_y0 + 3.0 * np.cos(z / 90.0 + aorta_phase)
    ivc_x = rng.uniform(18.0, 26.0)
    ivc_y = vertebra_y + vertebra_radii[1] + rng.uniform(8.0, 12.0)

    # Kidneys (label 3, both sides): bean shapes with cortex, medulla and a fatty sinus at the hilum.
    cortex_hu = rng.uniform(140.0, 160.0)
    medulla_hu = cortex_hu - rng.uniform(25.0, 40.0)
    ivc_hu = rng.uniform(105.0, 125.0)
    left_kidney_z = rng.uniform(-20.0, 0.0)
    for side, kidney_z in ((1.0, left_kidney_z - rng.uniform(5.0, 15.0)), (-1.0, left_kidney_z)):
        radii = rng.uniform([22.0, 26.0, 48.0], [27.0, 32.0, 58.0]) * rng.uniform(0.85, 1.15)
        centre = np.array([side * rng.uniform(55.0, 68.0), vertebra_y + rng.uniform(-8.0, 4.0), kidney_z])
        # Local x points laterally (away from the hilum); the hilum faces antero-medially; the upper pole is medial.
        base = np.diag([side, side, 1.0])
        rotation = (_rotation("y", -side * rng.uniform(10.0, 20.0)) @ _rotation("z", -side * rng.uniform(25.0, 40.0))
                    @ base @ _small_rotation(rng, 5.0))
        local = _local(q, centre, rotation)
        kidney_r = _ellipsoid_radius(local, radii)
        hilum_r = _ellipsoid_radius([local[0] + 0.9 * radii[0], local[1], local[2]], radii * [0.55, 0.4, 0.35])
        parenchyma = (kidney_r < 1) & (hilum_r > 1) & inside_wall
        canvas.paint(_rim(kidney_r < 1) & inside_wall, visceral_fat)  # perirenal fat
        canvas.paint(parenchyma, cortex_hu + 6.0 * texture, label=3)
        canvas.paint(parenchyma & (kidney_r < 1 - rng.uniform(6.0, 8.0) / radii.min()),
                     medulla_hu + 6.0 * texture, label=3)
        sinus = (hilum_r < 1) & (kidney_r < 1.05) & inside_wall
        canvas.paint(sinus, -60.0 + 15.0 * texture)
        canvas.paint(sinus & (hilum_r < 0.55), rng.uniform(0.0, 20.0))  # renal pelvis, urine
        # Renal vein to the IVC; the left one passes in front of the aorta.
        hilum_point = centre + rotation @ np.array([-0.7 * radii[0], 0.0, 0.0])
        path = [hilum_point, [ivc_x, ivc_y, kidney_z + 10.0]]
        if side < 0:
            path.insert(1, [aorta_x0, aorta_y0 + aorta_radius + 6.0, kidney_z + 5.0])
        canvas.paint((_polyline_distance(q, path) < rng.uniform(4.0, 6.0)) & inside_wall, ivc_hu)

    ivc = _ellipsoid_radius([x - ivc_x, y - ivc_y], rng.uniform([11.0, 7.0], [15.0, 10.0])) < 1
    canvas.paint(ivc, ivc_hu + 3.0 * texture)
    aorta = (x - aorta_x) ** 2 + (y - aorta_y) ** 2 < aorta_radius ** 2
    canvas.paint(_rim(aorta) & inside_wall, visceral_fat)
    canvas.paint(aorta, rng.uniform(180.0, 210.0) + 3.0 * texture, label=4)

    # Spine: vertebral bodies with cortical rim and discs, canal, posterior elements (unlabelled bone).
    cancellous_hu, cortical_hu = rng.uniform(180.0, 300.0), rng.uniform(450.0, 700.0)
    disc = level_position < rng.uniform(6.0, 9.0)
    arch_level = (level_position > 10.0) & (level_position < level_period - 6.0)
    vertebra_r = _ellipsoid_radius([x, y - vertebra_y], vertebra_radii)
    canvas.paint((vertebra_r < 1) & ~disc, cortical_hu)
    canvas.paint((vertebra_r < 0.82) & ~disc, cancellous_hu + 30.0 * texture)
    canvas.paint((vertebra_r < 1) & disc, rng.uniform(70.0, 100.0))
    canal_r = np.sqrt(x ** 2 + (y - canal_y) ** 2)
    lamina = (canal_r < rng.uniform(14.0, 16.0)) & (y < canal_y + 4.0)
    spinous = _ellipsoid_radius([x, y - canal_y + 24.0], [5.0, 14.0]) < 1
    transverse = _ellipsoid_radius([np.abs(x) - 28.0, y - canal_y - 4.0], [16.0, 5.0]) < 1
    canvas.paint((lamina | spinous | transverse) & arch_level & inside_fat, cortical_hu - 50.0)
    canvas.paint(canal_r < rng.uniform(8.0, 9.5), rng.uniform(15.0, 35.0))

    # Lower ribs: arcs in the body wall, sloping down anteriorly; lower ribs end further back.
    rib_a = body_a - fat_thickness - 0.5 * wall_thickness
    rib_b = body_b - fat_thickness - 0.5 * wall_thickness
    ellipse_r = np.sqrt((x / rib_a) ** 2 + (y / rib_b) ** 2) + 1e-6
    gradient = np.sqrt((x / rib_a ** 2) ** 2 + (y / rib_b ** 2) ** 2) / ellipse_r + 1e-6
    radial_mm = (ellipse_r - 1) / gradient
    rib_z, rib_step = rng.uniform(70.0, 95.0), rng.uniform(22.0, 28.0)
    for rib in range(6):
        slope_z = rib_z - rib * rib_step - 0.35 * (y + rib_b)
        anterior_end = rib_b * (0.55 - 0.3 * rib)
        in_arc = (np.abs(x) > 30.0) & (y < anterior_end)
        rib_r = np.sqrt((radial_mm / 4.5) ** 2 + ((z - slope_z) / 5.5) ** 2)
        canvas.paint(in_arc & (rib_r < 1), cortical_hu + 50.0)
        canvas.paint(in_arc & (rib_r < 0.5), cancellous_hu + 50.0)

    # Partial volume (scanner point-spread function), then correlated noise, then the usual integer HU range.
    psf = rng.uniform(0.5, 0.8) * np.array([1.0, 1.0, rng.uniform(1.0, 1.2)])
    image = ndimage.gaussian_filter(canvas.image, psf)
    image += np.float32(rng.uniform(6.0, 12.0)) * _correlated_noise(rng, grid.shape, 0.5)
    image = np.clip(np.round(image), -1024.0, 3071.0).astype(np.float32)
    return image, canvas.label, grid


# ----------------------------------------------------------------------------------------------------------------
# MRI head (T1-weighted, arbitrary units)


def _build_mri(rng):
    in_plane = rng.uniform(2.2, 2.7)
    spacing = np.array([in_plane, in_plane, rng.uniform(2.8, 3.6)])
    fov = rng.uniform([180.0, 215.0, 175.0], [200.0, 235.0, 195.0])
    grid = _grid_around_anatomy(rng, fov, spacing, centre_jitter_mm=[4.0, 5.0, 5.0])
    q = _warped_coordinates(rng, grid, [(60.0, rng.uniform(2.0, 4.0)), (25.0, rng.uniform(1.0, 2.0))])
    x, y, z = q
    texture = _smooth_noise(rng, grid, 10.0)
    gain = rng.uniform(400.0, 1200.0)

    def tissue(value):  # tissue contrast varies a little between scanners and sequences
        return np.float32(gain * value * rng.uniform(0.94, 1.06))

    wm, gm, csf = tissue(1.0), tissue(0.72), tissue(0.16)
    canvas = _Canvas(grid.shape, 0.0)

    # Cranial cavity: a superellipsoid flatter below; scalp and skull are shells around it.
    cavity_radii = rng.uniform([63.0, 80.0, 60.0], [69.0, 88.0, 66.0]) * rng.uniform(0.92, 1.08)
    cavity_lower_z = rng.uniform(44.0, 52.0)

    def cavity_radius(offset_mm):
        radius_z = np.where(z > 0, cavity_radii[2], cavity_lower_z) + np.float32(offset_mm)
        return _ellipsoid_radius([x, y, z], [cavity_radii[0] + offset_mm, cavity_radii[1] + offset_mm, radius_z],
                                 exponent=2.2)

    skull_thickness, scalp_thickness = rng.uniform(5.5, 8.0), rng.uniform(4.0, 7.0)
    face = _ellipsoid_radius(_local(q, [0.0, 15.0, -60.0]), [cavity_radii[0] + 5.0, cavity_radii[1] + 12.0, 62.0]) < 1
    canvas.paint(face, tissue(0.6) + np.float32(0.08 * gain) * texture)
    head = cavity_radius(skull_thickness + scalp_thickness) < 1
    canvas.paint(head, tissue(1.05) + np.float32(0.06 * gain) * texture)  # scalp fat is bright on T1
    canvas.paint(cavity_radius(skull_thickness + 1.2) < 1, tissue(0.6))  # skin-side of periosteum and muscle
    canvas.paint(cavity_radius(skull_thickness) < 1, tissue(0.07))  # outer table
    canvas.paint(cavity_radius(skull_thickness - 1.8) < 1, tissue(0.5))  # diploe (marrow)
    canvas.paint(cavity_radius(1.5) < 1, tissue(0.07))  # inner table
    canvas.paint(cavity_radius(0.0) < 1, csf)

    # Orbits (fat, dark vitreous) and maxillary sinuses (air) in the face: structure, unlabelled.
    for side in (-1.0, 1.0):
        eye = [side * rng.uniform(29.0, 34.0), 0.8 * cavity_radii[1], -0.7 * cavity_lower_z]
        canvas.paint(_ellipsoid_radius(_local(q, eye), [17.0, 17.0, 14.0]) < 1, tissue(1.1))
        canvas.paint(_ellipsoid_radius(_local(q, eye), [11.5, 11.5, 11.5]) < 1, tissue(0.12))
        sinus = [side * 24.0, 0.65 * cavity_radii[1], -0.7 * cavity_lower_z - 28.0]
        canvas.paint(_ellipsoid_radius(_local(q, sinus), [13.0, 15.0, 14.0]) < 1, 0.0)

    # Brain: cortex (label 2) folded around white matter (label 1).
    csf_gap = rng.uniform(1.5, 3.0)
    fold = _smooth_noise(rng, grid, rng.uniform(9.0, 12.0))
    brain_r = cavity_radius(-csf_gap - 1.0 * np.maximum(fold - 1.2, 0.0))
    brain = brain_r < 1
    # Where the folding field is high the white matter boundary sinks (a sulcus between two cortical banks);
    # where it is low a white-matter finger reaches up into a gyrus.
    cortex_thickness = rng.uniform(3.0, 4.5)
    fold_depth = rng.uniform(8.0, 12.0)
    white_r = cavity_radius(-csf_gap - cortex_thickness - fold_depth * (0.5 + 0.5 * np.tanh(1.5 * fold)))
    white = brain & (white_r < 1)
    callosum_z = rng.uniform(12.0, 20.0)
    above_callosum = z > callosum_z + 5.0
    medial = (np.abs(x) < cortex_thickness + 1.5) & (above_callosum | (np.abs(y) > 40.0)) & (z > -15.0)
    white &= ~medial
    canvas.paint(brain, gm + np.float32(0.03 * gain) * texture, label=2)
    canvas.paint(white, wm + np.float32(0.02 * gain) * texture, label=1)
    sulci = brain & ~white & (np.abs(fold - rng.uniform(1.0, 1.3)) < 0.15) & (brain_r > 0.85)
    canvas.paint(sulci, csf)
    fissure = (np.abs(x) < 1.5) & (above_callosum | (np.abs(y) > 40.0)) & (z > -15.0)
    canvas.paint(brain & fissure, csf)
    tentorium_z = -0.45 * cavity_lower_z + 0.25 * y - 0.005 * x ** 2  # a tent, highest in the midline
    canvas.paint(brain & (np.abs(z - tentorium_z) < 1.5) & (y < -10.0), csf)

    # Cerebellum: cortex with a white-matter core, below the tentorium.
    cerebellum_centre = [0.0, -0.55 * cavity_radii[1], -0.65 * cavity_lower_z]
    cerebellum_core = _ellipsoid_radius(_local(q, cerebellum_centre), [28.0, 14.0, 11.0]) < 1
    canvas.paint(brain & (z < tentorium_z - 1.5) & cerebellum_core, wm, label=1)

    # Deep grey nuclei (thalami, caudate heads): grey matter deep inside the white matter.
    for side in (-1.0, 1.0):
        thalamus = _ellipsoid_radius(_local(q, [side * 11.0, -10.0, callosum_z - 14.0]), [9.0, 15.0, 10.0]) < 1
        caudate = _ellipsoid_radius(_local(q, [side * 15.0, 20.0, callosum_z - 4.0]), [6.0, 11.0, 9.0]) < 1
        canvas.paint(thalamus | caudate, tissue(0.82) + np.float32(0.02 * gain) * texture, label=2)

    # Brainstem: white-matter-like but not labelled, so intensity alone does not define white matter.
    brainstem = _polyline_distance(q, [[0.0, -14.0, callosum_z - 22.0], [0.0, -24.0, -cavity_lower_z - 5.0],
                                       [0.0, -28.0, -cavity_lower_z - 60.0]]) < rng.uniform(10.0, 13.0)
    canvas.paint(brainstem & (head | face), tissue(0.93) + np.float32(0.02 * gain) * texture)

    # Lateral ventricles (label 3): bananas bent downwards at both ends, beside the midline; third ventricle slit.
    ventricle_scale = rng.uniform(0.8, 1.3)
    ventricles = np.zeros(grid.shape, dtype=bool)
    for side in (-1.0, 1.0):
        centre = [side * rng.uniform(9.0, 12.0), rng.uniform(-4.0, 6.0), callosum_z - 6.0]
        local = _local(q, centre, _rotation("z", side * rng.uniform(3.0, 10.0)) @ _small_rotation(rng, 4.0))
        bend = rng.uniform(0.010, 0.016)
        local[2] = local[2] + bend * local[1] ** 2  # the horns curve down
        ventricles |= _ellipsoid_radius(local, np.array([5.5, 31.0, 8.5]) * ventricle_scale) < 1
    third = (np.abs(x) < 1.6) & (_ellipsoid_radius(_local(q, [0.0, -4.0, callosum_z - 16.0]), [3.0, 14.0, 8.0]) < 1)
    canvas.paint(ventricles | third, csf, label=3)

    # Lesion (label 4): enhancing rim, necrotic core, and subtle oedema in the surrounding white matter.
    lesion_radius = rng.uniform(5.0, 12.5)
    lesion_centre = [rng.choice([-1.0, 1.0]) * rng.uniform(22.0, 38.0), rng.uniform(-45.0, 45.0),
                     rng.uniform(0.0, 30.0)]
    lesion_local = _local(q, lesion_centre, _small_rotation(rng, 90.0))
    lesion_r = _ellipsoid_radius(lesion_local, lesion_radius * rng.uniform(0.8, 1.2, size=3))
    lesion_r = lesion_r + np.float32(0.12) * _smooth_noise(rng, grid, 8.0)
    oedema = (lesion_r < 1 + rng.uniform(0.4, 1.0)) & white
    canvas.paint(oedema, tissue(0.86) + np.float32(0.02 * gain) * texture, label=1)
    lesion = (lesion_r < 1) & brain
    canvas.paint(lesion, tissue(1.3), label=4)
    canvas.paint(lesion & (lesion_r < 1 - rng.uniform(2.0, 3.5) / lesion_radius), tissue(0.35), label=4)

    # Partial volume, a smooth multiplicative bias field (up to +/-20%), then Rician noise on the magnitude.
    image = ndimage.gaussian_filter(canvas.image, rng.uniform(0.5, 0.8))
    bias = _polynomial_bias_field(rng, grid, max_deviation=rng.uniform(0.08, 0.2))
    image *= bias
    noise_sigma = np.float32(rng.uniform(0.015, 0.04) * gain)
    real = image + noise_sigma * rng.standard_normal(grid.shape, dtype=np.float32)
    imaginary = noise_sigma * rng.standard_normal(grid.shape, dtype=np.float32)
    return np.sqrt(real ** 2 + imaginary ** 2).astype(np.float32), canvas.label, grid


def _polynomial_bias_field(rng, grid: _Grid, max_deviation: float) -> np.ndarray:
    """1 + a random second-order polynomial in the coordinates, scaled so that it stays within 1 +/- max_deviation."""
    x, y, z = (c / np.float32(100.0) for c in grid.mesh())
    terms = [x, y, z, x * y, x * z, y * z, x * x, y * y, z * z]
    polynomial = sum(np.float32(c) * t for c, t in zip(rng.standard_normal(len(terms)), terms))
    polynomial = np.broadcast_to(polynomial, grid.shape)
    return (1.0 + max_deviation * polynomial / np.abs(polynomial).max()).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# Abdominal ultrasound (3D curvilinear probe on the right upper quadrant, beam towards posterior)


def _build_us(rng):
    probe_radius = rng.uniform(35.0, 50.0)  # curvilinear footprint: the sector's apex sits this far above the skin
    depth = rng.uniform(140.0, 170.0)
    max_range = probe_radius + depth
    lateral_half_angle = np.deg2rad(rng.uniform(30.0, 38.0))
    elevation_half_angle = np.deg2rad(rng.uniform(20.0, 28.0))
    in_plane = rng.uniform(2.2, 2.8)
    spacing = np.array([in_plane, in_plane, rng.uniform(3.0, 4.0)])
    # Apex at the origin, beam along -y (anterior to posterior), x lateral, z elevation.
    half_x = max_range * np.sin(lateral_half_angle) + 2.0
    half_z = max_range * np.sin(elevation_half_angle) + 2.0
    top = -probe_radius * np.cos(lateral_half_angle) * np.cos(elevation_half_angle) + 2.0
    extents = [(-half_x, half_x), (-max_range - 2.0, top), (-half_z, half_z)]
    axes = tuple(np.arange(lo + s / 2, hi, s, dtype=np.float64).astype(np.float32)
                 for (lo, hi), s in zip(extents, spacing))
    grid = _Grid(axes, tuple(float(s) for s in spacing))
    q = _warped_coordinates(rng, grid, [(50.0, rng.uniform(2.0, 4.0)), (20.0, rng.uniform(1.0, 2.0))])
    x, y, z = q
    texture = _smooth_noise(rng, grid, 8.0)

    # Beam geometry from the unwarped grid: the sector is a property of the probe, not of the anatomy.
    gx, gy, gz = (np.broadcast_to(c, grid.shape) for c in grid.mesh())
    height = np.maximum(-gy, 1e-3)
    beam_range = np.sqrt(gx ** 2 + gy ** 2 + gz ** 2)
    lateral_angle, elevation_angle = np.arctan2(gx, height), np.arctan2(gz, height)
    sector = ((beam_range >= probe_radius) & (beam_range <= max_range) & (gy < 0)
              & (np.abs(lateral_angle) <= lateral_half_angle) & (np.abs(elevation_angle) <= elevation_half_angle))

    # Echogenicity (backscatter amplitude, liver = 1) and attenuation (nepers per mm, one way) are painted together.
    echo = _Canvas(grid.shape, 0.0)
    tissue_attenuation = rng.uniform(0.010, 0.016)
    attenuation = np.full(grid.shape, tissue_attenuation, dtype=np.float32)

    def paint(mask, amplitude, label=0, alpha=None):
        echo.paint(mask, amplitude, label)
        if alpha is not None:
            attenuation[mask] = alpha

    warped_range = np.sqrt(x ** 2 + y ** 2 + z ** 2)
    skin_end = probe_radius + 1.5
    fat_end = skin_end + rng.uniform(8.0, 18.0)
    wall_end = fat_end + rng.uniform(8.0, 14.0)
    paint(warped_range < skin_end, 1.5)
    paint(warped_range >= skin_end, 0.18 + 0.04 * texture)  # subcutaneous fat
    septa = np.abs(_smooth_noise(rng, grid, 10.0)) < 0.1
    paint((warped_range >= skin_end) & (warped_range < fat_end) & septa, 1.0)
    muscle = (warped_range >= fat_end) & (warped_range < wall_end)
    paint(muscle, 0.35 + 0.8 * (np.sin(2 * np.pi * warped_range / 6.0) > 0.6))  # striated
    deep_tissue = warped_range >= wall_end
    # Beyond the liver: echogenic retroperitoneal fat with darker bowel loops.
    paint(deep_tissue, np.where(_smooth_noise(rng, grid, 12.0) > 0.7, 0.35, 2.5 + 0.5 * texture))

    # Liver (label 1): fills the sector below the wall except where its deep and lateral edges show.
    liver_depth = wall_end + rng.uniform(45.0, 60.0)
    liver_radii = rng.uniform([110.0, 60.0, 100.0], [140.0, 72.0, 130.0])
    liver_r = _ellipsoid_radius(_local(q, [rng.uniform(-40.0, 40.0), -liver_depth, rng.uniform(-10.0, 10.0)],
                                       _small_rotation(rng, 15.0)), liver_radii)
    liver = (liver_r < 1) & deep_tissue
    capsule = (liver_r < 1 + 3.5 / liver_radii[1]) & deep_tissue & ~liver
    paint(capsule, 4.0)  # liver capsule and diaphragm are specular
    liver_echo = rng.uniform(0.9, 1.1)
    paint(liver, liver_echo * (1.0 + 0.08 * texture), label=1)

    # Right kidney deep to the liver (unlabelled): hypoechoic cortex, bright sinus.
    kidney_centre = [rng.uniform(-30.0, 30.0), -(liver_depth + liver_radii[1] + rng.uniform(5.0, 20.0)),
                     rng.uniform(-15.0, 15.0)]
    kidney_r = _ellipsoid_radius(_local(q, kidney_centre, _small_rotation(rng, 25.0)),
                                 rng.uniform([22.0, 25.0, 45.0], [27.0, 30.0, 55.0]))
    paint((kidney_r < 1) & deep_tissue & ~liver, 0.4 + 0.05 * texture)
    paint((kidney_r < 0.5) & deep_tissue & ~liver, 3.0 + 0.3 * texture)

    # Hepatic vein (unlabelled): dark tube without the portal vein's bright wall, heading deep towards the IVC.
    hv_start = [rng.uniform(-50.0, 50.0), -(wall_end + rng.uniform(15.0, 30.0)), rng.uniform(-30.0, 30.0)]
    hv_end = [rng.uniform(-20.0, 20.0), -(liver_depth + rng.uniform(30.0, 50.0)), rng.uniform(-30.0, 30.0)]
    paint((_segment_distance(q, hv_start, hv_end) < rng.uniform(3.5, 5.5)) & liver, 0.03, alpha=0.001)

    # Gallbladder (label 2): anechoic pear under the liver, bright wall; bile barely attenuates, so the tissue
    # behind it looks brighter (posterior enhancement).
    gb_radius = rng.uniform(11.0, 16.0)
    gb_centre = [rng.uniform(-25.0, 25.0), -(wall_end + rng.uniform(25.0, 35.0)), rng.uniform(-15.0, 15.0)]
    gb_rotation = _rotation("y", rng.uniform(-60.0, 60.0)) @ _small_rotation(rng, 20.0)
    gb_local = _local(q, gb_centre, gb_rotation)
    gb_length = rng.uniform(28.0, 40.0)
    taper = 1.0 - 0.35 * np.clip(gb_local[2] / gb_length, -1.0, 1.0)  # the neck narrows
    gb_r = _ellipsoid_radius([gb_local[0] / taper, gb_local[1] / taper, gb_local[2]],
                             [gb_radius, gb_radius * rng.uniform(1.0, 1.2), gb_length])
    paint((gb_r < 1 + 3.0 / gb_radius) & deep_tissue, 2.5)
    gallbladder = (gb_r < 1) & deep_tissue
    paint(gallbladder, 0.015, label=2, alpha=0.0005)

    # Portal vein (label 3): dark lumen with an echogenic wall, running mostly laterally, with one branch.
    pv_depth = -gb_centre[1] + 1.2 * gb_radius + rng.uniform(12.0, 20.0)
    pv_z = rng.uniform(-12.0, 12.0)
    pv_points = [[-rng.uniform(35.0, 55.0), -pv_depth - rng.uniform(-8.0, 8.0), pv_z + rng.uniform(-8.0, 8.0)],
                 [rng.uniform(-5.0, 5.0), -pv_depth, pv_z],
                 [rng.uniform(35.0, 55.0), -pv_depth - rng.uniform(-8.0, 8.0), pv_z + rng.uniform(-8.0, 8.0)]]
    branch_end = [pv_points[1][0] + rng.uniform(-15.0, 15.0), -pv_depth - rng.uniform(15.0, 25.0),
                  pv_z + rng.choice([-1.0, 1.0]) * rng.uniform(20.0, 30.0)]
    pv_radius = rng.uniform(5.0, 7.5)
    pv_distance = np.minimum(_polyline_distance(q, pv_points), _segment_distance(q, pv_points[1], branch_end)
                             + np.float32(0.3 * pv_radius))
    paint(deep_tissue & (pv_distance < pv_radius + 1.5) & ~gallbladder, 3.0, alpha=tissue_attenuation)
    paint(deep_tissue & (pv_distance < pv_radius) & ~gallbladder, 0.03, label=3, alpha=0.001)

    # Strong reflectors that cast acoustic shadows: a rib in the near field, sometimes a gallstone.
    rib_side = rng.choice([-1.0, 1.0])
    rib_depth = wall_end - rng.uniform(2.0, 6.0)
    rib_x = rib_side * rng.uniform(0.45, 0.75) * rib_depth * np.tan(lateral_half_angle)
    rib = _segment_distance(q, [rib_x, -rib_depth, -200.0], [rib_x + rng.uniform(-20.0, 20.0), -rib_depth, 200.0])
    paint(rib < rng.uniform(5.0, 7.0), 6.0, alpha=0.25)
    if rng.random() < 0.6:
        stone_radius = rng.uniform(3.0, 6.0)
        # Stones sink: this one lies against the gallbladder's deep (posterior) wall.
        stone_centre = np.asarray(gb_centre) - [0.0, gb_radius - stone_radius - 1.0, 0.0]
        stone = _ellipsoid_radius(_local(q, stone_centre), [stone_radius] * 3) < 1
        paint(stone, 6.0, alpha=0.25)

    # Speckle: complex Gaussian scatterers weighted by echogenicity, blurred by the (anisotropic) pulse, enveloped.
    psf = np.array([rng.uniform(0.8, 1.2), rng.uniform(0.4, 0.6), rng.uniform(0.8, 1.2)])
    amplitude = echo.image
    in_phase = ndimage.gaussian_filter(amplitude * rng.standard_normal(grid.shape, dtype=np.float32), psf)
    quadrature = ndimage.gaussian_filter(amplitude * rng.standard_normal(grid.shape, dtype=np.float32), psf)
    envelope = np.sqrt(in_phase ** 2 + quadrature ** 2) / np.float32(_gaussian_kernel_norm(psf))

    # Attenuation along each beam (round trip), with time-gain compensation tuned for average tissue.
    path_attenuation = _integrate_along_beams(attenuation, grid, probe_radius, max_range, lateral_half_angle,
                                              elevation_half_angle, (beam_range, lateral_angle, elevation_angle))
    compensated = tissue_attenuation * rng.uniform(0.85, 1.05) * (beam_range - probe_radius)
    gain = np.exp(np.clip(-2.0 * (path_attenuation - compensated), -30.0, 1.5)).astype(np.float32)

    # Log compression to display values: liver mid-grey, bile black, reflectors near white.
    floor_db, dynamic_range_db = -rng.uniform(30.0, 36.0), rng.uniform(50.0, 60.0)
    decibels = 20.0 * np.log10(envelope * gain + 1e-6)
    image = np.clip((decibels - floor_db) / dynamic_range_db, 0.0, 1.0)
    image = ndimage.gaussian_filter(image, 0.5)  # scan conversion interpolates between beams
    image = np.where(sector, image, 0.0).astype(np.float32)
    label = np.where(sector, echo.label, 0).astype(np.uint8)
    return image, label, grid


# ----------------------------------------------------------------------------------------------------------------
# Scanner profiles


def _render_with(profile: Scanner, modality: str, image: np.ndarray, grid: _Grid, rng) -> np.ndarray:
    """`image` (RAS grid) as `profile`'s scanner would show it."""
    outside_sector = image == 0 if modality == "us" else None  # ultrasound is black outside its sector
    scale = 1.0 if modality == "ct" else float(np.percentile(image, 99)) or 1.0
    if any(profile.blur_voxels):
        image = ndimage.gaussian_filter(image, profile.blur_voxels)
    if profile.bias:
        image = image * _polynomial_bias_field(rng, grid, profile.bias)
    image = profile.gain * image + np.float32(profile.offset * scale)
    if profile.noise:
        image = image + np.float32(profile.noise * scale) * _correlated_noise(rng, grid.shape, 0.6)
    if profile.streaks:
        image = image + _streaks(rng, image, profile.streaks)
    if modality == "ct":
        image = np.clip(np.round(image), -1024.0, 3071.0)
    elif modality == "mri":
        image = np.abs(image)  # a magnitude image
    else:
        image = np.where(outside_sector, 0.0, np.clip(image, 0.0, 1.0))
    return image.astype(np.float32)


def _streaks(rng, image: np.ndarray, amplitude: float, count: int = 8) -> np.ndarray:
    """CT streaks: thin bright and dark lines through the centre of the bone (above 300 HU) in every axial slice,
    fading with distance from it and varying a little from slice to slice."""
    bone = np.argwhere(image > 300.0)
    centre = bone[:, :2].mean(axis=0) if len(bone) else (np.asarray(image.shape[:2]) - 1) / 2.0
    x, y = np.meshgrid(*(np.arange(n, dtype=np.float32) - c for n, c in zip(image.shape[:2], centre)),
                       indexing="ij")
    fade = np.exp(-np.sqrt(x ** 2 + y ** 2) / np.float32(0.5 * max(image.shape[:2])))
    pattern = np.zeros(image.shape[:2], np.float32)
    for angle, sign in zip(rng.uniform(0.0, np.pi, count), rng.choice([-1.0, 1.0], count)):
        distance = np.abs(-x * np.sin(angle) + y * np.cos(angle))
        pattern += np.float32(sign) * np.exp(-0.5 * (distance / 0.8) ** 2)
    per_slice = 1.0 + 0.3 * rng.standard_normal(image.shape[2]).astype(np.float32)
    return np.float32(amplitude) * (pattern * fade)[:, :, None] * per_slice[None, None, :]


def _gaussian_kernel_norm(sigmas) -> float:
    """Root of the sum of squared weights of scipy's Gaussian filter: the gain it applies to white noise."""
    total = 1.0
    for sigma in sigmas:
        impulse = np.zeros(2 * int(4.0 * sigma + 0.5) + 1)
        impulse[len(impulse) // 2] = 1.0
        total *= float(np.sum(ndimage.gaussian_filter1d(impulse, sigma) ** 2))
    return float(np.sqrt(total) * np.sqrt(np.pi / 4.0) * np.sqrt(2.0))


def _integrate_along_beams(attenuation, grid: _Grid, probe_radius, max_range, lateral_half_angle,
                           elevation_half_angle, beam_coordinates) -> np.ndarray:
    """Attenuation integrated from the skin to each voxel along its beam (nepers).

    Resamples onto a (range, lateral angle, elevation angle) grid, sums along range there, and samples the sums
    back at every voxel: two interpolations instead of one ray march per voxel.
    """
    beam_range, lateral_angle, elevation_angle = beam_coordinates
    step = 0.5 * min(grid.spacing)
    ranges = np.arange(probe_radius, max_range + step, step)
    lateral = np.linspace(-lateral_half_angle, lateral_half_angle, 72)
    elevation = np.linspace(-elevation_half_angle, elevation_half_angle, 48)
    r, tx, tz = np.meshgrid(ranges, np.tan(lateral), np.tan(elevation), indexing="ij")
    norm = np.sqrt(1.0 + tx ** 2 + tz ** 2)
    points = np.stack([r * tx / norm, -r / norm, r * tz / norm])
    origins = np.array([a[0] for a in grid.axes], dtype=np.float64)[:, None, None, None]
    indices = (points - origins) / np.asarray(grid.spacing)[:, None, None, None]
    sampled = ndimage.map_coordinates(attenuation, indices.reshape(3, -1), order=1, mode="nearest")
    # Attenuation in front of each sample only, so a reflector's own front surface still shows brightly.
    sampled = sampled.reshape(r.shape)
    cumulative = (np.cumsum(sampled, axis=0) - 0.5 * sampled) * step
    back = np.stack([(beam_range - probe_radius) / step,
                     (lateral_angle + lateral_half_angle) / (2 * lateral_half_angle) * (len(lateral) - 1),
                     (elevation_angle + elevation_half_angle) / (2 * elevation_half_angle) * (len(elevation) - 1)])
    return ndimage.map_coordinates(cumulative.astype(np.float32), back.reshape(3, -1), order=1,
                                   mode="nearest").reshape(beam_range.shape)


# ----------------------------------------------------------------------------------------------------------------
# Storage: voxel order, oblique grids, NIfTI


_LETTER_AXES = {"R": (0, False), "L": (0, True), "A": (1, False), "P": (1, True), "S": (2, False), "I": (2, True)}


def _random_axcodes(rng) -> str:
    draw = rng.random()
    if draw < _PLAIN_RAS_PROBABILITY:
        return "RAS"
    if draw < _PLAIN_RAS_PROBABILITY + _LPS_PROBABILITY:
        return "LPS"
    letters = (("R", "L"), ("A", "P"), ("S", "I"))
    return "".join(letters[axis][int(flip)] for axis, flip in zip(rng.permutation(3), rng.random(3) < 0.5))


def _store_in_voxel_order(ras_image, ras_label, ras_affine, axcodes: str):
    """Transposes and flips RAS-ordered arrays into `axcodes` order; every voxel keeps its world position."""
    ras_shape = ras_image.shape
    ras_axes = [_LETTER_AXES[letter][0] for letter in axcodes]
    flips = [_LETTER_AXES[letter][1] for letter in axcodes]
    image, label = np.transpose(ras_image, ras_axes), np.transpose(ras_label, ras_axes)
    stored_to_ras = np.zeros((4, 4))
    stored_to_ras[3, 3] = 1.0
    for stored_axis, (ras_axis, flip) in enumerate(zip(ras_axes, flips)):
        if flip:
            image, label = np.flip(image, stored_axis), np.flip(label, stored_axis)
            stored_to_ras[ras_axis, stored_axis] = -1.0
            stored_to_ras[ras_axis, 3] = ras_shape[ras_axis] - 1
        else:
            stored_to_ras[ras_axis, stored_axis] = 1.0
    return image, label, ras_affine @ stored_to_ras


def _rotate_grid_about_its_centre(affine, shape, axis, degrees) -> np.ndarray:
    """Tilts the whole voxel grid in world space, as an oblique acquisition does; voxel data are unchanged."""
    centre = affine[:3, :3] @ ((np.asarray(shape) - 1) / 2.0) + affine[:3, 3]
    rotation = Rotation.from_rotvec(np.asarray(axis) * np.deg2rad(degrees)).as_matrix()
    tilt = np.eye(4)
    tilt[:3, :3] = rotation
    tilt[:3, 3] = centre - rotation @ centre
    return tilt @ affine


def _save_nifti(array, affine, path: Path) -> None:
    image = nib.Nifti1Image(array, affine)
    image.set_qform(affine, code=1)  # 1: scanner coordinates
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    nib.save(image, os.fspath(path))


def _save_file(array, affine, path: Path) -> None:
    """A NIfTI volume, or without an affine an 8-bit PNG picture."""
    if affine is not None:
        _save_nifti(array, affine, path)
        return
    from PIL import Image

    Image.fromarray(np.asarray(array, np.uint8)).save(os.fspath(path))


def _check_modality(modality) -> None:
    if modality not in MODALITIES:
        raise MedsegError(f"unknown phantom modality {modality!r}; choose one of {', '.join(MODALITIES)}")


def _check_integer(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise MedsegError(f"{name} must be an integer >= {minimum}, got {value!r}")
