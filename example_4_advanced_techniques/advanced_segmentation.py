"""Example 4: advanced techniques: atrous convolution, attention, multi-scale, TTA, dense CRF,
morphology, mixed losses and hard example mining, measured in one ablation.

What you will learn
-------------------
- Atrous (dilated) convolution: how it grows the receptive field without losing resolution
  (output stride), how to compute that receptive field for a real network (encoder and decoder,
  walked along its own layers) and check it with a gradient, and why equal dilation rates leave
  holes (the gridding artefact) that hybrid rates such as 1, 2, 5 fill.
- Attention: CBAM (channel then spatial attention) and DANet-style position self-attention whose
  residual scale starts at 0, and how to draw the attention maps with forward hooks.
- Multi-scale training (a random rescale per batch, masks kept aligned with nearest-exact) and
  multi-scale inference.
- Test-time augmentation (TTA): flips, 90-degree rotations and scales, each undone on the
  prediction before the probabilities are averaged.
- A fully connected CRF (Krähenbühl & Koltun) with mean-field inference written with torch and
  numpy only: exact on a small image, made fast by a permutohedral lattice (the appendix), and
  how far the fast one is from the exact one.
- Morphological post-processing per class with scipy.ndimage.
- Losses beyond cross-entropy, all on logits and ignoring label 255: focal, soft Dice,
  Lovasz-softmax, the U-Net paper's boundary-weighted cross-entropy, a weighted mixed loss and
  OHEM (online hard example mining).
- Gradient checkpointing: memory saved against time added, measured, with BatchNorm updated once
  per step (not twice).
- Deployment: torch.export and ONNX (run with onnxruntime), each checked against the eager model,
  and the latency of all three.
- And above all: measure each trick, with more than one seed. Several do not help on this data,
  and the ablation says so.

How to run
----------
From this folder (``example_4_advanced_techniques/``)::

    python advanced_segmentation.py               # the ablation, one seed: 2.5-3 minutes
    python advanced_segmentation.py --seeds 0 1 2  # every row, three seeds: 18-23 minutes
    python advanced_segmentation.py --quick       # tiny set-up check (about 30 s): outputs/quick/
    python advanced_segmentation.py --predict my_image.png   # segment your own image (after a run)

Add ``--threads 1`` on a machine whose cores other programs keep busy. The ONNX check needs the
optional packages ``pip install onnx onnxscript onnxruntime``; without them the run prints one
line and skips it. Change a setting in the "Settings" cell below and run again. Each "# %%" line
starts a cell, so the file also runs cell by cell in Jupyter or VS Code.

Everything is written to ``outputs/`` beside this script: one checkpoint per trained ablation
row (``row0.pt`` .. ``row3.pt``), ``model.pt`` (the row that validation prefers, with the
inference steps validation kept: what ``--predict`` uses), ``model.pt2`` (the torch.export
program), ``model.onnx``, ``metrics.json`` and the figures ``receptive_field.png``,
``attention_maps.png``, ``predictions.png``, ``ablation.png`` and ``crf_exact_vs_lattice.png``.
``--seeds`` writes ``outputs/seeds/`` (a finished seed is reused if the run is interrupted).

What you should see
-------------------
On a 2-core CPU (no GPU), with torch's default two threads, the default run took 140 s and
printed (long lines cut here)::

    ablation                                     val mIoU test mIoU bound.F1 seconds  kept
    baseline                                       0.4784    0.4735   0.5541    21.0
    + attention (CBAM, position)                   0.5239    0.5199   0.6028    20.3
    + mixed loss with OHEM                         0.7977    0.7897   0.9598    28.0
    + multi-scale training                         0.7282    0.7167   0.9172    39.5
    + TTA: flips and rotations                     0.8183    0.8104   0.9652     1.3  yes
    + multi-scale inference (0.75, 1.0, 1.25)      0.6820    0.6812   0.8169     3.8  no
    + dense CRF                                    0.8301    0.8253   0.9579     1.8  yes
    + morphology                                   0.8171    0.8133   0.9416     0.3  no
    lattice vs exact CRF on a 64x64 image: labels agree on 99.93% of pixels, ...
    gradient checkpointing: saved activations 55.0 -> 37.8 MB (31% less), ...

The final pipeline (the mixed-loss row, flips and rotations, the tuned dense CRF) scores test
mIoU 0.825. ``--seeds 0 1 2`` repeats every row with three seeds (23 min on one thread): the
final pipeline scores 0.834 +- 0.006; the losses that weigh classes (+24 to +29 mIoU over
cross-entropy), attention (+4 to +5, mostly CBAM's doing), flips and rotations at test time and
the tuned CRF help in every seed, while multi-scale training, multi-scale inference and
morphology hurt in every seed. README.md has the table and the reasons.

References
----------
- Chen et al. (2017), DeepLab: atrous convolution, ASPP and fully connected CRFs.
  https://arxiv.org/abs/1606.00915 ; Rethinking Atrous Convolution (DeepLabV3),
  https://arxiv.org/abs/1706.05587
- Wang et al. (2018), Understanding Convolution for Semantic Segmentation (gridding, hybrid
  dilated convolution). https://arxiv.org/abs/1702.08502
- Woo et al. (2018), CBAM: Convolutional Block Attention Module. https://arxiv.org/abs/1807.06521
- Badrinarayanan et al. (2017), SegNet (the architecture our network is not).
  https://arxiv.org/abs/1511.00561
- Fu et al. (2019), Dual Attention Network for Scene Segmentation (DANet).
  https://arxiv.org/abs/1809.02983
- Krähenbühl & Koltun (2011), Efficient Inference in Fully Connected CRFs with Gaussian Edge
  Potentials. https://arxiv.org/abs/1210.5644 ; Adams, Baek, Davis (2010), Fast High-Dimensional
  Filtering Using the Permutohedral Lattice; Teichmann & Cipolla (2018), Convolutional CRFs,
  https://arxiv.org/abs/1805.04777
- Lin et al. (2017), Focal Loss. https://arxiv.org/abs/1708.02002 ; Berman et al. (2018), The
  Lovasz-Softmax loss. https://arxiv.org/abs/1705.08790 ; Milletari et al. (2016), V-Net (soft
  Dice). https://arxiv.org/abs/1606.04797 ; Shrivastava et al. (2016), OHEM.
  https://arxiv.org/abs/1604.03540 ; Ronneberger et al. (2015), U-Net (weight map).
  https://arxiv.org/abs/1505.04597
- Csurka et al. (2013), What is a good evaluation measure for semantic segmentation? (boundary F1).
- PyTorch docs: torch.utils.checkpoint, torch.export, torch.onnx,
  torch.autograd.graph.saved_tensors_hooks; onnxruntime, https://onnxruntime.ai
"""

import argparse
import contextlib
import copy
import hashlib
import importlib
import json
import math
import os
import random
import time
from pathlib import Path
from typing import NamedTuple

import matplotlib

matplotlib.use("Agg")  # draw into files, never open a window: works on servers and in CI
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from scipy import ndimage
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

# Files are read and written beside this script, whatever the working directory. A notebook
# (the script opened cell by cell with jupytext) has no __file__: there, the working directory.
HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()

# %% Settings
# ===============================================================================================
# Edit these: the knobs you will want to turn, then run again.
# data
IMAGE_SIZE = 64  # pixels per side; small, so that four models train on a 2-core CPU
SPLIT_SIZES = (256, 64, 96)  # train / val / test images
RARE_CLASS_PROBABILITY = 0.3  # chance that an image contains a "gem" (the rare class)
NOISE_STD = 0.07  # pixel noise added after the soft (blurred) boundaries are drawn
# model
WIDTH = 24  # channels at 1/2 resolution; 2 * WIDTH at 1/4 resolution (the output stride 4)
DILATIONS = (1, 2, 5)  # hybrid dilation rates of the context blocks; try (2, 2, 2) for gridding
GRAD_CHECKPOINT = False  # recompute each stage in backward instead of storing its activations
# training
EPOCHS = 12  # upper bound per ablation row; early stopping usually ends sooner
BATCH_SIZE = 16
LEARNING_RATE = 3e-3  # AdamW's step size at the start; poly decay brings it towards 0
PATIENCE = 4  # stop a row when validation mIoU has not improved for this many epochs
TRAIN_SCALES = (0.75, 1.0, 1.25, 1.5)  # multi-scale training: one random scale per batch
LOSS_WEIGHTS = dict(ohem=1.0, boundary_ce=0.5, dice=0.5, lovasz=0.5, focal=0.0)  # mixed loss
# inference and post-processing
TTA_SCALES = (0.75, 1.0, 1.25)  # multi-scale inference; with flips and 4 rotations: 24 passes
CRF_ITERATIONS = 5  # mean-field iterations (pydensecrf's README example; DeepLab used 10)
# system
SEED = 0  # same seed -> same data, same initial weights, same numbers
DEVICE = "auto"  # "auto" picks CUDA, then Apple MPS, then CPU; or name one: "cpu", "cuda", "mps"
NUM_THREADS = None  # CPU threads for PyTorch; None = one per core (fastest on an idle CPU). Set
#                  1 on a busy or shared CPU, where threads that wait for each other crawl
OUTPUT_DIR = HERE / "outputs"  # checkpoints, metrics.json, figures
# -----------------------------------------------------------------------------------------------
# Advanced settings: defaults that rarely need a change.
CBAM_REDUCTION = 4  # CBAM's MLP squeezes C -> C / 4 -> C (the paper's 16 needs wider layers)
ATTENTION_KEY_REDUCTION = 8  # position attention projects query / key to C / 8 (DANet)
WEIGHT_DECAY = 1e-4
FOCAL_GAMMA = 2.0  # focal loss: 0 gives cross-entropy, 2 is the paper's default
OHEM_THRESHOLD = 0.7  # OHEM keeps pixels whose true-class probability is below this ...
OHEM_MIN_KEPT = 4096  # ... but never fewer than this many pixels per batch
UNET_W0, UNET_SIGMA = 10.0, 5.0  # U-Net weight map: w0 * exp(-(d1 + d2)^2 / (2 sigma^2))
# the reference implementation's example values (pydensecrf's README); the speed benchmark's
CRF_PARAMS = dict(smooth_sxy=3.0, smooth_weight=3.0, app_sxy=80.0, app_srgb=13.0, app_weight=10.0)
CRF_CANDIDATES = (  # tried on the validation split; the best is used on the test split
    dict(CRF_PARAMS),  # pydensecrf's example values, made for 500 x 375 photographs
    dict(
        smooth_sxy=1.0, smooth_weight=3.0, app_sxy=67.0, app_srgb=3.0, app_weight=4.0
    ),  # DeepLab's VOC
    dict(
        smooth_sxy=1.0, smooth_weight=1.0, app_sxy=8.0, app_srgb=13.0, app_weight=2.0
    ),  # scaled to 64 px
    dict(
        smooth_sxy=1.0, smooth_weight=0.5, app_sxy=4.0, app_srgb=20.0, app_weight=1.0
    ),  # milder still
)
MORPHOLOGY = {  # per class: opening / closing radius, fill holes, smallest component kept (px)
    1: dict(open=1, close=1, fill_holes=True, min_size=30),  # field: big and compact
    2: dict(open=0, close=0, fill_holes=True, min_size=3),  # pebble: small, opening would erase it
    3: dict(open=0, close=0, fill_holes=False, min_size=6),  # wire: 1-2 px thin, never open
    4: dict(open=1, close=1, fill_holes=True, min_size=12),  # tile: medium squares
    5: dict(open=0, close=0, fill_holes=True, min_size=4),  # gem: rare and small
}
CRF_BENCHMARK_SIZE = (375, 500)  # H, W of the CRF speed benchmark (the reference's 500 x 375)
BOUNDARY_TOLERANCE = 2  # boundary F1: a boundary pixel counts as matched within this distance
NUM_WORKERS = "auto"  # DataLoader processes: "auto" = 0 on a CPU (a worker would compete with
# training for the same cores), min(8, cores - 1) with CUDA; or a number
# --quick: a tiny configuration that runs in about 30 s, to check that everything works
QUICK = dict(
    IMAGE_SIZE=32,
    SPLIT_SIZES=(32, 16, 16),
    WIDTH=8,
    EPOCHS=1,
    BATCH_SIZE=8,
    OHEM_MIN_KEPT=256,
    TTA_SCALES=(1.0,),
    CRF_CANDIDATES=CRF_CANDIDATES[:1],
    CRF_BENCHMARK_SIZE=(60, 80),
)
CLASS_NAMES = ("background", "field", "pebble", "wire", "tile", "gem")
CLASS_COLORS = np.array(  # for drawing label maps
    [
        [0.1, 0.1, 0.1],
        [0.2, 0.7, 0.2],
        [1.0, 0.9, 0.5],
        [0.3, 0.5, 1.0],
        [0.9, 0.4, 0.2],
        [1.0, 0.2, 1.0],
    ]
)
IGNORE_INDEX = 255  # label value the losses and the metrics skip


# %% 1. Data: scenes where the advanced techniques matter
# ===============================================================================================
# Each image is a textured ground with six classes that stress different weaknesses:
#   field  - one big blob with a wobbly outline (large scale: needs a large receptive field),
#   pebble - many tiny disks, 2-4 px across (small scale: needs resolution),
#   wire   - 1-2 px wide lines across the image (thin structures: the first to vanish when a
#            network downsamples, or when post-processing "cleans" the mask),
#   tile   - striped squares (texture, not colour, separates them from the ground),
#   gem    - a small diamond present in only ~30% of the images (the rare class),
# drawn with soft (blurred) edges and pixel noise, so boundaries are uncertain. Every sample is a
# pure function of (seed, split, index): the same triple always gives the same picture.
#
# We also precompute each training mask's U-Net weight map (`unet_weight_map` below explains it;
# section 4's boundary-weighted loss uses it); it travels with the image through the DataLoader.
# These masks have no unlabelled pixels, but every loss and metric below still skips label 255
# (the tests check it), because real datasets such as PASCAL VOC mark uncertain object borders
# with 255.


def smooth_noise(rng: np.random.Generator, size: int, cells: int = 5) -> np.ndarray:
    """Low-frequency texture in about [-1, 1], shape (size, size): a random grid, upsampled."""
    grid = rng.normal(size=(cells, cells))
    return ndimage.zoom(grid, size / cells, order=3, mode="reflect")[:size, :size]


def scene_layers(
    rng: np.random.Generator, size: int, x: np.ndarray, y: np.ndarray
) -> list[tuple[np.ndarray, int]]:
    """The objects of one scene as (mask (size, size) bool, class), in drawing order.

    x, y: the pixel centres' coordinates (size, size). Later layers cover earlier ones.
    """
    layers = []
    # 1) field: a blob whose radius wobbles with the angle (a noisy, irregular boundary)
    if rng.random() < 0.8:
        cx, cy = rng.uniform(0.25, 0.75, size=2) * size
        angle = np.arctan2(y - cy, x - cx)
        wobble = (
            1
            + 0.15 * np.sin(3 * angle + rng.uniform(0, 6))
            + 0.08 * np.sin(7 * angle + rng.uniform(0, 6))
        )
        layers.append((np.hypot(x - cx, y - cy) < rng.uniform(0.15, 0.3) * size * wobble, 1))
    # 2) tiles: striped squares, a mean colour close to the ground's: texture tells them apart
    for _ in range(rng.integers(0, 3)):
        cx, cy = rng.uniform(0.1, 0.9, size=2) * size
        half, theta = rng.uniform(0.06, 0.12) * size, rng.uniform(0, np.pi / 2)
        u = (x - cx) * np.cos(theta) + (y - cy) * np.sin(theta)
        v = -(x - cx) * np.sin(theta) + (y - cy) * np.cos(theta)
        layers.append((np.maximum(np.abs(u), np.abs(v)) < half, 4))
    # 3) pebbles: many tiny disks
    for _ in range(rng.integers(3, 9)):
        cx, cy = rng.uniform(0, 1, size=2) * size
        layers.append((np.hypot(x - cx, y - cy) < rng.uniform(1.0, 2.2), 2))
    # 4) wires: straight lines 1-2 px wide across the whole image
    for _ in range(rng.integers(1, 3)):
        cx, cy, theta = (
            rng.uniform(0.2, 0.8) * size,
            rng.uniform(0.2, 0.8) * size,
            rng.uniform(0, np.pi),
        )
        distance = np.abs(-(x - cx) * np.sin(theta) + (y - cy) * np.cos(theta))
        layers.append((distance < rng.uniform(0.5, 1.0), 3))
    # 5) the rare gem: a small diamond
    if rng.random() < RARE_CLASS_PROBABILITY:
        cx, cy = rng.uniform(0.15, 0.85, size=2) * size
        layers.append((np.abs(x - cx) + np.abs(y - cy) < rng.uniform(2.5, 4.0), 5))
    return layers


