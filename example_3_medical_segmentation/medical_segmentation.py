"""Example 3: medical segmentation: Dice loss, class imbalance, 3D volumes, per-patient validation.

What you will learn
-------------------
- What a CT volume is: a 3D grid of Hounsfield units (HU) with a voxel *spacing* in millimetres
  that differs between patients and between the in-plane and through-plane directions.
- Medical preprocessing, step by step: HU windowing and clipping, intensity normalization,
  resampling to a common spacing (linear for images, nearest for masks) and 2.5D inputs
  (neighbouring slices as extra channels).
- Class imbalance (lesions are ~1% of the voxels): oversampling lesion slices, class-weighted
  cross-entropy, focal loss, soft Dice loss and Dice + cross-entropy (two compared side by side
  in the default run, all five with one edit: COMPARE_LOSSES).
- Soft Dice loss on softmax probabilities: what the smoothing term does, why background is left
  out.
- Validation that a clinician would accept: split by *patient*, never by slice; pick epoch and
  threshold on validation, touch the test split once; score every patient on the reassembled 3D
  volume (Dice, IoU, sensitivity, specificity, precision, HD95 in mm) and report mean, standard
  deviation and a Student-t 95% interval (none where there is no spread); count lesions found and
  missed with 3D connected components; test on a scanner the model never saw.
- Real 2D medical photos (retina, dermoscopy, endoscopy) with --data-dir: native resolution,
  random patches with a foreground bias and paired flips / quarter turns, a schedule counted in
  optimizer steps, overlapping sliding windows at inference, a field-of-view mask, and per-image
  Dice, sensitivity, specificity and ROC AUC plus the Dice pooled over all test pixels.

How to run
----------
From this folder (``example_3_medical_segmentation/``)::

    python medical_segmentation.py                 # full run, 1-1.5 minutes on a 2-core CPU
    python medical_segmentation.py --quick         # tiny set-up check in seconds (outputs/quick/)
    python medical_segmentation.py --predict outputs/example_slice.png   # segment an image
    python medical_segmentation.py --data-dir ~/data/chase_db1   # your photos (see README.md)

Everything is written to ``outputs/`` beside this script: ``best_model.pt``, ``metrics.json``
and the figures ``preprocessing.png``, ``training_curves.png``, ``three_views.png`` and
``per_patient_dice.png`` (plus ``example_slice.png``, a test slice to try ``--predict`` on).
``--data-dir`` (or the constant ``DATA_DIR``) switches from the built-in synthetic CT cohort to
your own 2D photos (DRIVE or CHASE_DB1 retinas, ISIC skin lesions, Kvasir polyps): ``images/``
and ``masks/`` (each mask named after its image; split 70/15/15), or ``train/`` and ``test/``
folders that hold them; masks stored as 0/255 or as class indices; optional ``fov/`` masks and
``classes.txt``. Nothing is downloaded. Such a run writes ``best_model.pt``, ``metrics.json``,
``training_curves.png``, ``test_predictions.png`` and ``per_image_dice.png``.

What you should see
-------------------
On a 2-core CPU (no GPU) the default run took 79 s in total and printed (abridged; the full
output is in README.md)::

    model: U-Net, 3 input channels, depth 3, base width 12: 271,935 parameters
    leakage check, lesion Dice of a copy-the-nearest-training-slice 'model':
      slice-level split 0.823 vs patient-level split 0.295
    loss comparison after 2 epochs, validation lesion Dice: weighted_ce 0.791, dice_ce 0.000
    best epoch 6; lesion threshold 0.5 chosen on validation (val Dice 0.930)
    test, in-domain (6 patients): mean +- std [Student-t 95% CI]
      dice         organ 0.975 +- 0.009 [0.966, 0.984] | lesion 0.945 +- 0.022 [0.922, 0.969]
      sensitivity  organ 0.980 +- 0.012 [0.968, 0.993] | lesion 0.923 +- 0.042 [0.879, 0.966]
      specificity  organ 0.997 +- 0.001 [0.996, 0.998] | lesion 1.000 +- 0.000 [width < 0.001]
      lesions found 13/13 (lesion-wise sensitivity 1.00), false-positive lesions 0
    test, out-of-domain scanner D (6 patients): mean +- std [Student-t 95% CI]
      dice         organ 0.856 +- 0.011 [0.844, 0.868] | lesion 0.694 +- 0.088 [0.601, 0.786]
      lesions found 14/14 (lesion-wise sensitivity 1.00), false-positive lesions 24
    test Dice organ 0.975 | lesion 0.945 | total 79 s | outputs in .../outputs

With --data-dir on CHASE_DB1 (retinal vessels: 20 training photos of 999 x 960, 16 train + 4
validation, 8 test, field-of-view masks) the same CPU took 432 s and printed (abridged)::

    step   250/1500 | train loss 1.0323 | val Dice vessel 0.690 (best) | 71 s
    estimated time to the end of training: about 6 min
    step  1500/1500 | train loss 0.3560 | val Dice vessel 0.814 (best) | 392 s
    test (8 images): mean +- std [Student-t 95% CI]
      dice         vessel 0.794 +- 0.019 [0.778, 0.810]
      sensitivity  vessel 0.834 +- 0.046 [0.795, 0.873]
      specificity  vessel 0.974 +- 0.005 [0.970, 0.978]
      auc          vessel 0.982 +- 0.004 [0.978, 0.985]
      pooled over all test pixels: Dice vessel 0.795
    test Dice vessel 0.794 (pooled 0.795) | total 432 s | outputs in .../outputs

References
----------
- Ronneberger, Fischer, Brox (2015), U-Net. https://arxiv.org/abs/1505.04597
- Milletari, Navab, Ahmadi (2016), V-Net (soft Dice loss). https://arxiv.org/abs/1606.04797
- Lin et al. (2017), Focal Loss for Dense Object Detection. https://arxiv.org/abs/1708.02002
- Isensee et al. (2021), nnU-Net (resampling, Dice + CE, patient-level evaluation).
  https://arxiv.org/abs/1809.10486
- Maier-Hein et al. (2024), Metrics Reloaded (which metric, empty masks, HD95).
  https://arxiv.org/abs/2206.01653
- Bilic et al. (2023), The Liver Tumor Segmentation Benchmark (LiTS).
  https://arxiv.org/abs/1901.04056
- scipy.ndimage.zoom: https://docs.scipy.org/doc/scipy/reference/generated/scipy.ndimage.zoom.html
- Staal et al. (2004), DRIVE retinal vessels. https://doi.org/10.1109/TMI.2004.825627
- Fraz et al. (2012), CHASE_DB1 retinal vessels. https://doi.org/10.1109/TBME.2012.2205687
"""

import argparse
import contextlib
import json
import os
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # draw into files, never open a window: works on servers and in CI
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from scipy import ndimage, stats
from torch.utils.data import DataLoader, TensorDataset, WeightedRandomSampler
from tqdm import tqdm

# Files are read and written beside this script, whatever the working directory. A notebook
# (the script opened cell by cell with jupytext) has no __file__: there, the working directory.
HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()

# %% Settings
# ===============================================================================================
# Edit these: the knobs you will want to turn, then run again.
# data
DATA_DIR = None  # None = synthetic CT cohort; or your folder of 2D photos and masks (--data-dir)
PATIENTS_PER_SCANNER = 10  # in-domain patients per scanner A, B, C (30 in all, split by patient)
OOD_PATIENTS = 6  # patients from scanner D: never trained on, an out-of-domain test
IMAGE_SIZE = 64  # in-plane network input after resampling: 64 x 4 mm = a 256 mm field of view
CONTEXT_SLICES = 1  # 2.5D: slices on each side fed as extra channels (0 = plain 2D)
# model
BASE_CHANNELS = 12  # channels of the first U-Net level; each level down doubles them
DEPTH = 3  # 2x down-samplings: 64 px -> 8 px at the bottleneck
# training
LOSS = "dice_ce"  # main run: "ce", "weighted_ce", "focal", "dice" or "dice_ce"
COMPARE_LOSSES = ("weighted_ce", "dice_ce")  # losses compared side by side (empty tuple = skip)
EPOCHS = 6  # upper bound for the main run (early stopping may end it sooner)
BATCH_SIZE = 16  # small batches give more updates per epoch on a CPU
LEARNING_RATE = 3e-3  # AdamW peak step size; one-cycle warm-up then cosine decay
LESION_OVERSAMPLE = 3.0  # a slice with lesion is drawn this many times more often (1 = off)
# your own 2D photos (--data-dir): native resolution, random patches in, sliding windows out
PATCH_SIZE = 96  # training patch side in pixels, cut at native resolution (nothing is resized)
PHOTO_STEPS = 1500  # optimizer steps, for any number of images (20 train as long as 2,000)
# system
SEED = 0  # same seed -> same cohort, same split, same initial weights
DEVICE = "auto"  # "auto" picks CUDA, then Apple MPS, then CPU; or name one: "cpu", "cuda", "mps"
NUM_THREADS = None  # CPU threads for PyTorch; None = one per core (fastest on an idle CPU). Set
#                  1 on a busy or shared CPU, where threads that wait for each other crawl
OUTPUT_DIR = HERE / "outputs"  # checkpoints, metrics.json, figures
# -----------------------------------------------------------------------------------------------
# Advanced settings: defaults that rarely need a change.
# data and preprocessing
SPLIT_FRACTIONS = (0.6, 0.2, 0.2)  # train / val / test fractions of the in-domain *patients*
NATIVE_SIZE = 128  # in-plane voxels of a synthetic scan (a clinical CT has 512)
TARGET_SPACING = (5.0, 4.0, 4.0)  # mm (z, y, x) of the common grid every scan is resampled to
HU_WINDOW = (50.0, 400.0)  # (level, width): the abdominal soft-tissue window, -150..250 HU
# training
COMPARE_EPOCHS = 2  # the comparison runs the first epochs of the main schedule with each loss
WEIGHT_DECAY = 1e-4  # mild regularisation (AdamW: decoupled from the gradient)
DICE_SMOOTH = 1.0  # smoothing term of the soft Dice loss (voxels); keeps empty classes finite
FOCAL_GAMMA = 2.0  # focal loss focusing parameter; 0 turns it back into weighted cross-entropy
INTENSITY_JITTER = 0.15  # random contrast / brightness change per training slice (scanner mimic)
PATIENCE = 4  # stop when the validation Dice has not improved for this many epochs (with
#               EPOCHS = 6 it can only act late: lower it, or raise EPOCHS, to see it stop a run)
# evaluation
LESION_THRESHOLDS = (None, 0.3, 0.4, 0.5, 0.6, 0.7)  # lesion threshold candidates; None = argmax
CONFIDENCE = 0.95  # Student-t interval of the mean over patients (or images)
# your own 2D photos (--data-dir)
PATCH_FOREGROUND = 0.5  # share of patches centred on a foreground pixel (the rest: anywhere)
PHOTO_BATCH = 8  # patches per step
PHOTO_BASE_CHANNELS = 16  # the photo U-Net's first width (thin vessels need a few more filters)
PHOTO_DEPTH = 3  # 96 px patches -> 12 px at the bottleneck
VAL_EVERY = 250  # steps between validations on the held-out images (early stopping counts these)
PHOTO_PATIENCE = 3  # stop after this many validations without improvement
COLOR_JITTER = 0.1  # per-channel contrast / brightness change of a training patch (+- 10%)
WINDOW_SIZE = 256  # sliding-window side for full-image inference (larger = fewer seams, more RAM)
WINDOW_OVERLAP = 0.25  # share of a window that its neighbour covers again
PHOTO_SPLIT_FRACTIONS = (0.7, 0.15, 0.15)  # train / val / test images (images/ + masks/ layout)
PHOTO_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)  # candidate thresholds for the last class, on val
# system
NUM_WORKERS = "auto"  # "auto": 0 on a CPU-only machine, min(8, cores - 1) with CUDA (loaders)
# --quick: a tiny configuration that runs in seconds, to check that everything works
QUICK = dict(
    PATIENTS_PER_SCANNER=2,
    OOD_PATIENTS=2,
    NATIVE_SIZE=48,
    TARGET_SPACING=(10.0, 8.0, 8.0),
    IMAGE_SIZE=32,
    BASE_CHANNELS=8,
    DEPTH=2,
    COMPARE_EPOCHS=1,
    EPOCHS=2,
    PHOTO_STEPS=40,
    VAL_EVERY=20,
    PATCH_SIZE=48,
    PHOTO_BASE_CHANNELS=8,
    PHOTO_DEPTH=2,
    WINDOW_SIZE=96,
)
CT_CLASS_NAMES = ("background", "organ", "lesion")  # class index -> name; the last is the lesion
IGNORE_INDEX = 255  # label value the loss and the metrics skip
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".gif", ".bmp", ".ppm")
MASK_SUFFIXES = ("", "_mask", "_segmentation", "_Segmentation")  # image stem + this (find_partner)
# -----------------------------------------------------------------------------------------------


# %% 1. Data: a synthetic CT cohort
# ===============================================================================================
# Real CT datasets (LiTS, KiTS, the Medical Segmentation Decathlon) are tens of gigabytes behind
# a registration form, so we simulate a small abdominal CT cohort that has their difficulties:
#
# - A CT scan is a 3D array of Hounsfield units: air -1000, fat about -100, water 0, soft tissue
#   and organs +30..+80 (more after contrast injection), bone +400 and up.
# - Each voxel covers (z, y, x) = (slice thickness, pixel size, pixel size) millimetres. Slices
#   are thicker than pixels are wide (anisotropic), and both vary from patient to patient.
# - Scanners differ: contrast timing (how bright the organ is), noise level, calibration.
# - Edges are blurred (partial volume: a voxel at a boundary averages two tissues) and noisy.
# - The lesions we want are small: about 0.5-1.5% of the voxels (LESION_SHARE). That is the class
#   imbalance.
#
# Every patient is a pure function of (SEED, patient id): the cohort is the same on every machine,
# and each patient's voxels are generated at that patient's own spacing, in millimetres.
# split_patients and load_data at the end of this section cut the cohort by patient (section 5
# says why). Your own 2D photos and masks (--data-dir) take another path: section 9 reads and
# trains on them.

# Scanner profiles: organ enhancement (HU), lesion contrast (HU darker than the organ), noise (HU),
# calibration gain and offset. Scanner D (late contrast, noisier, mis-calibrated) is never
# trained on.
SCANNERS = {
    "A": dict(enhancement=60.0, lesion_contrast=50.0, noise=12.0, gain=1.00, offset=0.0),
    "B": dict(enhancement=80.0, lesion_contrast=60.0, noise=18.0, gain=1.05, offset=15.0),
    "C": dict(enhancement=45.0, lesion_contrast=45.0, noise=15.0, gain=0.95, offset=-10.0),
    "D": dict(enhancement=15.0, lesion_contrast=30.0, noise=28.0, gain=0.90, offset=30.0),
}
IN_DOMAIN_SCANNERS = ("A", "B", "C")
OOD_SCANNER = "D"
# The lesion facts, in one place (the README quotes them; a test checks text and generator agree):
LESIONS_DRAWN = (2, 5)  # lesions drawn per patient; where two touch they count as one (1-5 remain)
LESION_VOLUME = (0.0065, 0.013)  # drawn lesion volume, as a share of all voxels of the scan
LESION_SHARE = (0.005, 0.015)  # share of voxels that *ends up* lesion (clipped to the organ):
#                                0.57-1.50% over the 36 default patients


