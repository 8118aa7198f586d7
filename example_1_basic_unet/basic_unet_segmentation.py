"""Example 1: a U-Net from scratch on synthetic shapes (binary semantic segmentation).

What you will learn
-------------------
- What semantic segmentation is: one class label for *every pixel*, not one per image.
- How a U-Net is built: an encoder that shrinks the image into features, a decoder that grows them
  back, and skip connections that hand fine detail from the encoder to the decoder.
- Pixel-wise cross-entropy: the classification loss you know, averaged over pixels.
- Paired augmentation: why image and mask must receive the *same* random transform, and why
  masks are resampled with NEAREST.
- IoU (intersection over union) from a confusion matrix, and why pixel accuracy can lie.
- A training loop you can trust: validation every epoch, early stopping, a best checkpoint saved
  atomically, Ctrl-C that keeps your work, a clear stop when the loss becomes NaN.

How to run
----------
From this folder (``example_1_basic_unet/``)::

    python basic_unet_segmentation.py              # full run, about 2 minutes on a 2-core CPU
    python basic_unet_segmentation.py --quick      # tiny run in seconds, into outputs/quick/
    python basic_unet_segmentation.py --predict my_photo.png   # segment your own image

Everything is written to ``outputs/`` beside this script: ``best_model.pt``, ``metrics.json``
and the figures ``training_curves.png``, ``predictions.png`` and ``augmentation.png``.
Change a setting in the "Settings" cell below and run again. The "# %%" lines mark the cells of
the chapter (editors such as VS Code show them as cells that run one at a time).

What you should see
-------------------
On a 2-core CPU (no GPU) the default run took 139 s (16 epochs) and ended with::

    test split             U-Net  all background
    IoU background         0.991           0.829
    IoU object             0.956           0.000
    mean IoU               0.973           0.414
    pixel accuracy         0.992           0.829

The all-background "model" scores 0.829 pixel accuracy and finds nothing: that is why we use IoU.

References
----------
- Ronneberger, Fischer, Brox (2015), U-Net: Convolutional Networks for Biomedical Image
  Segmentation. https://arxiv.org/abs/1505.04597
- Long, Shelhamer, Darrell (2015), Fully Convolutional Networks for Semantic Segmentation.
  https://arxiv.org/abs/1411.4038
- torchvision transforms v2 and tv_tensors:
  https://pytorch.org/vision/stable/auto_examples/transforms/plot_transforms_getting_started.html
"""

import argparse
import contextlib
import json
import os
import random
import time
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # draw into files, never open a window: works on servers and in CI
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from tqdm import tqdm

# Files are read and written beside this script, whatever the working directory. A notebook
# (the script opened cell by cell with jupytext) has no __file__: there, the working directory.
HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()

# %% Settings
# ===============================================================================================
# Edit these: the knobs you will want to turn, then run again.
# data
IMAGE_SIZE = 64  # pixels per side; shapes are drawn at this size (bigger = sharper but slower)
NUM_IMAGES = 1400  # split 70/15/15 into train / val / test (980 / 210 / 210)
MAX_SHAPES = 3  # each image holds 1..MAX_SHAPES shapes, which may overlap
MIN_CONTRAST = 0.3  # least RGB distance from a shape to any background color (0: shapes may
# vanish; keep it below 0.8: no color is farther than sqrt(3)/2 ~ 0.87 from mid-grey)
AUGMENT = True  # paired flips, quarter turns and small affine warps (train split only)
# model
BASE_CHANNELS = 8  # channels of the first level; each level down doubles them (16: 4x compute)
DEPTH = 4  # number of 2x down-samplings: receptive field vs. compute (64 px -> 4 px at depth 4)
BILINEAR = False  # upsample with bilinear + 1x1 conv instead of a learned transposed convolution
# training
EPOCHS = 16  # upper bound; early stopping may end sooner (16 keeps the run near 2 minutes)
BATCH_SIZE = 8  # small batches: more updates per epoch, which helps more than big ones here
LEARNING_RATE = 3e-3  # AdamW's step size at the start; cosine decay brings it to ~0 at the end
PATIENCE = 5  # stop when validation foreground IoU has not improved for this many epochs
# system
SEED = 0  # same seed -> same data, same initial weights, same curves (on a GPU: nearly)
DEVICE = "auto"  # "auto" picks CUDA, then Apple MPS, then CPU; or name one: "cpu", "cuda", "mps"
OUTPUT_DIR = HERE / "outputs"  # checkpoints, metrics.json, figures
# -----------------------------------------------------------------------------------------------
# Advanced settings: defaults that rarely need a change.
NOISE_STD = (0.02, 0.08)  # per-image Gaussian pixel noise, drawn from this range
SPLIT_FRACTIONS = (0.70, 0.15, 0.15)  # train / val / test
AFFINE_PROBABILITY = 0.3  # share of images warped: the warp is the slowest augmentation step
WEIGHT_DECAY = 1e-4  # mild regularisation: shrinks weights a little every step
NUM_WORKERS = "auto"  # DataLoader processes: "auto" = 0 on a CPU (a worker would compete with
# training for the same cores), min(8, cores - 1) with CUDA; or a number
# --quick: a tiny configuration that runs in seconds, to check that everything works
QUICK = dict(IMAGE_SIZE=32, NUM_IMAGES=80, BASE_CHANNELS=8, DEPTH=2, EPOCHS=2, PATIENCE=2)
CLASS_NAMES = ("background", "object")  # class index -> name; index 1 is the foreground
IGNORE_INDEX = 255  # label the loss and the metrics skip; none here, VOC (Example 2) marks outlines