def draw_scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One image (3, size, size) float32 in [0, 1] and its label map (size, size) int64."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5  # pixel centres
    labels = np.zeros((size, size), dtype=np.int64)
    base = np.array(
        [
            [0.45, 0.42, 0.38],
            [0.25, 0.55, 0.25],
            [0.80, 0.75, 0.55],
            [0.10, 0.10, 0.16],
            [0.50, 0.45, 0.40],
            [0.70, 0.25, 0.70],
        ]
    )  # mean colour per class
    colors = np.clip(base + rng.uniform(-0.08, 0.08, size=base.shape), 0, 1)
    image = colors[0][:, None, None] + 0.12 * smooth_noise(rng, size)  # the textured ground
    stripes = 0.5 + 0.5 * np.sign(np.sin(2 * np.pi * (x + y) / 4.0))  # tile texture, period ~3 px
    for mask, cls in scene_layers(rng, size, x, y):
        labels[mask] = cls
        paint = colors[cls][:, None, None] * np.ones((3, size, size))
        if cls == 1:
            paint = paint + 0.1 * smooth_noise(rng, size)
        if cls == 4:
            paint = paint + 0.25 * (stripes - 0.5)
        image = np.where(mask[None], paint, image)
    image = ndimage.gaussian_filter(image, sigma=(0, 0.6, 0.6))  # soft, uncertain boundaries
    image = image * rng.uniform(0.85, 1.15) + rng.normal(0, NOISE_STD, size=image.shape)
    return np.clip(image, 0, 1).astype(np.float32), labels


def unet_weight_map(labels: np.ndarray, class_weights: np.ndarray) -> np.ndarray:
    """U-Net weight map (H, W) float32: w_c(class) + w0 * exp(-(d1 + d2)^2 / (2 sigma^2)).

    d1, d2 are the distances to the nearest and second-nearest object, an object being a
    connected component of non-background pixels (touching objects of two classes count as one).
    The exponential term is large on background squeezed between two objects, so the loss
    insists on keeping them apart; w_c balances class frequencies.
    """
    weights = class_weights[labels].astype(np.float32)  # (H, W)
    objects, count = ndimage.label(labels > 0)  # each connected object gets its own id
    if count >= 2:
        # distance of every pixel to each object: (count, H, W); EDT measures to the nearest 0
        distances = np.stack(
            [ndimage.distance_transform_edt(objects != k) for k in range(1, count + 1)]
        )
        d1, d2 = np.partition(distances, 1, axis=0)[:2]  # nearest and second nearest
        border = UNET_W0 * np.exp(-((d1 + d2) ** 2) / (2 * UNET_SIGMA**2))
        weights += np.where(labels == 0, border, 0).astype(np.float32)  # background pixels only
    return weights


def make_split(split: str, size: int, seed: int) -> dict[str, torch.Tensor]:
    """Images (N, 3, H, W) float32 and masks (N, H, W) int64 of one split."""
    split_id = ("train", "val", "test").index(split)
    count = SPLIT_SIZES[split_id]
    samples = [draw_scene(np.random.default_rng([seed, split_id, i]), size) for i in range(count)]
    return dict(
        images=torch.from_numpy(np.stack([s[0] for s in samples])),
        masks=torch.from_numpy(np.stack([s[1] for s in samples])),
    )


def make_datasets(seed: int) -> dict[str, dict[str, torch.Tensor]]:
    """The three splits; the train split also gets U-Net weight maps (N, H, W) float32."""
    data = {split: make_split(split, IMAGE_SIZE, seed) for split in ("train", "val", "test")}
    masks = data["train"]["masks"].numpy()
    frequency = np.bincount(masks.ravel(), minlength=len(CLASS_NAMES)) / masks.size
    # w_c: inverse frequency, square-rooted and scaled so the background weighs 1 (a mild balance)
    class_weights = np.sqrt(frequency[0] / np.maximum(frequency, 1e-6))
    data["train"]["weights"] = torch.from_numpy(
        np.stack([unet_weight_map(m, class_weights) for m in masks])
    )
    data["class_frequency"] = frequency
    return data


def describe_data(data: dict, device: torch.device) -> None:
    """Print the device, the split sizes and each class's share of the training pixels."""
    print(
        f"device: {device} | {IMAGE_SIZE}x{IMAGE_SIZE} images, splits {SPLIT_SIZES} | "
        f"outputs: {OUTPUT_DIR}"
    )
    shares = ", ".join(f"{n} {f:.1%}" for n, f in zip(CLASS_NAMES, data["class_frequency"]))
    print(f"class pixel shares (train): {shares}")


def train_loader(train: dict[str, torch.Tensor], seed: int) -> DataLoader:
    """Shuffled (image, mask, weight map) batches; the last incomplete one is dropped (BatchNorm
    needs more than one sample)."""
    dataset = TensorDataset(train["images"], train["masks"], train["weights"])
    return DataLoader(
        dataset,
        batch_size=BATCH_SIZE,
        shuffle=True,
        drop_last=True,
        num_workers=pick_num_workers(NUM_WORKERS),
        generator=torch.Generator().manual_seed(seed),
    )


# %% 2. Atrous convolution and the receptive field
# ===============================================================================================
# A 3x3 convolution with dilation d samples its 9 inputs d pixels apart: it sees a (2d+1)^2 window
# for the price of 9 weights, and keeps the resolution. DeepLab replaces the last strides of a
# network by dilations so that the features stay at output stride 8 or 16 (input size / feature
# size) instead of 32, and still see the whole object.
#
# Receptive field (RF) of a stack of layers (kernel k_i, stride s_i, dilation d_i):
#   RF = 1 + sum_i (k_i - 1) * d_i * (s_1 * ... * s_{i-1})
# Each layer widens the RF by (k - 1) * d steps of the current "jump" (the product of the
# strides before it). We check the formula against a measurement: back-propagate from one output
# pixel of a stack of all-ones convolutions and see which input pixels receive gradient.
#
# Gridding: three 3x3 layers all with dilation 2 have RF 13, but they only ever touch every
# second pixel: the gradient map is a checkerboard with holes. Hybrid dilation rates with no
# common factor, such as 1, 2, 5 (Wang et al., 2018), cover every pixel of their RF (17).


def receptive_field(layers: list[tuple[int, int, int]]) -> int:
    """Receptive field in input pixels of a stack of (kernel, stride, dilation) layers."""
    rf, jump = 1, 1
    for kernel, stride, dilation in layers:
        rf += (kernel - 1) * dilation * jump  # 1) widen by (k - 1) * d steps of the current jump
        jump *= stride  # 2) later layers step over `stride` times more input pixels
    return rf


def gradient_receptive_field(layers: list[tuple[int, int, int]], size: int = 97) -> np.ndarray:
    """Which input pixels affect the centre output pixel: (size, size) |gradient|, 0 = unseen."""
    convs = [
        nn.Conv2d(
            1,
            1,
            kernel,
            stride=stride,
            dilation=dilation,
            padding=dilation * (kernel - 1) // 2,
            bias=False,
        )
        for kernel, stride, dilation in layers
    ]
    net = nn.Sequential(*convs)
    for conv in convs:
        nn.init.ones_(conv.weight)  # all-ones: no accidental zero weight can hide a pixel
    x = torch.zeros(1, 1, size, size, requires_grad=True)
    y = net(x)  # (1, 1, h, w)
    y[0, 0, y.shape[-2] // 2, y.shape[-1] // 2].backward()
    return x.grad[0, 0].abs().numpy()


def extent(grad_map: np.ndarray) -> int:
    """Width in pixels of the non-zero region of a gradient map (its measured receptive field)."""
    columns = np.flatnonzero(grad_map.sum(axis=0) > 0)
    return int(columns[-1] - columns[0] + 1)


DILATION_RATES = {  # three stacks of 3x3 convolutions: plain, gridding, hybrid
    "rates 1,1,1": (1, 1, 1),
    "rates 2,2,2 (gridding)": (2, 2, 2),
    "rates 1,2,5 (hybrid)": (1, 2, 5),
}


def gridding_report() -> dict:
    """Receptive field (formula and gradient) and the holes inside it for each stack of
    DILATION_RATES; prints one line."""
    results = {}
    for name, rates in DILATION_RATES.items():
        layers = [(3, 1, r) for r in rates]
        grad = gradient_receptive_field(layers, size=25)  # (25, 25), centre pixel 12
        rf = receptive_field(layers)
        box = grad[12 - rf // 2 : 12 + rf // 2 + 1, 12 - rf // 2 : 12 + rf // 2 + 1]
        results[name] = dict(
            formula=rf, measured=extent(grad), holes_inside_rf=int((box == 0).sum())
        )
    print(
        "three 3x3 layers: "
        + "; ".join(
            f"{name} RF {r['formula']} px (gradient {r['measured']} px), "
            f"{r['holes_inside_rf']} holes"
            for name, r in results.items()
        )
    )
    return results


# %% 3. Model: a small DeepLab-style network with optional attention
# ===============================================================================================
# Two stride-2 stages bring the features to 1/4 of the input (output stride 4). Instead of more
# strides, three residual 3x3 blocks with dilations DILATIONS grow the receptive field past the
# 64 px image's width (a central pixel sees all of it) while staying at 1/4 resolution. A light
# decoder upsamples to 1/2, concatenates the 1/2-resolution stem features (they remember where
# the thin wires are), classifies every pixel and upsamples the logits to the input size.
#
#   image -> stem (/2) ------------------------------------------------+
#              |                                                        concat -> fuse -> 1x1
#              +-> down (/4) -> dilated 1,2,5 -> [CBAM] -> [position] -> up x2 -+      -> up x2
#
# Receptive field (section 2's formula, walked along this path): the encoder alone reaches
# 83 px; the decoder's two 3x3 convolutions at 1/2 resolution and its two bilinear upsamplings
# add 12 to 16 more: 95 or 99 px, depending on where the output pixel falls between the coarse
# pixels. With either attention block it is the whole image (CBAM's channel attention averages
# over all positions; the position attention's softmax runs over all positions).
#
# Attention (optional, CBAM and position attention each have ablation rows), on the 1/4
# features where it is cheap:
# - CBAM re-weights channels ("what": sigmoid of a shared MLP applied to the average- and
#   max-pooled features) and then positions ("where": sigmoid of a 7x7 conv over the per-pixel
#   channel mean and max).
# - Position attention (DANet, a non-local block) lets every position gather features from all
#   positions, weighted by softmax(query . key). Its output is gamma * attended + x, with gamma a
#   learned scalar that starts at 0: at initialisation the block is exactly the identity, so it
#   cannot disturb a working network, and it is switched on only as far as training finds useful.
#   The attention matrix is (HW) x (HW): 256 x 256 at 16 x 16 features, but 268 million entries at
#   128 x 128. That is why it lives at the coarsest stage.
#
# Gradient checkpointing (GRAD_CHECKPOINT): during training every stage is run through
# torch.utils.checkpoint, which keeps only the stage's input and recomputes its insides during
# backward. Less memory for activations, one extra forward pass of time (measured in section 7).
# The recomputation must not update BatchNorm's running statistics a second time (see run()):
# then a checkpointed step is the same step as a plain one (a test checks statistics and grads).


class ConvBNReLU(nn.Sequential):
    """3x3 conv (maybe strided or dilated) -> BatchNorm -> ReLU; output H, W = input / stride."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1):
        super().__init__(
            # padding = dilation keeps the size for a dilated 3x3: it reaches `dilation` px out
            nn.Conv2d(
                in_channels,
                out_channels,
                3,
                stride,
                padding=dilation,
                dilation=dilation,
                bias=False,
            ),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class DilatedResidual(nn.Module):
    """x + ConvBNReLU with dilation d: (N, C, H, W) -> (N, C, H, W), receptive field + 2d steps."""

    def __init__(self, channels: int, dilation: int):
        super().__init__()
        self.body = ConvBNReLU(channels, channels, dilation=dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ChannelAttention(nn.Module):
    """CBAM channel attention: (N, C, H, W) -> weights (N, C, 1, 1) in (0, 1)."""

    def __init__(self, channels: int, reduction: int):
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.mlp = nn.Sequential(  # shared by both pooled descriptors; 1x1 convs = a per-pixel MLP
            nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        average = x.mean(dim=(2, 3), keepdim=True)  # (N, C, 1, 1)
        maximum = x.amax(dim=(2, 3), keepdim=True)  # (N, C, 1, 1)
        return torch.sigmoid(self.mlp(average) + self.mlp(maximum))


class SpatialAttention(nn.Module):
    """CBAM spatial attention: (N, C, H, W) -> map (N, 1, H, W) in (0, 1)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size=7, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat(
            [x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)], dim=1
        )  # (N, 2, H, W)
        return torch.sigmoid(self.conv(pooled))


class CBAM(nn.Module):
    """Channel attention, then spatial attention; keeps the shape (N, C, H, W)."""

    def __init__(self, channels: int, reduction: int):
        super().__init__()
        self.channel = ChannelAttention(channels, reduction)
        self.spatial = SpatialAttention()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.channel(x)  # (N, C, H, W) * (N, C, 1, 1)
        return x * self.spatial(x)  # (N, C, H, W) * (N, 1, H, W)


class PositionAttention(nn.Module):
    """DANet position attention: out = gamma * attend(x) + x, gamma starts at 0; keeps the shape."""

    def __init__(self, channels: int, key_reduction: int):
        super().__init__()
        inner = max(channels // key_reduction, 1)
        self.query = nn.Conv2d(channels, inner, 1)
        self.key = nn.Conv2d(channels, inner, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))  # residual scale: the block starts as identity

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """Row i = how much position i attends to every position: (N, HW, HW), rows sum to 1."""
        q = self.query(x).flatten(2).transpose(1, 2)  # (N, C', H, W) -> (N, HW, C')
        k = self.key(x).flatten(2)  # (N, C', HW)
        return torch.softmax(q @ k, dim=-1)  # (N, HW, HW): softmax over the positions attended to

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        attention = self.attention_map(x)  # (N, HW, HW)
        v = self.value(x).flatten(2)  # (N, C, HW)
        attended = v @ attention.transpose(1, 2)  # (N, C, HW): position i = sum_j a[i, j] v[:, j]
        return self.gamma * attended.view(n, c, h, w) + x


# Why this name: the network is not SegNet (Badrinarayanan et al., 2017: an encoder-decoder whose
# decoder upsamples with the encoder's max-pooling indices). It is a small DeepLab-style network:
# a dilated (atrous) cascade instead of more strides, as in DeepLabV3's cascaded blocks, with the
# hybrid rates of Wang et al., and a DeepLabV3+-like decoder that concatenates the 1/2-resolution
# features, plus optional attention. Hence DilatedAttentionNet.


class DilatedAttentionNet(nn.Module):
    """Dilated encoder, optional CBAM and position attention, light decoder.

    (N, 3, H, W) -> logits (N, classes, H, W).
    """

    output_stride = 4  # input size / size of the deepest features

    def __init__(
        self,
        num_classes=6,
        width=24,
        dilations=(1, 2, 5),
        cbam=False,
        position_attention=False,
        cbam_reduction=4,
        key_reduction=8,
        grad_checkpoint=False,
    ):
        super().__init__()
        self.dilations = tuple(dilations)
        self.grad_checkpoint = grad_checkpoint
        self.stem = nn.Sequential(ConvBNReLU(3, width, stride=2), ConvBNReLU(width, width))  # 1/2
        self.down = nn.Sequential(
            ConvBNReLU(width, 2 * width, stride=2), ConvBNReLU(2 * width, 2 * width)
        )  # 1/4
        self.context = nn.Sequential(*(DilatedResidual(2 * width, d) for d in self.dilations))
        self.cbam = CBAM(2 * width, cbam_reduction) if cbam else nn.Identity()
        self.position = (
            PositionAttention(2 * width, key_reduction) if position_attention else nn.Identity()
        )
        self.fuse = nn.Sequential(ConvBNReLU(3 * width, width), ConvBNReLU(width, width))
        self.classifier = nn.Conv2d(width, num_classes, 1)  # a linear classifier at every pixel

    def layer_path(self) -> list[tuple]:
        """The deepest path from the input to the logits, read from the modules themselves.

        Steps: ("conv", kernel, stride, dilation, padding), ("upsample", factor) for a bilinear
        resize, and ("global",) where an attention block lets every position see every other.
        """

        def convs(stage: nn.Module) -> list[tuple]:
            return [
                ("conv", m.kernel_size[0], m.stride[0], m.dilation[0], m.padding[0])
                for m in stage.modules()
                if isinstance(m, nn.Conv2d)
            ]

        path = convs(self.stem) + convs(self.down) + convs(self.context)  # encoder: 1 -> 1/4
        if not isinstance(self.cbam, nn.Identity) or not isinstance(self.position, nn.Identity):
            path.append(("global",))  # CBAM's average pooling, the position attention's softmax
        path += [("upsample", 2)] + convs(self.fuse) + convs(self.classifier)  # decoder at 1/2
        return path + [("upsample", 2)]  # the logits back to the input size

    def run(self, stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Apply one stage, through gradient checkpointing when it is switched on and useful."""
        if self.grad_checkpoint and self.training and torch.is_grad_enabled():
            # use_reentrant=False: the recommended implementation (works with inputs that do not
            # require grad, and with torch.autograd.grad).
            # Gotcha: the stage runs twice, once now and once again in backward. A BatchNorm in
            # training mode updates its running statistics both times (num_batches_tracked 2
            # after one step, the averages moving twice as fast), so we put them back after the
            # recomputation: context_fn returns (forward context, recomputation context). The
            # recomputation itself still normalises with the batch's statistics, as it must.
            return checkpoint(
                stage,
                x,
                use_reentrant=False,
                context_fn=lambda: (contextlib.nullcontext(), restored_batchnorm_statistics(stage)),
            )
        return stage(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = self.run(self.stem, x)  # (N, w, H/2, W/2)
        high = self.run(self.down, low)  # (N, 2w, H/4, W/4)
        high = self.run(self.context, high)  # same shape, receptive field now covers the image
        high = self.position(self.cbam(high))  # attention keeps the shape
        # Gotcha: upsample to an explicit size=, the skip's size; with odd inputs (H/2 = 37.5)
        # a scale_factor=2 would be one pixel off and the concatenation would fail.
        high = F.interpolate(high, size=low.shape[-2:], mode="bilinear", align_corners=False)
        y = self.run(self.fuse, torch.cat([low, high], dim=1))  # (N, 3w, H/2, W/2) -> (N, w, ..)
        logits = self.classifier(y)  # (N, classes, H/2, W/2)
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


@contextlib.contextmanager
def restored_batchnorm_statistics(module: nn.Module):
    """Within the block BatchNorm layers work as usual; on leaving it, their running_mean,
    running_var and num_batches_tracked are put back as they were when it was entered."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [[b.clone() for b in (m.running_mean, m.running_var, m.num_batches_tracked)]
             for m in norms if m.track_running_stats]  # fmt: skip
    try:
        yield
    finally:
        with torch.no_grad():
            for m, values in zip([m for m in norms if m.track_running_stats], saved):
                for buffer, value in zip(
                    (m.running_mean, m.running_var, m.num_batches_tracked), values
                ):
                    buffer.copy_(value)


def model_config(cbam: bool = False, position_attention: bool = False) -> dict:
    """The constants that define a network, stored in its checkpoint to rebuild it later."""
    return dict(
        num_classes=len(CLASS_NAMES),
        width=WIDTH,
        dilations=DILATIONS,
        cbam=cbam,
        position_attention=position_attention,
        cbam_reduction=CBAM_REDUCTION,
        key_reduction=ATTENTION_KEY_REDUCTION,
        grad_checkpoint=GRAD_CHECKPOINT,
    )


# Section 2's formula is for a plain stack of convolutions. A real segmentation network also has a
# decoder: convolutions at a finer resolution and bilinear upsamplings. To count those too we walk
# the network's path (DilatedAttentionNet.layer_path(), read from its modules) backwards from one
# output pixel and track the interval of positions that can reach it, along one axis:
# - a convolution (kernel k, stride s, dilation d, padding p) at output position i reads inputs
#   i * s - p + j * d for j = 0 .. k - 1;
# - a bilinear upsampling by f (align_corners=False) reads the two input pixels around
#   (i + 0.5) / f - 0.5, so the answer depends on where i falls between the coarse pixels: that
#   is why this network's receptive field is 95 px at some output pixels and 99 px at others;
# - an attention block that mixes all positions makes it the whole image.
# Far from the image border, no step is cut off by padding, so this is exact (a test checks it
# against the gradient of the real model); near the border the interval is clipped.


def receptive_interval(path: list[tuple], index: int) -> tuple[int, int] | None:
    """First and last input position (one axis) that reach output position `index` along a
    layer_path(); None when an attention step makes every input position reach it."""
    low, high = index, index
    for step in reversed(path):  # from the output back to the input
        if step[0] == "global":
            return None
        if step[0] == "conv":
            _, kernel, stride, dilation, padding = step
            low, high = low * stride - padding, high * stride - padding + (kernel - 1) * dilation
        else:  # ("upsample", factor): bilinear, align_corners=False: two taps around the source
            factor = step[1]
            low = math.floor((low + 0.5) / factor - 0.5)
            high = math.floor((high + 0.5) / factor - 0.5) + 1
    return low, high


def measured_receptive_interval(model: nn.Module, size: int, index: int) -> tuple[int, int]:
    """The input columns whose gradient reaches output pixel (index, index) of `model`.

    On a copy whose convolutions compute positive weighted averages, in eval mode, and a positive
    input: every activation is then positive and moderate, so no ReLU, no cancellation and no
    saturated sigmoid can hide a pixel that is connected (the all-ones trick of
    gradient_receptive_field, for a real network).
    """
    probe = copy.deepcopy(model).eval().cpu().float()
    with torch.no_grad():
        for conv in [m for m in probe.modules() if isinstance(m, nn.Conv2d)]:
            conv.weight.abs_().div_(conv.weight.sum(dim=(1, 2, 3), keepdim=True))
        for module in probe.modules():
            if isinstance(module, PositionAttention):
                module.gamma.fill_(1.0)  # gamma = 0 would hide the attention path
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)) + 0.1
    x.requires_grad_(True)
    probe(x)[0, :, index, index].sum().backward()
    columns = np.flatnonzero(x.grad[0].abs().sum(dim=(0, 1)).numpy() > 0)
    return int(columns[0]), int(columns[-1])