@dataclass
class Case:
    """One patient (or one 2D image) as acquired: intensities, labels and voxel spacing."""

    case_id: str
    scanner: str
    image: np.ndarray  # (C, D, H, W) float32: HU for CT (C = 1), RGB in [0, 1] for photos (C = 3)
    mask: np.ndarray  # (D, H, W) int64 class indices
    spacing: tuple  # (z, y, x) millimetres per voxel (pixels for photos)
    modality: str  # "ct" or "photo": what was acquired (--predict reads it from the checkpoint)
    fov: np.ndarray | None = None  # (D, H, W) bool field of view (photos with a fov/ folder)


def ellipsoid(coords: tuple, centre, radii) -> np.ndarray:
    """Normalized squared distance sum(((x - c) / r)^2) on the grid: <= 1 is inside, (D, H, W)."""
    return sum(((axis - c) / r) ** 2 for axis, c, r in zip(coords, centre, radii))


def patient_geometry(rng: np.random.Generator) -> tuple[tuple, tuple]:
    """Per-patient spacing (z, y, x) in mm, and voxel-centre coordinates Z, Y, X (D, H, W) each."""
    field_of_view = rng.uniform(240.0, 290.0)  # mm across the in-plane image
    pixel = field_of_view / NATIVE_SIZE  # in-plane spacing, e.g. 1.9-2.3 mm at 128 voxels
    thickness = rng.uniform(2.5, 5.0)  # slice thickness: always coarser than the pixels
    slices = int(round(rng.uniform(120.0, 160.0) / thickness))  # a 12-16 cm slab: 24-64 slices
    z = (np.arange(slices) + 0.5) * thickness - slices * thickness / 2  # voxel centres in mm
    yx = (np.arange(NATIVE_SIZE) + 0.5) * pixel - field_of_view / 2
    coords = np.meshgrid(z, yx, yx, indexing="ij")  # three (D, H, W) arrays, mm from the centre
    return (thickness, pixel, pixel), tuple(c.astype(np.float32) for c in coords)


def draw_lesions(rng, coords, organ, organ_centre, organ_radii, voxel_mm3) -> np.ndarray:
    """LESIONS_DRAWN ellipsoidal lesions of LESION_VOLUME in all, clipped to the organ (D, H, W).

    What remains after the clipping is the LESION_SHARE of the README (a test checks it).
    """
    total_mm3 = organ.size * voxel_mm3
    fraction = rng.uniform(*LESION_VOLUME)  # of all voxels in the scan: the class imbalance
    low, high = LESIONS_DRAWN
    shares = rng.dirichlet(np.full(rng.integers(low, high + 1), 2.0))  # volume split per lesion
    lesions = np.zeros(organ.shape, dtype=bool)
    placed = []  # (centre, radius) of the lesions drawn so far
    for share in shares:
        radius = (3 * share * fraction * total_mm3 / (4 * np.pi)) ** (1 / 3)  # sphere, same volume
        room = np.maximum(np.array(organ_radii) - radius, 0.0)  # keep most of it inside the organ
        for _ in range(30):  # a few tries to keep lesions apart, so that they can be counted
            direction = rng.normal(size=3)
            direction *= rng.uniform(0.0, 0.85) / np.linalg.norm(direction)  # inside the unit ball
            centre = np.array(organ_centre) + direction * room
            if all(np.linalg.norm(centre - c) > 1.1 * (radius + r) for c, r in placed):
                break
        placed.append((centre, radius))
        lesions |= ellipsoid(coords, centre, radius * rng.uniform(0.8, 1.2, size=3)) <= 1.0
    return lesions & organ  # a lesion is part of the organ: clip what sticks out


def synthetic_patient(patient_id: int, scanner: str) -> Case:
    """Simulate one abdominal CT of `scanner`: labels 0 background, 1 organ, 2 lesion."""
    rng = np.random.default_rng([SEED, patient_id])  # one independent stream per patient
    profile = SCANNERS[scanner]
    spacing, coords = patient_geometry(rng)
    z, y, x = coords
    # 1) anatomy, in millimetres. Image x grows to the patient's left, y towards the back.
    a, b = rng.uniform(105.0, 120.0), rng.uniform(80.0, 92.0)  # body half-width and half-depth
    taper = 1.0 + 0.06 * np.sin(z / 40.0 + rng.uniform(0, 2 * np.pi))  # body width changes along z
    fat = rng.uniform(10.0, 18.0)  # subcutaneous fat thickness
    body = (x / (a * taper)) ** 2 + (y / (b * taper)) ** 2 <= 1.0
    inside = (x / (a * taper - fat)) ** 2 + (y / (b * taper - fat)) ** 2 <= 1.0
    spine = x**2 + (y - 0.7 * b) ** 2 <= 14.0**2
    aorta = (x - 8.0) ** 2 + (y - 0.4 * b) ** 2 <= 10.0**2
    spleen_centre = (rng.normal(0, 10), -0.1 * b, 0.55 * a)
    spleen = (ellipsoid(coords, spleen_centre, (35.0, 22.0, 20.0)) <= 1.0) & inside
    organ_centre = (rng.normal(0, 8), rng.normal(-0.05 * b, 5), -0.33 * a + rng.normal(0, 5))
    organ_radii = (rng.uniform(60, 72), rng.uniform(48, 58), rng.uniform(60, 72))
    bumps = 0.12 * np.sin(x / 15.0 + rng.uniform(0, 6)) * np.cos(y / 18.0 + rng.uniform(0, 6))
    organ = (ellipsoid(coords, organ_centre, organ_radii) + bumps <= 1.0) & inside & ~aorta
    lesion = draw_lesions(rng, coords, organ, organ_centre, organ_radii, np.prod(spacing))
    # 2) Hounsfield units per tissue, plus a faint smooth texture inside the body
    organ_hu = 55.0 + profile["enhancement"]
    texture = ndimage.gaussian_filter(rng.normal(0, 1, z.shape), 2.0) * 25.0  # blobs, std ~1.4 HU
    hu = np.full(z.shape, -1000.0, dtype=np.float32)  # air
    hu[body] = -100.0  # subcutaneous fat
    hu[inside] = 40.0  # muscle and other soft tissue
    hu[spleen] = organ_hu + 10.0  # a look-alike organ: intensity alone is not enough
    hu[aorta] = 40.0 + 2.5 * profile["enhancement"]  # contrast-filled vessel
    hu[spine] = 450.0  # bone
    hu[organ] = organ_hu
    hu[lesion] = organ_hu - profile["lesion_contrast"]  # hypodense lesions
    hu[inside] += texture[inside]
    # 3) partial-volume blur: each voxel averages its footprint (wider in mm where voxels are big)
    hu = ndimage.gaussian_filter(hu, sigma=(0.6, 0.8, 0.8))
    # 4) the scanner: calibration and noise
    hu = profile["gain"] * hu + profile["offset"] + rng.normal(0, profile["noise"], hu.shape)
    mask = np.zeros(z.shape, dtype=np.int64)
    mask[organ] = 1
    mask[lesion] = 2
    return Case(f"P{patient_id:03d}", scanner, hu[None].astype(np.float32), mask, spacing, "ct")


def synthetic_cohort() -> dict[str, list[Case]]:
    """In-domain patients (scanners A, B, C, round robin) and out-of-domain ones (scanner D)."""
    n_in = PATIENTS_PER_SCANNER * len(IN_DOMAIN_SCANNERS)
    in_domain = [
        synthetic_patient(i, IN_DOMAIN_SCANNERS[i % len(IN_DOMAIN_SCANNERS)])
        for i in tqdm(range(n_in), desc="simulating patients", leave=False)
    ]
    ood = [synthetic_patient(n_in + i, OOD_SCANNER) for i in range(OOD_PATIENTS)]
    return {"in_domain": in_domain, "ood": ood}


def split_patients(cases: list[Case], seed: int, fractions=None) -> dict[str, list[Case]]:
    """Shuffle the patients with the seed and cut them into train / val / test (>= 1 each)."""
    fractions = fractions or SPLIT_FRACTIONS
    order = np.random.default_rng(seed).permutation(len(cases))
    n_val = max(1, int(round(fractions[1] * len(cases))))
    n_test = max(1, int(round(fractions[2] * len(cases))))
    n_train = len(cases) - n_val - n_test
    if n_train < 1:
        raise SystemExit(f"error: {len(cases)} cases are too few for a train / val / test split")
    chosen = [cases[i] for i in order]
    return {
        "train": chosen[:n_train],
        "val": chosen[n_train : n_train + n_val],
        "test": chosen[n_train + n_val :],
    }


def load_data() -> tuple[dict[str, list[Case]], tuple[str, ...]]:
    """The synthetic cohort split by patient (train / val / test), plus scanner D as "ood"."""
    cohort = synthetic_cohort()
    splits = split_patients(cohort["in_domain"], SEED)
    splits["ood"] = cohort["ood"]
    return splits, CT_CLASS_NAMES


# %% 2. Preprocessing: windowing, normalization, resampling, 2.5D
# ===============================================================================================
# (a) HU windowing and clipping. CT values span -1000..+3000 HU, but the organ and its lesions
#     differ by a few tens of HU. A radiologist's "window" (level L, width W) shows only
#     [L - W/2, L + W/2]: everything darker is black, brighter is white. We clip to the same
#     range and scale it to [0, 1], so the network's input range is spent where the contrast is.
# (b) Normalization. Scanners differ in calibration and contrast timing; we z-score each volume
#     over its body voxels (those above the window's floor), which removes much of that shift.
# (c) Resampling. A 2 mm x 2 mm x 5 mm voxel and a 1.5 x 1.5 x 2.5 mm one do not show the same
#     anatomy at the same size: a convolution kernel would see different millimetres per patient.
#     So every scan is resampled to TARGET_SPACING (scipy.ndimage.zoom): images with linear
#     interpolation, masks with nearest neighbour (order=0), then cropped / padded to IMAGE_SIZE.
# (d) 2.5D. A 2D network is fast, but one slice has no idea what lies above and below. Feeding the
#     neighbouring slices as extra channels (z-1, z, z+1) gives it some 3D context for free.
# The network's predictions are mapped back through (c) to the *original* grid for evaluation:
# a clinician's measurement lives in the scan as acquired, not in our resampled copy.


def window_hu(hu: np.ndarray, level: float, width: float) -> np.ndarray:
    """Clip HU to [level - width/2, level + width/2] and scale that range to [0, 1]."""
    low = level - width / 2
    return np.clip((hu - low) / width, 0.0, 1.0).astype(np.float32)


def normalize_body(windowed: np.ndarray) -> np.ndarray:
    """Z-score a windowed volume with the mean / std of its body voxels (above the window floor)."""
    body = windowed > 0.0  # air is clipped to exactly 0 by the window
    values = windowed[body] if body.any() else windowed
    return ((windowed - values.mean()) / (values.std() + 1e-6)).astype(np.float32)


def resampled_shape(shape: tuple, spacing: tuple, new_spacing: tuple) -> tuple:
    """Grid size that covers the same millimetres at the new spacing: round(n * s / s_new)."""
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, new_spacing))


def resample(volume: np.ndarray, shape: tuple, order: int) -> np.ndarray:
    """Resample the last three axes (D, H, W) of `volume` to exactly `shape` (scipy.ndimage.zoom).

    order=1 (linear) for intensities and probabilities, order=0 (nearest) for label masks.
    """
    lead = volume.ndim - 3  # a leading channel axis is not resampled
    factors = (1.0,) * lead + tuple(n / m for n, m in zip(shape, volume.shape[lead:]))
    # Gotcha: grid_mode=True treats voxels as boxes whose *edges* line up, which is what a change
    # of spacing means. The default (grid_mode=False) lines up the centres of the corner voxels
    # and shifts everything by up to half a voxel.
    # Gotcha: a mask resampled with order=1 would invent labels between classes (1.5 between
    # organ and lesion): labels use nearest neighbour, order=0, and survive exactly.
    return ndimage.zoom(volume, factors, order=order, grid_mode=True, mode="nearest")


def center_crop_or_pad(array: np.ndarray, size: tuple, fill: float) -> np.ndarray:
    """Crop or pad the last two axes around the centre to `size` (H, W); its own inverse."""
    out = np.full(array.shape[:-2] + tuple(size), fill, dtype=array.dtype)
    src, dst = [slice(None)] * array.ndim, [slice(None)] * array.ndim
    for axis, target in zip((-2, -1), size):
        n = array.shape[axis]
        if n >= target:  # crop: keep the middle `target` rows / columns
            start = (n - target) // 2
            src[axis] = slice(start, start + target)
        else:  # pad: put the whole array in the middle of `target`
            start = (target - n) // 2
            dst[axis] = slice(start, start + n)
    out[tuple(dst)] = array[tuple(src)]
    return out


def stack_context(volume: np.ndarray, context: int) -> np.ndarray:
    """2.5D inputs: (C, D, H, W) -> (D, C * (2 * context + 1), H, W), neighbours as channels.

    Slice z gets slices z - context .. z + context of every channel; at the ends of the volume
    the edge slice is repeated.
    """
    depth = volume.shape[1]
    offsets = np.arange(-context, context + 1)
    index = np.clip(np.arange(depth)[:, None] + offsets[None], 0, depth - 1)  # (D, 2k+1)
    stacked = volume[:, index]  # (C, D, 2k+1, H, W)
    stacked = stacked.transpose(1, 0, 2, 3, 4)  # (D, C, 2k+1, H, W)
    stacked = stacked.reshape(depth, -1, *volume.shape[2:])  # (D, C*(2k+1), H, W)
    return np.ascontiguousarray(stacked)


@dataclass
class Prepared:
    """A Case on the network's grid: 2.5D slices and labels, plus what is needed to map back."""

    case: Case
    inputs: np.ndarray  # (D', C_in, S, S) float32 network inputs, one per resampled slice
    labels: np.ndarray  # (D', S, S) int64 labels on the same grid
    resampled: tuple  # (D', H', W') grid after resampling, before the crop / pad to S x S


def preprocess(case: Case) -> Prepared:
    """Window / normalize, resample to the common spacing, crop / pad, stack 2.5D context."""
    level, width = HU_WINDOW  # photos take section 9's way: native size, no resampling
    intensities = normalize_body(window_hu(case.image, level, width))  # (1, D, H, W)
    context = CONTEXT_SLICES
    shape = resampled_shape(case.mask.shape, case.spacing, TARGET_SPACING)
    image = resample(intensities, shape, order=1)  # (C, D', H', W')
    mask = resample(case.mask, shape, order=0)  # (D', H', W'), nearest: labels stay labels
    fill = float(image.min())  # pad with the darkest value (air), never with 0 (= average tissue)
    image = center_crop_or_pad(image, (IMAGE_SIZE, IMAGE_SIZE), fill)  # (C, D', S, S)
    mask = center_crop_or_pad(mask, (IMAGE_SIZE, IMAGE_SIZE), 0)  # (D', S, S)
    return Prepared(case, stack_context(image, context), mask, shape)


def probabilities_to_native(probs: np.ndarray, prepared: Prepared) -> np.ndarray:
    """Undo the crop / pad and the resampling: (K, D', S, S) -> (K, D, H, W), the original grid."""
    _, height, width = prepared.resampled
    background = np.zeros((len(probs), 1, 1, 1), dtype=probs.dtype)
    background[0] = 1.0  # padded area = certain background
    uncropped = center_crop_or_pad(probs - background, (height, width), 0.0) + background
    # Probabilities, not labels, are interpolated (linear), then thresholded on the native grid:
    # smoother boundaries than blowing up a blocky label map.
    return resample(uncropped, prepared.case.mask.shape, order=1)  # (K, D, H, W)