# %% 1. Data: synthetic shapes, drawn by the script
# ===============================================================================================
# Real segmentation datasets are large downloads; to learn the mechanics we draw our own. Each
# image is a background (a colour gradient or a texture) with 1..MAX_SHAPES shapes (circle,
# ellipse, rectangle, triangle) in random colours, possibly overlapping, plus pixel noise. The
# mask says, for every pixel, 0 = background or 1 = object (inside any shape).
#
# Every image is a pure function of (seed, index): the same pair always gives the same image,
# so the train / val / test split is just a split of indices and never leaks.


def random_color(rng: np.random.Generator) -> np.ndarray:
    """One RGB colour in [0, 1]^3, shape (3,)."""
    return rng.uniform(0.0, 1.0, size=3).astype(np.float32)


def make_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A gradient or a texture between two random colours, shape (size, size, 3), float32."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size  # (H, W) each, in [0, 1)
    angle = rng.uniform(0, 2 * np.pi)
    along = np.cos(angle) * x + np.sin(angle) * y  # coordinate along a random direction
    if rng.random() < 0.5:  # linear gradient
        t = (along - along.min()) / (np.ptp(along) + 1e-6)
    else:  # stripes or checks, so the network cannot just threshold brightness
        frequency = rng.uniform(3, 10)
        across = -np.sin(angle) * x + np.cos(angle) * y
        t = 0.5 + 0.5 * np.sin(2 * np.pi * frequency * along)
        if rng.random() < 0.5:
            t = t * (0.5 + 0.5 * np.sin(2 * np.pi * frequency * across))
    c0, c1 = random_color(rng), random_color(rng)
    return c0 + (c1 - c0) * t[..., None]  # (H, W, 1) broadcasts against (3,) -> (H, W, 3)


def shape_mask(rng: np.random.Generator, kind: str, size: int) -> np.ndarray:
    """Boolean (size, size) mask of one randomly placed and rotated shape of the given kind."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5  # pixel centres
    cx, cy = rng.uniform(0.2, 0.8, size=2) * size
    radius = rng.uniform(0.12, 0.25) * size
    angle = rng.uniform(0, np.pi)
    # Coordinates in the shape's own rotated frame (u along its first axis, v across it).
    u = (x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)
    v = -(x - cx) * np.sin(angle) + (y - cy) * np.cos(angle)
    if kind == "circle":
        return u**2 + v**2 <= radius**2
    if kind == "ellipse":
        return (u / radius) ** 2 + (v / (radius * rng.uniform(0.5, 0.8))) ** 2 <= 1.0
    if kind == "rectangle":
        return (np.abs(u) <= radius) & (np.abs(v) <= radius * rng.uniform(0.5, 1.0))
    # triangle: corners roughly a third of a turn apart, so no triangle is a thin sliver
    first_corner = rng.uniform(0, 2 * np.pi)
    corners = first_corner + np.array([0, 2, 4]) * np.pi / 3 + rng.uniform(-0.3, 0.3, 3)
    px, py = cx + radius * 1.3 * np.cos(corners), cy + radius * 1.3 * np.sin(corners)
    # a point is inside when it lies on the same side of all three edges
    sides = [
        (px[(i + 1) % 3] - px[i]) * (y - py[i]) - (py[(i + 1) % 3] - py[i]) * (x - px[i])
        for i in range(3)
    ]
    return ((sides[0] >= 0) & (sides[1] >= 0) & (sides[2] >= 0)) | (
        (sides[0] <= 0) & (sides[1] <= 0) & (sides[2] <= 0)
    )


def generate_sample(seed: int, index: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw sample `index` of the dataset with this seed.

    Returns (image, mask): image float32 (3, size, size) in [0, 1], mask int64 (size, size) with
    values in {0, 1}.
    """
    rng = np.random.default_rng([seed, index])  # one independent stream per (seed, index)
    image = make_background(rng, size)  # (H, W, 3)
    background_colors = image.reshape(-1, 3).copy()  # (H * W, 3): every colour in the background
    mask = np.zeros((size, size), dtype=bool)
    for _ in range(rng.integers(1, MAX_SHAPES + 1)):
        inside = shape_mask(rng, rng.choice(["circle", "ellipse", "rectangle", "triangle"]), size)
        # Keep every shape visible: redraw its colour until it is far from all background colours
        # (at most 1000 draws, so an impossible MIN_CONTRAST cannot hang the script).
        for _ in range(1000):
            color = random_color(rng)
            if np.linalg.norm(background_colors - color, axis=1).min() >= MIN_CONTRAST:
                break
        else:  # no colour was far enough: say so instead of drawing a faint shape silently
            warnings.warn(
                f"MIN_CONTRAST = {MIN_CONTRAST} not met in 1000 colours: some shapes blend into "
                "their background (lower it)",
                stacklevel=2,
            )
        image[inside] = color  # later shapes cover earlier ones; the mask is their union
        mask |= inside
    image = image + rng.normal(0.0, rng.uniform(*NOISE_STD), size=image.shape)
    image = np.clip(image, 0.0, 1.0).astype(np.float32).transpose(2, 0, 1)  # (H, W, 3) -> (3, H, W)
    return image, mask.astype(np.int64)


def split_indices(num_images: int, seed: int) -> dict[str, np.ndarray]:
    """Shuffle 0..num_images-1 with the seed; cut it into train / val / test by SPLIT_FRACTIONS."""
    order = np.random.default_rng(seed).permutation(num_images)
    n_train = int(round(SPLIT_FRACTIONS[0] * num_images))
    n_val = int(round(SPLIT_FRACTIONS[1] * num_images))
    return {
        "train": order[:n_train],
        "val": order[n_train : n_train + n_val],
        "test": order[n_train + n_val :],
    }