def model_receptive_field(model: nn.Module, size: int = 128) -> dict:
    """The real network's receptive field at four neighbouring output pixels: walked along its
    layer path and measured with a gradient (size: input side, large enough to avoid borders)."""
    path = model.layer_path()
    positions = range(size // 2, size // 2 + 4)  # four phases of the two x2 upsamplings
    walked = [receptive_interval(path, i) for i in positions]
    measured = [measured_receptive_interval(model, size, i) for i in positions]
    widths = [None if w is None else w[1] - w[0] + 1 for w in walked]
    return dict(
        whole_image=walked[0] is None,  # attention: every input pixel reaches every output
        walked_px=sorted(set(widths)) if walked[0] is not None else None,
        measured_px=sorted({hi - lo + 1 for lo, hi in measured}),
        walked_equals_measured=None if walked[0] is None else walked == measured,
        encoder_formula_px=receptive_field(
            [step[1:4] for step in path[: path.index(("upsample", 2))] if step[0] == "conv"]
        ),
        output_stride=model.output_stride,
        input_px=size,
    )


def network_receptive_fields() -> dict:
    """The receptive field of the network (width 8), without and with attention; prints it."""
    config = dict(model_config(), width=8)
    results = {
        "model without attention": model_receptive_field(DilatedAttentionNet(**config)),
        "model with attention": model_receptive_field(
            DilatedAttentionNet(**dict(config, cbam=True, position_attention=True))
        ),
    }
    plain = results["model without attention"]
    print(
        f"receptive field of the network: encoder {plain['encoder_formula_px']} px, with the "
        f"decoder {' or '.join(map(str, plain['walked_px']))} px (walked along its layers; "
        f"gradient: {' or '.join(map(str, plain['measured_px']))} px); with attention: "
        f"{'the whole image' if results['model with attention']['whole_image'] else '?'}"
    )
    return results


# %% 4. Losses and metrics
# ===============================================================================================
# Every loss takes logits (N, C, H, W) and labels (N, H, W) and skips pixels labelled 255.
# Gotcha: before any gather()/one_hot() with the labels, replace 255 by a valid class (we use 0)
# and mask those pixels out afterwards: indexing with 255 is out of range (a device-side assert on
# CUDA).
# - Focal loss: cross-entropy times (1 - p_t)^gamma, which fades out pixels that are already
#   easy (p_t near 1); alpha optionally weighs classes. gamma = 0 and no alpha is cross-entropy.
# - Soft Dice: 1 - 2|P.G| / (|P| + |G|) with probabilities P. Convention here: per class over the
#   whole batch, averaged over the classes present in the batch's labels (an absent class is
#   left out, so a perfect prediction gives exactly 0).
# - Lovasz-softmax: a surrogate of 1 - IoU (the Lovasz extension of the Jaccard loss, convex and
#   piecewise linear in the per-pixel errors, not smooth), per present class, averaged. It aims
#   at the metric more directly than cross-entropy (at the IoU of the batch, not of the whole
#   split); its authors suggest cross-entropy first and Lovasz to fine-tune, while the mixed loss
#   simply adds it with weight 0.5 from the start.
# - Boundary-weighted cross-entropy: per-pixel cross-entropy times the U-Net weight map (section
#   1's `unet_weight_map` explains it), averaged over valid pixels.
# - OHEM cross-entropy: only the hard pixels count: those whose true-class probability is at most
#   OHEM_THRESHOLD, and always at least OHEM_MIN_KEPT of the hardest. Convention here: the mean is
#   over the kept pixels (some codebases divide by all pixels instead).
# - The mixed loss sums these with LOSS_WEIGHTS.
#
# Metrics (over a whole split, never averaged per image): a confusion matrix gives
# IoU_c = TP / (TP + FP + FN). Rule: a class absent from both prediction and ground truth has
# undefined IoU (0 / 0 = NaN) and is left out of the mean (nanmean). IoU barely moves when an
# edge shifts by a pixel, so we add a boundary metric: boundary F1 (Csurka et al., 2013). For each
# class, a boundary pixel of the prediction is a hit when a ground-truth boundary pixel is within
# BOUNDARY_TOLERANCE px (precision), and vice versa (recall); F1 per class, same NaN rule.


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of values where mask is True; 0 (still differentiable) when the mask is empty."""
    return (values * mask).sum() / mask.sum().clamp(min=1)


def true_class_log_prob(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """log p(true class) per pixel (N, H, W); ignored pixels get class 0's (mask them yourself)."""
    safe = torch.where(target == IGNORE_INDEX, 0, target)  # Gotcha: 255 would index out of range
    return F.log_softmax(logits, dim=1).gather(1, safe[:, None])[:, 0]  # (N, 1, H, W) -> (N, H, W)


def focal_loss(logits, target, gamma=None, alpha=None) -> torch.Tensor:
    """-alpha_t * (1 - p_t)^gamma * log p_t, mean over valid pixels; alpha: None or (C,) weights."""
    gamma = FOCAL_GAMMA if gamma is None else gamma
    log_p = true_class_log_prob(logits, target)  # (N, H, W)
    loss = -((1 - log_p.exp()) ** gamma) * log_p
    if alpha is not None:
        safe = torch.where(target == IGNORE_INDEX, 0, target)  # Gotcha: 255 would index past alpha
        loss = loss * torch.as_tensor(alpha, dtype=loss.dtype, device=loss.device)[safe]
    return masked_mean(loss, target != IGNORE_INDEX)


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """1 - soft Dice per class, averaged over the classes present in target (valid pixels only)."""
    num_classes = logits.shape[1]
    valid = (target != IGNORE_INDEX)[:, None]  # (N, 1, H, W)
    probs = logits.softmax(dim=1) * valid  # (N, C, H, W), zero at ignored pixels
    onehot = F.one_hot(torch.where(valid[:, 0], target, 0), num_classes)  # (N, H, W, C)
    onehot = onehot.permute(0, 3, 1, 2) * valid  # (N, C, H, W)
    intersection = (probs * onehot).sum(dim=(0, 2, 3))  # (C,)
    total = probs.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3))  # (C,)
    dice = (2 * intersection + eps) / (total + eps)
    present = onehot.sum(dim=(0, 2, 3)) > 0
    if not present.any():
        return logits.sum() * 0  # nothing to score, but keep the graph so backward() works
    return 1 - dice[present].mean()


def lovasz_grad(gt_sorted: torch.Tensor) -> torch.Tensor:
    """Gradient of the Lovasz extension of the Jaccard loss w.r.t. errors sorted descending.

    gt_sorted: (P,) labels (1 = class pixel) in that order, or (P, C): one such column per class.
    """
    gts = gt_sorted.sum(dim=0)
    intersection = gts - gt_sorted.cumsum(0)
    union = gts + (1 - gt_sorted).cumsum(0)
    jaccard = 1 - intersection / union  # Jaccard loss of the top-1, top-2, ... errors
    jaccard[1:] = jaccard[1:] - jaccard[:-1]  # differences = weights of each sorted error
    return jaccard


def lovasz_softmax(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Lovasz-softmax loss (Berman et al.), mean over the classes present in target."""
    num_classes = logits.shape[1]
    probs = logits.softmax(dim=1).permute(0, 2, 3, 1).reshape(-1, num_classes)  # (N*H*W, C)
    labels = target.reshape(-1)
    valid = labels != IGNORE_INDEX
    probs, labels = probs[valid], labels[valid]  # (P, C), (P,)
    foreground = F.one_hot(labels, num_classes).to(probs.dtype)  # (P, C): column c = "is class c"
    present = foreground.sum(dim=0) > 0  # (C,) only classes present in the labels count
    if not present.any():
        return logits.sum() * 0  # Gotcha: a plain 0 would not backpropagate
    errors = (foreground - probs).abs()  # (P, C)
    # One sort for all classes, each column by its own descending error (the same numbers as a
    # loop of one sort per class, in one call).
    errors_sorted, order = torch.sort(errors, dim=0, descending=True)  # (P, C) each
    grads = lovasz_grad(foreground.gather(0, order))  # (P, C)
    losses = (errors_sorted * grads).sum(dim=0)  # (C,) dot products
    return losses[present].mean()


def boundary_weighted_ce(
    logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy per pixel times the U-Net weight map (N, H, W), mean over valid pixels."""
    ce = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="none")  # (N, H, W)
    return masked_mean(ce * weights, target != IGNORE_INDEX)


@torch.no_grad()
def ohem_mask(logits, target, threshold=None, min_kept=None) -> torch.Tensor:
    """Pixels OHEM keeps (N, H, W) bool: p_true <= max(threshold, p of the min_kept-th hardest)."""
    threshold = OHEM_THRESHOLD if threshold is None else threshold
    min_kept = OHEM_MIN_KEPT if min_kept is None else min_kept
    valid = target != IGNORE_INDEX
    p_true = true_class_log_prob(logits, target).exp()  # (N, H, W)
    candidates = p_true[valid]
    if candidates.numel() == 0 or min_kept <= 0:
        return valid & (p_true <= threshold)
    # the k-th smallest p without sorting all of them (kthvalue is linear time, a sort is not)
    kth = torch.kthvalue(candidates, min(min_kept, candidates.numel())).values
    return valid & (p_true <= torch.clamp(kth, min=threshold))


def ohem_cross_entropy(logits, target, threshold=None, min_kept=None) -> torch.Tensor:
    """Cross-entropy averaged over the hard pixels chosen by ohem_mask."""
    ce = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="none")  # (N, H, W)
    return masked_mean(ce, ohem_mask(logits, target, threshold, min_kept))


def mixed_loss(logits, target, weights, loss_weights=None) -> torch.Tensor:
    """sum_k LOSS_WEIGHTS[k] * loss_k; terms with weight 0 are not computed. Terms: ce (plain
    cross-entropy), ohem, boundary_ce, dice, lovasz, focal."""
    loss_weights = LOSS_WEIGHTS if loss_weights is None else loss_weights
    terms = dict(
        ce=lambda: F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX),
        ohem=lambda: ohem_cross_entropy(logits, target),
        boundary_ce=lambda: boundary_weighted_ce(logits, target, weights),
        dice=lambda: soft_dice_loss(logits, target),
        lovasz=lambda: lovasz_softmax(logits, target),
        focal=lambda: focal_loss(logits, target),
    )
    return sum(w * terms[name]() for name, w in loss_weights.items() if w)


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts (C, C): row = true class, column = predicted; target pixels outside [0, C) skipped.

    pred and target are integer tensors of the same shape (N x H x W); IGNORE_INDEX (255) lies
    outside [0, C), so ignored pixels are never counted.
    """
    valid = (target >= 0) & (target < num_classes)
    bins = num_classes * target[valid].long() + pred[valid].long()  # one bin per (true, pred) pair
    return torch.bincount(bins, minlength=num_classes**2).reshape(num_classes, num_classes)


def metrics_from_confusion(confusion: torch.Tensor) -> dict:
    """IoU per class (C,) (NaN for a class absent from both prediction and ground truth) and its
    mean over the classes that have one: {"iou": tensor (C,), "miou": float}."""
    confusion = confusion.double()
    tp = confusion.diag()
    iou = tp / (confusion.sum(0) + confusion.sum(1) - tp)  # 0 / 0 -> NaN: the rule above
    return dict(iou=iou, miou=float(torch.nanmean(iou)))


def class_boundary(labels: np.ndarray, c: int) -> np.ndarray:
    """Boundary pixels (H, W) bool of class c: in the class, with a 3x3 neighbour outside it."""
    region = labels == c
    # border_value=1: the image frame is not a boundary (the object may continue outside)
    return region & ~ndimage.binary_erosion(region, structure=np.ones((3, 3)), border_value=1)


def boundary_counts(pred: np.ndarray, target: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, 4) counts for one image: [pred hits, pred boundary px, truth hits, truth boundary px]."""
    counts = np.zeros((num_classes, 4), dtype=np.int64)
    valid = target != IGNORE_INDEX
    for c in range(num_classes):
        b_pred, b_true = class_boundary(pred, c) & valid, class_boundary(target, c) & valid
        # distance of every pixel to the nearest boundary pixel of the other map (inf if none)
        to_true = (
            ndimage.distance_transform_edt(~b_true) if b_true.any() else np.full(pred.shape, np.inf)
        )
        to_pred = (
            ndimage.distance_transform_edt(~b_pred) if b_pred.any() else np.full(pred.shape, np.inf)
        )
        counts[c] = [
            (b_pred & (to_true <= BOUNDARY_TOLERANCE)).sum(),
            b_pred.sum(),
            (b_true & (to_pred <= BOUNDARY_TOLERANCE)).sum(),
            b_true.sum(),
        ]
    return counts