# %% 3. Model: a small 2D U-Net on 2.5D inputs
# ===============================================================================================
# Example 1's U-Net with the same layers, minus its bilinear option (upsampling is always a learned
# transposed convolution), its input-size check and its Down class (each step down is written as
# max pooling + DoubleConv in place). Its input is 2 * CONTEXT_SLICES + 1 CT slices (or 3 colours
# for photos). A 3D U-Net would see the whole volume but costs ~10x more on a CPU; 2.5D is the
# usual compromise (nnU-Net also trains 2D models for thick-slice scans).


class DoubleConv(nn.Sequential):
    """(3x3 conv -> BatchNorm -> ReLU) twice; keeps H and W (padding=1)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class Up(nn.Module):
    """Double H and W, concatenate the skip, DoubleConv: (N, C_in, h, w) -> (N, C_out, H, W)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2)
        self.conv = DoubleConv(in_channels, out_channels)  # in: C_in // 2 (up) + C_in // 2 (skip)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)  # (N, C_in // 2, 2h, 2w)
        dh, dw = skip.shape[-2] - x.shape[-2], skip.shape[-1] - x.shape[-1]  # odd sizes: pad
        x = F.pad(x, [dw // 2, dw - dw // 2, dh // 2, dh - dh // 2])  # (N, C_in // 2, H, W)
        return self.conv(torch.cat([skip, x], dim=1))  # (N, C_in, H, W) -> (N, C_out, H, W)


class UNet(nn.Module):
    """U-Net: (N, in_channels, H, W) -> logits (N, num_classes, H, W)."""

    def __init__(self, in_channels=3, num_classes=3, base_channels=16, depth=3):
        super().__init__()
        widths = [base_channels * 2**level for level in range(depth + 1)]  # e.g. 16, 32, 64, 128
        self.inc = DoubleConv(in_channels, widths[0])
        self.downs = nn.ModuleList(
            nn.Sequential(nn.MaxPool2d(2), DoubleConv(widths[i], widths[i + 1]))
            for i in range(depth)
        )
        self.ups = nn.ModuleList(Up(widths[i + 1], widths[i]) for i in reversed(range(depth)))
        self.outc = nn.Conv2d(widths[0], num_classes, kernel_size=1)  # per-pixel classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.inc(x)]  # (N, w0, H, W)
        for down in self.downs:
            skips.append(down(skips[-1]))  # level l: (N, w_l, H / 2^l, W / 2^l)
        x = skips.pop()  # the bottleneck
        for up in self.ups:
            x = up(x, skips.pop())
        return self.outc(x)  # (N, num_classes, H, W): logits, no softmax here


def model_config(in_channels: int, num_classes: int) -> dict:
    """The constants that define the network, saved in the checkpoint to rebuild it later."""
    return dict(
        in_channels=in_channels, num_classes=num_classes, base_channels=BASE_CHANNELS, depth=DEPTH
    )


def describe_model(in_channels: int, names) -> int:
    """Print (and return) the size of the U-Net that the settings above build."""
    model = UNet(**model_config(in_channels, len(names)))
    parameters = count_parameters(model)
    print(
        f"model: U-Net, {in_channels} input channels, depth {DEPTH}, base width {BASE_CHANNELS}: "
        f"{parameters:,} parameters"
    )
    return parameters


# %% 4. Losses and metrics for imbalanced classes
# ===============================================================================================
# With lesions at ~1% of the voxels, plain cross-entropy (CE) is dominated by the 99% of easy
# background: predicting "no lesion" everywhere already gives a low loss. The remedies:
# - oversampling: draw slices that contain lesion LESION_OVERSAMPLE times more often (sampler);
# - class-weighted CE: each class's voxels weigh 1 / sqrt(its frequency) (normalized to mean 1);
# - focal loss: multiply the weighted CE by (1 - p_true)^gamma, so well-classified voxels stop
#   counting (the class weights play the role of the focal paper's alpha);
# - soft Dice loss: optimize the overlap measure directly. Dice is a *ratio* per class, so a
#   lesion of 100 voxels counts as much as an organ of 10000: far less sensitive to the
#   imbalance, though it can start slowly (see the comparison after training);
# - Dice + CE: Dice for the overlap, CE for well-behaved per-voxel gradients (nnU-Net's default).
#
# Soft Dice. For class c with softmax probabilities p and one-hot target g over all voxels of the
# batch:   Dice_c = (2 * sum(p * g) + s) / (sum(p) + sum(g) + s),   loss = 1 - mean_c Dice_c.
# - Probabilities, not argmax: argmax has no gradient; "soft" counts are differentiable.
# - The smoothing s (DICE_SMOOTH): when a class is absent from a batch (sum g = 0) and the network
#   predicts none of it, Dice_c = s / s = 1 (loss 0, nothing to fix) instead of 0 / 0; if it does
#   predict some, Dice_c < 1 and the gradient pushes those probabilities down. It also keeps the
#   gradient finite on an all-background batch.
# - Background is left out of the mean: it is nearly always ~0.99 and would dilute the signal.
# - Sums run over the whole batch ("batch Dice"), which is more stable than per-slice Dice when
#   most slices contain no lesion.
#
# Metrics, per patient on the 3D volume, from the confusion matrix (row = truth, column = pred):
#   Dice = 2TP / (2TP + FP + FN)     IoU = TP / (TP + FP + FN)
#   sensitivity (recall) = TP / (TP + FN)    specificity = TN / (TN + FP)
#   precision = TP / (TP + FP)
# Pixel accuracy is left out on purpose: with ~99% background, a model that never predicts a
# lesion already scores 0.99. (Specificity has the same weakness, so it is always shown beside
# sensitivity.)
# The empty-mask rule: when a class is absent from both the prediction and the ground truth of a
# patient, Dice and IoU are 0 / 0: undefined. We report NaN and leave that patient out of the mean
# for that class (nanmean), as we do for IoU in every example. A class absent from the truth but
# predicted gets Dice 0: false alarms are punished. Other ratios are NaN when their denominator
# is 0.


def one_hot_valid(target: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, H, W) labels -> one-hot (N, K, H, W) float, and valid (not ignored) mask (N, 1, H, W)."""
    valid = (target != IGNORE_INDEX).unsqueeze(1)  # (N, 1, H, W)
    safe = torch.where(target == IGNORE_INDEX, torch.zeros_like(target), target)  # 255 -> 0
    one_hot = F.one_hot(safe, num_classes)  # (N, H, W, K)
    one_hot = one_hot.permute(0, 3, 1, 2).float()  # (N, H, W, K) -> (N, K, H, W)
    return one_hot * valid, valid


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - mean foreground soft Dice over the batch; logits (N, K, H, W), target (N, H, W)."""
    num_classes = logits.shape[1]
    probs = logits.float().softmax(dim=1)  # (N, K, H, W)
    one_hot, valid = one_hot_valid(target, num_classes)
    probs = probs * valid  # ignored voxels count for nothing
    dims = (0, 2, 3)  # sum over batch and pixels: one Dice per class
    intersection = (probs * one_hot).sum(dims)  # (K,)
    totals = probs.sum(dims) + one_hot.sum(dims)  # (K,)
    dice = (2 * intersection + DICE_SMOOTH) / (totals + DICE_SMOOTH)  # (K,)
    return 1.0 - dice[1:].mean()  # classes 1.. only: background left out


def focal_loss(logits: torch.Tensor, target: torch.Tensor, weight=None) -> torch.Tensor:
    """sum of -w_t * (1 - p_t)^gamma * log p_t over valid voxels / sum of their w_t.

    logits (N, K, H, W). Normalized as nn.CrossEntropyLoss(weight=...) is, so gamma = 0 gives
    exactly the weighted cross-entropy.
    """
    log_probs = logits.float().log_softmax(dim=1)  # (N, K, H, W)
    valid = target != IGNORE_INDEX
    # Gotcha: gather with 255 in the target indexes out of range; replace it first, mask it later.
    safe = torch.where(valid, target, torch.zeros_like(target))
    log_pt = log_probs.gather(1, safe.unsqueeze(1)).squeeze(1)  # (N, H, W) log-prob of the truth
    loss = -((1 - log_pt.exp()) ** FOCAL_GAMMA) * log_pt  # (N, H, W)
    w = weight[safe] if weight is not None else torch.ones_like(loss)  # (N, H, W) w_t per voxel
    if not valid.any():
        return logits.sum() * 0.0  # nothing labelled: a zero that still has a gradient graph
    return (loss * w)[valid].sum() / w[valid].sum()


def make_loss(name: str, class_weights: torch.Tensor):
    """The loss function called `name`: (logits (N, K, H, W), target (N, H, W)) -> scalar."""
    ce = nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)
    weighted_ce = nn.CrossEntropyLoss(weight=class_weights, ignore_index=IGNORE_INDEX)

    def dice_ce(logits, target):
        return soft_dice_loss(logits, target) + ce(logits.float(), target)

    losses = {
        "ce": lambda logits, target: ce(logits.float(), target),
        "weighted_ce": lambda logits, target: weighted_ce(logits.float(), target),
        "focal": lambda logits, target: focal_loss(logits, target, class_weights),
        "dice": soft_dice_loss,
        "dice_ce": dice_ce,
    }
    if name not in losses:
        raise SystemExit(f"error: unknown loss {name!r}; choose one of {', '.join(losses)}")
    return losses[name]


def class_weights_from(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """1 / sqrt(voxel frequency) per class, normalized to mean 1; labels any shape of indices."""
    counts = np.bincount(labels[labels != IGNORE_INDEX].ravel(), minlength=num_classes)
    weights = 1.0 / np.sqrt(np.maximum(counts, 1) / counts.sum())  # sqrt: full inverse is too harsh
    return torch.tensor(weights / weights.mean(), dtype=torch.float32)


def training_data(prepared: dict, names) -> dict:
    """What fit() needs: train / val cases, class names, class weights from the train labels."""
    train_labels = np.concatenate([p.labels for p in prepared["train"]])  # (N, S, S)
    return dict(
        train=prepared["train"],
        val=prepared["val"],
        class_names=names,
        class_weights=class_weights_from(train_labels, len(names)),
    )


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts (C, C): row = true class, column = predicted; target pixels outside [0, C) skipped.

    pred and target are integer tensors of the same shape (N x H x W); IGNORE_INDEX (255) lies
    outside [0, C), so ignored pixels are never counted.
    """
    valid = (target >= 0) & (target < num_classes)
    bins = num_classes * target[valid].long() + pred[valid].long()  # one bin per (true, pred) pair
    return torch.bincount(bins, minlength=num_classes**2).reshape(num_classes, num_classes)


def metrics_from_confusion(confusion) -> dict[str, np.ndarray]:
    """Per-class Dice, IoU, sensitivity, specificity, precision, each (K,); 0 / 0 -> NaN.

    confusion: (K, K) counts, row = true class, column = predicted (a tensor or an array).
    """
    confusion = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(confusion)
    fn = confusion.sum(axis=1) - tp  # true c, predicted something else
    fp = confusion.sum(axis=0) - tp  # predicted c, truly something else
    tn = confusion.sum() - tp - fn - fp
    with np.errstate(divide="ignore", invalid="ignore"):  # 0 / 0 -> NaN: the empty-mask rule
        return {
            "dice": 2 * tp / (2 * tp + fp + fn),
            "iou": tp / (tp + fp + fn),
            "sensitivity": tp / (tp + fn),
            "specificity": tn / (tn + fp),
            "precision": tp / (tp + fp),
        }


def label_metrics(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> dict:
    """metrics_from_confusion for two NumPy label arrays of the same shape."""
    counts = confusion_matrix(torch.as_tensor(pred), torch.as_tensor(truth), num_classes)
    return metrics_from_confusion(counts)


def surface(mask: np.ndarray) -> np.ndarray:
    """The voxels of a bool mask that touch the outside (the mask minus its erosion)."""
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def surface_distances(a: np.ndarray, b: np.ndarray, spacing: tuple) -> np.ndarray:
    """Distances (mm) from every surface voxel of mask `a` to the nearest surface voxel of `b`."""
    distance_to_b = ndimage.distance_transform_edt(~surface(b), sampling=spacing)  # mm, anisotropic
    return distance_to_b[surface(a)]


def hd95(pred: np.ndarray, truth: np.ndarray, spacing: tuple) -> float:
    """95th percentile Hausdorff distance in mm (max of both directions); NaN if one is empty."""
    if not pred.any() or not truth.any():
        return float("nan")  # undefined when either mask is empty
    return float(
        max(
            np.percentile(surface_distances(pred, truth, spacing), 95),
            np.percentile(surface_distances(truth, pred, spacing), 95),
        )
    )


def count_lesions(pred: np.ndarray, truth: np.ndarray, min_overlap: float = 0.1) -> dict:
    """Lesion-wise detection with 3D connected components (26-connectivity) of bool volumes.

    A true lesion is "found" when predicted lesion voxels cover at least `min_overlap` of it; a
    predicted component with less than `min_overlap` of its voxels on true lesions is a false
    positive. Gotcha: "any overlap" is not enough - one blob over the whole organ would then
    "find" every lesion with no false positive.
    """
    structure = np.ones((3, 3, 3), dtype=bool)  # neighbours across faces, edges and corners
    truth_labels, n_true = ndimage.label(truth, structure=structure)
    pred_labels, n_pred = ndimage.label(pred, structure=structure)
    # share of each true lesion that is predicted, and of each predicted blob that is true
    covered = ndimage.mean(pred.astype(float), truth_labels, np.arange(1, n_true + 1))
    on_lesion = ndimage.mean(truth.astype(float), pred_labels, np.arange(1, n_pred + 1))
    found = int(np.sum(np.asarray(covered) >= min_overlap))
    return {
        "true_lesions": n_true,
        "found": found,
        "missed": n_true - found,
        "false_positives": int(np.sum(np.asarray(on_lesion) < min_overlap)),
    }


# %% 5. Splitting by patient
# ===============================================================================================
# Neighbouring slices of one scan are nearly identical (5 mm apart, same anatomy, same scanner).
# If slices of one patient land in both train and test, the test set contains near-copies of
# training data and the score says more about memory than about new patients. Clinical use means
# *new patients*, so the unit of splitting is the patient: all of a patient's slices go to exactly
# one split. leakage_demo() makes the point with a "model" that only memorizes: it answers each test
# slice with the mask of the most similar training slice. Under a slice-level split that scores
# well (the neighbouring slice, 5 mm away, is in training); under a patient-level split it fails.
# Separately, all patients of scanner D are held out: an out-of-domain test of generalization.
# The split happens as the data is loaded (load_data, at the end of section 1, calls
# split_patients); this section says why it is done by patient, and measures what the other way
# would hide.


def unit_rows(slices: np.ndarray) -> np.ndarray:
    """(N, H, W) -> (N, H*W) rows with zero mean and unit length: dot products = correlations."""
    rows = slices.reshape(len(slices), -1)  # (N, H, W) -> (N, H*W)
    rows = rows - rows.mean(axis=1, keepdims=True)
    return rows / (np.linalg.norm(rows, axis=1, keepdims=True) + 1e-8)


def nearest_slice_dice(test: tuple, train: tuple, num_classes: int) -> np.ndarray:
    """Per-class Dice of a "model" that copies the mask of the most similar training slice.

    test and train are (slices (N, S, S), labels (N, S, S)); similarity is Pearson correlation.
    """
    correlation = unit_rows(test[0]) @ unit_rows(train[0]).T  # (N, M)
    nearest = correlation.argmax(axis=1)  # (N,) the best training slice for each test slice
    return label_metrics(train[1][nearest], test[1], num_classes)["dice"]


def leakage_demo(prepared: list[Prepared], test_ids: set, num_classes: int, seed: int) -> dict:
    """A memorizing nearest-slice "model" scored under a slice-level and a patient-level split."""
    middle = prepared[0].inputs.shape[1] // 2  # the channel of the slice itself, not a neighbour
    slices = np.concatenate([p.inputs[:, middle] for p in prepared])  # (N, S, S) all slices
    labels = np.concatenate([p.labels for p in prepared])  # (N, S, S)
    owner = np.concatenate([[p.case.case_id] * len(p.inputs) for p in prepared])  # (N,)
    slice_test = np.random.default_rng(seed).random(len(slices)) < SPLIT_FRACTIONS[2]  # by slice
    patient_test = np.isin(owner, list(test_ids))  # by patient: our split
    result = {}
    for split_name, is_test in (("slice_level", slice_test), ("patient_level", patient_test)):
        dice = nearest_slice_dice(
            (slices[is_test], labels[is_test]), (slices[~is_test], labels[~is_test]), num_classes
        )
        result[split_name] = float(dice[-1])  # Dice of the last class (lesion)
    result["test_slices_whose_patient_is_in_train_slice_level"] = float(
        np.isin(owner[slice_test], owner[~slice_test]).mean()
    )
    return result


def describe_split(splits: dict, prepared: dict, names) -> dict:
    """Print the split (patients, slices, lesion share) and the leakage check; return both."""
    in_domain = [p for s in ("train", "val", "test") for p in prepared[s]]
    lesion_fraction = float(np.mean([(p.case.mask == len(names) - 1).mean() for p in in_domain]))
    print(
        ", ".join(
            f"{s}: {len(c)} patients / {sum(len(p.inputs) for p in prepared[s])} slices"
            for s, c in splits.items()
        )
        + f" | {names[-1]} = {lesion_fraction:.2%} of voxels"
    )
    leakage = leakage_demo(in_domain, {c.case_id for c in splits["test"]}, len(names), SEED)
    print(
        f"leakage check, {names[-1]} Dice of a copy-the-nearest-training-slice 'model':\n"
        f"  slice-level split {leakage['slice_level']:.3f} vs patient-level split "
        f"{leakage['patient_level']:.3f}"
    )
    return dict(lesion_fraction=lesion_fraction, leakage=leakage)


# %% 6. Training
# ===============================================================================================
# The training set is every resampled slice of the training patients. An epoch draws that many
# slices with a WeightedRandomSampler: lesion slices LESION_OVERSAMPLE times more likely. Each
# slice's intensities are jittered a little (contrast and brightness), which mimics scanner
# differences. After every epoch the validation *patients* are segmented in 3D and scored; the
# weights with the best mean foreground Dice are saved atomically (temporary file, then rename).
# Early stopping after PATIENCE epochs without improvement; Ctrl-C stops cleanly and keeps the
# best weights; a non-finite loss stops with a message.
# The loss comparison trains each loss in COMPARE_LOSSES for the first COMPARE_EPOCHS epochs of
# the main run's schedule, from the same initial weights, with the same batches and learning
# rates: the loss is the only thing that differs, so the validation lesion Dice compares losses.
#
# Validation segments each patient in 3D: slices are predicted one batch at a time and stacked
# back in order into a probability volume (K, D', S, S), mapped back to the patient's original
# grid, and turned into labels there. The decision rule has one tuned knob, the lesion threshold
# t: a voxel is lesion when P(lesion) >= t, otherwise the more likely of the other classes.
# During training t = None: plain argmax (section 7 tunes t once training is done).


def slice_tensors(prepared: list[Prepared]) -> tuple[torch.Tensor, torch.Tensor]:
    """All slices of these cases: inputs (N, C_in, S, S) float32, labels (N, S, S) int64."""
    inputs = torch.from_numpy(np.concatenate([p.inputs for p in prepared]))
    labels = torch.from_numpy(np.concatenate([p.labels for p in prepared]))
    return inputs, labels


def train_loader(prepared: list[Prepared], seed: int) -> DataLoader:
    """Shuffled training batches in which slices with the last class (lesion) are oversampled."""
    inputs, labels = slice_tensors(prepared)
    has_lesion = (labels == labels.max()).flatten(1).any(dim=1)  # (N,) slice shows the last class
    weights = 1.0 + (LESION_OVERSAMPLE - 1.0) * has_lesion.double()  # (N,) sampling weights
    sampler = WeightedRandomSampler(
        weights,
        num_samples=len(weights),
        replacement=True,
        generator=torch.Generator().manual_seed(seed),
    )
    return DataLoader(
        TensorDataset(inputs, labels),
        batch_size=BATCH_SIZE,
        sampler=sampler,
        drop_last=len(weights) > BATCH_SIZE,  # no tiny last batch for BatchNorm
        num_workers=pick_num_workers(NUM_WORKERS),
    )


def jitter_intensity(images: torch.Tensor) -> torch.Tensor:
    """Random contrast (x (1 +- j)) and brightness (+- j) per sample: (N, C, H, W) -> same."""
    n = images.shape[0]
    scale = 1 + INTENSITY_JITTER * (2 * torch.rand(n, 1, 1, 1, device=images.device) - 1)
    shift = INTENSITY_JITTER * (2 * torch.rand(n, 1, 1, 1, device=images.device) - 1)
    return images * scale + shift


def train_one_epoch(model, loader, loss_fn, optimizer, scheduler, scaler, device, epoch) -> float:
    """One pass over `loader` with gradient updates; returns the mean training loss."""
    model.train()  # BatchNorm uses batch statistics and updates its running averages
    total, count = 0.0, 0
    bar = tqdm(loader, desc=f"epoch {epoch:2d} train", leave=False)
    for step, (images, masks) in enumerate(bar):
        images, masks = jitter_intensity(images.to(device)), masks.to(device)
        with autocast(device):  # mixed precision on CUDA only (appendix)
            loss = loss_fn(model(images), masks)
        if not torch.isfinite(loss):
            raise SystemExit(
                f"error: the training loss became {loss.item()} at epoch {epoch}, batch {step}. "
                f"Lower LEARNING_RATE (now {LEARNING_RATE}) or raise DICE_SMOOTH and run again."
            )
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()  # the scaler keeps float16 gradients from underflowing
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()  # the learning rate follows its schedule batch by batch
        total += loss.item() * len(images)
        count += len(images)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return total / count


@torch.inference_mode()
def predict_probabilities(model, inputs: np.ndarray, device, batch_size: int = 64) -> np.ndarray:
    """Softmax probabilities for a stack of slices: (D, C_in, S, S) -> (K, D, S, S)."""
    model.eval()  # Gotcha: forget it and BatchNorm uses this batch's statistics, not its averages
    outputs = []
    for start in range(0, len(inputs), batch_size):
        batch = torch.from_numpy(inputs[start : start + batch_size]).to(device)
        with autocast(device):
            outputs.append(model(batch).float().softmax(dim=1).cpu())  # (B, K, S, S)
    return torch.cat(outputs).permute(1, 0, 2, 3).numpy()  # (D, K, S, S) -> (K, D, S, S)


def decide(probs: np.ndarray, threshold) -> np.ndarray:
    """Labels from probabilities (K, ...): last class if P >= threshold, else argmax of the rest."""
    if threshold is None:
        return probs.argmax(axis=0)
    rest = probs[:-1].argmax(axis=0)
    return np.where(probs[-1] >= threshold, len(probs) - 1, rest)


def native_probabilities(model, prepared: Prepared, device) -> np.ndarray:
    """Predict every slice, reassemble the volume and map it to the original grid: (K, D, H, W)."""
    return probabilities_to_native(predict_probabilities(model, prepared.inputs, device), prepared)


def validation_dice(model, prepared: list[Prepared], names, device, threshold, probs=None) -> dict:
    """Mean 3D Dice over patients per foreground class; `probs` reuses native probabilities."""
    per_class = []
    for i, p in enumerate(prepared):
        native = probs[i] if probs is not None else native_probabilities(model, p, device)
        per_class.append(label_metrics(decide(native, threshold), p.case.mask, len(names))["dice"])
    means = np.nanmean(np.array(per_class), axis=0)  # (K,) NaN (empty / empty) patients left out
    return {name: float(means[k]) for k, name in enumerate(names) if k > 0}


def make_optimizer(model: nn.Module, total_steps: int, device: torch.device) -> tuple:
    """AdamW and a one-cycle schedule: warm-up over 15% of the steps, then cosine decay."""
    # fused=True: one kernel updates all weights instead of ~10 small operations per weight
    # tensor (same maths, a faster step). CPU and CUDA have it.
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=LEARNING_RATE,
        weight_decay=WEIGHT_DECAY,
        fused=device.type in ("cpu", "cuda"),
    )
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=LEARNING_RATE, total_steps=total_steps, pct_start=0.15
    )
    return optimizer, scheduler


class BestWeights:
    """The weights with the best validation score so far: kept in memory and, with a path, saved.

    The checkpoint holds what --predict needs to rebuild the model (`extra`: its config and the
    data config) besides the weights; it is saved atomically, so a crash never leaves half a file.
    """

    def __init__(self, checkpoint_path: Path | None = None, extra: dict | None = None):
        self.path, self.extra = checkpoint_path, extra or {}
        self.score, self.state, self.waited = -1.0, None, 0

    def update(self, model: nn.Module, score: float, epoch: int) -> bool:
        """Keep (and save) the weights when `score` beats the best so far; else count a miss."""
        if not score > self.score:  # Gotcha: "score <= best" would let a NaN score count as best
            self.waited += 1
            return False
        self.score, self.waited = score, 0
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if self.path is not None:
            checkpoint = dict(model_state=self.state, **self.extra, epoch=epoch, val_score=score)
            save_checkpoint(checkpoint, self.path)
        return True


def data_config(data: dict) -> dict:
    """What --predict needs to preprocess an image like the training data."""
    return dict(
        class_names=list(data["class_names"]),
        modality=data["train"][0].case.modality,
        image_size=IMAGE_SIZE,
        hu_window=list(HU_WINDOW),
        context_slices=CONTEXT_SLICES,
        lesion_threshold=0.5,  # replaced by the validation-chosen threshold after training
    )


def fit(
    loss_name: str, data: dict, epochs: int, device, checkpoint_path=None, stop_after=None
) -> tuple:
    """Train a fresh U-Net with loss `loss_name`; returns (model with the best weights, history,
    interrupted: True when Ctrl-C stopped it). `data`: the prepared train / val cases, class names
    and class weights. With a checkpoint_path the best weights are also saved there (with what
    --predict needs). With stop_after (a comparison run: only its history is used) only the first
    `stop_after` epochs of the `epochs`-long schedule run, and the model is None if none ended.
    """
    torch.manual_seed(SEED)  # every loss starts from the same initial weights
    names = data["class_names"]
    config = model_config(data["train"][0].inputs.shape[1], len(names))
    model = UNet(**config).to(device, memory_format=memory_format(device))
    loss_fn = make_loss(loss_name, data["class_weights"].to(device))
    loader = train_loader(data["train"], SEED)
    optimizer, scheduler = make_optimizer(model, epochs * len(loader), device)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")
    best = BestWeights(checkpoint_path, dict(config=config, data_config=data_config(data)))
    history, start, interrupted = [], time.perf_counter(), False
    try:
        for epoch in range(1, (stop_after or epochs) + 1):
            epoch_start = time.perf_counter()
            train_loss = train_one_epoch(
                model, loader, loss_fn, optimizer, scheduler, scaler, device, epoch
            )
            dice = validation_dice(model, data["val"], names, device, threshold=None)
            score = float(np.mean(list(dice.values())))  # mean foreground Dice over val patients
            history.append(dict(epoch=epoch, train_loss=train_loss, val_dice=dice, val_score=score))
            improved = best.update(model, score, epoch)
            shown = " ".join(f"{n} {d:.3f}" for n, d in dice.items())
            print(
                f"  [{loss_name}] epoch {epoch:2d}/{epochs} | train loss {train_loss:.4f} | "
                f"val Dice {shown}{' (best)' if improved else ''} | "
                f"{time.perf_counter() - epoch_start:.1f} s"
            )
            if epoch == 1 and stop_after is None:  # say how long the rest will take (at most)
                print_eta(time.perf_counter() - start, 1, epochs)
            if best.waited >= PATIENCE:
                print(f"  early stopping: no improvement for {PATIENCE} epochs")
                break
    except KeyboardInterrupt:
        print("\ninterrupted: training stopped, continuing with the best weights so far")
        interrupted = True
    if best.state is None:
        if stop_after is not None:  # a comparison run stopped early: the main run still stands
            return None, history, interrupted
        raise SystemExit("error: training stopped in the first epoch; nothing to evaluate")
    model.load_state_dict(best.state)
    return model, history, interrupted


def train_and_compare(data: dict, device, checkpoint_path: Path) -> dict:
    """The main run (best weights saved), then the first epochs of each loss in COMPARE_LOSSES.

    Every loss gets the same initial weights, batches and learning-rate schedule, so that the
    loss is the only difference. Returns the model, its history, every curve and the comparison.
    """
    names = data["class_names"]
    others = [name for name in COMPARE_LOSSES if name != LOSS]
    then = f"; then {COMPARE_EPOCHS} epochs of {', '.join(others)} to compare" if others else ""
    print(f"main run: {LOSS}, up to {EPOCHS} epochs (the time estimate is for it){then}")
    model, history, interrupted = fit(LOSS, data, EPOCHS, device, checkpoint_path)
    histories, comparison = {f"{LOSS} (main run)": history}, {}
    for loss_name in COMPARE_LOSSES:
        if interrupted:  # Ctrl-C means "stop training": on to the evaluation
            print("loss comparison skipped (interrupted)")
            break
        if loss_name == LOSS:  # the main run has already been through these epochs
            arm = history[:COMPARE_EPOCHS]
        else:
            print(
                f"comparison run: {loss_name}, first {COMPARE_EPOCHS} epochs of the same schedule"
            )
            _, arm, interrupted = fit(loss_name, data, EPOCHS, device, stop_after=COMPARE_EPOCHS)
            if not arm:  # Ctrl-C before its first epoch ended: nothing to compare
                print("loss comparison stopped (interrupted)")
                break
            histories[loss_name] = arm
        comparison[loss_name] = dict(val_dice=arm[-1]["val_dice"], epochs=len(arm))
    if comparison:
        print(
            f"loss comparison after {COMPARE_EPOCHS} epochs, validation {names[-1]} Dice: "
            + ", ".join(f"{k} {v['val_dice'][names[-1]]:.3f}" for k, v in comparison.items())
        )
    return dict(model=model, history=history, histories=histories, comparison=comparison)


# %% 7. Evaluation: 3D, per patient, with uncertainty
# ===============================================================================================
# The lesion threshold t of section 6's decision rule is chosen on the validation patients (as
# is the epoch), saved with the model, and the test patients are scored once. Plain argmax
# (t = None) is one of the candidates: tuning can then never do worse than no tuning on validation.
# Each patient gets its own scores; the cohort result is the mean over patients with its standard
# deviation s and a Student-t 95% interval of the mean, mean +- t(0.975, n-1) * s / sqrt(n).
# Gotcha: with a handful of patients a bootstrap percentile interval is too narrow (resampling 6
# patients never sees the 7th kind of patient; it covers the true mean less often than it
# claims); the t interval widens with the t quantile (2.57 at n = 6 instead of 1.96). It still
# assumes roughly normal per-patient scores, so below 10 patients it is printed with a note. A
# metric with no spread (every patient 1.000) gets no interval: there is nothing to estimate.
# Ratios (Dice, sensitivity, ...) cannot leave [0, 1], so their intervals are clipped to it.


def choose_threshold(model, prepared: list[Prepared], names, device) -> tuple[float, dict]:
    """The lesion threshold from LESION_THRESHOLDS with the best mean lesion Dice on validation."""
    probs = [native_probabilities(model, p, device) for p in prepared]  # predict once, reuse
    by_threshold = {
        t: validation_dice(model, prepared, names, device, t, probs)[names[-1]]
        for t in LESION_THRESHOLDS
    }
    best = max(by_threshold, key=lambda t: -1.0 if np.isnan(by_threshold[t]) else by_threshold[t])
    return best, by_threshold


def store_threshold(checkpoint_path: Path, threshold) -> dict:
    """Write the chosen threshold into the saved checkpoint (--predict uses it); return it."""
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    checkpoint["data_config"]["lesion_threshold"] = threshold
    save_checkpoint(checkpoint, checkpoint_path)
    return checkpoint


def score_patient(pred: np.ndarray, truth: np.ndarray, spacing: tuple, names) -> dict:
    """All per-patient numbers for 3D label volumes pred and truth (D, H, W)."""
    scores = label_metrics(pred, truth, len(names))
    result = {metric: {n: float(v[k]) for k, n in enumerate(names)} for metric, v in scores.items()}
    result["hd95_mm"] = {
        n: hd95(pred == k, truth == k, spacing) for k, n in enumerate(names) if k > 0
    }
    result["lesions"] = count_lesions(pred == len(names) - 1, truth == len(names) - 1)
    return result


def evaluate_cases(model, prepared: list[Prepared], names, device, threshold) -> list[dict]:
    """All per-patient scores on the original grids (Dice, IoU, ..., HD95, lesion counts)."""
    results = []
    for p in prepared:
        pred = decide(native_probabilities(model, p, device), threshold)
        results.append(
            dict(
                patient=p.case.case_id,
                scanner=p.case.scanner,
                **score_patient(pred, p.case.mask, p.case.spacing, names),
                predicted_voxels=np.bincount(pred.ravel(), minlength=len(names)).tolist(),
            )
        )
    return results


def t_interval(values: np.ndarray, confidence: float = 0.95) -> tuple[float, float] | None:
    """Student-t interval of the mean (NaNs dropped): mean +- t_{(1+c)/2, n-1} * s / sqrt(n).

    None when there is no spread to estimate from: fewer than 2 values, or all values equal.
    """
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    if len(values) < 2 or np.ptp(values) == 0:
        return None
    half = stats.t.ppf((1 + confidence) / 2, len(values) - 1) * values.std(ddof=1)
    half /= np.sqrt(len(values))
    return float(values.mean() - half), float(values.mean() + half)


CT_METRICS = ("dice", "iou", "sensitivity", "specificity", "precision", "hd95_mm")  # per patient
RATIO_METRICS = ("dice", "iou", "sensitivity", "specificity", "precision", "auc")  # in [0, 1]


def summarize(per_patient: list[dict], names, metrics=CT_METRICS) -> dict:
    """Means over patients (NaN excluded), their std and t interval; lesion-wise totals if any."""
    summary, spread, interval = {}, {}, {}
    for metric in metrics:
        summary[metric], spread[metric], interval[metric] = {}, {}, {}
        for name in per_patient[0][metric]:
            values = np.array([p[metric][name] for p in per_patient], dtype=np.float64)
            finite = values[~np.isnan(values)]
            summary[metric][name] = float(finite.mean()) if len(finite) else float("nan")
            spread[metric][name] = float(finite.std(ddof=1)) if len(finite) > 1 else float("nan")
            ci = t_interval(values, CONFIDENCE)
            if ci is not None and metric in RATIO_METRICS:
                ci = (max(ci[0], 0.0), min(ci[1], 1.0))
            interval[metric][name] = ci  # None: no spread to estimate an interval from
    result = dict(summary, std=spread, ci95=interval, per_patient=per_patient)
    result["n_patients"] = len(per_patient)
    if "lesions" in per_patient[0]:
        lesions = [p["lesions"] for p in per_patient]
        totals = {k: int(sum(counts[k] for counts in lesions)) for k in lesions[0]}
        totals["lesion_wise_sensitivity"] = totals["found"] / max(totals["true_lesions"], 1)
        result["lesions"] = totals
    return result


def interval_text(interval) -> str:
    """The interval as "[low, high]" at 3 decimals, or a word when there is nothing to show."""
    if interval is None:
        return "[no spread]"
    low, high = interval
    if f"{low:.3f}" == f"{high:.3f}":
        return "[width < 0.001]"
    return f"[{low:.3f}, {high:.3f}]"


def print_summary(title: str, summary: dict, names, metrics=CT_METRICS, unit="patients") -> None:
    """A table: one row per metric, one column per foreground class: mean +- std [95% CI]."""
    n = summary["n_patients"]
    print(f"\n{title} ({n} {unit}): mean +- std [Student-t {CONFIDENCE:.0%} CI]")
    if n < 10:
        print(
            f"  note: with n = {n} < 10 {unit} the interval rests on roughly normal scores; "
            "read it as a rough guide"
        )
    for metric in metrics:
        cells = []
        for name in names[1:]:
            cells.append(
                f"{name} {summary[metric][name]:.3f} +- {summary['std'][metric][name]:.3f} "
                + interval_text(summary["ci95"][metric][name])
            )
        print(f"  {metric:<12} " + " | ".join(cells))
    if "lesions" in summary:
        lesions = summary["lesions"]
        print(
            f"  lesions found {lesions['found']}/{lesions['true_lesions']} (lesion-wise "
            f"sensitivity {lesions['lesion_wise_sensitivity']:.2f}), false-positive lesions "
            f"{lesions['false_positives']}"
        )


def warn_if_collapsed(predicted_counts, best_val_score: float, names) -> str | None:
    """One "Warning:" line when the predictions hold a single class, or validation stayed at 0.

    predicted_counts: pixels (voxels) predicted per class over the evaluated images, (K,).
    Returns the line (None when all is well), so that a test can check it.
    """
    counts = np.asarray(predicted_counts)
    present = [names[k] for k in np.flatnonzero(counts)]
    if len(present) > 1 and best_val_score > 0:
        return None
    if len(present) > 1:
        what = "the validation score stayed at 0"
    else:
        what = f"the model predicts only {present[0] if present else 'nothing'!r} everywhere"
    line = (
        f"Warning: {what}. Likely causes: masks stored as 0/255 not mapped to 0/1, too few "
        "optimizer steps, images shrunk so small that the objects vanish, a learning rate too "
        "high, or a class imbalance the loss does not handle."
    )
    print(line)
    return line


def evaluate_test(model, prepared: dict, names, device, checkpoint_path: Path) -> dict:
    """Choose the threshold on validation, then score the test (and OOD) patients once."""
    threshold, val_by_threshold = choose_threshold(model, prepared["val"], names, device)
    checkpoint = store_threshold(checkpoint_path, threshold)
    rule = "argmax (no threshold)" if threshold is None else f"threshold {threshold}"
    print(
        f"best epoch {checkpoint['epoch']}; {names[-1]} {rule} chosen on validation "
        f"(val Dice {val_by_threshold[threshold]:.3f})"
    )
    results, predicted = {}, np.zeros(len(names), dtype=np.int64)
    for split in [s for s in ("test", "ood") if s in prepared]:
        per_patient = evaluate_cases(model, prepared[split], names, device, threshold)
        results[split] = summarize(per_patient, names)
        if split == "test":
            predicted = np.sum([p["predicted_voxels"] for p in per_patient], axis=0)
        print_summary(
            "test, in-domain" if split == "test" else f"test, out-of-domain scanner {OOD_SCANNER}",
            results[split],
            names,
        )
    return dict(
        threshold=threshold,
        val_by_threshold=val_by_threshold,
        best_epoch=checkpoint["epoch"],
        results=results,
        warning=warn_if_collapsed(predicted, checkpoint["val_score"], names),
    )


# %% 8. Visualization
# ===============================================================================================
# What each step did, in pictures: the preprocessing chain, the training curves of every loss,
# a test patient in three planes with truth and prediction, and the Dice of every test patient.


def plot_window_panels(axes, case: Case, z: int) -> None:
    """(a) Slice z in raw HU, then windowed and clipped to [0, 1]: two panels."""
    level, width = HU_WINDOW
    shown = axes[0].imshow(case.image[0, z], cmap="gray")
    axes[0].figure.colorbar(shown, ax=axes[0], fraction=0.046, label="HU")
    axes[0].set_title(
        f"(a) raw CT, {case.case_id} slice {z}\n(full HU range: soft tissues look alike)"
    )
    axes[1].imshow(window_hu(case.image[0, z], level, width), cmap="gray", vmin=0, vmax=1)
    axes[1].set_title(f"(a) window L={level:.0f} W={width:.0f}, clipped to [0, 1]")


def plot_scanner_histograms(ax_hu, ax_z, cases: list[Case]) -> None:
    """(b) Body intensities of one patient per scanner: in HU, then after the z-score."""
    level, width = HU_WINDOW
    by_scanner = {}
    for c in cases:
        by_scanner.setdefault(c.scanner, c)
    for scanner, c in sorted(by_scanner.items()):
        windowed = window_hu(c.image[0], level, width)
        ax_hu.hist(
            c.image[0][windowed > 0].ravel(),
            bins=80,
            range=(-150, 250),
            histtype="step",
            density=True,
            label=f"scanner {scanner}",
        )
        ax_z.hist(
            normalize_body(windowed)[windowed > 0].ravel(),
            bins=80,
            range=(-4, 3),
            histtype="step",
            density=True,
            label=f"scanner {scanner}",
        )
    ax_hu.set(title="(b) body HU per scanner: shifted", xlabel="HU")
    ax_z.set(title="(b) after per-volume z-score: aligned", xlabel="z-score")
    ax_hu.legend(fontsize=8)


def plot_resampling_panels(axes, case: Case, prep: Prepared) -> None:
    """(c) A coronal cut in voxels and in millimetres, the resampled mask; (d) a 2.5D input."""
    level, width = HU_WINDOW
    y = case.mask.shape[1] // 2 + 5  # a coronal cut near the organ
    axes[0].imshow(window_hu(case.image[0, :, y], level, width), cmap="gray", aspect=1)
    axes[0].set_title(
        f"(c) coronal, native voxels ({case.spacing[0]:.1f} x {case.spacing[2]:.1f} mm)\n"
        "drawn one pixel per voxel: squashed"
    )
    native_aspect = case.spacing[0] / case.spacing[2]
    axes[1].imshow(window_hu(case.image[0, :, y], level, width), cmap="gray", aspect=native_aspect)
    axes[1].set_title("(c) same, drawn in millimetres: true shape")
    centre = prep.inputs.shape[1] // 2
    k = int(np.argmax((prep.labels == 2).sum(axis=(1, 2))))
    rgb = (
        prep.inputs[k, centre - 1 : centre + 2]
        if prep.inputs.shape[1] >= 3
        else prep.inputs[k, :1].repeat(3, 0)
    )
    rgb = (rgb - rgb.min()) / (np.ptp(rgb) + 1e-6)
    axes[2].imshow(prep.labels[k], cmap="viridis", vmin=0, vmax=2, interpolation="nearest")
    axes[2].set_title("(c) mask, nearest-resampled:\nstill only labels 0, 1, 2")
    axes[3].imshow(rgb.transpose(1, 2, 0))  # (3, S, S) -> (S, S, 3)
    axes[3].set_title(
        f"(d) 2.5D input on the {TARGET_SPACING[1]:.0f} mm grid\nz-1, z, z+1 as R, G, B"
    )


def plot_preprocessing(cases: list[Case], prepared: list[Prepared], path: Path) -> None:
    """Raw HU -> window -> normalization (per scanner) -> resampling -> 2.5D input: one figure."""
    case, prep = cases[0], prepared[0]
    z = int(np.argmax((case.mask == 2).sum(axis=(1, 2))))  # the slice with most lesion
    fig, axes = plt.subplots(2, 4, figsize=(16, 7.5))
    plot_window_panels(axes[0, :2], case, z)
    plot_scanner_histograms(axes[0, 2], axes[0, 3], cases)
    plot_resampling_panels(axes[1], case, prep)
    for ax in (*axes[0, :2], *axes[1]):
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_training_curves(histories: dict, path: Path) -> None:
    """Training loss and validation lesion Dice per epoch, one line per loss function."""
    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(10, 4))
    for label, history in histories.items():
        epochs = [h["epoch"] for h in history]
        ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label=label)
        ax_dice.plot(epochs, [list(h["val_dice"].values())[-1] for h in history], "o-", label=label)
    ax_loss.set(
        xlabel="epoch", ylabel="loss (each on its own scale)", title="Training loss", yscale="log"
    )
    ax_dice.set(xlabel="epoch", ylabel="Dice", title="Validation lesion Dice (3D, per patient)")
    ax_loss.legend(fontsize=8)
    ax_dice.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_three_views(case: Case, pred: np.ndarray, path: Path) -> None:
    """Axial / coronal / sagittal cuts at the largest lesion: truth solid, prediction dashed."""
    level, width = HU_WINDOW
    volume = window_hu(case.image[0], level, width)  # (D, H, W)
    lesion = case.mask == case.mask.max()
    labels, n = ndimage.label(lesion)
    largest = np.argmax(np.bincount(labels.ravel())[1:]) + 1 if n else 0
    zc, yc, xc = (
        np.round(ndimage.center_of_mass(labels == largest)).astype(int)
        if n
        else np.array(volume.shape) // 2
    )
    dz, dy, dx = case.spacing
    views = [  # (title, image, truth, prediction, aspect = row spacing / column spacing)
        ("axial", volume[zc], case.mask[zc], pred[zc], dy / dx),
        ("coronal", volume[:, yc], case.mask[:, yc], pred[:, yc], dz / dx),
        ("sagittal", volume[:, :, xc], case.mask[:, :, xc], pred[:, :, xc], dz / dy),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.8))
    for ax, (title, image, truth, guess, aspect) in zip(axes, views):
        ax.imshow(image, cmap="gray", aspect=aspect, vmin=0, vmax=1)
        for k, true_color, pred_color in ((1, "lime", "cyan"), (2, "red", "yellow")):
            if (truth >= k).any():  # organ contour = outline of organ + lesion (lesion is inside)
                ax.contour(truth >= k, levels=[0.5], colors=true_color, linewidths=1.2)
            if (guess >= k).any():
                ax.contour(
                    guess >= k, levels=[0.5], colors=pred_color, linewidths=1.2, linestyles="--"
                )
        ax.set_title(title)
        ax.axis("off")
    fig.suptitle(
        f"{case.case_id} (scanner {case.scanner}): truth solid (organ green, lesion red), "
        "prediction dashed (organ cyan, lesion yellow)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_per_patient(groups: dict, names, path: Path) -> None:
    """Bar chart: Dice of every foreground class for every test patient, in-domain then OOD."""
    rows = [(label, p) for label, per_patient in groups.items() for p in per_patient]
    x = np.arange(len(rows))
    width = 0.8 / (len(names) - 1)
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(rows) + 2), 4))
    for k, name in enumerate(names[1:]):
        ax.bar(x + k * width, [p["dice"][name] for _, p in rows], width, label=name)
    ax.set_xticks(x + width * (len(names) - 2) / 2)
    ax.set_xticklabels([f"{p['patient']}\n{label}" for label, p in rows], fontsize=7)
    ax.set(ylabel="Dice", ylim=(0, 1), title="Dice per test patient (or image)")
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def save_example_slice(prepared: Prepared, path: Path) -> None:
    """Save a patient's grid slice with the most lesion as an 8-bit PNG in the HU window.

    This is what --predict expects from a CT model: a windowed axial slice of ~256 mm.
    """
    k = int(np.argmax((prepared.labels == prepared.labels.max()).sum(axis=(1, 2))))
    level, width = HU_WINDOW
    hu = resample(prepared.case.image, prepared.resampled, order=1)[0, k]  # (H', W') on the grid
    hu = center_crop_or_pad(hu, (IMAGE_SIZE, IMAGE_SIZE), -1000.0)  # (S, S), air outside
    Image.fromarray((window_hu(hu, level, width) * 255).round().astype(np.uint8)).save(path)


def make_figures(splits: dict, prepared: dict, training: dict, evaluation: dict, device) -> None:
    """All figures of the CT run into OUTPUT_DIR, and a test slice to try --predict on."""
    names = CT_CLASS_NAMES
    plot_preprocessing(
        splits["train"] + splits.get("ood", []), prepared["train"], OUTPUT_DIR / "preprocessing.png"
    )
    plot_training_curves(training["histories"], OUTPUT_DIR / "training_curves.png")
    first = prepared["test"][0]
    probs = native_probabilities(training["model"], first, device)
    pred = decide(probs, evaluation["threshold"])  # (D, H, W) labels on the native grid
    plot_three_views(first.case, pred, OUTPUT_DIR / "three_views.png")
    save_example_slice(first, OUTPUT_DIR / "example_slice.png")
    plot_per_patient(
        {
            ("in-domain" if s == "test" else "OOD"): r["per_patient"]
            for s, r in evaluation["results"].items()
        },
        names,
        OUTPUT_DIR / "per_patient_dice.png",
    )


# %% 9. Your own photos (--data-dir): native resolution, patches in, sliding windows out
# ===============================================================================================
# A retinal vessel is 1-10 pixels wide in a 565 x 584 photo. Squeeze the photo to 64 x 64 and
# the vessels vanish; the model then learns "background everywhere". So photos keep their native
# resolution, and the network never sees a whole photo during training:
# - Training cuts random PATCH_SIZE x PATCH_SIZE patches. A share PATCH_FOREGROUND of them is
#   centred on a foreground pixel (thin structures are rare: a uniform draw mostly shows
#   background), the rest anywhere in the field of view. Each patch gets one draw of the 8
#   flips / quarter turns, applied to the image and the mask alike (one draw for both: that is
#   what makes it paired), and a mild per-channel colour jitter (image only).
# - The schedule counts optimizer steps (PHOTO_STEPS), not epochs: an "epoch" of 20 photos is
#   2-3 batches of PHOTO_BATCH, so 6 epochs would be about 15 steps. Counted in steps, 20 images
#   train as long as 2,000.
# - Every VAL_EVERY steps the held-out validation photos are segmented whole and scored; the
#   best weights are kept, training stops after PHOTO_PATIENCE validations without improvement,
#   and the decision threshold is chosen on the same validation photos afterwards.
# - Inference slides a WINDOW_SIZE window over the photo with WINDOW_OVERLAP, and averages the
#   softmax *probabilities* of overlapping windows, each weighted by a bump that is highest at
#   the window's centre (a convolution near a window edge sees zero padding, not the photo).
#   The map comes back at the photo's exact size, whatever that size is.
# - Pixels outside the field of view (fov/ masks) get the ignore label: no loss, no metric.
# - Metrics per photo at native resolution, inside the field of view: Dice, IoU, sensitivity,
#   specificity, precision, and ROC AUC (from the probabilities, before any threshold: what
#   vessel papers report), plus the Dice pooled over all test pixels (one confusion matrix).
#
# Your own data. Public 2D medical datasets (ISIC skin lesions, Kvasir-SEG polyps, DRIVE and
# CHASE_DB1 retinal vessels) ship as folders of photos and masks, one mask per image with the
# same file stem. Two layouts are read:
#   DATA_DIR/images/ + DATA_DIR/masks/              split by image, seeded: 70 / 15 / 15
#   DATA_DIR/train/{images,masks}/ + DATA_DIR/test/{images,masks}/   an official test split: the
#       test images are used as they are, the validation images are carved out of train/
# An optional fov/ folder beside masks/ (named like the masks, 0/255) marks each photo's field of
# view (the round fundus of a retina photo): pixels outside it count in neither the loss nor the
# metrics.
# An optional DATA_DIR/classes.txt names the classes, one per line (background first), and fixes
# their number. Each image becomes a one-slice "patient": a Case with D = 1.
# Gotcha: masks are often saved as 0/255 (black/white PNG), or as JPEG with compression noise
# (Kvasir). Fed to cross-entropy as is, 255 is "class 255" (or the ignore index!): map to 0/1.


def read_image(path: Path, mode: str) -> np.ndarray:
    """Pillow-read `path` converted to `mode` ("RGB" or "L"); one clear error if not an image."""
    try:
        with Image.open(path) as file:
            return np.asarray(file.convert(mode))
    except (UnidentifiedImageError, OSError) as error:
        raise SystemExit(
            f"error: cannot read {path}: not an image Pillow can open ({error})"
        ) from None


def mask_to_indices(mask: np.ndarray, path: Path) -> np.ndarray:
    """(H, W) uint8 -> int64 class indices.

    Values below 128 only: class indices 0, 1, 2, ... as they are. Otherwise a binary grey mask
    (0/255, 0/128, or a JPEG's noisy 0/255 with grey edges): foreground = the values >= 128.
    Small indices next to 255 (an ignore label) are an error: this chapter reads no ignore label
    from masks (a field of view goes in fov/).
    """
    values = np.unique(mask)
    if values.max() < 128:
        return mask.astype(np.int64)
    small, bright = values[(values > 0) & (values < 128)], values[values >= 128]
    if len(small) and bright.tolist() == [255]:  # e.g. 0, 1, 2 and 255, nothing in between
        raise SystemExit(
            f"error: mask {path} holds class indices {small[:5].tolist()} and 255; masks are "
            "binary (0 and 255, or any grey >= 128 = foreground) or class indices 0, 1, 2, ... "
            "without 255 (a field of view goes in fov/)"
        )
    return (mask >= 128).astype(np.int64)


def image_files(folder: Path) -> list[Path]:
    """The files in `folder` with an image extension, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)


def image_id(stem: str) -> str | None:
    """The stem's leading id, e.g. "21" of DRIVE's 21_training and 21_manual1; None if no digit."""
    first = re.split(r"[_.\- ]", stem)[0]
    return first if any(c.isdigit() for c in first) else None


def find_partner(image: Path, by_stem: dict[str, Path], image_stems: list[str]) -> Path | None:
    """The file of `by_stem` (masks or FOV masks) that belongs to `image`, or None.

    Public datasets name masks in three ways, tried in this order:
    1. the image's stem plus one of MASK_SUFFIXES: a.png, a_mask.png, ISIC's a_segmentation.png;
    2. the one stem that is the image's stem plus a tag: CHASE_DB1's Image_01L_1stHO, STARE's
       im0001.ah (two such files, say two annotators, are an error: keep one);
    3. the one stem with the image's leading id, when no other image has that id: DRIVE's
       21_training.tif and 21_manual1.gif.
    """
    for suffix in MASK_SUFFIXES:
        if image.stem + suffix in by_stem:
            return by_stem[image.stem + suffix]
    n = len(image.stem)
    tagged = [f for s, f in by_stem.items() if s[:n] == image.stem and s[n : n + 1] in "_.-"]
    if len(tagged) > 1:
        raise SystemExit(
            f"error: {tagged[0].name} and {tagged[1].name} could both belong to {image}; keep "
            f"one per image in {tagged[0].parent} (e.g. the first annotator's)"
        )
    if tagged:
        return tagged[0]
    key = image_id(image.stem)
    if key is None or sum(image_id(s) == key for s in image_stems) > 1:
        return None
    shared = [f for s, f in by_stem.items() if image_id(s) == key]
    return shared[0] if len(shared) == 1 else None


def match_files(images_dir: Path, masks_dir: Path) -> list[tuple[Path, Path]]:
    """Pair every image with its mask (find_partner); one clear error for any unmatched file."""
    images, masks = image_files(images_dir), image_files(masks_dir)
    mask_by_stem = {m.stem: m for m in masks}
    stems = [image.stem for image in images]
    pairs = [(image, find_partner(image, mask_by_stem, stems)) for image in images]
    unmatched_images = [image for image, mask in pairs if mask is None]
    if unmatched_images:
        raise SystemExit(
            f"error: no mask in {masks_dir} for image {unmatched_images[0]} "
            f"({len(unmatched_images)} unmatched images; a mask is named after its image, "
            "see find_partner)"
        )
    owners = {}
    for image, mask in pairs:
        if mask in owners:
            raise SystemExit(f"error: {mask} would be the mask of {owners[mask]} and of {image}")
        owners[mask] = image
    unmatched_masks = [m for m in masks if m not in owners]
    if unmatched_masks:
        raise SystemExit(f"error: no image in {images_dir} for mask {unmatched_masks[0]}")
    if not pairs:
        raise SystemExit(f"error: no images ({', '.join(IMAGE_EXTENSIONS)}) found in {images_dir}")
    return pairs


def check_same_size(array: np.ndarray, image: np.ndarray, path: Path, image_path: Path) -> None:
    """One clear error when a mask (or FOV) file is not the size of its image."""
    if array.shape[:2] != image.shape[:2]:
        raise SystemExit(
            f"error: mask {path} is {array.shape[1]}x{array.shape[0]} pixels but image "
            f"{image_path} is {image.shape[1]}x{image.shape[0]}; they must be the same size"
        )


def load_folder_cases(data_dir: Path, num_classes: int | None = None) -> list[Case]:
    """Read data_dir/images, data_dir/masks (and fov/ if there) into one-slice Cases (C=3, D=1)."""
    images_dir, masks_dir = Path(data_dir) / "images", Path(data_dir) / "masks"
    for folder in (images_dir, masks_dir):
        if not folder.is_dir():
            raise SystemExit(f"error: {folder} is not a folder; DATA_DIR needs images/ and masks/")
    fov_dir = Path(data_dir) / "fov"  # optional: field-of-view masks, named as the masks are
    fov_paths = dict(match_files(images_dir, fov_dir)) if fov_dir.is_dir() else {}
    cases = []
    for image_path, mask_path in match_files(images_dir, masks_dir):
        image = read_image(image_path, "RGB")  # (H, W, 3) uint8
        mask = read_image(mask_path, "L")  # (H, W) uint8
        check_same_size(mask, image, mask_path, image_path)
        labels = mask_to_indices(mask, mask_path)  # (H, W)
        if num_classes is not None and labels.max() >= num_classes:
            raise SystemExit(
                f"error: mask {mask_path} holds class {labels.max()} but classes.txt names "
                f"only {num_classes} classes"
            )
        fov = None
        if fov_paths:
            fov_path = fov_paths[image_path]
            fov_pixels = read_image(fov_path, "L")
            check_same_size(fov_pixels, image, fov_path, image_path)
            fov = (fov_pixels >= 128)[None]  # (1, H, W) bool
        pixels = image.astype(np.float32).transpose(2, 0, 1)[:, None] / 255.0  # (3, 1, H, W)
        cases.append(
            Case(image_path.stem, "folder", pixels, labels[None], (1.0, 1.0, 1.0), "photo", fov)
        )
    return cases


def read_class_names(data_dir: Path) -> tuple[str, ...] | None:
    """The class names in data_dir/classes.txt (one per line, background first), or None."""
    path = Path(data_dir) / "classes.txt"
    if not path.is_file():
        return None
    names = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    if len(names) < 2:
        raise SystemExit(f"error: {path} must name at least 2 classes (background first)")
    return names


def class_names_for(cases: list[Case]) -> tuple[str, ...]:
    """Class names: organ / lesion for the CT cohort, background / foreground (or class_k) else."""
    if cases[0].modality == "ct":
        return CT_CLASS_NAMES
    n = max(2, max(int(c.mask.max()) for c in cases) + 1)
    return ("background", "foreground") if n == 2 else tuple(f"class_{k}" for k in range(n))


def load_folder_splits(data_dir: Path, seed: int) -> tuple[dict[str, list[Case]], tuple]:
    """Train / val / test Cases from either layout (see above), and the class names."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise SystemExit(f"error: {data_dir} is not a folder; DATA_DIR needs images/ and masks/")
    names = read_class_names(data_dir)
    k = len(names) if names else None
    if (data_dir / "train").is_dir() and (data_dir / "test").is_dir():  # official test split
        train = load_folder_cases(data_dir / "train", k)
        val_share = PHOTO_SPLIT_FRACTIONS[1] / sum(PHOTO_SPLIT_FRACTIONS[:2])  # 15 / 85 of train/
        n_val = max(1, round(val_share * len(train)))
        if len(train) - n_val < 1:
            raise SystemExit(
                f"error: {data_dir / 'train'} has {len(train)} image(s); at least 2 are needed "
                "(one to train on, one to validate on)"
            )
        order = np.random.default_rng(seed).permutation(len(train))
        splits = {
            "train": [train[i] for i in order[n_val:]],
            "val": [train[i] for i in order[:n_val]],
            "test": load_folder_cases(data_dir / "test", k),
        }
    else:
        if not (data_dir / "images").is_dir():  # neither layout: say what is there
            found = ", ".join(sorted(f"{p.name}/" for p in data_dir.iterdir() if p.is_dir()))
            raise SystemExit(
                f"error: {data_dir} holds neither images/ + masks/ nor train/ + test/ (each with "
                f"images/ and masks/); found: {found or 'no folders'}"
            )
        cases = load_folder_cases(data_dir, k)
        if len(cases) < 3:
            raise SystemExit(
                f"error: {data_dir / 'images'} has {len(cases)} image(s); at least 3 are needed "
                "for a train / val / test split (or use train/ and test/ folders)"
            )
        splits = split_patients(cases, seed, PHOTO_SPLIT_FRACTIONS)
    cases = [c for split in splits.values() for c in split]
    return splits, names or class_names_for(cases)


def normalize_photo(pixels: np.ndarray) -> np.ndarray:
    """Z-score each colour channel of a photo, (C, D, H, W) -> same shape."""
    mean = pixels.mean(axis=(1, 2, 3), keepdims=True)
    std = pixels.std(axis=(1, 2, 3), keepdims=True)
    return ((pixels - mean) / (std + 1e-6)).astype(np.float32)


@dataclass
class Photo:
    """One photo ready for training and scoring at native resolution."""

    case_id: str
    image: np.ndarray  # (C, H, W) float32, each channel z-scored over the photo
    labels: np.ndarray  # (H, W) int64 class indices, IGNORE_INDEX outside the field of view
    fov: np.ndarray  # (H, W) bool field of view (all True without a fov/ folder)
    height: int  # the photo's size before any padding (padding only for photos < PATCH_SIZE)
    width: int


def pad_to_patch(array: np.ndarray, fill=0) -> np.ndarray:
    """Pad the last two axes (H, W) at the bottom and right with `fill` up to PATCH_SIZE."""
    height, width = array.shape[-2:]
    pad = [(0, 0)] * (array.ndim - 2) + [(0, max(0, PATCH_SIZE - height))]
    return np.pad(array, pad + [(0, max(0, PATCH_SIZE - width))], constant_values=fill)


def prepare_photo(case: Case) -> Photo:
    """Normalize a photo Case and pad it (image 0, label ignored) up to at least PATCH_SIZE."""
    image = normalize_photo(case.image)[:, 0]  # (C, 1, H, W) -> (C, H, W)
    fov = case.fov[0] if case.fov is not None else np.ones(case.mask.shape[1:], dtype=bool)
    labels = np.where(fov, case.mask[0], IGNORE_INDEX)  # (H, W)
    height, width = labels.shape
    # a photo smaller than a patch is padded; the padding is ignored (label 255, outside the FOV)
    image, labels, fov = pad_to_patch(image), pad_to_patch(labels, IGNORE_INDEX), pad_to_patch(fov)
    return Photo(case.case_id, image, labels, fov, height, width)


class PatchSampler:
    """Random training patches with a foreground bias, paired dihedral flips and colour jitter."""

    def __init__(self, photos: list[Photo], seed: int):
        self.photos = photos
        self.rng = np.random.default_rng(seed)
        # flat indices of the pixels a patch may be centred on: foreground, and any valid pixel
        self.foreground = [
            np.flatnonzero((p.labels > 0) & (p.labels != IGNORE_INDEX)) for p in photos
        ]
        self.valid = [np.flatnonzero(p.labels != IGNORE_INDEX) for p in photos]
        sizes = np.array([max(len(v), 1) for v in self.valid], dtype=np.float64)
        self.weights = sizes / sizes.sum()  # large photos are drawn more often: every pixel alike

    def centre(self, i: int) -> tuple[int, int]:
        """A patch centre in photo i: on the foreground with probability PATCH_FOREGROUND."""
        pool = self.valid[i]
        if len(self.foreground[i]) and self.rng.random() < PATCH_FOREGROUND:
            pool = self.foreground[i]
        if len(pool) == 0:  # nothing valid (an empty field of view): anywhere
            pool = np.arange(self.photos[i].labels.size)
        return divmod(int(pool[self.rng.integers(len(pool))]), self.photos[i].labels.shape[1])

    def patch(self) -> tuple[np.ndarray, np.ndarray]:
        """One augmented patch: image (C, P, P) float32 and labels (P, P) int64."""
        i = int(self.rng.choice(len(self.photos), p=self.weights))
        photo, size = self.photos[i], PATCH_SIZE
        cy, cx = self.centre(i)
        # the centre lands anywhere in the middle half of the patch, not always in its middle
        top = cy - size // 2 + int(self.rng.integers(-size // 4, size // 4 + 1))
        left = cx - size // 2 + int(self.rng.integers(-size // 4, size // 4 + 1))
        top = int(np.clip(top, 0, photo.labels.shape[0] - size))
        left = int(np.clip(left, 0, photo.labels.shape[1] - size))
        image = photo.image[:, top : top + size, left : left + size]  # (C, P, P)
        labels = photo.labels[top : top + size, left : left + size]  # (P, P)
        # one draw of the 8 symmetries for both (paired); the image's axes (1, 2) = labels' (0, 1)
        turns, flip = int(self.rng.integers(4)), bool(self.rng.random() < 0.5)
        image, labels = np.rot90(image, turns, axes=(1, 2)), np.rot90(labels, turns)
        if flip:
            image, labels = image[:, :, ::-1], labels[:, ::-1]
        # colour jitter, image only: contrast x (1 +- j) and brightness +- j per channel
        channels = image.shape[0]
        scale = 1 + COLOR_JITTER * self.rng.uniform(-1, 1, size=(channels, 1, 1))
        shift = COLOR_JITTER * self.rng.uniform(-1, 1, size=(channels, 1, 1))
        image = image * scale + shift
        return np.ascontiguousarray(image, dtype=np.float32), np.ascontiguousarray(labels)

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A training batch: images (B, C, P, P) float32 and labels (B, P, P) int64."""
        patches = [self.patch() for _ in range(size)]
        images = torch.from_numpy(np.stack([p[0] for p in patches]))
        labels = torch.from_numpy(np.stack([p[1] for p in patches]).astype(np.int64))
        return images, labels


def window_starts(length: int, window: int, overlap: float) -> list[int]:
    """Start offsets of windows of `window` px covering `length` px, the last flush with the end."""
    if length <= window:
        return [0]
    stride = max(1, int(window * (1 - overlap)))
    starts = list(range(0, length - window, stride))
    return starts + [length - window]


def window_weight(height: int, width: int) -> np.ndarray:
    """(h, w) weights of one window: a Gaussian bump (sigma = 1/4 of the side), 1 at the centre.

    Pixels near a window's edge were predicted with zero padding in view, so where windows
    overlap the one that has the pixel nearer its centre counts more. Never 0: a pixel covered
    by a single window near its edge still gets that window's prediction.
    """
    ys = np.exp(-0.5 * ((np.arange(height) - (height - 1) / 2) / (height / 4)) ** 2)
    xs = np.exp(-0.5 * ((np.arange(width) - (width - 1) / 2) / (width / 4)) ** 2)
    return np.maximum(np.outer(ys, xs), 1e-3).astype(np.float32)


@torch.inference_mode()
def sliding_window_probabilities(
    model, image: np.ndarray, device, window: int | None = None, overlap: float | None = None
) -> np.ndarray:
    """Softmax probabilities of a whole photo from overlapping windows: (C, H, W) -> (K, H, W)."""
    model.eval()  # Gotcha: forget this and BatchNorm normalizes each window with its own stats
    window, overlap = window or WINDOW_SIZE, WINDOW_OVERLAP if overlap is None else overlap
    _, height, width = image.shape
    win_h, win_w = min(window, height), min(window, width)
    weight = torch.from_numpy(window_weight(win_h, win_w))  # (h, w)
    corners = [
        (top, left)
        for top in window_starts(height, win_h, overlap)
        for left in window_starts(width, win_w, overlap)
    ]
    total, norm = None, torch.zeros(height, width)
    pixels = torch.from_numpy(image)
    for start in range(0, len(corners), 4):  # 4 windows per forward pass
        batch_corners = corners[start : start + 4]
        crops = torch.stack([pixels[:, t : t + win_h, x : x + win_w] for t, x in batch_corners])
        crops = crops.to(device, memory_format=memory_format(device))  # (B, C, h, w)
        with autocast(device):
            probs = model(crops).float().softmax(dim=1).cpu()  # (B, K, h, w)
        if total is None:
            total = torch.zeros(probs.shape[1], height, width)
        # Gotcha: average probabilities, never logits or labels (a confident window would
        # outvote every other one, and labels cannot be averaged at all).
        for (t, x), p in zip(batch_corners, probs):
            total[:, t : t + win_h, x : x + win_w] += p * weight
            norm[t : t + win_h, x : x + win_w] += weight
    return (total / norm).numpy()  # (K, H, W), each pixel's probabilities sum to 1


def photo_probabilities(model, photo: Photo, device) -> np.ndarray:
    """(K, H, W) probabilities of a photo at its own size (padding for tiny photos cut off)."""
    probs = sliding_window_probabilities(model, photo.image, device)
    return probs[:, : photo.height, : photo.width]


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve = P(score of a random positive > a random negative), ties half.

    The Mann-Whitney rank formula: (sum of the positives' ranks - n1 (n1 + 1) / 2) / (n1 n0),
    with tied scores given their average rank. NaN when either class is absent.
    """
    positive = np.asarray(positive, dtype=bool).ravel()
    n1, n0 = int(positive.sum()), int((~positive).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    ranks = stats.rankdata(np.asarray(scores, dtype=np.float64).ravel())  # ties: average rank
    return float((ranks[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def score_photo(probs: np.ndarray, photo: Photo, names, threshold) -> tuple[dict, np.ndarray]:
    """Per-photo scores inside the field of view, and its confusion matrix (K, K) for pooling."""
    truth = photo.labels[: photo.height, : photo.width]  # IGNORE_INDEX outside the FOV
    inside = truth != IGNORE_INDEX
    pred = decide(probs, threshold)  # (H, W)
    # pixels outside the field of view hold IGNORE_INDEX, which confusion_matrix skips
    confusion = confusion_matrix(torch.as_tensor(pred), torch.as_tensor(truth), len(names)).numpy()
    scores = metrics_from_confusion(confusion)
    result = {metric: {n: float(v[k]) for k, n in enumerate(names)} for metric, v in scores.items()}
    result["auc"] = {n: roc_auc(probs[k][inside], truth[inside] == k) for k, n in enumerate(names)}
    return result, confusion


PHOTO_METRICS = ("dice", "iou", "sensitivity", "specificity", "precision", "auc")


def evaluate_photos(
    model, photos: list[Photo], names, device, threshold, probs=None, keep=None
) -> dict:
    """Scores per photo, their summary (mean, std, t interval) and the pooled scores.

    probs: the photos' probability maps if already predicted; keep: a list that receives the
    first 3 maps (for the figure, without predicting those photos again).
    """
    per_photo, pooled = [], np.zeros((len(names), len(names)), dtype=np.int64)
    for i, photo in enumerate(photos):
        p = probs[i] if probs is not None else photo_probabilities(model, photo, device)
        if keep is not None and len(keep) < 3:
            keep.append(p)
        scores, confusion = score_photo(p, photo, names, threshold)
        per_photo.append(dict(patient=photo.case_id, **scores))
        pooled += confusion
    summary = summarize(per_photo, names, PHOTO_METRICS)
    pooled_scores = metrics_from_confusion(pooled)
    summary["pooled"] = {
        m: {n: float(v[k]) for k, n in enumerate(names)} for m, v in pooled_scores.items()
    }
    summary["predicted_pixels"] = {n: int(c) for n, c in zip(names, pooled.sum(axis=0))}
    return summary


def photo_model_config(num_classes: int) -> dict:
    """The photo U-Net's constants, saved in the checkpoint to rebuild it later."""
    return {
        "in_channels": 3,
        "num_classes": num_classes,
        "base_channels": PHOTO_BASE_CHANNELS,
        "depth": PHOTO_DEPTH,
    }


def photo_data_config(names) -> dict:
    """What --predict needs to treat a photo like the training data."""
    return {"class_names": list(names), "modality": "photo", "lesion_threshold": None}


def photo_val_dice(model, photos: list[Photo], names, device) -> dict:
    """Mean Dice per foreground class over the validation photos (argmax decision)."""
    dice = evaluate_photos(model, photos, names, device, threshold=None)["dice"]
    return {n: dice[n] for n in names[1:]}


def train_photo_step(model, sampler, loss_fn, optimizer, scheduler, scaler, device, step) -> float:
    """One optimizer step on a fresh batch of random patches; returns its loss."""
    model.train()
    images, labels = sampler.batch(PHOTO_BATCH)
    images = images.to(device, memory_format=memory_format(device))
    labels = labels.to(device)
    with autocast(device):
        loss = loss_fn(model(images), labels)
    if not torch.isfinite(loss):
        raise SystemExit(
            f"error: the training loss became {loss.item()} at step {step}. "
            f"Lower LEARNING_RATE (now {LEARNING_RATE}) and run again."
        )
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    return loss.item()


def fit_photos(data: dict, device, checkpoint_path=None) -> tuple:
    """Train a fresh U-Net on random patches for PHOTO_STEPS steps; (best model, history)."""
    torch.manual_seed(SEED)
    names = data["class_names"]
    config = photo_model_config(len(names))
    model = UNet(**config).to(device, memory_format=memory_format(device))
    loss_fn = make_loss(LOSS, data["class_weights"].to(device))
    sampler = PatchSampler(data["train"], SEED)
    optimizer, scheduler = make_optimizer(model, PHOTO_STEPS, device)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")
    best = BestWeights(checkpoint_path, dict(config=config, data_config=photo_data_config(names)))
    history, losses, start = [], [], time.perf_counter()
    try:
        for step in tqdm(range(1, PHOTO_STEPS + 1), desc="training steps", leave=False):
            step_args = (model, sampler, loss_fn, optimizer, scheduler, scaler, device, step)
            losses.append(train_photo_step(*step_args))
            if step % VAL_EVERY and step != PHOTO_STEPS:
                continue
            dice = photo_val_dice(model, data["val"], names, device)
            score = float(np.nanmean(list(dice.values())))
            score = 0.0 if np.isnan(score) else score
            train_loss, losses = float(np.mean(losses)), []  # mean since the last validation
            history.append(dict(step=step, train_loss=train_loss, val_dice=dice, val_score=score))
            improved = best.update(model, score, step)
            shown = " ".join(f"{n} {d:.3f}" for n, d in dice.items())
            print(
                f"  step {step:5d}/{PHOTO_STEPS} | train loss {train_loss:.4f} | "
                f"val Dice {shown}{' (best)' if improved else ''} | "
                f"{time.perf_counter() - start:.0f} s"
            )
            if len(history) == 1:  # real data: say how long the rest will take
                print_eta(time.perf_counter() - start, step, PHOTO_STEPS)
            if best.waited >= PHOTO_PATIENCE:
                print(f"  early stopping: no improvement in {PHOTO_PATIENCE} validations")
                break
    except KeyboardInterrupt:
        print("\ninterrupted: training stopped, continuing with the best weights so far")
    if best.state is None:
        raise SystemExit("error: training stopped before the first validation; nothing to evaluate")
    model.load_state_dict(best.state)
    return model, history


def choose_photo_threshold(model, photos: list[Photo], names, device) -> tuple:
    """The last class's threshold from PHOTO_THRESHOLDS with the best mean validation Dice."""
    probs = [photo_probabilities(model, p, device) for p in photos]  # predict once, reuse
    by_threshold = {
        t: evaluate_photos(model, photos, names, device, t, probs)["dice"][names[-1]]
        for t in PHOTO_THRESHOLDS
    }
    best = max(by_threshold, key=lambda t: -1.0 if np.isnan(by_threshold[t]) else by_threshold[t])
    return best, by_threshold


def plot_photo_predictions(probs: list, photos: list[Photo], cases, names, threshold, path) -> None:
    """For the first test photos (one per map in probs): photo, mask, errors of the prediction."""
    rows = len(probs)
    fig, axes = plt.subplots(rows, 3, figsize=(12, 4 * rows), squeeze=False)
    for r in range(rows):
        photo, case = photos[r], cases[r]
        pred = decide(probs[r], threshold)
        truth = case.mask[0]
        fov = photo.fov[: photo.height, : photo.width]
        errors = np.zeros((*truth.shape, 3))  # green = found, red = missed, blue = false alarm
        errors[(pred > 0) & (truth > 0)] = (0, 1, 0)
        errors[(pred == 0) & (truth > 0) & fov] = (1, 0, 0)
        errors[(pred > 0) & (truth == 0) & fov] = (0, 0.4, 1)
        axes[r, 0].imshow(case.image[:, 0].transpose(1, 2, 0))
        axes[r, 0].set_title(f"{case.case_id}")
        axes[r, 1].imshow(truth, cmap="gray", interpolation="nearest")
        axes[r, 1].set_title(f"truth ({names[-1]})")
        axes[r, 2].imshow(errors, interpolation="nearest")
        axes[r, 2].set_title("green found, red missed, blue false alarm")
        for ax in axes[r]:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_photo_curves(history: list[dict], path: Path) -> None:
    """Training loss and validation Dice against optimizer steps."""
    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(10, 4))
    steps = [h["step"] for h in history]
    ax_loss.plot(steps, [h["train_loss"] for h in history], "o-")
    ax_loss.set(xlabel="optimizer step", ylabel="loss", title="Training loss (mean since last val)")
    ax_dice.plot(steps, [h["val_score"] for h in history], "o-")
    ax_dice.set(xlabel="optimizer step", ylabel="Dice", title="Validation Dice (whole photos)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def photo_training_data(splits: dict, photos: dict, names) -> dict:
    """Print the photos' split, sizes and foreground share; return what fit_photos() needs."""
    sizes = sorted({(c.mask.shape[2], c.mask.shape[1]) for s in splits.values() for c in s})
    shown_sizes = ", ".join(f"{w}x{h}" for w, h in sizes[:3]) + (" ..." if len(sizes) > 3 else "")
    train_labels = np.concatenate([p.labels.ravel() for p in photos["train"]])
    share = float(np.mean(train_labels[train_labels != IGNORE_INDEX] > 0))
    print(
        ", ".join(f"{s}: {len(c)} images" for s, c in splits.items())
        + f" | sizes {shown_sizes} | {', '.join(names[1:])} = {share:.1%} of training pixels"
        + (" (inside the field of view)" if splits["train"][0].fov is not None else "")
    )
    return {
        "train": photos["train"],
        "val": photos["val"],
        "class_names": names,
        "class_weights": class_weights_from(train_labels, len(names)),
        "foreground_share": share,
    }


def score_test_photos(model, photos: dict, splits: dict, names, device, threshold, best) -> tuple:
    """Score the test photos once, print the table, draw the first ones; (summary, warning)."""
    shown = []  # the first test photos' probability maps, for the figure
    test = evaluate_photos(model, photos["test"], names, device, threshold, keep=shown)
    print_summary("test", test, names, PHOTO_METRICS, unit="images")
    print(
        "  pooled over all test pixels: Dice "
        + " | ".join(f"{n} {test['pooled']['dice'][n]:.3f}" for n in names[1:])
    )
    collapsed = warn_if_collapsed(list(test["predicted_pixels"].values()), best["val_score"], names)
    plot_photo_predictions(
        shown, photos["test"], splits["test"], names, threshold, OUTPUT_DIR / "test_predictions.png"
    )
    plot_per_patient({"test": test["per_patient"]}, names, OUTPUT_DIR / "per_image_dice.png")
    return test, collapsed


def run_photos(splits: dict, names, device, checkpoint_path: Path, start: float) -> dict:
    """The --data-dir chapter: patches, steps, validation, threshold, the test photos once."""
    photos = {s: [prepare_photo(c) for c in cases] for s, cases in splits.items()}
    data = photo_training_data(splits, photos, names)
    print(
        f"training: {LOSS}, {PHOTO_STEPS} steps of {PHOTO_BATCH} patches of {PATCH_SIZE} px, "
        f"validation every {VAL_EVERY} steps"
    )
    model, history = fit_photos(data, device, checkpoint_path)
    plot_photo_curves(history, OUTPUT_DIR / "training_curves.png")
    best = max(history, key=lambda h: h["val_score"])
    threshold, val_by_threshold = choose_photo_threshold(model, photos["val"], names, device)
    store_threshold(checkpoint_path, threshold)
    print(
        f"best step {best['step']}; {names[-1]} threshold {threshold} chosen on validation "
        f"(val Dice {val_by_threshold[threshold]:.3f})"
    )
    test, collapsed = score_test_photos(model, photos, splits, names, device, threshold, best)
    total_seconds = time.perf_counter() - start
    metrics = {
        "test": test,
        "validation": {"threshold": threshold, "dice_by_threshold": val_by_threshold},
        "best_step": best["step"],
        "history": history,
        "data": {
            "images": {s: len(c) for s, c in splits.items()},
            "foreground_pixel_fraction": data["foreground_share"],
            "class_names": list(names),
        },
        "warning": collapsed,
        "total_seconds": round(total_seconds, 1),
        "device": str(device),
    }
    write_json(metrics, OUTPUT_DIR / "metrics.json")
    dice = " | ".join(
        f"{n} {test['dice'][n]:.3f} (pooled {test['pooled']['dice'][n]:.3f})" for n in names[1:]
    )
    print(f"\ntest Dice {dice} | total {total_seconds:.0f} s | outputs in {OUTPUT_DIR}")
    return metrics


# %% 10. Your own image: --predict
# ===============================================================================================
# A trained checkpoint segments one 2D image. For a CT model the image must be a slice shown in
# the training window (a PNG exported from a viewer with L=50, W=400, like
# outputs/example_slice.png) covering about IMAGE_SIZE x TARGET_SPACING mm: gray values 0..255
# are mapped back to HU, then preprocessed as in training, with two differences: the z-score
# uses this one slice's body pixels (training used the whole volume's), and the slice is repeated
# as its own neighbours. For a model trained on a folder of photos, the image is read in colour.
# Probabilities are resized back to the image's size with an explicit size= before the decision.


def load_model(checkpoint_path: Path, device: torch.device) -> tuple[UNet, dict]:
    """Rebuild the U-Net from a checkpoint (its saved config, not the constants above)."""
    checkpoint = torch.load(checkpoint_path, map_location=device, weights_only=True)
    model = UNet(**checkpoint["config"]).to(device, memory_format=memory_format(device))
    model.load_state_dict(checkpoint["model_state"])
    model.eval()
    return model, checkpoint


def image_inputs(path: Path, config: dict) -> tuple[np.ndarray, np.ndarray]:
    """(1, C_in, S, S) CT-model input for an image file, and the image as RGB (H, W, 3), [0, 1]."""
    rgb = read_image(path, "RGB").astype(np.float32) / 255.0  # (H, W, 3)
    size = (config["image_size"], config["image_size"])
    level, width = config["hu_window"]
    hu = level - width / 2 + rgb.mean(axis=2) * width  # gray 0..1 -> HU inside the window
    slice_ = normalize_body(window_hu(hu, level, width))[None, None]  # (1, 1, H, W)
    small = resample(slice_, (1, *size), order=1)  # (1, 1, S, S)
    return stack_context(small, config["context_slices"]), rgb  # neighbours: (1, 2k+1, S, S)


def predict_image(image_path: Path, checkpoint_path: Path, device: torch.device) -> Path:
    """Segment one image file with the saved checkpoint; write and return an overlay PNG."""
    if not image_path.is_file():
        raise SystemExit(f"error: no such image file: {image_path}")
    if not checkpoint_path.is_file():
        raise SystemExit(
            f"error: no trained model at {checkpoint_path}; "
            "train one first: python medical_segmentation.py "
            "(a --quick run's model: --quick --predict)"
        )
    model, checkpoint = load_model(checkpoint_path, device)
    config = checkpoint["data_config"]
    if config["modality"] == "photo":  # native resolution, sliding windows, as in training
        rgb = read_image(image_path, "RGB").astype(np.float32) / 255.0  # (H, W, 3)
        pixels = normalize_photo(rgb.transpose(2, 0, 1)[:, None])[:, 0]  # (3, H, W)
        height, width = rgb.shape[:2]  # a photo smaller than a patch is padded, as in training
        probs = sliding_window_probabilities(model, pad_to_patch(pixels), device)
        probs = probs[:, :height, :width]  # (K, H, W): the padding cut off again
    else:
        inputs, rgb = image_inputs(image_path, config)
        probs = torch.from_numpy(predict_probabilities(model, inputs, device))  # (K, 1, S, S)
        # Gotcha: resize probabilities with an explicit size= (the image's), never the labels.
        probs = probs.permute(1, 0, 2, 3)  # (K, 1, S, S) -> (1, K, S, S)
        probs = F.interpolate(probs, size=rgb.shape[:2], mode="bilinear")[0].numpy()  # (K, H, W)
    labels = decide(probs, config["lesion_threshold"])  # (H, W)
    colors = plt.get_cmap("tab10")(np.arange(len(config["class_names"])))[:, :3]
    overlay = rgb.copy()
    for k in range(1, len(colors)):
        overlay[labels == k] = 0.5 * overlay[labels == k] + 0.5 * colors[k]
    out_path = OUTPUT_DIR / f"{image_path.stem}_overlay.png"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((overlay * 255).round().astype(np.uint8)).save(out_path)
    fractions = ", ".join(
        f"{n} {np.mean(labels == k):.1%}" for k, n in enumerate(config["class_names"])
    )
    print(f"pixels per class: {fractions}; overlay written to {out_path}")
    return out_path


# %% 11. Putting it together
# ===============================================================================================
# main() below is the chapter in one screen: one call per section, in order. The helpers before
# it read the command line and write the results.


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Read --quick, --predict and --data-dir, and apply them (and NUM_THREADS) to this run."""
    parser = argparse.ArgumentParser(description="Medical image segmentation: Dice, imbalance, 3D.")
    parser.add_argument("--quick", action="store_true", help="tiny run in seconds (set-up check)")
    parser.add_argument("--predict", metavar="IMAGE", type=Path, help="segment your own image")
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="your photos: images/ + masks/, or train/ + test/ with those (sets DATA_DIR)",
    )
    # Cells run in a notebook have no __file__, and sys.argv holds the kernel's options, not ours
    # (`%run script.py --quick` sets __file__ and passes its own arguments: those are kept).
    if argv is None and "__file__" not in globals():
        argv = []
    args = parser.parse_args(argv)
    if args.quick:
        # Replace the settings at the top for this process (a notebook: restart the kernel after),
        # and keep its files in outputs/quick/
        # so that a set-up check never overwrites the model or metrics of a real run.
        globals().update(QUICK, OUTPUT_DIR=OUTPUT_DIR / "quick")
    if args.data_dir is not None:
        globals()["DATA_DIR"] = args.data_dir
    if NUM_THREADS is not None:
        torch.set_num_threads(NUM_THREADS)
    return args


def write_metrics(run: dict, device, start: float) -> dict:
    """Collect the run's numbers (`run`: what main() gathered), write metrics.json, print a line."""
    names, evaluation, training = run["names"], run["evaluation"], run["training"]
    results = evaluation["results"]
    total_seconds = time.perf_counter() - start
    metrics = {
        "test": results["test"],
        "test_ood": results.get("ood"),
        "validation": dict(
            threshold=evaluation["threshold"],
            lesion_dice_by_threshold={  # JSON keys: "argmax" for None, else the threshold
                "argmax" if t is None else t: d for t, d in evaluation["val_by_threshold"].items()
            },
        ),
        "loss_comparison": training["comparison"],
        "best_epoch": evaluation["best_epoch"],
        "history": training["history"],
        "data": dict(
            patients={s: len(c) for s, c in run["splits"].items()},
            lesion_voxel_fraction=run["cohort"]["lesion_fraction"],
            class_names=list(names),
            leakage=run["cohort"]["leakage"],
        ),
        "warning": evaluation["warning"],
        "total_seconds": round(total_seconds, 1),
        "device": str(device),
    }
    write_json(metrics, OUTPUT_DIR / "metrics.json")
    dice = " | ".join(f"{n} {results['test']['dice'][n]:.3f}" for n in names[1:])
    print(f"\ntest Dice {dice} | total {total_seconds:.0f} s | outputs in {OUTPUT_DIR}")
    return metrics


def main(argv: list[str] | None = None) -> dict:
    """The chapter in one screen: one call per section, in order (--predict: segment one image)."""
    args = parse_args(argv)
    device = pick_device(DEVICE)
    # cuDNN tries its convolution algorithms on the first batch of each shape and keeps the
    # fastest: worth it when shapes repeat, as they do here (no effect on a CPU).
    torch.backends.cudnn.benchmark = True
    checkpoint_path = OUTPUT_DIR / "best_model.pt"
    if args.predict is not None:  # your own image (section 10); --quick: the quick run's model
        return {"overlay": str(predict_image(args.predict, checkpoint_path, device))}

    start = time.perf_counter()
    seed_everything(SEED)
    OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
    print(f"device: {device} ({torch.get_num_threads()} CPU threads) | outputs: {OUTPUT_DIR}")
    if DATA_DIR is not None:  # your own photos (section 9) take their own path from here
        splits, names = load_folder_splits(Path(DATA_DIR).expanduser(), SEED)
        return run_photos(splits, names, device, checkpoint_path, start)
    # 1. Data: a synthetic CT cohort, split by patient (section 5 says why)
    splits, names = load_data()
    # 2. Preprocessing: window, normalize, resample to one spacing, stack 2.5D context
    prepared = {split: [preprocess(c) for c in cases] for split, cases in splits.items()}
    # 3. Model: the U-Net these settings build, and its size
    describe_model(prepared["train"][0].inputs.shape[1], names)
    # 4. Losses and metrics for imbalanced classes: class weights from the training labels
    data = training_data(prepared, names)
    # 5. Splitting by patient: the split, and what a slice-level split would have leaked
    cohort = describe_split(splits, prepared, names)
    # 6. Training: the main run, then a short comparison of losses
    training = train_and_compare(data, device, checkpoint_path)
    # 7. Evaluation: the threshold on validation, then the test patients, once
    evaluation = evaluate_test(training["model"], prepared, names, device, checkpoint_path)
    # 8. Visualization: preprocessing, curves, three views, Dice per patient
    make_figures(splits, prepared, training, evaluation, device)
    # 11. Putting it together: metrics.json and a one-line summary
    run = dict(splits=splits, names=names, cohort=cohort, training=training, evaluation=evaluation)
    return write_metrics(run, device, start)


# %% Appendix: plumbing
# ===============================================================================================
# Device choice, DataLoader workers, seeding, memory layout, mixed precision, the parameter count,
# the time estimate, atomic saves and JSON: the same helpers in every chapter, copied byte for byte
# (tests/test_chapters.py compares the copies), so that a diff between two chapters shows only the
# new idea. Nothing here is about segmentation.


def pick_device(name: str) -> torch.device:
    """Return the device named by DEVICE; "auto" prefers CUDA, then Apple MPS, then the CPU.

    Under torchrun (Example 2) every process takes the GPU numbered by its LOCAL_RANK.
    """
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_num_workers(setting) -> int:
    """DataLoader worker processes: "auto" = 0 on a CPU-only machine, min(8, cores - 1) with CUDA.

    On a CPU the workers would compete with the model for the same cores; a GPU finishes a batch
    faster than one process decodes the next one's JPEGs, so there the workers pay off.
    """
    if setting != "auto":
        return int(setting)
    if not torch.cuda.is_available():
        return 0
    return max(1, min(8, (os.cpu_count() or 1) - 1))


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch so that a run can be repeated exactly."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds CUDA and MPS


def memory_format(device: torch.device) -> torch.memory_format:
    """How image-like tensors are laid out in memory: channels-last on CUDA, the default elsewhere.

    channels_last keeps the shape N x C x H x W but stores the numbers as N x H x W x C, the
    order in which NVIDIA's tensor cores convolve fastest. On a CPU it brings no steady gain, so
    there we keep the default layout (benchmarks/README.md has the measurements).
    """
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def autocast(device: torch.device):
    """Mixed precision on CUDA (float16 matmuls, float32 where it matters); a no-op elsewhere.

    CPUs gain little from it here, and older PyTorch builds have no autocast for Apple MPS.
    """
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def count_parameters(model: nn.Module) -> int:
    """Number of parameters, trainable or frozen (weights and biases; buffers are not counted)."""
    return sum(parameter.numel() for parameter in model.parameters())


def print_eta(seconds_so_far: float, steps_done: int, steps_total: int) -> str:
    """Print (and return) one line: the time left if the remaining steps run at the rate so far."""
    minutes = seconds_so_far / max(steps_done, 1) * (steps_total - steps_done) / 60
    shown = f"{minutes:.0f}" if minutes >= 1 else f"{minutes:.1f}"  # "4", or "0.3" when short
    line = f"estimated time to the end of training: about {shown} min"
    print(line)
    return line


def save_checkpoint(state: dict, path: Path) -> None:
    """torch.save to a temporary file, then rename: the file at `path` is always complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)


def jsonable(value):
    """Plain JSON types: NaN -> None (null), numpy numbers -> float / int, tuples -> lists."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return None if np.isnan(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def write_json(data: dict, path: Path) -> None:
    """Write JSON atomically (temporary file, then rename); NaN (undefined scores) becomes null."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(jsonable(data), indent=2, allow_nan=False))
    os.replace(temporary, path)


if __name__ == "__main__":
    main()