# Augmentation for segmentation has one rule: whatever geometric change happens to the image must
# happen, identically, to the mask, or the labels no longer describe the pixels. torchvision's
# transforms v2 do this for us when we wrap the tensors as tv_tensors: a single call transforms an
# Image and its Mask with the same random parameters. Colour changes (brightness, noise) would be
# applied to the image only; we rely on the generator's own colour variety instead.


class RandomDihedral(nn.Module):
    """Apply the same random symmetry of the square to image and mask: (..., S, S) -> (..., S, S).

    A square has 8 symmetries: 4 quarter turns, each with or without a mirror. One draw picks
    one of them; this gives exactly the statistics of random horizontal flip + random vertical
    flip + random quarter turn, in one step instead of three (benchmarks/README.md has the
    timing). A transform of your own can join a v2 pipeline as a plain module whose forward
    takes and returns (image, mask). Pixels only move: nothing is interpolated.
    """

    def forward(self, image: tv_tensors.Image, mask: tv_tensors.Mask):
        k = int(torch.randint(8, ()))  # one draw for both: that is what makes it paired

        def move(x: torch.Tensor) -> torch.Tensor:
            x = x.rot90(k % 4, dims=(-2, -1))  # k % 4 quarter turns
            return x.flip(-1) if k >= 4 else x  # the mirrored half of the 8 symmetries

        # Gotcha: most operations on a tv_tensor return a plain tensor, and the next v2 transform
        # would not know the mask is a Mask any more; wrap(..., like=x) restores the type.
        return tv_tensors.wrap(move(image), like=image), tv_tensors.wrap(move(mask), like=mask)


def build_train_transform() -> v2.Compose:
    """Random paired flips and quarter turns, and a small affine warp on some images."""
    return v2.Compose(
        [
            RandomDihedral(),  # exact flips and quarter turns: pixels move, nothing is interpolated
            v2.RandomApply(
                # Gotcha: a Mask must be resampled with NEAREST: blending labels 0 and 1 would
                # invent a class "0.5" (with several classes, a wrong class in between). v2 always
                # uses NEAREST for a tv_tensors.Mask. For the image it is a choice: photos look
                # better resampled bilinearly, but every image this model will see has
                # pixel-sharp edges, so the image stays NEAREST too: train on what you test on.
                [
                    v2.RandomAffine(
                        degrees=15,
                        translate=(0.05, 0.05),
                        scale=(0.9, 1.1),
                        interpolation=v2.InterpolationMode.NEAREST,  # see the gotcha above
                    )
                ],
                p=AFFINE_PROBABILITY,
            ),
        ]
    )


# Normalization. Networks train faster on inputs with zero mean and unit variance. Datasets of
# photos use one mean and std for the whole dataset (ImageNet's, in Example 2). Here every image
# has its own random colours, so we standardize each image by its own statistics, channel by
# channel: the network then sees each pixel relative to the rest of its picture ("brighter and
# redder than this image's background"), which is exactly the comparison it needs (to see it
# matter, return the image unchanged here and compare the validation IoU). The same function
# must run on every image the model ever sees: training, evaluation and --predict. We
# standardize *before* the augmentation, so the corners that a rotation leaves empty are filled
# with 0 = the image's mean colour (augmentation.png shows raw pixels, where that fill looks
# black).