def boundary_f1(counts: np.ndarray) -> np.ndarray:
    """Boundary F1 per class (C,) from summed counts; NaN when a class has no boundary anywhere."""
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = counts[:, 0] / counts[:, 1]
        recall = counts[:, 2] / counts[:, 3]
        f1 = 2 * precision * recall / (precision + recall)
    f1[(counts[:, 1] > 0) ^ (counts[:, 3] > 0)] = 0.0  # boundaries on one side only: all wrong
    f1[(counts[:, 1] > 0) & (counts[:, 3] > 0) & (counts[:, 0] + counts[:, 2] == 0)] = 0.0
    return f1


def score_labels(preds: torch.Tensor, masks: torch.Tensor) -> dict:
    """mIoU, boundary F1 and per-class IoU of label maps (N, H, W) against masks (N, H, W)."""
    num_classes = len(CLASS_NAMES)
    scores = metrics_from_confusion(confusion_matrix(preds, masks, num_classes))
    counts = sum(boundary_counts(p.numpy(), t.numpy(), num_classes) for p, t in zip(preds, masks))
    bf1 = boundary_f1(counts)
    return dict(
        miou=scores["miou"],
        boundary=float(np.nanmean(bf1)),
        iou_per_class={name: round(float(v), 4) for name, v in zip(CLASS_NAMES, scores["iou"])},
    )


# %% 5. Training, with multi-scale augmentation
# ===============================================================================================
# Every batch gets one random quarter turn and flip (the scenes have no "up"), the same for
# image, mask and weight map. With multi-scale training the batch is also resized by a random
# factor from TRAIN_SCALES: the network sees pebbles at 1.5 px and at 3 px radius, the
# situation multi-scale *inference* (section 6) is made for (there it runs on the row validation
# prefers, which may have trained at one scale). One scale per batch keeps the tensors
# rectangular.
# Gotcha: images are resized bilinearly, masks (and the weight map) with nearest-neighbour:
# interpolating labels 2 and 4 would invent label 3. And use mode="nearest-exact", not PyTorch's
# legacy "nearest", which shifts the mask by up to half a pixel against the image (rescale_batch).
#
# The loop itself is the one from Example 1: validation mIoU every epoch, the best weights saved
# atomically, early stopping, a NaN loss stops with a message; Ctrl-C stops the run, keeping the
# checkpoints written so far (a row that did not finish never enters the table).
#
# The ablation. The default run trains the four rows marked default=True below, each adding one
# idea to the one before (same data, same seed, same epochs, each row from the same initial
# random state). `--seeds 0 1 2` (section 10) trains every row: each changes ONE thing against
# the row named in "against" (CBAM alone, position attention alone, each loss alone), so that
# each claim has its own row.


def apply_transform(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    """Rotate (..., H, W) by k quarter turns, then, if `flip`, flip left-right (training, TTA)."""
    x = torch.rot90(x, k, dims=(-2, -1))
    return x.flip(-1) if flip else x


def rescale_batch(images, masks, weights, scale: float):
    """Resize a batch by `scale`: images bilinear (antialiased when they shrink), masks and
    weights nearest-exact, so that all three stay aligned. Sizes are rounded."""
    size = [max(8, round(s * scale)) for s in images.shape[-2:]]  # round, never truncate
    shrinking = size[0] < images.shape[-2] or size[1] < images.shape[-1]
    # antialias: a shrinking bilinear resize otherwise samples the 3 px tile stripes (aliasing)
    images = F.interpolate(
        images, size=size, mode="bilinear", align_corners=False, antialias=shrinking
    )
    # Gotcha: mode="nearest" is PyTorch's legacy rule: output pixel i copies input floor(i / s),
    # which puts the mask up to half an input pixel off the bilinearly resized image (bilinear
    # and "nearest-exact" both map pixel centres to pixel centres: floor((i + 0.5) / s)).
    masks = F.interpolate(masks[:, None].float(), size=size, mode="nearest-exact")[:, 0].long()
    weights = F.interpolate(weights[:, None], size=size, mode="nearest-exact")[:, 0]
    return images, masks, weights


def load_model(path: Path, device: torch.device) -> tuple[DilatedAttentionNet, dict]:
    """Rebuild a network from its checkpoint (its saved config, not the constants above)."""
    state = torch.load(path, map_location=device, weights_only=True)
    model = DilatedAttentionNet(**state["config"]).to(device, memory_format=memory_format(device))
    model.load_state_dict(state["model_state"])
    return model.eval(), state


@torch.inference_mode()
def predict_logits(model: nn.Module, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Plain prediction: logits (N, C, H, W) on the CPU, in batches."""
    model.eval()  # Gotcha: without eval() BatchNorm normalises with the batch's own statistics
    return torch.cat(
        [model(images[i : i + 64].to(device)).float().cpu() for i in range(0, len(images), 64)]
    )


def make_optimizer(model: nn.Module, device: torch.device, total_steps: int) -> tuple:
    """AdamW with poly decay (DeepLab: lr * (1 - step / total)^0.9) and a gradient scaler that
    is active on CUDA only (float16 mixed precision). Returns (optimizer, scheduler, scaler)."""
    # fused=True: one kernel updates all weights instead of ~10 small operations per weight
    # tensor (same maths, a faster step). CPU and CUDA have it.
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=LEARNING_RATE,
        weight_decay=WEIGHT_DECAY,
        fused=device.type in ("cpu", "cuda"),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: (1 - step / total_steps) ** 0.9
    )
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")
    return optimizer, scheduler, scaler


def train_one_epoch(model, loader, trainer: tuple, row: dict, epoch: int, augment, device) -> float:
    """One pass over the training batches, each turned, flipped and (multi-scale rows) rescaled
    at random; returns the mean loss. trainer: (optimizer, scheduler, scaler)."""
    optimizer, scheduler, scaler = trainer
    loss_weights = LOSS_WEIGHTS if row["loss"] == "mixed" else row["loss"]  # {term: weight}
    model.train()
    losses = []
    for step, (images, masks, weights) in enumerate(
        tqdm(loader, desc=f"{row['name']} epoch {epoch}", leave=False)
    ):
        k, flip = int(augment.integers(4)), bool(augment.integers(2))  # the same for all three
        images, masks, weights = (apply_transform(t, k, flip) for t in (images, masks, weights))
        if row["multiscale"]:
            images, masks, weights = rescale_batch(
                images, masks, weights, float(augment.choice(TRAIN_SCALES))
            )
        images, masks, weights = images.to(device), masks.to(device), weights.to(device)
        with autocast(device):
            logits = model(images)
        logits = logits.float()  # losses in float32: softmax and sorting are fp16-fragile
        loss = mixed_loss(logits, masks, weights, loss_weights)
        if not torch.isfinite(loss):
            raise SystemExit(
                f"error: the training loss became {loss.item()} ({row['name']}, "
                f"epoch {epoch}, batch {step}). Lower LEARNING_RATE (now {LEARNING_RATE}) "
                "or the LOSS_WEIGHTS and run again."
            )
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        losses.append(loss.item())
    return float(np.mean(losses))


def validate_and_checkpoint(model, data, row, device, path, epoch, best) -> tuple[float, bool]:
    """Validation mIoU of this epoch, and whether it beat `best`; if so the weights are saved
    (atomically) to path, with what it takes to rebuild the network."""
    val = data["val"]
    val_labels = predict_logits(model, val["images"], device).argmax(1)  # (N, H, W)
    val_miou = score_labels(val_labels, val["masks"])["miou"]
    improved = val_miou > best
    if improved:
        save_checkpoint(
            dict(
                model_state=model.state_dict(),
                config=model_config(row["cbam"], row["position"]),
                image_size=IMAGE_SIZE,
                epoch=epoch,
                val_miou=val_miou,
            ),
            path,
        )
    return val_miou, improved


def fit(
    model: DilatedAttentionNet, data: dict, row: dict, device: torch.device, path: Path, seed=None
) -> list[dict]:
    """Train one ablation row (its loss, optional multi-scale); best checkpoint -> path."""
    seed = SEED if seed is None else seed
    loader = train_loader(data["train"], seed)
    trainer = make_optimizer(model, device, EPOCHS * len(loader))
    augment = np.random.default_rng(seed)  # quarter turns, flips and scales, reproducible
    path.unlink(missing_ok=True)  # an earlier run's checkpoint must not pass for this row's
    history, best, stale, start = [], -1.0, 0, time.perf_counter()
    try:
        for epoch in range(1, EPOCHS + 1):
            train_loss = train_one_epoch(model, loader, trainer, row, epoch, augment, device)
            val_miou, improved = validate_and_checkpoint(
                model, data, row, device, path, epoch, best
            )
            history.append(dict(epoch=epoch, train_loss=train_loss, val_miou=val_miou))
            best, stale = (val_miou, 0) if improved else (best, stale + 1)
            print(
                f"  epoch {epoch:2d} | loss {train_loss:.4f} | val mIoU {val_miou:.4f}"
                f"{' (best, saved)' if improved else ''}"
            )
            if epoch == 1:  # this row's time left, if it does not stop early
                print_eta(time.perf_counter() - start, 1, EPOCHS)
                print("  (for this row; the other rows and the inference steps come after)")
            if stale >= PATIENCE:
                print(f"  early stopping: no improvement for {PATIENCE} epochs")
                break
    except KeyboardInterrupt:  # stop the whole run: a half-trained row must not join the table
        raise SystemExit(
            f"\ninterrupted during {row['name']!r}: stopped; the checkpoints of the rows trained "
            f"so far (and this row's best) are in {path.parent}"
        ) from None
    if not path.is_file():  # Ctrl-C exits above: here no epoch ever scored (a NaN mIoU)
        raise SystemExit(
            "error: no epoch saved a checkpoint (validation mIoU undefined in every epoch); "
            "nothing to evaluate"
        )
    return history


def ablation_row(name, cbam, position, loss, against, multiscale=False, default=False) -> dict:
    """One trained row. loss: {mixed_loss term: weight}, or "mixed" for LOSS_WEIGHTS; against:
    the row it changes one thing from; default: trained in the default (one-seed) run too."""
    return dict(
        name=name, cbam=cbam, position=position, loss=loss, against=against,
        multiscale=multiscale, default=default,
    )  # fmt: skip


CE, ATTENTION = dict(ce=1.0), "+ attention (CBAM, position)"
ABLATION_ROWS = (
    ablation_row("baseline", False, False, CE, None, default=True),
    ablation_row("+ CBAM", True, False, CE, "baseline"),
    ablation_row("+ position attention", False, True, CE, "baseline"),
    ablation_row(ATTENTION, True, True, CE, "baseline", default=True),
    ablation_row("attention, OHEM cross-entropy", True, True, dict(ohem=1.0), ATTENTION),
    ablation_row("attention, boundary-weighted CE", True, True, dict(boundary_ce=1.0), ATTENTION),
    ablation_row("attention, soft Dice", True, True, dict(dice=1.0), ATTENTION),
    ablation_row("attention, Lovasz-softmax", True, True, dict(lovasz=1.0), ATTENTION),
    ablation_row("+ mixed loss with OHEM", True, True, "mixed", ATTENTION, default=True),
    ablation_row(
        "+ multi-scale training", True, True, "mixed", "+ mixed loss with OHEM", True, True
    ),
)
TRAINING_ROWS = tuple(row for row in ABLATION_ROWS if row["default"])  # the default run's rows


def train_rows(rows: tuple, data: dict, seed: int, device: torch.device, folder: Path, prefix=""):
    """Train each row from the same initial state; checkpoints folder/{prefix}row{i}.pt.

    Returns (score rows, {name: training history}, [(best model, its checkpoint state)]).
    """
    results, histories, models = [], {}, []
    for index, row in enumerate(rows):
        row_start = time.perf_counter()
        torch.manual_seed(seed)  # every row starts from the same random state
        model = DilatedAttentionNet(**model_config(row["cbam"], row["position"]))
        model = model.to(device, memory_format=memory_format(device))
        print(f"[{index + 1}/{len(rows)}] {row['name']}: {count_parameters(model):,} parameters")
        path = folder / f"{prefix}row{index}.pt"
        histories[row["name"]] = fit(model, data, row, device, path, seed)
        model, state = load_model(path, device)
        test = data["test"]
        test_labels = predict_logits(model, test["images"], device).argmax(1)  # (N, H, W)
        scores = score_labels(test_labels, test["masks"])
        seconds = time.perf_counter() - row_start
        results.append(
            dict(name=row["name"], **scores, seconds=seconds, val_miou=state["val_miou"])
        )
        models.append((model, state))
        print(
            f"  test mIoU {scores['miou']:.4f} | boundary F1 {scores['boundary']:.4f} | "
            f"{seconds:.0f} s"
        )
    return results, histories, models


# %% 6. Inference tricks: multi-scale + TTA, dense CRF, morphology
# ===============================================================================================
# Test-time augmentation. Run the network on transformed copies of the image (flips, quarter
# turns, rescalings), *undo* each transform on the output, and average the class probabilities.
# Rules that keep it correct:
#   1) undo in the reverse order: flip back first, then rotate back (rot90 by -k);
#   2) resize the logits back with an explicit size= (the input's H, W), never scale_factor=:
#      round(0.75 * 75) = 56, and 56 * (1 / 0.75) is not 75 again;
#   3) softmax, then average probabilities; never average argmax label maps.
# Cost: len(TTA_SCALES) x 2 flips x 4 rotations = 24 forward passes per image.


def tta_transforms(flips: bool, rot90: bool) -> list[tuple[int, bool]]:
    """The (quarter turns, flip) pairs TTA uses; (0, False) is the identity."""
    return [
        (k, flip)
        for k in (range(4) if rot90 else [0])
        for flip in ((False, True) if flips else (False,))
    ]


def invert_transform(y: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    """Exact inverse of apply_transform (section 5): flip back first, then rotate back."""
    y = y.flip(-1) if flip else y
    return torch.rot90(y, -k, dims=(-2, -1))


@torch.inference_mode()
def tta_predict(
    model: nn.Module, images: torch.Tensor, scales=None, flips=True, rot90=True
) -> torch.Tensor:
    """Average class probabilities (N, C, H, W) over scales x flips x quarter turns."""
    scales = TTA_SCALES if scales is None else scales
    model.eval()
    height, width = images.shape[-2:]
    total, count = 0.0, 0
    for scale in scales:
        size = (max(8, round(height * scale)), max(8, round(width * scale)))  # round, not int()
        # antialias when shrinking: bilinear alone samples the 3 px tile stripes (aliasing)
        scaled = (
            images
            if size == (height, width)
            else F.interpolate(
                images, size=size, mode="bilinear", align_corners=False, antialias=scale < 1
            )
        )
        for k, flip in tta_transforms(flips, rot90):
            logits = model(apply_transform(scaled, k, flip))
            logits = invert_transform(logits, k, flip)  # undone: back to `size`
            # Gotcha: back to the input's exact size with size=, not scale_factor=1/scale
            logits = F.interpolate(
                logits, size=(height, width), mode="bilinear", align_corners=False
            )
            total = total + logits.float().softmax(dim=1)
            count += 1
    return total / count


def tta_probabilities(
    model: nn.Module, images: torch.Tensor, device: torch.device, **options
) -> torch.Tensor:
    """tta_predict(**options) in batches on `device`; probabilities (N, C, H, W) on the CPU."""
    return torch.cat(
        [
            tta_predict(model, images[i : i + 32].to(device), **options).cpu()
            for i in range(0, len(images), 32)
        ]
    )


# Dense CRF. The network labels pixels independently and its outputs are blurry at edges. A fully
# connected CRF (Krähenbühl & Koltun, 2011) adds a pairwise term between *every* pair of pixels:
#   E(x) = sum_i U_i(x_i) + sum_{i<j} mu(x_i, x_j) k(f_i, f_j),  U_i = -log p_i (the network)
#   k = w_app * exp(-|p_i - p_j|^2 / 2 sxy_a^2 - |I_i - I_j|^2 / 2 srgb^2)   (appearance: nearby
#       pixels of similar colour should agree)
#     + w_smooth * exp(-|p_i - p_j|^2 / 2 sxy_s^2)                           (smoothness)
# with Potts compatibility mu = [x_i != x_j]. Mean-field inference repeats
#   Q <- softmax(-U + sum_m w_m * Kn_m Q)
# where Kn = D^-1/2 K D^-1/2 is the kernel matrix normalised symmetrically (D = K 1, each pixel's
# own term included), as in the reference implementation (pydensecrf). The defaults in
# CRF_PARAMS are that implementation's: smoothness sxy 3, weight 3; appearance sxy 80, srgb 13
# (colours in 0..255), weight 10; 5 iterations.
#
# mean_field below is the whole algorithm. dense_crf_exact feeds it the kernels as N x N
# matrices, which is exact but only fits small images: 4096 x 4096 numbers at 64 x 64, but 35
# billion at 500 x 375. K Q is also a Gaussian *filter* in the feature space (x, y, r, g, b), and
# the appendix "a fast dense CRF" computes that filter with a permutohedral lattice in O(N d):
# dense_crf, the same CRF for full-size images, which the pipeline uses. Its price: the lattice
# only approximates the Gaussian (about 1% off after normalisation); compare_crf_exact measures
# what that does to the labels.


def crf_features(image: np.ndarray, sxy: float, srgb: float | None = None) -> np.ndarray:
    """Per-pixel features (H*W, 2 or 5) in row-major order: (x, y[, r, g, b]) / sigmas; image
    (H, W, 3) in 0..255."""
    h, w = image.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    columns = [xx / sxy, yy / sxy]
    if srgb is not None:
        columns += [image[..., c] / srgb for c in range(3)]
    return np.stack([c.ravel() for c in columns], axis=1).astype(np.float64)


def mean_field(probs: torch.Tensor, kernels: list, iterations: int) -> torch.Tensor:
    """Mean-field with Potts compatibility: probs (N, L) -> Q (N, L).

    kernels: [filter] where filter(Q (N, L) torch) = sum_m w_m Kn_m Q, a new tensor, for one or
    more kernels, each normalised symmetrically (Kn = D^-1/2 K D^-1/2, D = K 1) and weighted.
    """
    probs = probs.clamp(min=1e-8)
    unary = torch.log(probs)  # -U
    q = probs / probs.sum(1, keepdim=True)  # = softmax(-U): the network's own probabilities
    for _ in range(iterations):
        scores = unary
        for filter_ in kernels:
            scores = filter_(q).add_(scores)  # -U + w * D^-1/2 K D^-1/2 Q
        q = torch.softmax(scores, dim=1)  # Potts: agreeing neighbours add to a label's score
    return q


def dense_crf_exact(
    probs: torch.Tensor, image: torch.Tensor, params: dict | None = None, iterations=None
) -> torch.Tensor:
    """The dense CRF with exact N x N kernels: probs (L, H, W), image (3, H, W) in [0, 1] ->
    Q (L, H, W). Small images only: memory grows as N^2 (dense_crf is the fast one)."""
    params = CRF_PARAMS if params is None else params
    iterations = CRF_ITERATIONS if iterations is None else iterations
    labels, h, w = probs.shape
    pixels = image.permute(1, 2, 0).numpy().astype(np.float64) * 255.0
    kernels = []
    for weight, feats in (
        (params["smooth_weight"], crf_features(pixels, params["smooth_sxy"])),
        (params["app_weight"], crf_features(pixels, params["app_sxy"], params["app_srgb"])),
    ):
        if not weight:
            continue
        f = torch.from_numpy(feats)
        matrix = torch.exp(-torch.cdist(f, f).square() / 2).float()  # (N, N), diagonal = 1
        norm = torch.rsqrt((matrix @ torch.ones(len(f), 1)).clamp(min=1e-20))  # D^-1/2, (N, 1)
        kernels.append(lambda v, k=matrix, s=norm, w=weight: (k @ (s * v)) * (w * s))
    flat = probs.reshape(labels, -1).T.contiguous().float()
    return mean_field(flat, kernels, iterations).T.reshape(labels, h, w)


def crf_labels(probs: torch.Tensor, images: torch.Tensor, params: dict) -> torch.Tensor:
    """The fast dense CRF (appendix) on every image: probs (N, L, H, W), images (N, 3, H, W)
    -> labels (N, H, W)."""
    return torch.stack([dense_crf(p, im, params).argmax(0) for p, im in zip(probs, images)])


def compare_crf_exact(probs: torch.Tensor, image: torch.Tensor, params: dict) -> tuple[dict, tuple]:
    """Lattice vs exact CRF on one small image: label agreement and probability difference."""
    start = time.perf_counter()
    exact = dense_crf_exact(probs, image, params)
    exact_seconds = time.perf_counter() - start
    start = time.perf_counter()
    approx = dense_crf(probs, image, params)
    lattice_seconds = time.perf_counter() - start
    changed = probs.argmax(0) != exact.argmax(0)  # pixels where the exact CRF changed the label
    result = dict(
        pixels=int(probs[0].numel()),
        label_agreement=float((exact.argmax(0) == approx.argmax(0)).float().mean()),
        agreement_on_changed_pixels=(
            float((exact.argmax(0) == approx.argmax(0))[changed].float().mean())
            if changed.any()
            else None
        ),
        mean_abs_prob_diff=float((exact - approx).abs().mean()),
        max_abs_prob_diff=float((exact - approx).abs().max()),
        exact_seconds=exact_seconds,
        lattice_seconds=lattice_seconds,
    )
    return result, (probs.argmax(0), exact.argmax(0), approx.argmax(0))


# Morphology. Simple per-class clean-ups with scipy.ndimage on the label map: opening (erode then
# dilate) deletes specks and 1-px bridges, closing (dilate then erode) fills small gaps, hole
# filling closes interior holes, and connected components smaller than min_size are removed.
# Per class, because what is noise for one class is the signal of another: an opening of radius
# 1 erases a 2-px wire completely. A class may grow (closing, hole filling) only into background:
# otherwise closing the field would swallow the 1-px wire that crosses it, and filling its holes
# would swallow the gem lying on it. Pixels a class gives up take the label of the nearest pixel
# of another class (a distance transform with return_indices finds it): never the class that
# just gave them up, or a spur cut off by the opening would grow straight back.


def disk(radius: int) -> np.ndarray:
    """Boolean disk-shaped structuring element of the given radius."""
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return xx**2 + yy**2 <= radius**2


def morphological_cleanup(labels: np.ndarray, rules: dict | None = None) -> np.ndarray:
    """Apply MORPHOLOGY-style rules {class: dict(open, close, fill_holes, min_size)} to labels
    (H, W); pixels a class gives up take the label of the nearest pixel of another class."""
    rules = MORPHOLOGY if rules is None else rules
    out = labels.copy()
    for c, rule in rules.items():
        region = out == c
        # Gotcha: ndimage.binary_opening / binary_closing erode with border_value=0, as if the
        # world outside the image were "not this class": a field that touches the image edge
        # would lose its edge pixels. Outside is unknown, so erode with border_value=1.
        if rule.get("open", 0):
            shape = disk(rule["open"])
            region = ndimage.binary_erosion(region, structure=shape, border_value=1)
            region = ndimage.binary_dilation(region, structure=shape)
        if rule.get("close", 0):
            shape = disk(rule["close"])
            region = ndimage.binary_dilation(region, structure=shape)
            region = ndimage.binary_erosion(region, structure=shape, border_value=1)
        if rule.get("fill_holes", False):
            region = ndimage.binary_fill_holes(region)
        if rule.get("min_size", 0):
            components, count = ndimage.label(region)
            sizes = np.bincount(components.ravel(), minlength=count + 1)  # sizes[0] = outside
            region = (sizes >= rule["min_size"])[components] & (components > 0)
        region &= (out == c) | (out == 0)  # grow into background only, never into other classes
        released = (out == c) & ~region  # pixels class c gave up
        out[region] = c
        donors = (out != c) & ~released  # labels a released pixel may take: any class but c
        if released.any() and donors.any():
            # each released pixel takes the label of its nearest donor. Gotcha: the nearest pixel
            # that merely kept its label is often of class c itself (the spur an opening just cut
            # off touches the blob it grew from): taking that label would undo the clean-up.
            _, nearest = ndimage.distance_transform_edt(~donors, return_indices=True)
            out[released] = out[nearest[0][released], nearest[1][released]]
        elif released.any():
            out[released] = 0  # no other class anywhere: background
    return out


# Which tricks to keep. They are added one at a time on top of the trained row with the best
# *validation* mIoU: flips and rotations, multi-scale inference, the dense CRF, morphology. Each
# is scored on validation and on test; a step is kept for the next steps (and for --predict) only
# if it raised validation mIoU. The test split never chooses anything. Every row reports test
# mIoU, boundary F1 and its time cost: what that step costs over the whole test split.
# The CRF's parameters are chosen on validation among CRF_CANDIDATES: the reference defaults were
# tuned for 500 x 375 photographs, not for 64 px scenes, and a CRF with the wrong parameters
# makes a good segmentation worse.


def tune_crf(
    probs: torch.Tensor, images: torch.Tensor, masks: torch.Tensor
) -> tuple[dict, list, torch.Tensor]:
    """Pick the CRF_CANDIDATES entry with the best mIoU on the given (validation) data.

    Returns (best parameters, mIoU per candidate, the best candidate's label maps (N, H, W)).
    """
    labels = [crf_labels(probs, images, params) for params in CRF_CANDIDATES]
    scores = [score_labels(x, masks)["miou"] for x in labels]
    best = int(np.argmax(scores))
    return dict(CRF_CANDIDATES[best]), scores, labels[best]


def add_inference_row(state: dict, name: str, val_labels, test_labels, seconds: float) -> bool:
    """Score one inference step (label maps (N, H, W)) into state["rows"]; it is kept, and
    returns True, when it raises validation mIoU above the best pipeline so far."""
    val_miou = score_labels(val_labels, state["val_masks"])["miou"]
    kept = val_miou > state["reference"]
    scores = score_labels(test_labels, state["test_masks"])
    state["rows"].append(
        dict(name=name, **scores, seconds=seconds, val_miou=val_miou, kept=kept,
             test_miou_before=state["before"])  # the test mIoU of the pipeline it was added to
    )  # fmt: skip
    state["reference"] = max(state["reference"], val_miou)
    state["before"] = scores["miou"] if kept else state["before"]
    return kept


def try_tta(model: nn.Module, data: dict, device: torch.device, state: dict) -> None:
    """Steps 1 and 2: flips and quarter turns at scale 1, then multi-scale inference (with the
    flips and turns if they were kept)."""
    for name, change in (
        ("+ TTA: flips and rotations", dict(flips=True, rot90=True)),
        (f"+ multi-scale inference {tuple(TTA_SCALES)}", dict(scales=tuple(TTA_SCALES))),
    ):
        trial = dict(state["pipeline"], **change)
        options = dict(scales=trial["scales"], flips=trial["flips"], rot90=trial["rot90"])
        start = time.perf_counter()
        test_probs = tta_probabilities(model, data["test"]["images"], device, **options)
        seconds = time.perf_counter() - start
        val_probs = tta_probabilities(model, data["val"]["images"], device, **options)
        if add_inference_row(state, name, val_probs.argmax(1), test_probs.argmax(1), seconds):
            state["pipeline"], state["probs"] = trial, dict(val=val_probs, test=test_probs)


def try_crf_and_morphology(data: dict, state: dict) -> dict:
    """Steps 3 and 4: the dense CRF with parameters tuned on validation, then morphology.
    Returns the CRF tuning: {"params", "val_miou_per_candidate"}."""
    val, test, probs = data["val"], data["test"], state["probs"]
    labels = {split: p.argmax(1) for split, p in probs.items()}
    crf_params, crf_scores, val_crf = tune_crf(probs["val"], val["images"], val["masks"])
    start = time.perf_counter()
    test_crf = crf_labels(probs["test"], test["images"], crf_params)
    if add_inference_row(state, "+ dense CRF", val_crf, test_crf, time.perf_counter() - start):
        state["pipeline"]["crf_params"], labels = crf_params, dict(val=val_crf, test=test_crf)
    start = time.perf_counter()
    test_clean = torch.from_numpy(
        np.stack([morphological_cleanup(m) for m in labels["test"].numpy()])
    )
    seconds = time.perf_counter() - start
    val_clean = torch.from_numpy(
        np.stack([morphological_cleanup(m) for m in labels["val"].numpy()])
    )
    if add_inference_row(state, "+ morphology", val_clean, test_clean, seconds):
        state["pipeline"]["morphology"], labels = True, dict(val=val_clean, test=test_clean)
    state["labels"] = labels
    return dict(params=crf_params, val_miou_per_candidate=crf_scores)


def inference_ablation(model: DilatedAttentionNet, data: dict, device: torch.device) -> dict:
    """Add TTA, multi-scale inference, the CRF and morphology in turn; validation keeps each or not.

    Returns the ablation rows, the kept pipeline, the CRF tuning, and the test probabilities and
    final label maps the figures need.
    """
    val, test = data["val"], data["test"]
    probs = {
        split: predict_logits(model, data[split]["images"], device).softmax(1)
        for split in ("val", "test")
    }
    state = dict(
        rows=[],
        probs=probs,
        val_masks=val["masks"],
        test_masks=test["masks"],
        reference=score_labels(probs["val"].argmax(1), val["masks"])["miou"],  # val mIoU to beat
        before=score_labels(probs["test"].argmax(1), test["masks"])["miou"],  # the kept pipeline's
        pipeline=dict(scales=(1.0,), flips=False, rot90=False, crf_params=None, morphology=False),
    )
    try_tta(model, data, device, state)
    crf = try_crf_and_morphology(data, state)
    return dict(
        rows=state["rows"],
        pipeline=state["pipeline"],
        crf=crf,
        test_probs=state["probs"]["test"],
        test_labels=state["labels"]["test"],
    )


def add_inference_tricks(models: list, data: dict, device: torch.device) -> tuple[int, dict]:
    """The inference steps on top of the trained row that validation prefers (test scores must
    not choose it); returns (that row's index, inference_ablation's result)."""
    best = max(range(len(models)), key=lambda i: models[i][1]["val_miou"])
    print(
        f"inference tricks on top of row {best + 1} ({TRAINING_ROWS[best]['name']}): "
        f"best validation mIoU {models[best][1]['val_miou']:.4f}"
    )
    inference = inference_ablation(models[best][0], data, device)
    print(
        f"CRF parameters chosen on validation: {inference['crf']['params']} (val mIoU per "
        f"candidate {np.round(inference['crf']['val_miou_per_candidate'], 4).tolist()})"
    )
    return best, inference


def print_ablation(rows: list[dict]) -> None:
    """The ablation table: validation and test mIoU, boundary F1, seconds, kept or not."""
    print(f"\n{'ablation':<44}{'val mIoU':>9}{'test mIoU':>10}{'bound.F1':>9}{'seconds':>8}  kept")
    for r in rows:
        kept = "" if r.get("kept") is None else ("yes" if r["kept"] else "no: lower val mIoU")
        print(
            f"{r['name']:<44}{r['val_miou']:>9.4f}{r['miou']:>10.4f}{r['boundary']:>9.4f}"
            f"{r['seconds']:>8.1f}  {kept}"
        )
    print("one seed: --seeds 0 1 2 repeats every row (and more rows) with three seeds")


def check_crf(inference: dict, data: dict) -> tuple[dict, tuple]:
    """The fast CRF against the exact one on the first test image (with the chosen parameters),
    and its speed at CRF_BENCHMARK_SIZE; prints both. Returns (results, label maps to draw)."""
    test = data["test"]
    params = inference["crf"]["params"]
    exact, maps = compare_crf_exact(inference["test_probs"][0], test["images"][0], params)
    print(
        f"lattice vs exact CRF on a {IMAGE_SIZE}x{IMAGE_SIZE} image: labels agree on "
        f"{exact['label_agreement']:.2%} of pixels, mean |dQ| {exact['mean_abs_prob_diff']:.4f}"
    )
    benchmark = benchmark_crf(SEED)  # the appendix's lattice at the reference's image size
    print(
        f"CRF {benchmark['size']}: {benchmark['first_call_seconds']:.2f} s first call, "
        f"{benchmark['cached_seconds']:.2f} s with the smoothness lattice cached "
        "(C++ reference ~0.3 s)"
    )
    return dict(benchmark=benchmark, exact_vs_lattice=exact), maps


# %% 7. Memory and deployment
# ===============================================================================================
# Gradient checkpointing. Backward needs the activations of the forward pass; normally autograd
# keeps them all. We count what it keeps with torch.autograd.graph.saved_tensors_hooks (every
# tensor saved for backward passes through `pack`), which works on any device. With
# GRAD_CHECKPOINT the stages keep only their inputs and recompute the rest in backward: less
# memory, more time. On a GPU it is what lets a bigger batch or image fit.
#
# Export. torch.export traces the model into a self-contained program (no Python class needed to
# load it) with the image height and width marked dynamic, saves it as a .pt2 file, and we load
# it back as a user would and check it computes the same logits as the eager model.


def saved_activation_bytes(
    model: DilatedAttentionNet, images: torch.Tensor, masks: torch.Tensor
) -> int:
    """Bytes of the distinct tensors autograd keeps for backward in one training step."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()  # shared storage counted once
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(images), masks, ignore_index=IGNORE_INDEX)
    loss.backward()  # the recomputation inside checkpointed stages is not counted: freed at once
    model.zero_grad(set_to_none=True)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(size for ptr, size in seen.items() if ptr not in params)  # activations, not weights


def synchronize(device: torch.device) -> None:
    """Wait for the GPU to finish its queued work (a no-op on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_seconds(
    model: DilatedAttentionNet, images: torch.Tensor, masks: torch.Tensor, repeats: int = 3
) -> float:
    """Median wall time of forward + backward."""
    model.train()
    times = []
    for _ in range(repeats):
        synchronize(images.device)  # Gotcha: CUDA runs asynchronously; time finished work only
        start = time.perf_counter()
        F.cross_entropy(model(images), masks, ignore_index=IGNORE_INDEX).backward()
        synchronize(images.device)
        times.append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    return float(np.median(times))


def measure_checkpointing(
    config: dict, images: torch.Tensor, masks: torch.Tensor, device: torch.device
) -> dict:
    """Saved activation memory and step time, without and with gradient checkpointing."""
    result = {}
    images, masks = images.to(device), masks.to(device)
    for enabled in (False, True):
        torch.manual_seed(SEED)
        model = DilatedAttentionNet(**dict(config, grad_checkpoint=enabled)).to(device)
        key = "checkpointing" if enabled else "plain"
        saved_mb = saved_activation_bytes(model, images, masks) / 2**20  # one training step
        updates = max(  # how often that one step updated BatchNorm's running statistics
            int(m.num_batches_tracked) for m in model.modules() if isinstance(m, nn.BatchNorm2d)
        )
        result[key] = dict(
            saved_mb=saved_mb,
            batchnorm_updates_per_step=updates,
            step_seconds=step_seconds(model, images, masks),
        )
    saved = result["checkpointing"]["saved_mb"] / result["plain"]["saved_mb"]
    result["memory_saved_fraction"] = 1 - saved
    result["time_added_fraction"] = (
        result["checkpointing"]["step_seconds"] / result["plain"]["step_seconds"] - 1
    )
    return result


def dynamic_shapes() -> dict:
    """Batch, height and width of the model's input `x` may change after export."""
    batch = torch.export.Dim("batch", min=1, max=1024)
    height = torch.export.Dim("height", min=16, max=4096)
    width = torch.export.Dim("width", min=16, max=4096)
    return {"x": {0: batch, 2: height, 3: width}}


def other_size(images: torch.Tensor) -> torch.Tensor:
    """Two of the images resized to a size the export never saw (13 and 7 px larger)."""
    size = (images.shape[-2] + 13, images.shape[-1] + 7)
    return F.interpolate(images[:2], size=size, mode="bilinear")


def export_model(model: DilatedAttentionNet, example: torch.Tensor, path: Path):
    """torch.export with dynamic batch, height and width, saved to `path`, loaded back."""
    model = model.eval()
    # Gotcha: an example with batch 1 (or size 1 anywhere) gets specialised to exactly 1; trace
    # with a batch of 2 so that the batch dimension stays dynamic
    program = torch.export.export(model, (example,), dynamic_shapes=dynamic_shapes())
    torch.export.save(program, path)
    return torch.export.load(path).module()  # what a user does: no DilatedAttentionNet class needed


@torch.no_grad()
def check_export(model: DilatedAttentionNet, images: torch.Tensor, path: Path) -> dict:
    """Export on the CPU, reload, compare logits with eager (also at a new image size), and
    time both per image.

    If torch.export fails (older PyTorch releases), returns {"error": "<the error's first line>"}.
    """
    model = copy.deepcopy(model).eval().cpu()  # a CPU copy: the caller's model stays on its device
    try:
        exported = export_model(model, images[:2], path)
    except Exception as error:  # torch.export is young: PyTorch 2.11 could not prove our dynamic
        # width valid ("Constraints violated (width)"); 2.14 exports this model. Report, go on.
        path.unlink(missing_ok=True)  # no program from an earlier run may pass for this one's
        first_line = (str(error).strip().splitlines() or [""])[0]
        return dict(error=f"{type(error).__name__}: {first_line}")
    eager_logits, exported_logits = model(images), exported(images)
    odd = other_size(images)
    timings = {
        name: ms_per_image(module, images)
        for name, module in (("eager", model), ("exported", exported))
    }
    return dict(
        max_abs_diff=float((eager_logits - exported_logits).abs().max()),
        max_abs_diff_other_size=float((model(odd) - exported(odd)).abs().max()),
        labels_agree=float((eager_logits.argmax(1) == exported_logits.argmax(1)).float().mean()),
        ms_per_image_eager=timings["eager"],
        ms_per_image_exported=timings["exported"],
        file_mb=path.stat().st_size / 2**20,
    )


ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")  # the optional extra for check_onnx


def import_onnx_runtime():
    """The onnxruntime module, or a one-line note (str) naming the missing optional package."""
    for name in ONNX_PACKAGES:  # torch.onnx.export needs onnx and onnxscript; running, onnxruntime
        try:
            module = importlib.import_module(name)
        except ImportError:
            return (
                f"{name} is not installed, ONNX export skipped (optional extra: "
                f"pip install {' '.join(ONNX_PACKAGES)})"
            )
    return module


def ms_per_image(run, images: torch.Tensor) -> float:
    """Mean milliseconds per image of run(image (1, 3, H, W)), one warm-up call first."""
    run(images[:1])  # the first call allocates buffers (and plans, for onnxruntime)
    start = time.perf_counter()
    for i in range(len(images)):
        run(images[i : i + 1])
    return (time.perf_counter() - start) / len(images) * 1000


def export_onnx(model: DilatedAttentionNet, example: torch.Tensor, path: Path) -> str | None:
    """torch.onnx.export with dynamic batch, height and width to `path`; None when it worked,
    else the error's first line (the file is then removed)."""
    try:
        # dynamo=True: the exporter traces with torch.export, then translates to ONNX operators
        torch.onnx.export(
            model,
            (example,),  # batch 2, not 1: a size-1 dimension would be fixed (see export_model)
            path,
            input_names=["images"],
            output_names=["logits"],
            dynamic_shapes=dynamic_shapes(),
            dynamo=True,
            verbose=False,
        )
    except Exception as error:  # an exporter that cannot translate an operator: report, go on
        path.unlink(missing_ok=True)
        first_line = (str(error).strip().splitlines() or [""])[0]
        return f"{type(error).__name__}: {first_line}"
    return None


@torch.no_grad()
def check_onnx(
    model: DilatedAttentionNet, images: torch.Tensor, path: Path, program: Path | None = None
) -> dict:
    """ONNX export with dynamic batch, height and width, run with onnxruntime, compared with eager
    (also at a new image size), and the time per image of eager, onnxruntime and the torch.export
    program saved at `program` (when given and present).

    Returns {"skipped": "<one line>"} when the optional packages are missing, {"error": ...} when
    the export fails.
    """
    ort = import_onnx_runtime()
    if isinstance(ort, str):
        return dict(skipped=ort)
    model = copy.deepcopy(model).eval().cpu()
    error = export_onnx(model, images[:2], path)
    if error is not None:
        return dict(error=error)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # the same cores as torch: a fair race
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run_onnx(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"images": x.numpy()})[0])

    odd = other_size(images)
    eager_logits, onnx_logits = model(images), run_onnx(images)
    timings = dict(ms_per_image_eager=ms_per_image(model, images))
    if program is not None and program.is_file():
        timings["ms_per_image_exported"] = ms_per_image(torch.export.load(program).module(), images)
    timings["ms_per_image_onnxruntime"] = ms_per_image(run_onnx, images)
    return dict(
        max_abs_diff=float((eager_logits - onnx_logits).abs().max()),
        max_abs_diff_other_size=float((model(odd) - run_onnx(odd)).abs().max()),
        labels_agree=float((eager_logits.argmax(1) == onnx_logits.argmax(1)).float().mean()),
        **timings,
        file_mb=path.stat().st_size / 2**20,
        onnxruntime_version=ort.__version__,
    )