def standardize(image: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit variance per image and channel: (..., 3, H, W) -> same shape."""
    mean = image.mean(dim=(-2, -1), keepdim=True)  # (..., 3, 1, 1)
    std = image.std(dim=(-2, -1), keepdim=True)
    return (image - mean) / (std + 1e-3)  # the epsilon keeps a flat image from dividing by 0


class ShapesDataset(Dataset):
    """The synthetic shapes with the given indices, generated once and kept in memory.

    `images` keeps the raw [0, 1] pixels (for plotting), `inputs` their standardized version,
    computed once for all images; items are standardized inputs, then augmented.
    """

    def __init__(self, indices: np.ndarray, seed: int, size: int, transform=None):
        samples = [generate_sample(seed, int(i), size) for i in indices]
        self.images = torch.from_numpy(np.stack([s[0] for s in samples]))  # (N, 3, H, W) float32
        self.inputs = standardize(self.images)  # (N, 3, H, W), what the network sees
        self.masks = torch.from_numpy(np.stack([s[1] for s in samples]))  # (N, H, W) int64
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.inputs[i], self.masks[i]
        if self.transform is not None:
            # One call, two tensors: the same random flip / turn / warp for both.
            image, mask = self.transform(tv_tensors.Image(image), tv_tensors.Mask(mask))
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)


def build_loaders(seed: int) -> dict[str, DataLoader]:
    """DataLoaders for train (augmented, shuffled), val and test (neither)."""
    loaders = {}
    for split, indices in split_indices(NUM_IMAGES, seed).items():
        if len(indices) == 0:
            raise SystemExit(f"error: NUM_IMAGES = {NUM_IMAGES} leaves the {split} split empty")
        train = split == "train"
        dataset = ShapesDataset(
            indices, seed, IMAGE_SIZE, build_train_transform() if train and AUGMENT else None
        )
        loaders[split] = DataLoader(
            dataset,
            batch_size=BATCH_SIZE,
            shuffle=train,
            drop_last=train and len(dataset) > BATCH_SIZE,  # no tiny last batch for BatchNorm
            num_workers=pick_num_workers(NUM_WORKERS),
            generator=torch.Generator().manual_seed(seed),  # same shuffling order every run
        )
    return loaders


# Check the pairing with your own eyes: augmentation.png shows one training image and five
# augmented copies above their masks. Every mask must have moved exactly as its image did.


def plot_augmentation(dataset: ShapesDataset, path: Path, copies: int = 5) -> None:
    """One training image and its mask, then `copies` random paired augmentations of them."""
    transform = build_train_transform()
    image, mask = dataset.images[0], dataset.masks[0]
    pairs = [(image, mask)] + [
        transform(tv_tensors.Image(image), tv_tensors.Mask(mask)) for _ in range(copies)
    ]
    fig, axes = plt.subplots(2, len(pairs), figsize=(2 * len(pairs), 4.2))
    for col, (img, msk) in enumerate(pairs):
        axes[0, col].imshow(img.permute(1, 2, 0).numpy())  # (3, H, W) -> (H, W, 3) for imshow
        axes[1, col].imshow(msk.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        axes[0, col].set_title("original" if col == 0 else f"augmented {col}", fontsize=9)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle("Paired augmentation: the mask (bottom) moves with the image (top)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# %% 2. Model: U-Net
# ===============================================================================================
# The U-Net (Ronneberger et al., 2015) has two halves. The encoder repeats "two 3x3 convolutions,
# then halve the resolution": each level sees a larger region but knows less about *where*
# things are. The decoder repeats "double the resolution, then two 3x3 convolutions" back to the
# input size. The skip connections are what make it work: at each level the decoder's upsampled
# features are *concatenated* with the encoder's features of the same resolution. The encoder
# features remember exact edges; the decoder features know what the object is. Concatenation
# (rather than adding) keeps both sets of channels and lets the next convolutions learn how to
# mix them. Ours is the common modern variant: padded 3x3 convolutions (the output is as large as
# the input) and BatchNorm. The paper used unpadded convolutions, so its output (388 px) was
# smaller than its input (572 px) and the skips had to be cropped.
#
# Channels with the defaults (BASE_CHANNELS = 8, DEPTH = 4), for a 64 x 64 input:
#   3 x 64x64 -> DoubleConv 8 ------------------------ concat 16 -> DoubleConv 8 -> 1x1 -> 2
#                 Down 16 x 32x32 ------------- concat 32 -> DoubleConv 16 -> Up
#                   Down 32 x 16x16 ------ concat 64 -> DoubleConv 32 -> Up
#                     Down 64 x 8x8 - concat 128 -> DoubleConv 64 -> Up
#                       Down 128 x 4x4 (bottleneck) -> Up


class DoubleConv(nn.Sequential):
    """(3x3 conv -> BatchNorm -> ReLU) twice; keeps H and W (padding=1)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            # bias=False: the BatchNorm right after has its own bias, a conv bias would be wasted
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class Down(nn.Sequential):
    """Halve H and W (2x2 max pooling), then DoubleConv.

    (N, C_in, H, W) -> (N, C_out, H // 2, W // 2)
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(nn.MaxPool2d(2), DoubleConv(in_channels, out_channels))


class Up(nn.Module):
    """Double H and W, concatenate the skip features, then DoubleConv.

    (N, C_in, h, w) and skip (N, C_in // 2, H, W) -> (N, C_out, H, W), where H and W are 2h and
    2w, or one more.
    """

    def __init__(self, in_channels: int, out_channels: int, bilinear: bool):
        super().__init__()
        if bilinear:  # fixed interpolation, then a 1x1 conv to halve the channels
            self.up = nn.Sequential(
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                nn.Conv2d(in_channels, in_channels // 2, kernel_size=1),
            )
        else:  # a learned upsampling: each input pixel paints a 2x2 patch
            self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2)
        self.conv = DoubleConv(in_channels, out_channels)  # in: C_in // 2 (up) + C_in // 2 (skip)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)  # (N, C_in // 2, 2h, 2w)
        # Gotcha: max pooling floors odd sizes (127 -> 63), so 2h can be one pixel short of the
        # skip's H. Pad the upsampled map to the skip's size so any input size works.
        dh, dw = skip.shape[-2] - x.shape[-2], skip.shape[-1] - x.shape[-1]
        x = F.pad(x, [dw // 2, dw - dw // 2, dh // 2, dh - dh // 2])  # (N, C_in // 2, H, W)
        x = torch.cat([skip, x], dim=1)  # concatenate on channels: (N, C_in, H, W)
        return self.conv(x)  # (N, C_out, H, W)


class UNet(nn.Module):
    """U-Net for `num_classes` classes: (N, in_channels, H, W) -> logits (N, num_classes, H, W)."""

    def __init__(self, in_channels=3, num_classes=2, base_channels=8, depth=4, bilinear=False):
        super().__init__()
        self.depth = depth
        widths = [base_channels * 2**level for level in range(depth + 1)]  # e.g. 8, 16, ..., 128
        self.inc = DoubleConv(in_channels, widths[0])
        self.downs = nn.ModuleList(Down(widths[i], widths[i + 1]) for i in range(depth))
        self.ups = nn.ModuleList(
            Up(widths[i + 1], widths[i], bilinear) for i in reversed(range(depth))
        )
        # 1x1 convolution: a linear classifier applied at every pixel, giving one score per class
        self.outc = nn.Conv2d(widths[0], num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[-2:]) < 2**self.depth:  # each level halves the size: it must stay >= 1
            raise ValueError(f"input {tuple(x.shape[-2:])} is too small for depth {self.depth}")
        skips = [self.inc(x)]  # (N, w0, H, W)
        for down in self.downs:
            skips.append(down(skips[-1]))  # level l: (N, w_l, H / 2^l, W / 2^l)
        x = skips.pop()  # the bottleneck, the deepest and coarsest features
        for up in self.ups:
            x = up(x, skips.pop())  # back up one level, joined with the matching encoder output
        return self.outc(x)  # (N, num_classes, H, W): raw scores (logits), no softmax here


def model_config() -> dict:
    """The constants that define the network, saved in the checkpoint to rebuild it later."""
    return dict(
        in_channels=3,
        num_classes=len(CLASS_NAMES),
        base_channels=BASE_CHANNELS,
        depth=DEPTH,
        bilinear=BILINEAR,
    )


# %% 3. Loss and metrics
# ===============================================================================================
# Loss. Segmentation is classification at every pixel, so the loss is cross-entropy at every
# pixel, averaged. nn.CrossEntropyLoss accepts logits (N, C, H, W) and integer labels (N, H, W)
# directly. We use two output channels and softmax cross-entropy even though the task is binary:
# it is the same code for 21 classes (Example 2), and the argmax over classes is the prediction.
# (One channel with BCEWithLogitsLoss is the equivalent binary formulation.)
#
# Metrics. We count, over the *whole* split, how many pixels of true class i were predicted as
# class j: the confusion matrix. From it, for each class c:
#   IoU_c = TP / (TP + FP + FN)  (overlap / union of predicted and true region of class c)
#   pixel accuracy = correct pixels / all pixels
# Summing counts over the split (rather than averaging per-image IoUs) is the convention of
# PASCAL VOC and torchvision's reference scripts: big and small images weigh by their pixels.
# Rule for an empty class: when a class is absent from both the prediction and the ground truth,
# TP + FP + FN = 0 and its IoU is undefined, so we report NaN and leave it out of means.


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts (C, C): row = true class, column = predicted; target pixels outside [0, C) skipped.

    pred and target are integer tensors of the same shape (N x H x W); IGNORE_INDEX (255) lies
    outside [0, C), so ignored pixels are never counted.
    """
    valid = (target >= 0) & (target < num_classes)
    bins = num_classes * target[valid].long() + pred[valid].long()  # one bin per (true, pred) pair
    return torch.bincount(bins, minlength=num_classes**2).reshape(num_classes, num_classes)


def metrics_from_confusion(confusion: torch.Tensor) -> dict:
    """IoU per class (NaN if absent from prediction and truth), mean IoU and pixel accuracy."""
    confusion = confusion.double()
    true_positive = confusion.diag()
    union = confusion.sum(dim=0) + confusion.sum(dim=1) - true_positive  # TP + FP + FN
    iou = true_positive / union  # 0 / 0 -> NaN: the empty-class rule above
    return {
        "iou_per_class": {name: iou[c].item() for c, name in enumerate(CLASS_NAMES)},
        "foreground_iou": iou[1].item(),
        "mean_iou": torch.nanmean(iou).item(),
        "pixel_accuracy": (true_positive.sum() / confusion.sum()).item(),
    }


# %% 4. Training
# ===============================================================================================
# One epoch = one pass over the training images. After each epoch we measure the validation
# split; the weights with the best validation foreground IoU are saved (atomically: written to a
# temporary file, then renamed, so a crash mid-write never leaves a corrupt checkpoint; see
# save_checkpoint in the plumbing appendix). If the validation IoU stops improving for PATIENCE
# epochs we stop early. Ctrl-C also stops cleanly: the best checkpoint is already on disk and the
# script goes on to evaluate it. fit() is the loop; the functions before it are its steps.
# On CUDA, autocast (plumbing appendix) runs the network in float16 where that is safe, and the
# GradScaler multiplies the loss so that small float16 gradients do not round to zero.


def train_one_epoch(model, loader, loss_fn, optimizer, scheduler, scaler, device, epoch) -> float:
    """One pass over `loader` with gradient updates; returns the mean training loss."""
    model.train()  # BatchNorm uses batch statistics and updates its running averages
    total, count = 0.0, 0
    bar = tqdm(loader, desc=f"epoch {epoch:2d} train", leave=False)
    for step, (images, masks) in enumerate(bar):
        images, masks = images.to(device), masks.to(device)  # (N, 3, H, W) float, (N, H, W) int64
        with autocast(device):
            loss = loss_fn(model(images), masks)
        if not torch.isfinite(loss):
            raise SystemExit(
                f"error: the training loss became {loss.item()} at epoch {epoch}, batch {step}. "
                f"Lower LEARNING_RATE (now {LEARNING_RATE}) and run again; the best checkpoint of "
                f"the epochs before (if one finished) is in {OUTPUT_DIR}."
            )
        optimizer.zero_grad(set_to_none=True)  # drop old gradients instead of filling with zeros
        scaler.scale(loss).backward()  # the scaler keeps float16 gradients from underflowing
        scaler.step(optimizer)  # no update where float16 gradients overflowed (inf or NaN)
        scaler.update()  # adapts the scale: smaller after an overflow, larger after good steps
        # the learning rate follows its schedule batch by batch (on CUDA PyTorch may warn that
        # it stepped before the optimizer: expected when the scaler skipped an overflowing step)
        scheduler.step()
        total += loss.item() * len(images)
        count += len(images)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return total / count


@torch.inference_mode()  # no autograd bookkeeping: faster and lighter than no_grad for eval
def evaluate(model, loader, loss_fn, device) -> tuple[float, torch.Tensor]:
    """Mean loss and confusion matrix over the whole loader."""
    model.eval()  # Gotcha: forget it and BatchNorm uses this batch's statistics, not its averages
    confusion = torch.zeros(len(CLASS_NAMES), len(CLASS_NAMES), dtype=torch.long)
    total, count = 0.0, 0
    for images, masks in loader:
        images, masks = images.to(device), masks.to(device)
        with autocast(device):
            logits = model(images)  # (N, C, H, W)
        total += loss_fn(logits.float(), masks).item() * len(images)
        count += len(images)
        pred = logits.argmax(dim=1)  # (N, C, H, W) -> (N, H, W): the most likely class per pixel
        confusion += confusion_matrix(pred, masks, len(CLASS_NAMES)).cpu()
    return total / count, confusion


def build_optimizer(model: nn.Module, device: torch.device, steps: int):
    """AdamW whose learning rate decays along a cosine over `steps` batches, and a GradScaler.

    Returns (optimizer, scheduler, scaler); the scaler only acts on CUDA, with float16.
    """
    # fused=True: one kernel updates all weights at once instead of ~10 small operations per
    # weight tensor (same maths, a little faster). CPU and CUDA have it.
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=LEARNING_RATE,
        weight_decay=WEIGHT_DECAY,
        fused=device.type in ("cpu", "cuda"),
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")
    return optimizer, scheduler, scaler


def validate_and_checkpoint(model, loader, loss_fn, device, epoch, best_iou, checkpoint_path):
    """Score the validation split; save the weights when they beat `best_iou`.

    Returns (val_loss, val_iou, improved). The checkpoint holds the model's config too, so that
    load_model can rebuild the network even after the settings at the top have changed.
    """
    val_loss, confusion = evaluate(model, loader, loss_fn, device)
    val_iou = metrics_from_confusion(confusion)["foreground_iou"]
    improved = val_iou > best_iou  # a NaN IoU (nothing to score) never counts as the best
    if improved:
        state = dict(
            model_state=model.state_dict(),
            config=model_config(),
            image_size=IMAGE_SIZE,
            epoch=epoch,
            val_foreground_iou=val_iou,
        )
        save_checkpoint(state, checkpoint_path)
    return val_loss, val_iou, improved


def fit(model, loaders, loss_fn, device, checkpoint_path: Path) -> list[dict]:
    """Train with validation every epoch, early stopping and a best checkpoint; returns history."""
    optimizer, scheduler, scaler = build_optimizer(model, device, EPOCHS * len(loaders["train"]))
    checkpoint_path.unlink(missing_ok=True)  # an earlier run's model must not pass for this one's
    history, best_iou, epochs_without_improvement = [], -1.0, 0
    try:
        for epoch in range(1, EPOCHS + 1):
            start = time.perf_counter()
            train_loss = train_one_epoch(
                model, loaders["train"], loss_fn, optimizer, scheduler, scaler, device, epoch
            )
            val_loss, val_iou, improved = validate_and_checkpoint(
                model, loaders["val"], loss_fn, device, epoch, best_iou, checkpoint_path
            )
            history.append(
                dict(
                    epoch=epoch,
                    train_loss=train_loss,
                    val_loss=val_loss,
                    val_foreground_iou=val_iou,
                )
            )
            if improved:
                best_iou, epochs_without_improvement = val_iou, 0
            else:
                epochs_without_improvement += 1
            seconds = time.perf_counter() - start
            print(
                f"epoch {epoch:2d}/{EPOCHS} | train loss {train_loss:.4f} | val loss {val_loss:.4f}"
                f" | val foreground IoU {val_iou:.4f}{' (best, saved)' if improved else ''}"
                f" | {seconds:.1f} s"
            )
            if epoch == 1:  # every epoch costs about the same: the first one tells the rest
                print_eta(seconds, 1, EPOCHS)
            if epochs_without_improvement >= PATIENCE:
                print(f"early stopping: no improvement for {PATIENCE} epochs")
                break
    except KeyboardInterrupt:
        print("\ninterrupted: training stopped, the best checkpoint so far is kept")
    return history


# %% 5. Evaluation
# ===============================================================================================
# The test split is touched once, at the very end, with the checkpoint that validation chose.
# Next to the model we score a "model" that answers background everywhere: objects cover about a
# sixth of the pixels, so it is right about 83% of the time, yet finds nothing. That is why
# segmentation is judged by IoU, not by pixel accuracy.


def load_model(checkpoint_path: Path, device: torch.device) -> tuple[UNet, dict]:
    """Rebuild the U-Net from a checkpoint (its saved config, not the constants above)."""
    checkpoint = torch.load(checkpoint_path, map_location=device, weights_only=True)
    model = UNet(**checkpoint["config"]).to(device, memory_format=memory_format(device))
    model.load_state_dict(checkpoint["model_state"])
    model.eval()
    return model, checkpoint


def all_background_confusion(loader) -> torch.Tensor:
    """Confusion matrix of a predictor that says "background" for every pixel."""
    confusion = torch.zeros(len(CLASS_NAMES), len(CLASS_NAMES), dtype=torch.long)
    for _, masks in loader:
        confusion += confusion_matrix(torch.zeros_like(masks), masks, len(CLASS_NAMES))
    return confusion


def print_results(test: dict, baseline: dict) -> None:
    """A small table: per-class IoU, mean IoU and pixel accuracy, model vs all-background."""
    rows = [(f"IoU {name}", "iou_per_class", name) for name in CLASS_NAMES]  # object = foreground
    rows += [("mean IoU", "mean_iou", None), ("pixel accuracy", "pixel_accuracy", None)]
    print(f"\n{'test split':<18}{'U-Net':>10}{'all background':>16}")
    for label, key, name in rows:
        ours = test[key][name] if name else test[key]
        theirs = baseline[key][name] if name else baseline[key]
        print(f"{label:<18}{ours:>10.3f}{theirs:>16.3f}")


def evaluate_best_checkpoint(checkpoint_path: Path, loader, loss_fn, device) -> tuple[UNet, dict]:
    """Score the checkpoint that validation chose, and the all-background baseline, on `loader`.

    Prints the comparison table; returns (model, results) with the keys "test",
    "all_background_baseline" and "best_epoch".
    """
    if not checkpoint_path.is_file():
        raise SystemExit(
            "error: no checkpoint to test: training stopped before the first epoch ended, or "
            "the validation foreground IoU was undefined (NaN: no foreground) in every epoch"
        )
    model, checkpoint = load_model(checkpoint_path, device)
    test_loss, confusion = evaluate(model, loader, loss_fn, device)
    test = metrics_from_confusion(confusion)
    baseline = metrics_from_confusion(all_background_confusion(loader))
    best_epoch, best_iou = checkpoint["epoch"], checkpoint["val_foreground_iou"]
    print(f"best checkpoint: epoch {best_epoch} (val foreground IoU {best_iou:.4f})")
    print_results(test, baseline)
    results = {
        "test": dict(test, loss=test_loss),
        "all_background_baseline": baseline,
        "best_epoch": best_epoch,
    }
    return model, results


# %% 6. Visualization
# ===============================================================================================
# Numbers say how well; pictures say where. The training curves show whether the model still
# learns or has begun to overfit; the prediction grid shows which pixels it gets wrong (mostly
# on outlines). The augmentation figure belongs to the data, so section 1 draws it.


def plot_training_curves(history: list[dict], path: Path) -> None:
    """Train / val loss and val foreground IoU per epoch."""
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_iou) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], "o-", label="validation")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="Loss", yscale="log")
    ax_loss.legend()
    ax_iou.plot(epochs, [h["val_foreground_iou"] for h in history], "o-", color="tab:green")
    ax_iou.set(xlabel="epoch", ylabel="IoU", title="Validation foreground IoU")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def error_map(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """RGB (H, W, 3): correct object white, correct background black, false positive red,
    false negative blue."""
    rgb = np.zeros(pred.shape + (3,), dtype=np.float32)
    rgb[(pred == 1) & (target == 1)] = (1.0, 1.0, 1.0)
    rgb[(pred == 1) & (target == 0)] = (1.0, 0.2, 0.2)  # false positive: predicted object, wrong
    rgb[(pred == 0) & (target == 1)] = (0.2, 0.4, 1.0)  # false negative: missed object
    return rgb


@torch.inference_mode()
def plot_predictions(model, dataset: ShapesDataset, device, path: Path, rows: int = 4) -> None:
    """Grid of image / ground truth / prediction / error map for the first `rows` test images."""
    model.eval()
    rows = min(rows, len(dataset))
    images, masks = dataset.images[:rows], dataset.masks[:rows]
    preds = model(standardize(images).to(device)).argmax(dim=1).cpu()  # (rows, H, W)
    fig, axes = plt.subplots(rows, 4, figsize=(9, 2.3 * rows), squeeze=False)
    titles = ["image", "ground truth", "prediction", "errors: FP red, FN blue"]
    for r in range(rows):
        panels = [
            images[r].permute(1, 2, 0).numpy(),
            masks[r].numpy(),
            preds[r].numpy(),
            error_map(preds[r].numpy(), masks[r].numpy()),
        ]
        for c, panel in enumerate(panels):
            axes[r, c].imshow(panel, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            axes[r, c].axis("off")
            if r == 0:
                axes[r, c].set_title(titles[c], fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# %% 7. Your own image: --predict
# ===============================================================================================
# The network was trained on IMAGE_SIZE x IMAGE_SIZE pictures, so we resize a photo to that size
# (a non-square photo gets squashed, like looking at it through a stretched lens), predict, and
# bring the *scores* (logits) back to the photo's size before taking the argmax.
# Gotcha: resize logits or probabilities with bilinear interpolation and an explicit size=;
# resizing the label map itself would need NEAREST and gives blocky edges.


def read_image(image_path: Path) -> np.ndarray:
    """Any image file Pillow reads -> float32 RGB (H, W, 3) in [0, 1]; a one-line error if not."""
    if not image_path.is_file():
        raise SystemExit(f"error: no such image file: {image_path}")
    try:
        with Image.open(image_path) as file:
            file = ImageOps.exif_transpose(file)  # phone photos: apply the stored rotation
            if file.mode in ("I;16", "I", "F"):  # 16-bit or float images: stretch to [0, 1]
                gray = np.asarray(file, dtype=np.float32)
                gray = (gray - gray.min()) / max(float(np.ptp(gray)), 1e-6)
                return np.repeat(gray[..., None], 3, axis=-1)  # (H, W) -> (H, W, 3)
            return np.asarray(file.convert("RGB"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise SystemExit(f"error: {image_path} is not an image that Pillow can read") from None


@torch.inference_mode()
def predict_image(image_path: Path, checkpoint_path: Path, device: torch.device) -> Path:
    """Segment one image file with the saved checkpoint; write and return an overlay PNG."""
    photo = read_image(image_path)  # (H, W, 3)
    if not checkpoint_path.is_file():
        raise SystemExit(
            f"error: no trained model at {checkpoint_path}; "
            "train one first: python basic_unet_segmentation.py "
            "(a --quick run's model: --quick --predict)"
        )
    model, checkpoint = load_model(checkpoint_path, device)
    size = checkpoint["image_size"]
    pixels = torch.from_numpy(photo).permute(2, 0, 1).unsqueeze(0)  # (H, W, 3) -> (1, 3, H, W)
    # Resize on the CPU: antialiased resizing is not implemented on every device (e.g. MPS).
    small = F.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True)
    logits = model(standardize(small).to(device))  # (1, 2, size, size)
    logits = F.interpolate(logits, size=photo.shape[:2], mode="bilinear")  # (1, 2, H, W)
    foreground = (logits.argmax(dim=1)[0] == 1).cpu().numpy()  # (H, W) bool
    overlay = photo.copy()
    overlay[foreground] = 0.5 * overlay[foreground] + 0.5 * np.array([1.0, 0.0, 0.0])  # red tint
    out_path = OUTPUT_DIR / f"{image_path.stem}_overlay.png"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((overlay * 255).round().astype(np.uint8)).save(out_path)
    print(f"{foreground.mean():.1%} of the pixels are 'object'; overlay written to {out_path}")
    return out_path


# %% 8. Putting it together
# ===============================================================================================
# main() below is the chapter in one screen: one call per section, in order. The two helpers
# before it read the command line and write the results.


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Read --quick and --predict; --quick swaps in the QUICK settings for this process."""
    parser = argparse.ArgumentParser(description="U-Net from scratch on synthetic shapes.")
    parser.add_argument("--quick", action="store_true", help="tiny run in seconds (set-up check)")
    parser.add_argument("--predict", metavar="IMAGE", type=Path, help="segment your own image")
    # Cells run in a notebook have no __file__, and sys.argv holds the kernel's options, not ours
    # (`%run script.py --quick` sets __file__ and passes its own arguments: those are kept).
    if argv is None and "__file__" not in globals():
        argv = []
    args = parser.parse_args(argv)
    if args.quick:
        # Replace the settings at the top for this process (a notebook: restart the kernel after),
        # and keep its files in outputs/quick/
        # so that a set-up check never overwrites the model of a real run.
        globals().update(QUICK, OUTPUT_DIR=OUTPUT_DIR / "quick")
    return args


def write_metrics(results: dict, history: list[dict], model, device, start: float) -> dict:
    """Add the training history, size and time to `results`, write metrics.json, print a line."""
    total_seconds = time.perf_counter() - start
    metrics = dict(
        results,
        epochs_run=len(history),
        history=history,
        parameters=count_parameters(model),
        total_seconds=round(total_seconds, 1),
        device=str(device),
    )
    write_json(metrics, OUTPUT_DIR / "metrics.json")
    test = results["test"]
    print(
        f"\ntest foreground IoU {test['foreground_iou']:.3f} | pixel accuracy "
        f"{test['pixel_accuracy']:.3f} | total {total_seconds:.0f} s | outputs in {OUTPUT_DIR}"
    )
    return metrics


def main(argv: list[str] | None = None) -> dict:
    """Train, evaluate and draw (or, with --predict, segment one image); returns the metrics."""
    args = parse_args(argv)
    device = pick_device(DEVICE)
    # cuDNN tries its convolution algorithms on the first batch of each shape and keeps the
    # fastest: worth it here, where every batch has the same shape (no effect on a CPU).
    torch.backends.cudnn.benchmark = True
    checkpoint_path = OUTPUT_DIR / "best_model.pt"
    if args.predict is not None:  # 7. your own image: a path of its own, no training; --quick:
        # the quick run's model
        return {"overlay": str(predict_image(args.predict, checkpoint_path, device))}

    start = time.perf_counter()
    seed_everything(SEED)
    OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
    print(
        f"device: {device} | images: {NUM_IMAGES} of {IMAGE_SIZE}x{IMAGE_SIZE} | outputs: "
        f"{OUTPUT_DIR}"
    )
    # 1. Data: synthetic shapes, and a figure of their paired augmentation
    loaders = build_loaders(SEED)
    print(", ".join(f"{split}: {len(loader.dataset)} images" for split, loader in loaders.items()))
    if AUGMENT:  # what training sees (AUGMENT = False: no figure, nothing is augmented)
        plot_augmentation(loaders["train"].dataset, OUTPUT_DIR / "augmentation.png")
    # 2. Model: a U-Net, built from the settings at the top
    model = UNet(**model_config()).to(device, memory_format=memory_format(device))
    print(
        f"U-Net with depth {DEPTH}, base width {BASE_CHANNELS}: "
        f"{count_parameters(model):,} parameters"
    )
    # 3. Loss: cross-entropy at every pixel (the metrics count a confusion matrix in 4 and 5)
    loss_fn = nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)  # takes logits, applies log-softmax
    # 4. Training: validation every epoch, the best weights saved to checkpoint_path
    history = fit(model, loaders, loss_fn, device, checkpoint_path)
    # 5. Evaluation: the best checkpoint, on the test split, once
    model, results = evaluate_best_checkpoint(checkpoint_path, loaders["test"], loss_fn, device)
    # 6. Visualization: training curves, and predictions with their errors
    plot_training_curves(history, OUTPUT_DIR / "training_curves.png")
    plot_predictions(model, loaders["test"].dataset, device, OUTPUT_DIR / "predictions.png")
    # 8. Putting it together: metrics.json and a one-line summary
    metrics = write_metrics(results, history, model, device, start)
    if args.quick:
        print("(--quick only checks the set-up: too short to learn; run without it for results)")
    return metrics


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