def print_deployment(export: dict, onnx: dict) -> None:
    """One line per export check, then the latency of eager, torch.export and onnxruntime."""
    if "error" in export:
        print(
            f"note: torch.export failed on PyTorch {torch.__version__}, export check skipped "
            f"({export['error']})"
        )
    else:
        print(
            f"torch.export: max |eager - exported| {export['max_abs_diff']:.2e} (other size "
            f"{export['max_abs_diff_other_size']:.2e})"
        )
    if "skipped" in onnx:
        print(f"note: {onnx['skipped']}")
    elif "error" in onnx:
        print(f"note: ONNX export failed, ONNX check skipped ({onnx['error']})")
    else:
        print(
            f"ONNX (onnxruntime {onnx['onnxruntime_version']}): max |eager - onnxruntime| "
            f"{onnx['max_abs_diff']:.2e} (other size {onnx['max_abs_diff_other_size']:.2e})"
        )
    latency = onnx if "ms_per_image_onnxruntime" in onnx else export
    names = (
        ("eager", "ms_per_image_eager"),
        ("torch.export", "ms_per_image_exported"),
        ("onnxruntime", "ms_per_image_onnxruntime"),
    )
    print(
        f"latency, one {IMAGE_SIZE}x{IMAGE_SIZE} image at a time on "
        f"{torch.get_num_threads()} thread(s): "
        + ", ".join(f"{name} {latency[key]:.1f} ms" for name, key in names if key in latency)
    )


def memory_and_deployment(model: DilatedAttentionNet, data: dict, device: torch.device) -> dict:
    """Gradient checkpointing measured on one training batch, then the trained model exported
    with torch.export and ONNX, each checked against eager; prints a summary."""
    train, test = data["train"], data["test"]
    memory = measure_checkpointing(
        model_config(True, True), train["images"][:BATCH_SIZE], train["masks"][:BATCH_SIZE], device
    )
    print(
        f"gradient checkpointing: saved activations {memory['plain']['saved_mb']:.1f} -> "
        f"{memory['checkpointing']['saved_mb']:.1f} MB ({memory['memory_saved_fraction']:.0%} "
        f"less), step time {memory['time_added_fraction']:+.0%}, BatchNorm updated "
        f"{memory['checkpointing']['batchnorm_updates_per_step']} time(s) per step"
    )
    export = check_export(model, test["images"][:16], OUTPUT_DIR / "model.pt2")
    onnx = check_onnx(
        model, test["images"][:16], OUTPUT_DIR / "model.onnx", OUTPUT_DIR / "model.pt2"
    )
    print_deployment(export, onnx)
    return dict(gradient_checkpointing=memory, export=export, onnx=onnx)


# %% 8. Visualization
# ===============================================================================================
# What the numbers do not show: the receptive fields of section 2 (with the trained network's
# *effective* receptive field: where its gradient actually reaches), what the attention blocks
# look at, the predictions of the baseline and of the final pipeline side by side, the exact and
# the fast CRF on one image, and the ablation as bars.


def device_of(model: nn.Module) -> torch.device:
    """The device a model's weights live on."""
    return next(model.parameters()).device


def colorize(labels: np.ndarray) -> np.ndarray:
    """Label map (H, W) -> RGB (H, W, 3); ignored pixels white."""
    rgb = np.ones(labels.shape + (3,))
    valid = labels < len(CLASS_NAMES)
    rgb[valid] = CLASS_COLORS[labels[valid]]
    return rgb


def plot_label_panels(
    panels: list[list], titles: list[str], path: Path, suptitle: str = ""
) -> None:
    """Grid of panels (rows of [image (3, H, W) tensor or label map (H, W)]) with column titles."""
    rows, cols = len(panels), len(panels[0])
    fig, axes = plt.subplots(rows, cols, figsize=(2.1 * cols, 2.1 * rows + 0.4), squeeze=False)
    for r, row in enumerate(panels):
        for c, panel in enumerate(row):
            panel = np.asarray(panel)
            axes[r, c].imshow(
                panel.transpose(1, 2, 0) if panel.ndim == 3 else colorize(panel),
                interpolation="nearest",
            )
            axes[r, c].axis("off")
            if r == 0:
                axes[r, c].set_title(titles[c], fontsize=8)
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_receptive_fields(model: nn.Module, image: torch.Tensor, receptive: dict, path: Path):
    """Gradient maps of the three dilation schedules of section 2, and the trained model's
    effective receptive field (|d logit(centre) / d input|, log scale)."""
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.4))
    for ax, (name, rates) in zip(axes, DILATION_RATES.items()):
        grad = gradient_receptive_field([(3, 1, r) for r in rates], size=25)
        ax.imshow(grad > 0, cmap="gray", interpolation="nearest")
        rf, holes = receptive[name]["formula"], receptive[name]["holes_inside_rf"]
        ax.set_title(f"{name}\nRF {rf} px, {holes} holes", fontsize=9)
    model.eval()
    x = image[None].to(device_of(model)).requires_grad_(True)  # (1, 3, H, W)
    logits = model(x)
    h, w = logits.shape[-2:]
    logits[0, :, h // 2, w // 2].sum().backward()
    effective = x.grad[0].abs().sum(0).cpu().numpy()  # (H, W)
    model.zero_grad(set_to_none=True)  # the gradients were only for the picture
    widths = receptive["model without attention"]["walked_px"]
    axes[3].imshow(np.log1p(effective / effective.max() * 1e3), cmap="magma")
    axes[3].set_title(
        f"trained model: effective RF (log scale)\nRF {min(widths)}-{max(widths)} px without "
        f"attention; with it, the whole image",
        fontsize=9,
    )
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


@torch.no_grad()
def plot_attention(model: DilatedAttentionNet, image: torch.Tensor, path: Path) -> None:
    """CBAM's spatial map and the position attention of two query pixels, captured with hooks."""
    captured = {}
    hooks = [
        model.cbam.spatial.register_forward_hook(lambda m, i, out: captured.update(spatial=out)),
        model.position.register_forward_pre_hook(lambda m, i: captured.update(position_input=i[0])),
    ]
    model.eval()
    labels = model(image[None]).argmax(1)[0]
    for hook in hooks:
        hook.remove()  # hooks stay until removed: do not leave them on a model you keep using
    attention = model.position.attention_map(captured["position_input"])[0]  # (hw, hw)
    h, w = captured["position_input"].shape[-2:]
    # two query positions: a cell in the middle (raster order) of the field cells, then of the
    # wire cells (or background) if there are any
    small = F.interpolate(labels[None, None].float(), size=(h, w), mode="nearest-exact")
    small = small[0, 0].long()  # (h, w)
    queries = []
    for cls in (1, 3, 0):
        cells = torch.nonzero(small == cls)
        if len(cells) and len(queries) < 2:
            queries.append((cls, cells[len(cells) // 2].tolist()))
    fig, axes = plt.subplots(1, 2 + len(queries), figsize=(3 * (2 + len(queries)), 3.2))
    axes[0].imshow(image.permute(1, 2, 0).numpy())
    axes[0].set_title("image", fontsize=9)
    axes[1].imshow(captured["spatial"][0, 0].numpy(), cmap="viridis")
    axes[1].set_title("CBAM spatial attention", fontsize=9)
    for ax, (cls, (qy, qx)) in zip(axes[2:], queries):
        ax.imshow(attention[qy * w + qx].view(h, w).numpy(), cmap="magma")  # row = one query pixel
        ax.plot(qx, qy, "c+", markersize=12)
        ax.set_title(
            f"position attention of a {CLASS_NAMES[cls]} pixel (+)\n"
            f"gamma = {model.position.gamma.item():.2f}",
            fontsize=9,
        )
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_ablation(rows: list[dict], path: Path) -> None:
    """Horizontal bars of test mIoU and boundary F1 per row; grey: a step validation dropped."""
    names = [r["name"] for r in rows][::-1]
    colours = ["tab:gray" if r.get("kept") is False else "tab:blue" for r in rows][::-1]
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.45 * len(rows) + 1.2), sharey=True)
    for ax, key, label in zip(
        axes, ("miou", "boundary"), ("test mIoU", f"test boundary F1 (tol {BOUNDARY_TOLERANCE} px)")
    ):
        values = [r[key] for r in rows][::-1]
        ax.barh(names, values, color=colours)
        ax.set_xlim(min(values) - 0.05, max(values) + 0.02)
        for y, v in enumerate(values):
            ax.text(v, y, f" {v:.3f}", va="center", fontsize=8)
        ax.set_title(label, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def draw_figures(models, best, inference, crf_maps, data, receptive, rows) -> None:
    """Every figure of the run, into OUTPUT_DIR: receptive fields, attention maps, predictions,
    the exact and the fast CRF, and the ablation."""
    test, final = data["test"], models[best][0]
    plot_receptive_fields(final, test["images"][0], receptive, OUTPUT_DIR / "receptive_field.png")
    plot_label_panels(
        [[test["images"][0], test["masks"][0], *crf_maps]],
        ["image", "ground truth", "network (TTA)", "exact dense CRF", "lattice dense CRF"],
        OUTPUT_DIR / "crf_exact_vs_lattice.png",
    )
    count = min(4, len(test["images"]))
    baseline_labels = predict_logits(models[0][0], test["images"][:4], device_of(models[0][0]))
    best_labels = predict_logits(final, test["images"][:4], device_of(final))
    plot_label_panels(
        [
            [test["images"][i], test["masks"][i], baseline_labels.argmax(1)[i],
             best_labels.argmax(1)[i], inference["test_labels"][i]]
            for i in range(count)
        ],  # fmt: skip
        ["image", "ground truth", "baseline", f"row {best + 1} (best val)",
         "+ kept inference steps"],  # fmt: skip
        OUTPUT_DIR / "predictions.png",
    )
    with_attention = [i for i, r in enumerate(TRAINING_ROWS) if r["cbam"] and r["position"]]
    if with_attention:  # the first row with both attention modules (row 2 by default)
        model = models[with_attention[0]][0].cpu()
        plot_attention(model, test["images"][0], OUTPUT_DIR / "attention_maps.png")
    plot_ablation(rows, OUTPUT_DIR / "ablation.png")


# %% 9. Your own image: --predict
# ===============================================================================================
# The pipeline the ablation kept, on one picture: resize it to the training size (square, as the
# training scenes: a non-square picture is squeezed), (TTA) probabilities, then the dense CRF and
# per-class morphology if validation kept them, at that size: their parameters (sxy, min_size)
# are in training pixels. The labels come back to the picture's size with nearest neighbour.


def save_for_predict(state: dict, pipeline: dict, row_name: str) -> None:
    """outputs/model.pt: the chosen row's checkpoint plus the inference steps validation kept."""
    save_checkpoint(dict(state, pipeline=pipeline, ablation_row=row_name), OUTPUT_DIR / "model.pt")


def predict_image(image_path: Path, device: torch.device) -> Path:
    """Segment one image file with outputs/model.pt; write and return a side-by-side PNG."""
    checkpoint_path = OUTPUT_DIR / "model.pt"
    if not image_path.is_file():
        raise SystemExit(f"error: no such image file: {image_path}")
    if not checkpoint_path.is_file():
        raise SystemExit(
            f"error: no trained model at {checkpoint_path}; train one first: "
            "python advanced_segmentation.py (a --quick run's model: --quick --predict)"
        )
    try:
        with Image.open(image_path) as file:
            photo = np.asarray(file.convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3)
    except (UnidentifiedImageError, OSError):
        raise SystemExit(f"error: {image_path} is not an image that Pillow can read") from None
    model, state = load_model(checkpoint_path, device)
    pixels = torch.from_numpy(photo).permute(2, 0, 1)  # (3, H, W)
    size = state["image_size"]
    small = F.interpolate(pixels[None], size=(size, size), mode="bilinear", antialias=True)
    pipeline = state["pipeline"]  # the inference steps that helped on validation
    probs = tta_predict(
        model,
        small.to(device),
        scales=pipeline["scales"],
        flips=pipeline["flips"],
        rot90=pipeline["rot90"],
    )[0].cpu()  # (C, S, S) at the training size
    if pipeline["crf_params"] is not None:
        probs = dense_crf(probs, small[0], pipeline["crf_params"])
    labels = probs.argmax(0).numpy()  # (S, S)
    if pipeline["morphology"]:
        labels = morphological_cleanup(labels)
    # Gotcha: labels are resized with nearest neighbour, never interpolated (nearest-exact: no
    # half-pixel shift)
    labels = F.interpolate(
        torch.from_numpy(labels)[None, None].float(), size=pixels.shape[-2:], mode="nearest-exact"
    )[0, 0].long().numpy()  # (S, S) -> (H, W)
    out_path = OUTPUT_DIR / f"{image_path.stem}_segmentation.png"
    side_by_side = np.concatenate([photo, colorize(labels).astype(np.float32)], axis=1)
    Image.fromarray((side_by_side * 255).round().astype(np.uint8)).save(out_path)
    shares = ", ".join(f"{name} {np.mean(labels == c):.1%}" for c, name in enumerate(CLASS_NAMES))
    print(f"{shares}\nsegmentation written to {out_path}")
    return out_path


# %% 10. Putting it together
# ===============================================================================================
# main() runs the chapter: data, receptive fields, the ablation's trained rows, the inference
# tricks on the best of them, memory and deployment checks, figures, the model --predict uses,
# and metrics.json.
#
# One seed and 96 test images are one draw: a difference of a few mIoU points between two rows
# can come and go with the seed. So `--seeds 0 1 2` repeats the ablation with three seeds (new
# data, new initial weights, new batch order each) and trains every row of ABLATION_ROWS. It
# reports mean and spread, and for each row the change against its reference row in every seed:
# a claim holds only when all seeds agree.


def summarize_seeds(per_seed: list[dict]) -> list[dict]:
    """Mean and spread of every row over the seeds, and its change against its reference row
    (training rows: the row named in "against"; inference rows: the pipeline it was added to)."""
    against = {row["name"]: row["against"] for row in ABLATION_ROWS}
    summary = []
    for name in [row["name"] for row in per_seed[0]["rows"]]:
        runs = [next(r for r in seed["rows"] if r["name"] == name) for seed in per_seed]
        by_name = [{r["name"]: r for r in seed["rows"]} for seed in per_seed]
        test = np.array([r["miou"] for r in runs])
        if name in against:  # a training row
            reference = against[name]
            changes = None if reference is None else test - [s[reference]["miou"] for s in by_name]
        else:  # an inference row
            reference = "the pipeline before"
            changes = test - [r["test_miou_before"] for r in runs]
        spread = float(test.std(ddof=1)) if len(test) > 1 else 0.0  # sample standard deviation
        summary.append(
            dict(
                name=name,
                test_miou_mean=float(test.mean()),
                test_miou_std=spread,
                test_miou_per_seed=test.round(4).tolist(),
                val_miou_mean=float(np.mean([r["val_miou"] for r in runs])),
                boundary_mean=float(np.mean([r["boundary"] for r in runs])),
                iou_per_class_mean={
                    c: round(float(np.nanmean([r["iou_per_class"][c] for r in runs])), 4)
                    for c in CLASS_NAMES
                },
                against=reference,
                change_per_seed=None if changes is None else changes.round(4).tolist(),
                same_sign_in_every_seed=(
                    None if changes is None else bool((changes > 0).all() or (changes < 0).all())
                ),
                kept=None if name in against else sum(bool(r["kept"]) for r in runs),
            )
        )
    return summary


def seed_fingerprint() -> str:
    """A hash of this file and of its settings: a saved seed is reused only while both match."""
    settings = {k: v for k, v in globals().items() if k.isupper() and k[0] != "_"}
    settings.pop("OUTPUT_DIR"), settings.pop("HERE")  # where the files live is no setting
    return hashlib.sha256(
        Path(__file__).read_bytes() + repr(sorted(settings.items(), key=str)).encode()
    ).hexdigest()


def run_seed(seed: int, device: torch.device, folder: Path, fingerprint: str) -> dict:
    """Every row of ABLATION_ROWS, then the inference steps on the row validation prefers, with
    one seed (new data too); saved to folder/seed{seed}.json."""
    seed_start = time.perf_counter()
    seed_everything(seed)
    data = make_datasets(seed)  # a new draw of the data, too
    rows, _, models = train_rows(ABLATION_ROWS, data, seed, device, folder, f"seed{seed}_")
    best = max(range(len(models)), key=lambda i: models[i][1]["val_miou"])
    inference = inference_ablation(models[best][0], data, device)
    result = dict(
        seed=seed,
        rows=rows + inference["rows"],
        inference_model=rows[best]["name"],
        seconds=round(time.perf_counter() - seed_start, 1),
        threads=torch.get_num_threads(),
        fingerprint=fingerprint,
    )
    write_json(result, folder / f"seed{seed}.json")
    return result


def print_seed_summary(summary: list[dict], seeds: list[int]) -> None:
    """The table of summarize_seeds: mean +- std, change per seed, whether every seed agrees."""
    print(f"\nablation over seeds {tuple(seeds)}: test mIoU mean +- standard deviation; change")
    print("against the reference row in each seed; 'yes' when every seed agrees on its sign")
    print(f"{'row':<36}{'test mIoU':>16}  {'change per seed':<24}{'agree':>6}  against")
    for r in summary:
        changes = r["change_per_seed"]
        change_text = "" if changes is None else " ".join(f"{c:+.3f}" for c in changes)
        agree = "" if changes is None else ("yes" if r["same_sign_in_every_seed"] else "no")
        kept = "" if r["kept"] is None else f" (kept in {r['kept']}/{len(seeds)} seeds)"
        print(
            f"{r['name'][:35]:<36}{r['test_miou_mean']:>9.4f} +- {r['test_miou_std']:.3f}  "
            f"{change_text:<24}{agree:>6}  {r['against'] or ''}{kept}"
        )


def seed_ablation(seeds: list[int], device: torch.device) -> dict:
    """The full ablation (every row of ABLATION_ROWS, then the inference steps on the row that
    validation prefers), once per seed; prints and returns mean, spread and changes per seed."""
    start = time.perf_counter()
    folder = OUTPUT_DIR / "seeds"
    folder.mkdir(parents=True, exist_ok=True)
    # An interrupted run resumes: each finished seed is saved with a fingerprint of this file and
    # of its constants, and reused only while both are unchanged.
    fingerprint = seed_fingerprint()
    per_seed = []
    for seed in seeds:
        path = folder / f"seed{seed}.json"
        if path.is_file() and json.loads(path.read_text()).get("fingerprint") == fingerprint:
            print(f"\n=== seed {seed}: done earlier with this code and settings, reused ===")
            per_seed.append(json.loads(path.read_text()))
            continue
        print(f"\n=== seed {seed} ===")
        per_seed.append(run_seed(seed, device, folder, fingerprint))
    summary = summarize_seeds(per_seed)
    print_seed_summary(summary, seeds)
    total = time.perf_counter() - start
    metrics = dict(
        seeds=list(seeds),
        summary=summary,
        per_seed=per_seed,
        total_seconds=round(total, 1),
        device=str(device),
    )
    write_json(metrics, folder / "metrics.json")
    timing = ", ".join(f"seed {r['seed']} {r['seconds']:.0f} s" for r in per_seed)
    threads = sorted({r["threads"] for r in per_seed})
    print(f"\ntotal {total:.0f} s this call | {timing}, {threads} thread(s) | {folder}")
    return metrics


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line: --quick, --predict IMAGE, --seeds SEED ..., --threads N."""
    parser = argparse.ArgumentParser(
        description="Advanced segmentation techniques, measured in one ablation."
    )
    parser.add_argument("--quick", action="store_true", help="tiny run (set-up check)")
    parser.add_argument("--predict", metavar="IMAGE", type=Path, help="segment your own image")
    parser.add_argument(
        "--seeds",
        metavar="SEED",
        type=int,
        nargs="+",
        help="the full ablation (every row) once per seed, e.g. --seeds 0 1 2: mean and spread",
    )
    parser.add_argument(
        "--threads", type=int, help="torch CPU threads (default: NUM_THREADS); 1 on a busy machine"
    )
    # Cells run in a notebook have no __file__, and sys.argv holds the kernel's options, not ours
    # (`%run script.py --quick` sets __file__ and passes its own arguments: those are kept).
    if argv is None and "__file__" not in globals():
        argv = []
    return parser.parse_args(argv)


def set_up(args: argparse.Namespace) -> torch.device:
    """Pick the device, set the CPU threads and, with --quick, the tiny settings."""
    device = pick_device(DEVICE)
    # cuDNN tries its convolution algorithms on the first batch of each shape and keeps the
    # fastest: worth it when shapes repeat, as they do here (no effect on a CPU).
    torch.backends.cudnn.benchmark = True
    threads = args.threads or NUM_THREADS
    if device.type == "cpu" and threads:
        torch.set_num_threads(threads)
    if args.quick:
        # Replace the constants above for this process (a notebook: restart the kernel after),
        # and keep its files in outputs/quick/
        # so that a set-up check never overwrites the model or metrics of a real run.
        globals().update(QUICK, OUTPUT_DIR=OUTPUT_DIR / "quick")
    return device


def write_metrics(rows, histories, inference, crf_check, receptive, deployment, data, best,
                  device, start) -> dict:  # fmt: skip
    """Everything the run measured, into OUTPUT_DIR/metrics.json; returns it."""
    total_seconds = time.perf_counter() - start
    rounded = ("miou", 4), ("boundary", 4), ("seconds", 1), ("val_miou", 4)
    metrics = dict(
        ablation=[dict(r, **{key: round(r[key], digits) for key, digits in rounded}) for r in rows],
        seconds_meaning=(
            "training rows: training + test evaluation; "
            "inference rows: that step over the whole test split"
        ),
        inference_pipeline=inference["pipeline"],
        crf=dict(
            params=inference["crf"]["params"],
            candidates=list(CRF_CANDIDATES),
            val_miou_per_candidate=inference["crf"]["val_miou_per_candidate"],
            **crf_check,
        ),
        receptive_field=receptive,
        **deployment,
        class_frequency={n: float(f) for n, f in zip(CLASS_NAMES, data["class_frequency"])},
        inference_model=TRAINING_ROWS[best]["name"],
        histories=histories,
        total_seconds=round(total_seconds, 1),
        device=str(device),
    )
    write_json(metrics, OUTPUT_DIR / "metrics.json")
    print(f"\ntotal {total_seconds:.0f} s | outputs in {OUTPUT_DIR}")
    return metrics


def main(argv: list[str] | None = None) -> dict:
    """The chapter in one screen: one call per section, in order; returns the metrics written.

    With --predict IMAGE it segments your image instead; with --seeds it runs every ablation row
    once per seed and reports which differences hold in every seed.
    """
    args = parse_args(argv)
    device = set_up(args)  # device, CPU threads, --quick's tiny settings
    if args.predict is not None:  # your own image (section 9); --quick --predict: the quick model
        return {"segmentation": str(predict_image(args.predict, device))}
    if args.seeds:  # the whole ablation once per seed (this section)
        return seed_ablation(args.seeds, device)
    start = time.perf_counter()
    seed_everything(SEED)
    OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
    # 1. Data: three splits of synthetic scenes, and the training masks' U-Net weight maps
    data = make_datasets(SEED)
    describe_data(data, device)
    # 2. Atrous convolution: the receptive field of three stacks of dilated convolutions
    receptive = gridding_report()
    # 3. Model: the receptive field of the real network, walked along its layers and measured
    receptive.update(network_receptive_fields())
    # 5. Training: the ablation's four rows (the models of section 3, the losses of section 4)
    rows, histories, models = train_rows(TRAINING_ROWS, data, SEED, device, OUTPUT_DIR)
    # 6. Inference tricks: added to the row validation prefers; the fast CRF against the exact one
    best, inference = add_inference_tricks(models, data, device)
    rows += inference["rows"]
    print_ablation(rows)
    crf_check, crf_maps = check_crf(inference, data)
    # 7. Memory and deployment: gradient checkpointing, torch.export, ONNX
    deployment = memory_and_deployment(models[best][0], data, device)
    # 8. Visualization
    draw_figures(models, best, inference, crf_maps, data, receptive, rows)
    # 9. Your own image: the model and the kept inference steps that --predict uses
    save_for_predict(models[best][1], inference["pipeline"], TRAINING_ROWS[best]["name"])
    # 10. Putting it together: everything measured, into metrics.json
    return write_metrics(
        rows, histories, inference, crf_check, receptive, deployment, data, best, device, start
    )


# %% Appendix: a fast dense CRF
# ===============================================================================================
# K is N x N: 35 billion entries for a 500 x 375 image. The trick that makes it fast: K Q is a
# Gaussian *filter* in feature space (x, y, r, g, b), and the permutohedral lattice (Adams et al.,
# 2010) computes such a filter in O(N d) by 1) splatting each pixel onto the d + 1 corners of
# its enclosing simplex of a lattice whose spacing is one standard deviation, 2) blurring along
# the lattice's d + 1 axes with [1/2, 1, 1/2], 3) slicing the result back at the pixels. The
# price: the lattice blur only approximates a Gaussian (its kernel is slightly anisotropic and
# truncated); after normalisation the filtered values are about 1% off the exact ones, and
# compare_crf_exact (section 6) measures the effect on the CRF's labels.
# Splat, blur and slice are sparse matrices, so each mean-field step is a few sparse-dense
# products. Speed matters here (the C++ reference is the yardstick), so:
# - the lattice is built with whole-array numpy operations only (no Python loop over pixels) and
#   small integer types where they suffice (int8 ranks instead of int64);
# - a sparse matrix times a dense one is F.embedding_bag (row r of the result = weighted sum of
#   the dense rows listed in row r): one fast kernel for all 21 labels at once, float32;
# - vertices are numbered in the order the pixels first use them, so the splat reads Q in order;
# - the D^-1/2 factors and the kernel weight are folded into the splat and slice weights once,
#   instead of multiplying Q by them in every iteration;
# - the two kernels share one slice (their slice matrices side by side): one pass over the pixels;
# - the smoothness lattice depends only on the image size: it is built (and normalised) once.


class SparseRows(NamedTuple):
    """A sparse matrix in CSR form (the layout of scipy.sparse.csr_matrix): row r holds the
    entries indptr[r]:indptr[r + 1] of indices (their columns) and values. int32 indices."""

    indptr: torch.Tensor
    indices: torch.Tensor
    values: torch.Tensor
    shape: tuple


def sparse_rows(indptr, indices, values, shape: tuple) -> SparseRows:
    """SparseRows from arrays (int32 indices: the fastest for embedding_bag, float32 values)."""
    return SparseRows(
        torch.as_tensor(np.asarray(indptr), dtype=torch.int32),
        torch.as_tensor(np.asarray(indices), dtype=torch.int32),
        torch.as_tensor(np.asarray(values), dtype=torch.float32),
        shape,
    )


def sparse_matmul(matrix: SparseRows, dense: torch.Tensor) -> torch.Tensor:
    """matrix (R, C) @ dense (C, L) -> (R, L). embedding_bag sums, for each row ("bag"), the dense
    rows its indices name, weighted by its values: exactly a CSR product, in one fast kernel."""
    return F.embedding_bag(
        matrix.indices,
        dense,
        matrix.indptr,
        mode="sum",
        per_sample_weights=matrix.values,
        include_last_offset=True,
    )


def group_codes(codes: np.ndarray) -> tuple:
    """Sort non-negative int64 codes and number the distinct ones.

    Returns (order that sorts them, the distinct codes, where each one starts in that order, the
    group number of each code). Faster than np.unique(return_index=True, return_inverse=True):
    the position is packed into the low bits, so a plain sort (no argsort) brings equal codes
    together, each group in increasing position.
    """
    n = len(codes)
    bits = max(int(n - 1).bit_length(), 1)
    if int(codes.max()) < (1 << (62 - bits)):
        packed = np.sort((codes << bits) | np.arange(n, dtype=np.int64))
        order, ordered = packed & ((1 << bits) - 1), packed >> bits
    else:
        order = np.argsort(codes, kind="stable")
        ordered = codes[order]
    first = np.empty(n, dtype=bool)
    first[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
    group = np.empty(n, dtype=np.int64)
    group[order] = np.cumsum(first) - 1
    starts = np.flatnonzero(first)
    return order, ordered[starts], starts, group


def permutohedral_lattice(features: np.ndarray) -> tuple:
    """Splat, blur and slice matrices of the permutohedral lattice for features (N, d) / sigma.

    Returns (splat (M+1, N), [blur_j (M+1, M+1) for the d + 1 axes], slice (N, M+1)) as SparseRows:
    lattice_filter(lattice, V) ~ sum_j exp(-|f_i - f_j|^2 / 2) V_j. Row M is a zero row that
    stands in for missing blur neighbours. Arrays are (d+1, N): one contiguous row per coordinate.
    """
    n, d = features.shape
    # 1) elevate to the hyperplane sum = 0 of R^(d+1), scaled so the blur below is ~ a unit Gaussian
    scale = np.sqrt(2.0 / 3.0) * (d + 1) / np.sqrt((np.arange(d) + 1.0) * (np.arange(d) + 2.0))
    cf = np.ascontiguousarray(features.T) * scale[:, None]  # (d, N)
    elevated = np.empty((d + 1, n))  # elevated[j] = sum_{i >= j} cf[i] - j * cf[j - 1]
    elevated[d] = -d * cf[d - 1]
    suffix = cf[d - 1].copy()
    for j in range(d - 1, 0, -1):
        np.subtract(suffix, j * cf[j - 1], out=elevated[j])
        suffix += cf[j - 1]
    elevated[0] = suffix
    # 2) the nearest lattice point of colour 0 (coordinates multiples of d + 1), then the simplex
    rem0 = np.rint(elevated * (1.0 / (d + 1)))  # in units of d + 1
    residual = elevated - rem0 * (d + 1)
    # rank[i] = position of coordinate i when the residuals are sorted high to low (ties: lower
    # i first)
    rank = np.zeros((d + 1, n), dtype=np.int8)
    for i in range(d + 1):
        for j in range(i + 1, d + 1):
            j_first = residual[j] > residual[i]
            rank[i] += j_first
            rank[j] += ~j_first
    rank += rem0.sum(0).astype(np.int8)  # + the offset from the plane
    wrap = (rank < 0).astype(np.int8) - (rank > d)  # wrap points that left the plane back onto it
    rank += np.int8(d + 1) * wrap
    rem0 += wrap
    residual -= wrap * (d + 1)
    # 3) barycentric weights of the d + 1 enclosing vertices, from the residuals sorted by rank
    coordinate = np.zeros((d + 1, n), dtype=np.int8)  # coordinate[r]: the coordinate of rank r
    for i in range(1, d + 1):
        for r in range(d + 1):
            coordinate[r] += (rank[i] == r) * np.int8(i)
    v = (residual * (1.0 / (d + 1))).astype(np.float32).ravel()
    pixel = np.arange(n)
    placed = [v[coordinate[d - b].astype(np.int64) * n + pixel] for b in range(d + 1)]
    barycentric = np.empty((d + 1, n), dtype=np.float32)
    barycentric[0] = 1.0 + placed[0] - placed[d]
    for b in range(1, d + 1):
        np.subtract(placed[b], placed[b - 1], out=barycentric[b])
    # 4) the vertices' keys as int64 codes (mixed radix over the first d coordinates; the last is
    # implied by sum = 0). Vertex k of a simplex is vertex k - 1 plus 1 in every coordinate, minus
    # d + 1 in the coordinate of rank d + 1 - k: a point whose coordinates are all = k mod d + 1.
    # Vertices with different k never coincide, so each k is grouped (sorted) on its own.
    rem0 = rem0[:d].astype(np.int64) * (d + 1)
    low = rem0.min(1) - 2 * (d + 1)  # spare values on both sides for the vertices and neighbours
    span = rem0.max(1) - low + 1 + 2 * (d + 1)
    if np.log2(span.astype(np.float64)).sum() > 62 - int(n - 1).bit_length():
        raise ValueError("lattice keys do not fit in 64 bits: use larger CRF standard deviations")
    multipliers = np.cumprod(np.concatenate([[1], span[:-1]])).astype(np.int64)
    code = (rem0[0] - low[0]) * multipliers[0]
    for j in range(1, d):
        code += (rem0[j] - low[j]) * multipliers[j]
    step = np.append(multipliers, 0) * (d + 1)  # the code is linear in the key
    total = int(multipliers.sum())
    groups, splat_pixels, splat_weights, splat_starts, vertex_codes = [], [], [], [], []
    m = 0  # vertices so far
    for k in range(d + 1):
        if k:
            code += total
            code -= np.take(step, coordinate[d + 1 - k])
        order, distinct, starts, group = group_codes(code)
        groups.append(group + m)
        splat_pixels.append(order)  # splat row of a vertex: the pixels that have it as corner k
        splat_weights.append(barycentric[k][order])
        splat_starts.append(starts + k * n)
        vertex_codes.append(distinct)
        m += len(distinct)
    # number the vertices by the first pixel that uses them: the splat then reads the pixels
    # roughly in memory order, which is faster (fewer cache misses) than in code order
    pixels = np.concatenate(splat_pixels)
    old_starts = np.concatenate(splat_starts + [[n * (d + 1)]])
    first_pixel = pixels[old_starts[:-1]]
    corner = np.repeat(np.arange(d + 1), [len(c) for c in vertex_codes])
    by_first = np.argsort(first_pixel * (d + 1) + corner)  # (a pixel has one vertex per corner)
    renumber = np.empty(m + 1, dtype=np.int64)  # old vertex number -> new; row m stays m
    renumber[by_first] = np.arange(m)
    renumber[m] = m
    counts = np.diff(old_starts)[by_first]
    new_starts = np.zeros(m + 2, dtype=np.int64)
    np.cumsum(counts, out=new_starts[1 : m + 1])
    new_starts[m + 1] = new_starts[m]
    source = np.repeat(old_starts[by_first] - new_starts[:m], counts) + np.arange(n * (d + 1))
    pixels, splat_weights = pixels[source], np.concatenate(splat_weights)[source]
    slice_indices = np.empty((n, d + 1), dtype=np.int64)
    for k in range(d + 1):
        slice_indices[:, k] = renumber[groups[k]]
    # the slice's 1 / (1 + 2^-d) makes sum_j K_ij ~ the true Gaussian sum
    slice_ = sparse_rows(
        np.arange(0, n * (d + 1) + 1, d + 1),
        slice_indices.ravel(),
        barycentric.T.ravel() * np.float32(1 / (1 + 2.0**-d)),
        (n, m + 1),
    )
    splat = sparse_rows(new_starts, pixels, splat_weights, (m + 1, n))
    # 5) blur along each lattice axis j: neighbours are the key +1 everywhere except -d at j, which
    # turns a vertex of class k into one of class k + 1 (mod d + 1): look it up in that class only
    bounds = np.cumsum([0] + [len(c) for c in vertex_codes])
    values = np.tile(np.array([1.0, 0.5, 0.5], np.float32), m)
    indptr = np.append(np.arange(0, 3 * m + 1, 3), 3 * m)  # 3 entries a row; row m empty (zero)
    blurs = []
    for j in range(d + 1):
        delta = total - int(step[j])
        indices = np.full((m, 3), m, dtype=np.int64)  # [itself, + neighbour, - neighbour]
        indices[:, 0] = np.arange(m)
        for k in range(d + 1):
            nxt = (k + 1) % (d + 1)
            wanted = vertex_codes[k] + delta
            position = np.minimum(
                np.searchsorted(vertex_codes[nxt], wanted), len(vertex_codes[nxt]) - 1
            )
            found = np.flatnonzero(vertex_codes[nxt][position] == wanted)  # others stay at row m
            here, there = renumber[bounds[k] + found], renumber[bounds[nxt] + position[found]]
            indices[here, 1] = there
            indices[there, 2] = here
        blurs.append(sparse_rows(indptr, indices.ravel(), values, (m + 1, m + 1)))
    return splat, blurs, slice_


def splat_and_blur(lattice: tuple, values: torch.Tensor) -> torch.Tensor:
    """Values (N, L) at the pixels -> blurred values (M+1, L) at the lattice's vertices."""
    splat, blurs, _ = lattice
    v = sparse_matmul(splat, values)  # (M+1, L)
    for blur in blurs:
        v = sparse_matmul(blur, v)
    return v


def lattice_filter(lattice: tuple, values):
    """Approximate Gaussian filter of values (N, L): splat, blur, slice (numpy or torch in, the
    same type out)."""
    v = splat_and_blur(lattice, torch.as_tensor(values, dtype=torch.float32))
    v = sparse_matmul(lattice[2], v)  # slice: (N, L)
    return v.numpy() if isinstance(values, np.ndarray) else v


def normalized_lattice(lattice: tuple, weight: float) -> tuple:
    """The lattice of weight * D^-1/2 K D^-1/2 (D = K 1): the factors are folded into its weights,
    splat columns times D^-1/2 and slice rows times weight * D^-1/2, so they cost nothing later."""
    splat, blurs, slice_ = lattice
    n = slice_.shape[0]
    norm = torch.rsqrt(lattice_filter(lattice, torch.ones(n, 1)).clamp_(min=1e-20)).view(-1)
    splat = splat._replace(values=splat.values * norm.index_select(0, splat.indices))
    slice_ = slice_._replace(values=(slice_.values.view(n, -1) * (weight * norm)[:, None]).view(-1))
    return splat, blurs, slice_


def summed_lattice_filter(lattices: list):
    """V -> sum_m lattice_filter(lattice_m, V), with a single slice: the kernels' slice matrices
    side by side (N, M_1 + M_2) applied to their blurred values stacked: one pass over the
    pixels."""
    n = lattices[0][2].shape[0]
    rows = np.cumsum([0] + [lattice[2].shape[1] for lattice in lattices])
    indices = torch.cat([s.indices.view(n, -1) + int(r) for (_, _, s), r in zip(lattices, rows)], 1)
    values = torch.cat([s.values.view(n, -1) for _, _, s in lattices], 1)
    k = indices.shape[1]
    slice_ = sparse_rows(
        torch.arange(0, n * k + 1, k), indices.view(-1), values.view(-1), (n, int(rows[-1]))
    )

    def filter_(v: torch.Tensor) -> torch.Tensor:
        blurred = [splat_and_blur(lattice, v) for lattice in lattices]
        return sparse_matmul(slice_, torch.cat(blurred))

    return filter_


_SPATIAL_LATTICES: dict = {}  # (H, W, sxy, weight) -> lattice (the smoothness kernel: no colours)


def spatial_lattice(h: int, w: int, sxy: float, weight: float) -> tuple:
    """The smoothness kernel's normalised, weighted lattice, built once per image size."""
    if (h, w, sxy, weight) not in _SPATIAL_LATTICES:
        lattice = permutohedral_lattice(crf_features(np.zeros((h, w, 3)), sxy))
        _SPATIAL_LATTICES[(h, w, sxy, weight)] = normalized_lattice(lattice, weight)
    return _SPATIAL_LATTICES[(h, w, sxy, weight)]


def dense_crf(
    probs: torch.Tensor, image: torch.Tensor, params: dict | None = None, iterations=None
) -> torch.Tensor:
    """Fully connected CRF (permutohedral lattice): probs (L, H, W), image (3, H, W) in [0, 1]
    -> Q (L, H, W)."""
    params = CRF_PARAMS if params is None else params
    iterations = CRF_ITERATIONS if iterations is None else iterations
    labels, h, w = probs.shape
    lattices = []
    if params["smooth_weight"]:
        lattices.append(spatial_lattice(h, w, params["smooth_sxy"], params["smooth_weight"]))
    if params["app_weight"]:
        # (H, W, 3) in 0..255, the unit of srgb
        pixels = image.permute(1, 2, 0).numpy().astype(np.float64) * 255.0
        features = crf_features(pixels, params["app_sxy"], params["app_srgb"])
        lattices.append(normalized_lattice(permutohedral_lattice(features), params["app_weight"]))
    kernels = [summed_lattice_filter(lattices)] if lattices else []
    flat = probs.reshape(labels, -1).T.contiguous().float()  # (L, H, W) -> (H*W, L), row-major
    return mean_field(flat, kernels, iterations).T.reshape(labels, h, w)


def benchmark_crf(seed: int) -> dict:
    """Time the lattice CRF at CRF_BENCHMARK_SIZE (the reference's 375 x 500), 21 labels and 5
    iterations."""
    rng = np.random.default_rng([seed, 99])
    h, w = CRF_BENCHMARK_SIZE
    image, labels = draw_scene(rng, max(h, w))
    image, labels = torch.from_numpy(image[:, :h, :w]), torch.from_numpy(labels[:h, :w])
    logits = (
        3.0 * F.one_hot(labels, 21).permute(2, 0, 1).float()
        + torch.from_numpy(rng.normal(0, 1.5, (21, h, w))).float()
    )
    probs = logits.softmax(0)  # a noisy 21-label unary
    _SPATIAL_LATTICES.clear()
    start = time.perf_counter()
    permutohedral_lattice(
        crf_features(
            image.permute(1, 2, 0).numpy() * 255.0, CRF_PARAMS["app_sxy"], CRF_PARAMS["app_srgb"]
        )
    )
    build = time.perf_counter() - start
    times = []
    for _ in range(3):  # the first call also builds the (cached) smoothness lattice
        start = time.perf_counter()
        dense_crf(probs, image, CRF_PARAMS, iterations=5)
        times.append(time.perf_counter() - start)
    return dict(
        first_call_seconds=times[0],
        cached_seconds=float(min(times[1:])),
        reference_seconds=0.3,
        appearance_lattice_build_seconds=build,
        size=f"{w}x{h}, 21 labels, 5 iterations, pydensecrf's example parameters",
    )


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
