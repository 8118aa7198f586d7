"""Example 2: transfer learning for segmentation with pretrained encoders, DeepLabV3 and FPN.

What you will learn
-------------------
- How an ImageNet classifier (ResNet-18/34/50, VGG-16-BN from torchvision) becomes the *encoder*
  of a segmentation network: features taken at strides 4, 8, 16 and 32 with torchvision's
  feature-extraction utilities, normalization constants read from the weights' own metadata.
- Two decoders written from scratch: DeepLabV3 (atrous convolutions, ASPP, output stride) and a
  Feature Pyramid Network with a simplified semantic head in the spirit of Panoptic FPN's;
  DeepLabV3+ too.
- Transfer learning made visible: a warm-up with a pretrained encoder frozen (BatchNorm in eval
  mode), then fine-tuning with a lower encoder learning rate, and poly learning-rate decay.
- Multi-scale + flip inference that averages softmax probabilities on the input's pixel grid.
- Your own data: any PASCAL-VOC-format folder, or a folder of images and masks, trained with the
  recipe of torchvision's segmentation reference (random resize 0.5-2.0, crop padded with the
  ignore label, flips) written with `torchvision.transforms.v2`; evaluated at full resolution.
- The metrics the field reports (per-class IoU, mIoU, pixel accuracy, mean class accuracy) from
  one confusion matrix; the model chosen on validation, the test split touched once.
- Scaling out with `torchrun`: DistributedDataParallel, all-reduced metrics (an appendix).

How to run (from this folder)
-----------------------------
    python pretrained_segmentation.py                     # DeepLabV3 vs FPN on the built-in set
    python pretrained_segmentation.py --quick             # tiny set-up check, into outputs/quick/
    python pretrained_segmentation.py --predict my.png    # segment your image with the best model
    torchrun --nproc_per_node=2 pretrained_segmentation.py  # 2 processes, half the steps each
Your own photos: set DATASET = "folder" and DATA_ROOT below (README: "Your own data").

What is read and downloaded: DATASET = "voc" (the default) reads a VOC-format folder under
DATA_ROOT (data/ beside this file); when there is none it downloads nothing (DOWNLOAD_VOC =
False), says so in one line and uses the built-in synthetic VOC-like set, which needs no files;
with DOWNLOAD_VOC = True it first downloads VOC 2012 trainval (2 GB) into DATA_ROOT/VOCdevkit.
DATASET = "folder" reads DATA_ROOT/images + DATA_ROOT/masks (or DATA_ROOT/train|val|test/...).
PRETRAINED = True tries to download torchvision's ImageNet weights for the encoder (about 45 MB
for ResNet-18, into torch's cache, ~/.cache/torch); offline a one-line note per model says so
and the encoder starts from random weights. PRETRAINED_WEIGHTS = a local file reads that file
instead.

What you should see
-------------------
The default run (`python pretrained_segmentation.py`; offline: no VOC in data/, so the synthetic
set, both encoders from random weights) on a 2-core CPU took 398 s in total and ended with
(the best model is chosen on validation; the test split only reports):

    model                         params  train s  val mIoU  test mIoU  MS+flip  pix acc   coarse
    deeplabv3_resnet18_scratch     13.3M      182     0.424      0.436    0.432    0.896    0.520
    fpn_resnet18_scratch           12.5M      186     0.872      0.894    0.901    0.985    0.995

"coarse" is the test mIoU of the true labels averaged over the cells of the model's prediction
grid and resized back: on 64-px images DeepLabV3's stride-16 grid is 4 x 4 (0.520), FPN's stride-4
grid 16 x 16 (0.995). It is a floor for the grid, not a ceiling: logits fitted to each test mask
on the 4 x 4 grid reach 0.79, so the stride alone does not explain DeepLabV3's 0.436.

Real photos, DATASET = "folder" on Stanford Background (715 outdoor photos of ~320 x 240, 8
classes, seeded 501/107/107 split), default settings, encoder from random weights:
val mIoU 0.487, test mIoU 0.487, pixel accuracy 0.719, in 753 s on a slow 2-core CPU (0.461 in
502 s on a faster one: the CPU changes the last digits of every sum, and the result moves by
points).

References
----------
- Chen et al., "Rethinking Atrous Convolution for Semantic Image Segmentation" (DeepLabV3), 2017.
  https://arxiv.org/abs/1706.05587
- Chen et al., "Encoder-Decoder with Atrous Separable Convolution" (DeepLabV3+), 2018.
  https://arxiv.org/abs/1802.02611
- Lin et al., "Feature Pyramid Networks for Object Detection", 2017.
  https://arxiv.org/abs/1612.03144
- Kirillov et al., "Panoptic Feature Pyramid Networks" (whose semantic branch our head
  simplifies), 2019. https://arxiv.org/abs/1901.02446
- Everingham et al., "The PASCAL Visual Object Classes Challenge", 2010.
  http://host.robots.ox.ac.uk/pascal/VOC/
- Gould et al., "Decomposing a Scene into Geometric and Semantically Consistent Regions" (the
  Stanford Background dataset), ICCV 2009.
- torchvision models and weights: https://pytorch.org/vision/stable/models.html
- torchvision feature extraction: https://pytorch.org/vision/stable/feature_extraction.html
- torchvision transforms v2: https://pytorch.org/vision/stable/transforms.html
- torchvision segmentation reference recipe:
  https://github.com/pytorch/vision/tree/main/references/segmentation
- PyTorch DDP tutorial: https://pytorch.org/tutorials/intermediate/ddp_tutorial.html
"""

import argparse
import colorsys
import contextlib
import json
import math
import os
import random
import time
import urllib.error
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless-safe: figures go to files, no window needed
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image, UnidentifiedImageError
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from torchvision import tv_tensors
from torchvision.models.feature_extraction import create_feature_extractor
from torchvision.transforms import v2
from tqdm import tqdm

# Files are read and written beside this script, whatever the working directory. A notebook
# (the script opened cell by cell with jupytext) has no __file__: there, the working directory.
HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()

# %% Settings
# ===============================================================================================
# Edit these: the knobs you will want to turn, then run again.
# data
DATASET = "voc"  # "voc": a VOC-format folder (else synthetic, with a note); "folder"; "synthetic"
DATA_ROOT = HERE / "data"  # where "voc" and "folder" look for data
DOWNLOAD_VOC = False  # True: fetch VOC 2012 trainval (2 GB) into DATA_ROOT when it is missing
IMAGE_SIZE = 64  # synthetic image and training crop size (px)

# model
RUNS = (("deeplabv3", "resnet18"), ("fpn", "resnet18"))  # (decoder, encoder) pairs to compare
PRETRAINED = True  # start the encoder from ImageNet weights (random init, with a note, if offline)
PRETRAINED_WEIGHTS = None  # or a path to a local state-dict file for the encoder (no download)
OUTPUT_STRIDE = 16  # DeepLab encoders: 16 or 8 (sharper, ~3x the compute of 16); FPN: always 32
DECODER_CHANNELS = 128  # width of ASPP / FPN; the papers use 256, 128 is kinder to a CPU

# training on the synthetic set (counted in passes over its 1,200 training images)
EPOCHS = 5  # passes over the training split, validation after each
BATCH_SIZE = 16  # images per step and per process
LR = 3e-3  # AdamW learning rate of the decoder (a few-minute run; SGD 0.01 is the long-run recipe)

# training on real photos (DATASET "voc" or "folder"): counted in optimizer steps, so a folder of
# 20 images trains as long as one of 2,000, and the time depends on these numbers, not the data
REAL_RUNS = (("fpn", "resnet18"),)  # one model: the architecture comparison is the synthetic one's
REAL_SHORT_SIDE = 180  # the network sees images with this shorter side (None: native size);
#                        predictions are resized back and scored against the full-size masks
CROP_SIZE = 176  # training crops (px), cut after the random resize, padded with 255 if needed
REAL_STEPS = 600  # optimizer steps in all (poly decay to zero at the last one)

# system
DEVICE = "auto"  # "auto" = CUDA, then Apple MPS, then CPU; or "cuda", "mps", "cpu"
SEED = 0  # same seed, same data, same initial weights, same numbers
# -----------------------------------------------------------------------------------------------
# Advanced settings: defaults that rarely need a change.
# data
VAL_FRACTION = 0.1  # share of a train split held out for validation (VOC: its val = our test)
SPLIT_FRACTIONS = (0.7, 0.15, 0.15)  # "folder" without official splits: seeded train/val/test
SYNTHETIC_SPLIT_SIZES = (1200, 100, 200)  # train, val, test images of the synthetic dataset
MAX_IMAGES_PER_SPLIT = None  # cap every split (--quick uses it); None = the whole split
SCALE_RANGE = (0.75, 1.25)  # synthetic: random rescale before the crop, objects at several sizes
JITTER = 0.1  # synthetic: photometric jitter (brightness, contrast, saturation); 0 turns it off
IGNORE_INDEX = 255  # VOC's label for object outlines and padding: no loss, no metric

# model
COMPARE_SCRATCH = True  # when ImageNet weights load, also train each run from scratch to compare
ASPP_RATES = "auto"  # "auto": fitted to the training crop's feature map; or e.g. (6, 12, 18)
DROPOUT = 0.1  # after the ASPP projection; torchvision uses 0.5 for long GPU runs

# training (both; on photos an "epoch" below means one REAL_VAL_EVERY stretch of steps)
WARMUP_EPOCHS = 1  # with pretrained weights only: decoder-only epochs, encoder frozen
ENCODER_LR_FACTOR = 0.1  # pretrained encoder learns 10x slower; from scratch it gets the full LR
WEIGHT_DECAY = 1e-4  # mild L2 regularization, as in the DeepLab recipes
POLY_POWER = 0.9  # poly decay: lr * (1 - step / total_steps) ** 0.9
PATIENCE = 3  # stop after this many validations without a better validation mIoU
EVAL_SCALES = (0.75, 1.0, 1.25)  # multi-scale test-time inference (1.0 alone = plain inference)
EVAL_FLIP = True  # also average over horizontal flips at test time
PREDICT_MAX_SIDE = 512  # --predict shrinks larger photos to this longer side (memory)

# training on real photos
REAL_SCALE_RANGE = (0.5, 2.0)  # random resize of the shorter side, x REAL_SHORT_SIDE (reference)
REAL_BATCH_SIZE = 8  # crops per step and per process (a 1-image folder gives 8 different crops)
REAL_VAL_EVERY = 150  # validate (and keep the best weights) every this many steps
REAL_LR = 3e-3  # AdamW, decoder (and a random encoder); a pretrained encoder x ENCODER_LR_FACTOR
REAL_EVAL_SCALES = (1.0,)  # test-time scales on photos (x REAL_SHORT_SIDE); flips: EVAL_FLIP
CLASS_WEIGHTING = "sqrt"  # photos: loss weight ~ 1/sqrt(class pixel share) of the train masks; None

# system
NUM_WORKERS = "auto"  # "auto": 0 on a CPU-only machine, min(8, cores - 1) with CUDA (JPEG decoding)
OUTPUT_DIR = HERE / "outputs"  # checkpoints, metrics.json, figures

# --quick: a tiny configuration that checks the set-up in seconds
QUICK = dict(
    SYNTHETIC_SPLIT_SIZES=(16, 4, 4),
    MAX_IMAGES_PER_SPLIT=16,
    IMAGE_SIZE=48,
    EPOCHS=2,
    BATCH_SIZE=8,
    DECODER_CHANNELS=32,
    PATIENCE=2,
    EVAL_SCALES=(0.75, 1.0),
    REAL_STEPS=4,
    REAL_VAL_EVERY=2,
    REAL_SHORT_SIDE=64,
    CROP_SIZE=48,
)
# -----------------------------------------------------------------------------------------------


# %% 1. Data: VOC, your own folders, and a synthetic stand-in
# ===============================================================================================
# Label maps are stored as PNGs whose pixel values are class indices (0, 1, 2, ...). PASCAL VOC
# uses *palette* PNGs: the values are the indices and a colour table (the official palette) only
# decides how they look. Reading such a PNG with PIL and np.array gives the indices directly -
# never convert it to RGB (only an export's colour masks are decoded, through its labelmap.txt,
# see below). Value 255 marks pixels nobody labelled (VOC: the thin outline around
# every object; after our padding: pixels outside the image): the loss and the metrics skip them.
#
# Three sources, chosen by DATASET:
#   "voc"       a VOC-format folder (JPEGImages/, SegmentationClass/; the ImageSets/Segmentation/
#               lists and an export's labelmap.txt if there, see below) in DATA_ROOT, from one
#               image to the full 2012 set
#   "folder"    DATA_ROOT/images/<name>.jpg + DATA_ROOT/masks/<name>.png (a seeded split), or
#               DATA_ROOT/train|val|test/images|masks when the dataset has official splits;
#               DATA_ROOT/classes.txt (optional) names the classes, one per line
#   "synthetic" a built-in VOC-like set (below), generated on the fly: no files at all
#
# Augmentation with torchvision.transforms.v2: wrap the image as tv_tensors.Image and the mask as
# tv_tensors.Mask, and ONE transform call moves both together (same resize, same crop, same flip).
# v2 knows what each one is: it resizes masks with NEAREST (a blend of label 3 and label 15 is not
# label 9), pads them with the value we give for Mask (255: padding is not "background"), and
# applies colour changes to the Image only. This is how torchvision's segmentation reference
# trains, and what we use for real photos: random resize of the shorter side (0.5-2.0 x a base),
# a crop padded with 255, a horizontal flip. Evaluation sees the whole image, unaugmented.
#
# prepare_data at the end of this section ties it together: the datasets, the training plan that
# fits them (training_plan: how long and on what crops, explained in section 4) and the loaders.


VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip
NUM_CLASSES = len(VOC_CLASSES)  # not a setting: the synthetic set draws VOC's 20 object classes
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def voc_palette() -> np.ndarray:
    """The official VOC colour table (256 x 3 uint8): bits of the index spread over R, G, B."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    for index in range(256):
        value, red, green, blue = index, 0, 0, 0
        for bit in range(8):  # the lowest 3 bits become the highest bits of R, G, B, and so on
            red |= ((value >> 0) & 1) << (7 - bit)
            green |= ((value >> 1) & 1) << (7 - bit)
            blue |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        palette[index] = (red, green, blue)
    return palette


def class_palette(class_colours: list | None = None) -> np.ndarray:
    """256 x 3 colour table: VOC's palette, the first classes recoloured by `class_colours`.

    class_colours: one [r, g, b] per class id (a VOC export's labelmap.txt colours), or None.
    """
    palette = voc_palette()
    if class_colours:
        palette[: len(class_colours)] = class_colours
    return palette


def colorize(mask: np.ndarray, class_colours: list | None = None) -> np.ndarray:
    """Class-index mask H x W -> RGB image H x W x 3 (class_palette's colours; 255 = cream)."""
    return class_palette(class_colours)[mask]


def pad_to(
    image: torch.Tensor, mask: torch.Tensor, height: int, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad right/bottom up to height x width: image (3 x h x w) with 0, mask (h x w) with 255."""
    pad = (0, width - image.shape[2], 0, height - image.shape[1])  # (left, right, top, bottom)
    return F.pad(image, pad, value=0.0), F.pad(mask, pad, value=IGNORE_INDEX)  # not background


PAD_FILL = {tv_tensors.Image: 0.0, tv_tensors.Mask: IGNORE_INDEX}  # what padding means, per type


def apply_paired(transform, image: torch.Tensor, mask: torch.Tensor):
    """Run a v2 transform on (3 x H x W image, H x W int64 mask) as one pair -> plain tensors."""
    image, mask = transform(tv_tensors.Image(image), tv_tensors.Mask(mask))  # one random draw
    return image.as_subclass(torch.Tensor).contiguous(), mask.as_subclass(torch.Tensor).contiguous()


def train_transform(image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic set: resize (SCALE_RANGE) -> crop IMAGE_SIZE (pad 255) -> flip -> colour jitter."""
    low, high = (round(IMAGE_SIZE * s) for s in SCALE_RANGE)
    steps = [
        v2.RandomResize(low, high + 1),  # shorter side -> a random size in [low, high]
        v2.RandomCrop(IMAGE_SIZE, pad_if_needed=True, fill=PAD_FILL),
        v2.RandomHorizontalFlip(),  # both flipped, or the labels walk off the objects
    ]
    if JITTER > 0:
        steps.append(v2.ColorJitter(brightness=JITTER, contrast=JITTER, saturation=JITTER))
    return apply_paired(v2.Compose(steps), image, mask)


def real_train_transform(image: torch.Tensor, mask: torch.Tensor):
    """Photos, torchvision's reference recipe: resize 0.5-2.0 x base -> crop (pad 255) -> flip.

    The image may come as uint8 (resized as bytes, which is cheaper) or float in [0, 1]; it
    leaves as float32 in [0, 1]. ImageNet normalization happens inside the model.
    """
    base = REAL_SHORT_SIDE or min(image.shape[-2:])  # None: the image's own shorter side
    low, high = (max(1, round(base * s)) for s in REAL_SCALE_RANGE)
    transform = v2.Compose(
        [
            v2.RandomResize(low, high + 1),  # the whole photo, shorter side in [low, high]
            v2.RandomCrop(CROP_SIZE, pad_if_needed=True, fill=PAD_FILL),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),  # images only: uint8 0..255 -> float 0..1
        ]
    )
    return apply_paired(transform, image, mask)


def read_mask(path: Path, colours: dict | None = None) -> np.ndarray:
    """A label PNG -> int64 H x W class ids.

    Index masks ("L"/"P"/"I" mode) hold the ids themselves. Colour masks (RGB), as annotation
    tools export VOC-format folders, need `colours`, {(r, g, b): class id}; without it they are
    an error that says how to convert them, unless all three channels are equal (ids saved as
    an RGB image, as OpenCV's imwrite of a 3-channel array does).
    """
    try:
        mask = Image.open(path)
        if mask.mode == "LA":  # grey + alpha: the grey values are the labels
            mask = mask.convert("L")
        if mask.mode in ("RGB", "RGBA"):
            rgb = np.array(mask.convert("RGB"))
            if colours is None and (rgb == rgb[..., :1]).all():  # r = g = b: the grey ids
                return rgb[..., 0].astype(np.int64)
            if colours is None:
                raise SystemExit(
                    f"error: {path} is a colour image; masks must store class indices (a mode L "
                    "or a palette P PNG, 255 = ignore), e.g. Image.fromarray(labels.astype("
                    "np.uint8)); colour masks are read only in a VOC-format folder (see README)"
                )
            return colours_to_labels(rgb, colours, path)
        # Gotcha: np.array of a palette ("P") PNG gives the class ids; .convert("RGB") gives colours
        return np.array(mask, dtype=np.int64)
    except (UnidentifiedImageError, OSError) as error:
        raise SystemExit(f"error: cannot read mask {path} ({type(error).__name__})") from None


def colours_to_labels(rgb: np.ndarray, colours: dict, path: Path) -> np.ndarray:
    """Colour mask H x W x 3 (uint8) -> class ids H x W (int64); an unknown colour is an error.

    Gotcha: a colour mask must be saved without smoothing (PNG, no anti-aliasing, no JPEG): a
    blended edge colour belongs to no class.
    """
    codes = rgb.reshape(-1, 3).astype(np.int64) @ np.array([65536, 256, 1])  # one int per pixel
    table = {r * 65536 + g * 256 + b: label for (r, g, b), label in colours.items()}
    unique, inverse = np.unique(codes, return_inverse=True)  # the few colours, and where they are
    unknown = [int(code) for code in unique if int(code) not in table]
    if unknown:
        code = unknown[0]
        raise SystemExit(
            f"error: mask {path} has the colour {(code >> 16, (code >> 8) & 255, code & 255)}, "
            f"which no class has ({len(unknown)} unknown colour(s)); labelmap.txt must give every "
            "class its colour (name:r,g,b::), or save masks without smoothing"
        )
    labels = np.array([table[int(code)] for code in unique], dtype=np.int64)
    return labels[inverse.ravel()].reshape(rgb.shape[:2])  # H x W class ids


def read_image(path: Path) -> torch.Tensor:
    """An image file -> uint8 3 x H x W (0..255)."""
    try:
        array = np.array(Image.open(path).convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as error:
        raise SystemExit(f"error: cannot read image {path} ({type(error).__name__})") from None
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()  # H x W x 3 -> 3 x H x W


def check_pairs(pairs: list[tuple[Path, Path]], num_classes: int | None, colours=None) -> int:
    """Read every mask once: same size as its image, values < num_classes or 255. Returns max label.

    A bad file stops the run here, with its name, instead of crashing mid-training (on a GPU an
    out-of-range class is a "device-side assert" that names nothing).
    """
    largest = -1
    for image_path, mask_path in pairs:
        mask = read_mask(mask_path, colours)
        with Image.open(image_path) as image:  # reads the header only: cheap
            width, height = image.size
        if mask.shape != (height, width):
            raise SystemExit(
                f"error: mask {mask_path} is {mask.shape[1]} x {mask.shape[0]} but its image "
                f"{image_path.name} is {width} x {height} (width x height); they must match"
            )
        labels = np.unique(mask)
        labels = labels[labels != IGNORE_INDEX]
        if labels.size and (labels.min() < 0 or (num_classes and labels.max() >= num_classes)):
            bad = labels[(labels < 0) | (labels >= (num_classes or 256))].tolist()
            allowed = f"0..{num_classes - 1}" if num_classes else "0, 1, 2, ..."
            raise SystemExit(
                f"error: mask {mask_path} has class values {bad[:5]} outside {allowed} "
                f"(and {IGNORE_INDEX} = ignore); masks stored as 0/255 must be mapped to 0/1, "
                "and classes.txt must list every class"
            )
        largest = max(largest, int(labels.max()) if labels.size else -1)
    return largest


def paired_files(dataset: Dataset) -> tuple[list[tuple[Path, Path]], dict | None]:
    """The (image, mask) files behind a (possibly capped) PairedFiles dataset, and its colours."""
    if isinstance(dataset, Subset):
        return [dataset.dataset.pairs[i] for i in dataset.indices], dataset.dataset.colours
    return dataset.pairs, dataset.colours


def class_colours(dataset: Dataset, num_classes: int) -> list[list[int]]:
    """One [r, g, b] per class: the colours of the dataset's colour masks (labelmap.txt), else
    VOC's palette. Figures and --predict's masks use them, so an export's classes keep its colours.
    """
    base = dataset.dataset if isinstance(dataset, Subset) else dataset
    palette = voc_palette()
    for rgb, label in (getattr(base, "colours", None) or {}).items():  # synthetic: no colours
        palette[label] = rgb
    return palette[:num_classes].tolist()


def class_weights(dataset: Dataset, num_classes: int) -> torch.Tensor:
    """Loss weight per class, 1/sqrt(its share of the labelled training pixels), mean 1.

    Rare classes (a pole, a sign) weigh more, so that the loss does not let the model ignore them;
    the square root keeps the weights moderate (plain 1/share would make a rare class 100x louder).
    """
    pairs, colours = paired_files(dataset)
    counts = torch.zeros(num_classes, dtype=torch.float64)
    for _, mask_path in pairs:
        mask = torch.from_numpy(read_mask(mask_path, colours)).flatten()
        counts += torch.bincount(mask[mask < num_classes], minlength=num_classes).double()
    share = counts / counts.sum().clamp(min=1)
    weights = torch.where(share > 0, share.clamp(min=1e-12).rsqrt(), torch.zeros_like(share))
    return (weights / weights[share > 0].mean()).float()  # absent classes: weight 0 (never seen)


class PairedFiles(Dataset):
    """(image file, mask file) pairs -> (3 x H x W float32 in [0, 1], H x W int64), transformed.

    colours: {(r, g, b): class id} for colour masks (VOC-format exports), else None.
    """

    def __init__(self, pairs: list[tuple[Path, Path]], transform=None, colours=None):
        self.pairs, self.transform, self.colours = pairs, transform, colours

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_path, mask_path = self.pairs[index]
        image, mask = read_image(image_path), torch.from_numpy(read_mask(mask_path, self.colours))
        if self.transform:  # augmented crop, float32 in [0, 1]
            return self.transform(image, mask)
        return image.float() / 255.0, mask  # the whole image, float32 in [0, 1]


# Synthetic stand-in. Every object class c = 1..20 gets a unique combination of shape (7 kinds),
# hue (10 steps around the colour wheel), brightness tier (light/dark) and texture (4 kinds), so a
# network must combine colour, texture and shape cues - like telling a cow from a horse.
SHAPES = ("disk", "square", "triangle", "diamond", "ring", "cross", "ellipse")
TEXTURES = ("solid", "stripes", "checker", "dots")


def shape_mask(kind: str, u: np.ndarray, v: np.ndarray, radius: float) -> np.ndarray:
    """Boolean H x W mask of one shape, given pixel coordinates (u, v) in the object's frame."""
    if kind == "disk":
        return u**2 + v**2 <= radius**2
    if kind == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8 * radius
    if kind == "triangle":
        return (v <= 0.7 * radius) & (v >= -radius + 1.7 * np.abs(u))
    if kind == "diamond":
        return np.abs(u) + np.abs(v) <= radius
    if kind == "ring":
        return (u**2 + v**2 <= radius**2) & (u**2 + v**2 >= (0.55 * radius) ** 2)
    if kind == "cross":
        bar = 0.35 * radius
        along, across = np.abs(u), np.abs(v)
        return ((along <= bar) & (across <= radius)) | ((across <= bar) & (along <= radius))
    return (u / radius) ** 2 + (v / (0.55 * radius)) ** 2 <= 1.0  # ellipse


def texture(kind: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Brightness pattern H x W (around 1) in the object's frame: how its surface looks."""
    if kind == "stripes":
        return np.where(np.sin(u * 2 * np.pi / 6) > 0, 1.0, 0.8)
    if kind == "checker":
        return np.where((np.floor(u / 4) + np.floor(v / 4)) % 2 == 0, 1.0, 0.8)
    if kind == "dots":
        return np.where(((u % 6) - 3) ** 2 + ((v % 6) - 3) ** 2 < 3, 0.75, 1.0)
    return np.ones_like(u)  # solid


def class_colour(label: int) -> np.ndarray:
    """RGB colour (3,) of object class 1..20: 10 hues x 2 brightness tiers, strongly saturated."""
    hue = ((label - 1) % 10) / 10
    value = 0.95 if label <= 10 else 0.45
    return np.array(colorsys.hsv_to_rgb(hue, 0.85, value))


def outline(labels: np.ndarray) -> np.ndarray:
    """Boolean H x W: pixels whose label differs from a 4-neighbour's (a 2-pixel band per edge)."""
    edge = np.zeros(labels.shape, dtype=bool)
    vertical = labels[1:, :] != labels[:-1, :]
    horizontal = labels[:, 1:] != labels[:, :-1]
    edge[1:, :] |= vertical
    edge[:-1, :] |= vertical
    edge[:, 1:] |= horizontal
    edge[:, :-1] |= horizontal
    return edge


def synthetic_sample(seed: int, split: int, index: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One VOC-like scene: float32 H x W x 3 image in [0, 1] and int64 H x W labels (0..20, 255)."""
    rng = np.random.default_rng([seed, split, index])  # same (seed, split, index) -> same scene
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)

    def frame(cy: float, cx: float, angle: float) -> tuple[np.ndarray, np.ndarray]:
        # pixel coordinates rotated into an object's own frame (u along, v across)
        dy, dx = ys - cy, xs - cx
        return dx * np.cos(angle) + dy * np.sin(angle), -dx * np.sin(angle) + dy * np.cos(angle)

    # 1) background: a greyish gradient plus clutter (desaturated shapes that are NOT objects)
    base = rng.uniform(0.25, 0.75, 3) * 0.3 + rng.uniform(0.25, 0.75) * 0.7
    ramp = rng.uniform(-0.2, 0.2) * (xs / size - 0.5) + rng.uniform(-0.2, 0.2) * (ys / size - 0.5)
    image = base[None, None, :] + ramp[..., None]
    for _ in range(rng.integers(3, 8)):
        u, v = frame(*rng.uniform(0, size, 2), rng.uniform(0, np.pi))
        region = shape_mask(SHAPES[rng.integers(len(SHAPES))], u, v, rng.uniform(0.04, 0.15) * size)
        grey = rng.uniform(0.15, 0.85)
        image[region] = grey + rng.uniform(-0.06, 0.06, 3)  # at most a faint tint
    labels = np.zeros((size, size), dtype=np.int64)

    # 2) objects: later ones occlude earlier ones, like people in front of a sofa
    for _ in range(rng.integers(1, 4)):
        label = int(rng.integers(1, NUM_CLASSES))
        u, v = frame(*rng.uniform(0.2, 0.8, 2) * size, rng.uniform(0, np.pi))
        region = shape_mask(SHAPES[(label - 1) % len(SHAPES)], u, v, rng.uniform(0.16, 0.3) * size)
        shade = texture(TEXTURES[(label - 1) % len(TEXTURES)], u, v)[..., None]
        colour = class_colour(label) * rng.uniform(0.9, 1.1, 3)  # small per-object variation
        image = np.where(region[..., None], colour[None, None, :] * shade, image)
        labels[region] = label

    # 3) sensor noise, then VOC-style 255 outlines around every object
    image = np.clip(image + rng.normal(0, 0.03, image.shape), 0, 1).astype(np.float32)
    labels[outline(labels)] = IGNORE_INDEX
    return image, labels


class SyntheticVOC(Dataset):
    """Built-in VOC-like scenes (split 0/1/2 = train/val/test): (3 x S x S float32, S x S int64)."""

    def __init__(self, split: int, length: int, transform=None):
        self.split, self.length, self.transform = split, length, transform
        self.size = IMAGE_SIZE  # read once, so a dataset never changes size mid-run

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, labels = synthetic_sample(SEED, self.split, index, self.size)
        image_t = torch.from_numpy(image).permute(2, 0, 1).contiguous()  # H x W x 3 -> 3 x H x W
        mask_t = torch.from_numpy(labels)
        return self.transform(image_t, mask_t) if self.transform else (image_t, mask_t)


def cap(dataset: Dataset) -> Dataset:
    """The first MAX_IMAGES_PER_SPLIT items of a dataset (all when it is None)."""
    if MAX_IMAGES_PER_SPLIT is None or len(dataset) <= MAX_IMAGES_PER_SPLIT:
        return dataset
    return Subset(dataset, range(MAX_IMAGES_PER_SPLIT))


def seeded_shuffle(items: list) -> list:
    """The same permutation of `items` on every machine and in every process (seeded by SEED)."""
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(SEED)).tolist()
    return [items[i] for i in order]


def hold_out(items: list, fraction: float, what: str, where) -> tuple[list, list]:
    """Split `items` into (kept, held out) with a seeded shuffle; both non-empty whenever possible.

    A single item cannot be split: it is used for both, with a one-line note.
    """
    if len(items) < 2:
        log(f"note: {where} has 1 image: it is used for training and as {what} too "
            f"(the {what} scores then say nothing about new images)")
        return items, items
    items = seeded_shuffle(items)
    held = min(len(items) - 1, max(1, round(fraction * len(items))))
    return items[held:], items[:held]


def split_three_ways(items: list, where) -> tuple[list, list, list]:
    """Seeded train/val/test split by SPLIT_FRACTIONS; fewer than 3 images: reused, with a note."""
    if len(items) < 3:
        log(f"note: {where} has {len(items)} image(s), too few to hold any out: validation and "
            "test reuse the training images (their scores say nothing about new images)")
        return items, items, items
    items = seeded_shuffle(items)
    n_val = max(1, round(SPLIT_FRACTIONS[1] * len(items)))
    n_test = max(1, min(len(items) - n_val - 1, round(SPLIT_FRACTIONS[2] * len(items))))
    return items[n_val + n_test :], items[:n_val], items[n_val : n_val + n_test]


def real_datasets(splits: dict[str, list], num_classes: int, colours=None) -> dict[str, Dataset]:
    """File pairs per split -> datasets: augmented crops for training, whole images otherwise."""
    for pairs in splits.values():
        check_pairs(pairs, num_classes, colours)
    return {
        "train": cap(PairedFiles(splits["train"], real_train_transform, colours)),
        "val": cap(PairedFiles(splits["val"], None, colours)),
        "test": cap(PairedFiles(splits["test"], None, colours)),
    }


# A VOC-format folder holds JPEGImages/<id>.jpg, SegmentationClass/<id>.png and the lists of ids in
# ImageSets/Segmentation/ (train.txt, val.txt). Annotation tools (CVAT, Datumaro) export the same
# layout with their own classes: a labelmap.txt with one "name:r,g,b:parts:actions" line per class
# (background first), colour masks drawn in those colours, and one list per subset (default.txt).


def find_voc_root() -> Path | None:
    """The VOC-format folder in DATA_ROOT (itself, or up to two levels down), or None."""
    root = Path(DATA_ROOT)
    candidates = [root, *sorted(root.glob("*")), *sorted(root.glob("*/*"))] if root.is_dir() else []
    for folder in candidates:
        lists = (folder / "ImageSets" / "Segmentation").is_dir()
        masks = (folder / "SegmentationClass").is_dir() and (folder / "JPEGImages").is_dir()
        if lists or masks:
            return folder
    for folder in candidates:  # VOC's folders are there, but incomplete: say so, do not guess
        if folder.name.startswith("VOC20") or (folder / "SegmentationClass").is_dir():
            raise SystemExit(
                f"error: {folder} is not a complete VOC 2012 folder; it needs JPEGImages/ and "
                "SegmentationClass/ (and the lists of ImageSets/Segmentation/, e.g. train.txt)"
            )
    return None


def read_label_map(voc_root: Path) -> tuple[tuple[str, ...], dict]:
    """Class names and mask colours {(r, g, b): id}: the folder's labelmap.txt, else VOC's 21.

    VOC's cream outline colour (224, 224, 192) means ignore (255) unless a class claims it.
    """
    path, palette = voc_root / "labelmap.txt", voc_palette()
    if path.is_file():
        names, colours = [], {}
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            name, _, rest = line.partition(":")
            try:
                rgb = tuple(int(value) for value in rest.split(":")[0].split(","))
            except ValueError:
                rgb = ()
            if not name.strip() or len(rgb) != 3:
                raise SystemExit(f"error: {path} line {number} is not name:r,g,b:parts:actions")
            colours[rgb] = len(names)  # class id = line order, background first
            names.append(name.strip())
        if len(names) < 2:
            raise SystemExit(f"error: {path} must name at least 2 classes (background first)")
        names = tuple(names)
    else:
        names = VOC_CLASSES
        colours = {tuple(int(v) for v in palette[k]): k for k in range(len(names))}
    colours.setdefault(tuple(int(v) for v in palette[IGNORE_INDEX]), IGNORE_INDEX)
    return names, colours


def voc_pairs(voc_root: Path, ids: list[str], where: Path) -> list[tuple[Path, Path]]:
    """The (JPEGImages/<id>.jpg (or .png, ...), SegmentationClass/<id>.png) pairs of `ids`."""
    if not ids:
        raise SystemExit(f"error: {where} lists no images")
    pairs = []
    for name in ids:
        mask = voc_root / "SegmentationClass" / f"{name}.png"
        images = [voc_root / "JPEGImages" / f"{name}{ext}" for ext in IMAGE_EXTENSIONS]
        image = next((path for path in images if path.is_file()), images[0])
        for path in (image, mask):
            if not path.is_file():
                raise SystemExit(f"error: {path} is missing (named in {where})")
        pairs.append((image, mask))
    return pairs


def read_ids(list_file: Path) -> list[str]:
    """The image ids of an ImageSets list, one per line (VOC's main lists add a flag: dropped)."""
    return [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()]


def voc_splits(voc_root: Path) -> dict[str, list]:
    """train / val / test pairs: VOC's train.txt and val.txt, else one seeded split of all ids.

    With train.txt, VOC's val.txt is the test split (as in the papers) and validation is held
    out of train. Without it (an export's default.txt, a trainval.txt, or no lists at all) every
    listed image (or every mask) is split SPLIT_FRACTIONS ways.
    """
    lists = voc_root / "ImageSets" / "Segmentation"
    if (lists / "train.txt").is_file():
        train = voc_pairs(voc_root, read_ids(lists / "train.txt"), lists / "train.txt")
        if (lists / "val.txt").is_file():
            test = voc_pairs(voc_root, read_ids(lists / "val.txt"), lists / "val.txt")
        else:
            train, test = hold_out(train, VAL_FRACTION, "test", lists / "train.txt")
        train, val = hold_out(train, VAL_FRACTION, "validation", lists / "train.txt")
        return {"train": train, "val": val, "test": test}
    list_files = sorted(lists.glob("*.txt")) if lists.is_dir() else []
    if list_files:  # every list's ids, each once, in a fixed order
        ids = sorted({name for path in list_files for name in read_ids(path)})
        where = list_files[0] if len(list_files) == 1 else lists
    else:
        ids = sorted(path.stem for path in (voc_root / "SegmentationClass").glob("*.png"))
        where = voc_root / "SegmentationClass"
    pairs = voc_pairs(voc_root, ids, where)
    log(
        f"note: no ImageSets/Segmentation/train.txt in {voc_root}: the {len(pairs)} images of "
        f"{where.name} get a seeded train/val/test split"
    )
    train, val, test = split_three_ways(pairs, voc_root)
    return {"train": train, "val": val, "test": test}


def load_voc() -> tuple[dict[str, Dataset], tuple[str, ...]] | None:
    """A VOC-format folder as ({train, val, test}, class names), or None."""
    voc_root = find_voc_root()
    if voc_root is None:
        expected = Path(DATA_ROOT) / "VOCdevkit" / "VOC2012"
        reason = "DOWNLOAD_VOC is False"
        if DOWNLOAD_VOC:
            if is_main_process():  # one process downloads, the others wait at the barrier
                try:
                    torchvision.datasets.VOCSegmentation(DATA_ROOT, year="2012", download=True)
                    reason = ""
                except (urllib.error.URLError, OSError, RuntimeError) as error:
                    reason = f"download failed: {type(error).__name__}: {error}"
            if dist.is_initialized():
                dist.barrier()
            voc_root = find_voc_root()  # the downloaded folder, checked as any other
        if voc_root is None:
            log(
                f"note: no VOC-format folder in {DATA_ROOT} ({reason or 'download incomplete'}); "
                f"put VOCdevkit/VOC2012 at {expected} or set DOWNLOAD_VOC = True (2 GB), or "
                'DATASET = "synthetic" to skip this check - continuing with the built-in '
                "synthetic VOC-like dataset"
            )
            return None
    names, colours = read_label_map(voc_root)
    splits = voc_splits(voc_root)
    log(f"reading VOC-format data from {voc_root} ({len(names)} classes)")
    return real_datasets(splits, len(names), colours), names


def folder_pairs(split_root: Path) -> list[tuple[Path, Path]]:
    """(image, mask) pairs from split_root/images/<name>.* and split_root/masks/<name>.png."""
    images_dir, masks_dir = split_root / "images", split_root / "masks"
    for folder in (images_dir, masks_dir):
        if not folder.is_dir():
            raise SystemExit(
                f"error: no folder {folder}; DATASET = \"folder\" expects images/ and masks/ in "
                f"{DATA_ROOT} (or in its train/, val/, test/)"
            )
    images = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise SystemExit(f"error: {images_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    masks = {p.stem: p for p in masks_dir.iterdir() if p.suffix.lower() in (".png", ".bmp", ".tif")}
    pairs = []
    for image in images:
        if image.stem not in masks:
            raise SystemExit(
                f"error: no mask for {image} in {masks_dir} (expected {image.stem}.png)"
            )
        pairs.append((image, masks[image.stem]))
    return pairs


def load_folder() -> tuple[dict[str, Dataset], tuple[str, ...]]:
    """DATA_ROOT/images + masks (seeded split) or DATA_ROOT/{train,val,test}/... -> data, names."""
    root = Path(DATA_ROOT)
    if (root / "train").is_dir():  # official splits: test untouched, a missing val from train
        splits = {"train": folder_pairs(root / "train")}
        for name in ("val", "test"):
            if (root / name).is_dir():
                splits[name] = folder_pairs(root / name)
            else:
                what = "validation" if name == "val" else "test"
                splits["train"], splits[name] = hold_out(
                    splits["train"], VAL_FRACTION, what, root / "train"
                )
    else:
        train, val, test = split_three_ways(folder_pairs(root), root)
        splits = {"train": train, "val": val, "test": test}
    classes_file = root / "classes.txt"
    if classes_file.is_file():  # fixes the number of classes, even if some never appear
        lines = classes_file.read_text().splitlines()
        names = tuple(line.strip() for line in lines if line.strip())
        if not names:
            raise SystemExit(f"error: {classes_file} is empty; write one class name per line")
    else:
        largest = max(check_pairs(pairs, None) for pairs in splits.values())
        if largest < 1:
            raise SystemExit(
                f"error: the masks in {root} hold only class 0 (and {IGNORE_INDEX} = ignore); "
                "masks stored as 0/255 must be mapped to 0/1, or add a classes.txt"
            )
        names = tuple(f"class {index}" for index in range(largest + 1))
    log(f"reading images and masks from {root} ({len(names)} classes)")
    return real_datasets(splits, len(names)), names


def load_datasets() -> tuple[dict[str, Dataset], dict]:
    """({train, val, test} datasets, {"dataset": "voc"/"folder"/"synthetic", "classes", "real"}).

    """
    if DATASET == "folder":
        datasets, names = load_folder()
        return datasets, {"dataset": "folder", "classes": names, "real": True}
    if DATASET == "voc":
        voc = load_voc()
        if voc is not None:
            datasets, names = voc
            return datasets, {"dataset": "voc", "classes": names, "real": True}
    elif DATASET != "synthetic":
        raise SystemExit(f'error: DATASET must be "voc", "folder" or "synthetic", not {DATASET!r}')
    n_train, n_val, n_test = SYNTHETIC_SPLIT_SIZES
    datasets = {
        "train": SyntheticVOC(0, n_train, train_transform),
        "val": SyntheticVOC(1, n_val),
        "test": SyntheticVOC(2, n_test),
    }
    info = {"dataset": "synthetic", "classes": VOC_CLASSES, "real": False}
    return {name: cap(data) for name, data in datasets.items()}, info


def pad_collate(batch: list[tuple[torch.Tensor, torch.Tensor]]):
    """Stack images of different sizes by padding to the largest: image 0, mask 255."""
    height = max(image.shape[1] for image, _ in batch)
    width = max(image.shape[2] for image, _ in batch)
    images, masks = zip(*[pad_to(image, mask, height, width) for image, mask in batch])
    return torch.stack(images), torch.stack(masks)  # N x 3 x H x W, N x H x W


def eval_collate(batch: list[tuple[torch.Tensor, torch.Tensor]]):
    """Evaluation batches: stacked when all images share one size, else a list of single images.

    Never padded: a padded image's prediction near the padding would depend on which images
    happen to share its batch (torchvision's reference evaluates one image at a time).
    """
    if len({image.shape for image, _ in batch}) == 1:
        images, masks = zip(*batch)
        return torch.stack(images), torch.stack(masks)  # N x 3 x H x W, N x H x W
    return [(image[None], mask[None]) for image, mask in batch]


def batches_of(loader):
    """(images N x 3 x H x W, masks N x H x W) from a loader, unpacking eval_collate lists."""
    for batch in loader:
        yield from batch if isinstance(batch, list) else [batch]


class EndlessSampler(Sampler):
    """Training sampler: an endless stream of indices, freshly shuffled (seeded) on every pass.

    Process `rank` of `world` takes every world-th index of the one shared stream, so the
    processes never see the same item at the same time. Endless means batches are always full:
    a 3-image folder still gives batches of 8 (different random crops of its 3 images), and the
    schedule is counted in optimizer steps, not passes.
    """

    def __init__(self, length: int, rank: int = 0, world: int = 1, seed: int = 0):
        self.length, self.rank, self.world, self.seed = length, rank, world, seed

    def __iter__(self):
        position, epoch = 0, 0
        while True:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            for index in torch.randperm(self.length, generator=generator).tolist():
                if position % self.world == self.rank:
                    yield index
                position += 1
            epoch += 1


def make_loader(
    dataset: Dataset, train: bool, rank: int = 0, world: int = 1, batch_size: int | None = None
) -> DataLoader:
    """Training loader (endless, full batches) or evaluation loader (the split once, in order).

    Evaluation batches are never padded (see eval_collate); photos are evaluated one at a time.
    """
    if len(dataset) == 0:
        raise SystemExit("error: a split is empty; nothing to train or evaluate on")
    batch_size, workers = batch_size or BATCH_SIZE, pick_num_workers(NUM_WORKERS)
    if train:
        sampler = EndlessSampler(len(dataset), rank, world, SEED)
        return DataLoader(
            dataset, batch_size, sampler=sampler, num_workers=workers, collate_fn=pad_collate
        )
    sampler = ShardSampler(len(dataset), rank, world)
    return DataLoader(
        dataset, batch_size, sampler=sampler, num_workers=workers, collate_fn=eval_collate
    )


def training_plan(real: bool, train_size: int, world: int = 1) -> dict:
    """How one run trains: runs, batch, steps, validation interval, LR, test-time inference."""
    if real:
        return {
            "real": True, "runs": REAL_RUNS, "batch_size": REAL_BATCH_SIZE, "steps": REAL_STEPS,
            "val_every": REAL_VAL_EVERY, "lr": REAL_LR, "crop": CROP_SIZE,
            "short_side": REAL_SHORT_SIDE, "eval_scales": REAL_EVAL_SCALES,
        }  # fmt: skip
    per_epoch = max(1, train_size // (BATCH_SIZE * world))  # full batches per pass
    return {
        "real": False, "runs": RUNS, "batch_size": BATCH_SIZE, "steps": EPOCHS * per_epoch,
        "val_every": per_epoch, "lr": LR, "crop": IMAGE_SIZE, "short_side": None,
        "eval_scales": EVAL_SCALES,
    }  # fmt: skip


def prepare_data(rank: int, world: int) -> tuple[dict, dict, dict]:
    """The data's description (source, classes), the training plan that fits it, three loaders."""
    if CLASS_WEIGHTING not in ("sqrt", None):  # before the data is read: fail fast
        raise SystemExit(f'error: CLASS_WEIGHTING must be "sqrt" or None, not {CLASS_WEIGHTING!r}')
    datasets, source = load_datasets()
    classes, real = source["classes"], source["real"]
    plan = training_plan(real, len(datasets["train"]), world)
    # each class's colour in figures and --predict's masks: the data's own (an export's labelmap)
    plan["class_colours"] = class_colours(datasets["train"], len(classes))
    if real and CLASS_WEIGHTING == "sqrt":
        plan["class_weights"] = class_weights(datasets["train"], len(classes))
        weights = ", ".join(f"{name} {w:.2f}" for name, w in zip(classes, plan["class_weights"]))
        log(f"class weights of the loss (1/sqrt of the pixel share): {weights}")
    eval_batch = 1 if real else BATCH_SIZE  # photos one at a time: no padding, no batch mates
    loaders = {
        "train": make_loader(datasets["train"], True, rank, world, plan["batch_size"]),
        "val": make_loader(datasets["val"], False, rank, world, eval_batch),
        "test": make_loader(datasets["test"], False, rank, world, eval_batch),
    }
    log(
        f"dataset: {source['dataset']} ({len(classes)} classes), images train/val/test: "
        f"{len(datasets['train'])}/{len(datasets['val'])}/{len(datasets['test'])}"
    )
    if real:
        short = plan["short_side"]
        side = "native size" if short is None else f"shorter side {short} px"
        log(
            f"photos: {plan['steps']} steps of {plan['batch_size']} crops of {plan['crop']} px, "
            f"network input at {side}, scored at the masks' full size"
        )
    return source, plan, loaders


# %% 2. Model: pretrained encoder + DeepLabV3 / DeepLabV3+ / FPN decoder
# ===============================================================================================
# An ImageNet classifier already knows edges, textures and object parts; we keep its convolutional
# body and throw away its classifier. torchvision's `create_feature_extractor` rewrites the model
# so that it returns the activations of named layers: for a ResNet, layer1..layer4 at strides
# 4, 8, 16 and 32 (a stride-s feature map has 1/s of the input's height and width).
#
# Pretrained weights expect inputs normalized with the statistics they were trained with; we read
# mean and std from the weights' own metadata (`weights.transforms()`) and do the normalization
# inside the model, so training, evaluation and --predict can never disagree about it.
#
# Output stride. A stride-32 map of a 64-pixel image is 2 x 2: too coarse for boundaries.
# DeepLab removes the last downsamplings and *dilates* the following 3x3 convolutions (holes
# between the taps) so they see as far as before without shrinking the map. The price: the last
# stage(s) now run on 4x (or 16x) as many positions. For a ResNet-18 encoder, output stride 16
# costs ~1.7x the compute of 32 and output stride 8 ~5x, with the memory to match.
# torchvision does this with `replace_stride_with_dilation`, but only for Bottleneck ResNets
# (50/101/152): ResNet-18/34's BasicBlock raises "Dilation > 1 not supported". So for those (and for
# VGG) we do it by hand: set the stage's stride-2 convolutions to stride 1, dilate its 3x3s.


def encoder_weights(name: str):
    """torchvision's default ImageNet weights enum for an encoder name (no download yet)."""
    return torchvision.models.get_model_weights(name).DEFAULT


def dilate_stage(stage: nn.Module, dilation: int) -> None:
    """Make one ResNet stage keep its input resolution: stride 2 -> 1, 3x3 convs dilated."""
    for module in stage.modules():
        if isinstance(module, nn.Conv2d):
            module.stride = (1, 1)  # the first conv and the 1x1 shortcut no longer downsample
            if module.kernel_size == (3, 3):
                module.dilation, module.padding = (dilation, dilation), (dilation, dilation)


def dilate_vgg(features: nn.Sequential, output_stride: int) -> None:
    """DeepLab-v1: pools past output_stride keep the size (3x3, stride 1); later convs dilate."""
    stride, dilation = 1, 1
    for index, module in enumerate(features):
        if isinstance(module, nn.MaxPool2d):
            if stride * 2 > output_stride:
                features[index] = nn.MaxPool2d(kernel_size=3, stride=1, padding=1)
                dilation *= 2
            else:
                stride *= 2
        elif isinstance(module, nn.Conv2d) and dilation > 1:
            module.dilation, module.padding = (dilation, dilation), (dilation, dilation)


def load_pretrained(model: nn.Module, name: str) -> bool:
    """Load ImageNet (or PRETRAINED_WEIGHTS) weights into a torchvision classifier; True: loaded."""
    if PRETRAINED_WEIGHTS is not None:
        path = Path(PRETRAINED_WEIGHTS)
        if not path.is_file():
            raise SystemExit(f"error: PRETRAINED_WEIGHTS file not found: {path}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - a text file fails in many ways (IndexError)
            raise SystemExit(
                f"error: PRETRAINED_WEIGHTS {path} is not a PyTorch weights file "
                f"({type(error).__name__}); expected a state dict saved with torch.save"
            ) from None
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        if not isinstance(state, dict):
            raise SystemExit(f"error: PRETRAINED_WEIGHTS {path} holds a {type(state).__name__}, "
                             "not a state dict")
        mine = model.state_dict()
        head = ("fc.", "classifier.")  # the ImageNet classifier: not part of the encoder
        missing = [key for key in mine if key not in state and not key.startswith(head)]
        unexpected = [key for key in state if key not in mine]
        wrong = [key for key in state if key in mine and state[key].shape != mine[key].shape]
        if missing or unexpected or wrong:
            raise SystemExit(
                f"error: {path} does not fit {name}: missing keys {missing[:3]}, unexpected keys "
                f"{unexpected[:3]}, wrong shapes {wrong[:3]} (is it a state dict of {name}?)"
            )
        model.load_state_dict(state, strict=False)  # the ImageNet classifier head may be absent
        return True
    weights = encoder_weights(name)
    try:
        model.load_state_dict(weights.get_state_dict(progress=is_main_process(), check_hash=True))
        return True
    except (urllib.error.URLError, OSError, RuntimeError) as error:
        log(
            f"note: could not fetch ImageNet weights {weights} ({type(error).__name__}: {error}); "
            "training the encoder from random initialization (set PRETRAINED_WEIGHTS to a local "
            "file)"
        )
        return False


def build_encoder(name: str, output_stride: int, pretrained: bool):
    """torchvision classifier -> feature extractor returning {"c2","c3","c4","c5"} at strides 4..32.

    Returns (extractor, channels per level, mean, std, loaded). With output_stride 16 or 8 the
    deepest levels keep stride 16 or 8 instead of shrinking.
    """
    if name.startswith("resnet"):
        dilate = [False, output_stride <= 8, output_stride <= 16]  # for layer2, layer3, layer4
        if name in ("resnet50", "resnet101", "resnet152"):
            model = torchvision.models.get_model(
                name, weights=None, replace_stride_with_dilation=dilate
            )
        else:
            model = torchvision.models.get_model(name, weights=None)
            # BasicBlock cannot take replace_stride_with_dilation: dilate by hand
            for stage, use, dilation in (
                (model.layer3, dilate[1], 2),
                (model.layer4, dilate[2], 4 if dilate[1] else 2),
            ):
                if use:
                    dilate_stage(stage, dilation)
        nodes = {"layer1": "c2", "layer2": "c3", "layer3": "c4", "layer4": "c5"}
    elif name == "vgg16_bn":
        model = torchvision.models.vgg16_bn(weights=None)
        pools = [i for i, m in enumerate(model.features) if isinstance(m, nn.MaxPool2d)]
        # stride 4, 8, 16: the ReLU before pools 3, 4, 5; stride 32: the last pool's output
        nodes = {
            f"features.{pools[2] - 1}": "c2",
            f"features.{pools[3] - 1}": "c3",
            f"features.{pools[4] - 1}": "c4",
            f"features.{pools[4]}": "c5",
        }
        dilate_vgg(model.features, output_stride)
    else:
        raise SystemExit(
            f"error: unknown encoder {name!r} (resnet18, resnet34, resnet50, vgg16_bn)"
        )
    loaded = pretrained and load_pretrained(model, name)
    extractor = create_feature_extractor(model, return_nodes=nodes)
    extractor.eval()
    with torch.no_grad():  # one small forward pass tells us each level's channel count
        features = extractor(torch.zeros(1, 3, 64, 64))
        channels = {key: value.shape[1] for key, value in features.items()}
    transform = encoder_weights(name).transforms()  # ImageNet statistics from the weights' metadata
    return extractor, channels, transform.mean, transform.std, loaded


def conv_bn_relu(in_channels: int, out_channels: int, kernel: int = 3, dilation: int = 1):
    """Conv (no bias: BatchNorm has one) -> BatchNorm -> ReLU, spatial size kept."""
    padding = dilation * (kernel // 2)
    return nn.Sequential(
        nn.Conv2d(
            in_channels, out_channels, kernel, padding=padding, dilation=dilation, bias=False
        ),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


# ASPP (Atrous Spatial Pyramid Pooling) looks at the deepest feature map with several receptive
# fields at once: a 1x1 branch (the pixel itself), three 3x3 branches with dilation rates r (taps
# r cells apart), and an image-pooling branch (the average of the whole map: global context, "this
# is an indoor scene"). The five outputs are concatenated, projected back with a 1x1 convolution,
# and regularized with dropout.
#
# Gotcha: the rates must fit the map. DeepLabV3's 6/12/18 were chosen for 513-px crops, whose
# stride-16 map is 33 x 33 (12/24/36 for the 65 x 65 map at stride 8). On a 64-px image the
# stride-16 map is 4 x 4: a tap 6 cells away from any cell falls outside it, so each of those
# branches only ever sees its centre tap - three 1x1 convolutions in disguise. ASPP_RATES = "auto"
# scales the paper's rates to the training crop's map (r = 3/16, 3/8, 9/16 of its side - 1), which
# gives back 6/12/18 at 33 and 12/24/36 at 65; ASPP warns when a rate does not fit the map.


def fitted_aspp_rates(crop: int, output_stride: int) -> tuple[int, int, int]:
    """ASPP rates scaled to the side of the crop's stride-`output_stride` map, increasing.

    Every rate stays below the side (a rate >= side makes a branch a 1x1 convolution), so on a
    tiny map the rates may repeat: 2 x 2 cells give (1, 1, 1).
    """
    side = math.ceil(crop / output_stride)  # e.g. 513 px at stride 16 -> 33 cells
    largest = max(1, side - 1)
    rates = []
    for fraction in (3 / 16, 3 / 8, 9 / 16):  # 6, 12, 18 on the paper's 33-cell map
        rate = max(round(fraction * (side - 1)), rates[-1] + 1 if rates else 1)
        rates.append(min(rate, largest))
    return tuple(rates)


class ASPP(nn.Module):
    """N x C_in x h x w -> N x C x h x w: five parallel branches, concatenated and projected."""

    def __init__(self, in_channels: int, channels: int, rates: tuple[int, int, int]):
        super().__init__()
        self.rates, self.checked = tuple(rates), False
        self.branches = nn.ModuleList(
            [conv_bn_relu(in_channels, channels, kernel=1)]
            + [conv_bn_relu(in_channels, channels, kernel=3, dilation=rate) for rate in rates]
        )
        # Gotcha: BatchNorm on a 1x1 map needs > 1 value per channel in training mode: batch >= 2
        self.pool = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), conv_bn_relu(in_channels, channels, kernel=1)
        )
        self.project = nn.Sequential(
            conv_bn_relu(5 * channels, channels, kernel=1), nn.Dropout(DROPOUT)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not self.checked:  # once, on the first training batch
            self.checked = True
            warn_if_rates_too_large(self.rates, x.shape[-2:])
        outputs = [branch(x) for branch in self.branches]
        pooled = self.pool(x)  # N x C x 1 x 1
        pooled = F.interpolate(pooled, size=x.shape[-2:], mode="bilinear", align_corners=False)
        outputs.append(pooled)  # the image-level context, copied to every cell
        return self.project(torch.cat(outputs, dim=1))  # N x 5C x h x w -> N x C x h x w


def warn_if_rates_too_large(rates, size) -> bool:
    """One line when an ASPP rate >= the feature map's height or width (the branch degenerates)."""
    height, width = size
    too_large = [rate for rate in rates if rate >= min(height, width)]
    if too_large:
        log(
            f"Warning: ASPP rates {too_large} do not fit the {height} x {width} feature map: their "
            "off-centre taps fall outside it, so those branches act as 1x1 convolutions; use "
            'ASPP_RATES = "auto" (fitted to the training crop), larger images or crops, or '
            "OUTPUT_STRIDE = 8"
        )
    return bool(too_large)


class DeepLabV3Head(nn.Module):
    """DeepLabV3 decoder: ASPP on c5 -> 3x3 conv -> 1x1 classifier (logits at the output stride)."""

    def __init__(self, channels: dict[str, int], num_classes: int, rates, width: int):
        super().__init__()
        self.aspp = ASPP(channels["c5"], width, rates)
        self.refine = conv_bn_relu(width, width)
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.classifier(self.refine(self.aspp(features["c5"])))


# DeepLabV3+ adds a light decoder: the ASPP output, upsampled to stride 4, is concatenated with
# the encoder's stride-4 features (squeezed to 48 channels so they do not drown the semantics),
# then two 3x3 convolutions sharpen the boundaries that ASPP alone leaves blurry.


class DeepLabV3PlusHead(DeepLabV3Head):
    """DeepLabV3+ decoder: ASPP(c5) upsampled, joined with a 48-channel projection of c2."""

    def __init__(self, channels: dict[str, int], num_classes: int, rates, width: int):
        super().__init__(channels, num_classes, rates, width)
        self.low_level = conv_bn_relu(channels["c2"], 48, kernel=1)
        self.refine = nn.Sequential(conv_bn_relu(width + 48, width), conv_bn_relu(width, width))

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        low = self.low_level(features["c2"])  # N x 48 x H/4 x W/4
        context = F.interpolate(
            self.aspp(features["c5"]), size=low.shape[-2:], mode="bilinear", align_corners=False
        )
        return self.classifier(self.refine(torch.cat([context, low], dim=1)))  # stride-4 logits


# FPN takes the opposite road to DeepLab: keep the cheap undilated encoder (stride 32), and build
# the resolution back up. Lateral 1x1 convolutions bring every level to the same width; the
# top-down pathway upsamples the coarse, semantic level and adds it to the next finer one, so every
# level gets both "what" (from deep) and "where" (from shallow); a 3x3 convolution smooths the
# aliasing of the sum. Our semantic head is a simplified version of Panoptic FPN's semantic
# branch (which stacks up to three conv + 2x-upsample stages per level, with GroupNorm): here each
# level gets one 3x3 conv + BatchNorm, is upsampled straight to stride 4, and the levels are added
# up before the classifier.


class FPNHead(nn.Module):
    """FPN decoder: lateral 1x1 + top-down upsample-and-add + 3x3 smoothing + stride-4 head."""

    def __init__(self, channels: dict[str, int], num_classes: int, width: int):
        super().__init__()
        self.levels = ("c2", "c3", "c4", "c5")
        self.lateral = nn.ModuleDict({k: nn.Conv2d(channels[k], width, 1) for k in self.levels})
        self.smooth = nn.ModuleDict({k: nn.Conv2d(width, width, 3, padding=1) for k in self.levels})
        self.semantic = nn.ModuleDict({k: conv_bn_relu(width, width) for k in self.levels})
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        # 1) top-down: start at the coarsest level, upsample to the next level's size and add
        pyramid, top = {}, None
        for key in reversed(self.levels):
            lateral = self.lateral[key](features[key])
            if top is not None:
                # explicit size=: odd inputs (65 x 97) give levels that are not exactly 2x apart
                lateral = lateral + F.interpolate(top, size=lateral.shape[-2:], mode="nearest")
            top = lateral
            pyramid[key] = self.smooth[key](lateral)
        # 2) semantic head: every level -> 3x3 conv -> stride-4 size, summed, then classified
        size = pyramid["c2"].shape[-2:]
        merged = sum(
            F.interpolate(
                self.semantic[key](pyramid[key]), size=size, mode="bilinear", align_corners=False
            )
            for key in self.levels
        )
        return self.classifier(merged)  # N x K x H/4 x W/4


class SegmentationModel(nn.Module):
    """Normalize -> encoder (dict of features) -> decoder (coarse logits) -> input-size logits."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, mean, std, config: dict):
        super().__init__()
        self.encoder, self.decoder, self.config = encoder, decoder, config
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))  # buffers move with .to()
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """N x 3 x H x W in [0, 1] -> N x K x H x W logits (any H, W)."""
        features = self.encoder((images - self.mean) / self.std)
        logits = self.decoder(features)  # N x K x H/s x W/s
        # Gotcha: resize to the explicit input size - H/s rounds, so a scale factor would miss it
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


def build_model(
    architecture: str,
    encoder: str,
    num_classes: int,
    pretrained: bool,
    output_stride: int | None = None,
    decoder_channels: int | None = None,
    aspp_rates=None,
    crop: int | None = None,
) -> SegmentationModel:
    """Any decoder ("deeplabv3", "deeplabv3plus", "fpn") x encoder pair -> full-resolution logits.

    output_stride / decoder_channels / aspp_rates default to OUTPUT_STRIDE / DECODER_CHANNELS /
    ASPP_RATES ("auto" fits them to `crop`, the training crop, default IMAGE_SIZE); --predict
    passes the values stored in the checkpoint. `model.pretrained_loaded` says whether weights
    loaded.
    """
    if architecture not in ("deeplabv3", "deeplabv3plus", "fpn"):
        raise SystemExit(
            f"error: unknown architecture {architecture!r} (deeplabv3, deeplabv3plus, fpn)"
        )
    output_stride = 32 if architecture == "fpn" else (output_stride or OUTPUT_STRIDE)
    width = decoder_channels or DECODER_CHANNELS
    extractor, channels, mean, std, loaded = build_encoder(encoder, output_stride, pretrained)
    rates = None
    if architecture == "fpn":
        decoder = FPNHead(channels, num_classes, width)
    else:
        rates = aspp_rates or ASPP_RATES
        if rates == "auto":
            rates = fitted_aspp_rates(crop or IMAGE_SIZE, output_stride)
        rates = tuple(int(rate) for rate in rates)
        head = DeepLabV3PlusHead if architecture == "deeplabv3plus" else DeepLabV3Head
        decoder = head(channels, num_classes, rates, width)
    config = dict(
        architecture=architecture,
        encoder=encoder,
        num_classes=num_classes,
        output_stride=output_stride,
        decoder_channels=width,
        aspp_rates=rates,
    )
    model = SegmentationModel(extractor, decoder, mean, std, config)
    model.pretrained_loaded = loaded
    return model


# %% 3. Loss and metrics
# ===============================================================================================
# The loss is per-pixel cross-entropy on logits, with ignore_index=255 so outlines and padding
# neither pull the network nor count as mistakes.
#
# Metrics come from ONE confusion matrix summed over the whole split (not an average of per-image
# scores): cm[t, p] counts pixels of true class t predicted as p, pixels labelled 255 left out.
# Then, per class c: IoU_c = TP / (TP + FP + FN), with TP = cm[c, c], FP = column sum - TP,
# FN = row sum - TP. Rule for absent classes: a class that appears neither in the truth nor in the
# predictions has 0 / 0 = undefined IoU (NaN) and is left out of the mean (nanmean); a class that
# is predicted but never true has IoU 0 and does count. Pixel accuracy = trace / total, and mean
# class accuracy = mean over classes present in the truth of TP / row sum.
#
# coarse_labels_miou, below, pushes the true labels through a model's prediction grid: how
# coarse is that grid? (section 6 stores it in every run's row).


def make_criterion(weight: torch.Tensor | None, device) -> nn.Module:
    """Pixel-wise cross-entropy: logits N x K x H x W against class ids N x H x W, 255 skipped.

    weight: optional loss weight per class (K,), e.g. class_weights of section 1 for photos.
    """
    weight = None if weight is None else weight.to(device)
    return nn.CrossEntropyLoss(weight, ignore_index=IGNORE_INDEX)  # Gotcha: 255 is no class


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts (C, C): row = true class, column = predicted; target pixels outside [0, C) skipped.

    pred and target are integer tensors of the same shape (N x H x W); IGNORE_INDEX (255) lies
    outside [0, C), so ignored pixels are never counted.
    """
    valid = (target >= 0) & (target < num_classes)
    bins = num_classes * target[valid].long() + pred[valid].long()  # one bin per (true, pred) pair
    return torch.bincount(bins, minlength=num_classes**2).reshape(num_classes, num_classes)


def metrics_from_confusion(cm: torch.Tensor) -> dict:
    """Per-class IoU (NaN: absent from truth and prediction), mIoU, pixel and class accuracies."""
    cm = cm.double()
    tp = cm.diag()
    truth, predicted = cm.sum(dim=1), cm.sum(dim=0)
    union = truth + predicted - tp  # TP + FN + FP
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    iou = torch.where(union > 0, tp / union.clamp(min=1), nan)
    class_accuracy = torch.where(truth > 0, tp / truth.clamp(min=1), nan)
    return {
        "per_class_iou": iou.tolist(),
        "miou": torch.nanmean(iou).item(),
        "pixel_accuracy": (tp.sum() / cm.sum().clamp(min=1)).item(),
        "mean_class_accuracy": torch.nanmean(class_accuracy).item(),
        "per_class_accuracy": class_accuracy.tolist(),
    }


# What can a model with output stride s draw? Its logits live on a grid s times coarser than the
# image it sees, and the final bilinear resize only interpolates between those cells. To feel how
# coarse that is, push the *true* labels through the same grid (one-hot, averaged over each cell,
# resized back bilinearly, argmax) and score the result: the coarse-label score.
# Gotcha: it is a floor for the grid, not a ceiling. Cell averages are one map the grid can hold,
# so when the score is high (stride 4: ~0.99), resolution is not what holds a model back. When it
# is low, better logits exist: fitted to each test mask, the 4 x 4 grid of a stride-16 model on
# 64-px images scores 0.79 where cell averages score 0.52 (benchmarks/stride_reference.py).


def coarse_labels_miou(
    loader: DataLoader, stride: int, num_classes: int, short_side: int | None = None
) -> float:
    """mIoU of the true labels after a round trip through the prediction grid (see above).

    The grid is that of the network's input: the mask's size, or (photos) the size with the
    shorter side resized to short_side, divided by `stride`.
    """
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for _, masks in batches_of(loader):  # masks: N x H x W with 255 = ignore
        labels = torch.where(masks == IGNORE_INDEX, num_classes, masks)  # ignore -> an extra slot
        onehot = F.one_hot(labels, num_classes + 1)[..., :num_classes].permute(0, 3, 1, 2).float()
        scale = 1.0 if short_side is None else short_side / min(masks.shape[-2:])
        grid = [max(1, math.ceil(round(side * scale) / stride)) for side in masks.shape[-2:]]
        coarse = F.adaptive_avg_pool2d(onehot, grid)  # N x K x grid: class shares in each cell
        fine = F.interpolate(coarse, size=masks.shape[-2:], mode="bilinear", align_corners=False)
        cm += confusion_matrix(fine.argmax(dim=1), masks, num_classes)
    if dist.is_initialized():
        dist.all_reduce(cm)
    return metrics_from_confusion(cm)["miou"]


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


def prediction_stride(architecture: str, output_stride: int) -> int:
    """The stride of a model's logits: the encoder's for DeepLabV3, 4 for the decoders that
    rebuild resolution from the stride-4 features (FPN, DeepLabV3+)."""
    return output_stride if architecture == "deeplabv3" else 4


# %% 4. Training: frozen warm-up (pretrained encoders only), then fine-tuning
# ===============================================================================================
# Transfer learning in two phases. (1) Warm-up: a *pretrained* encoder is frozen and its
# BatchNorm layers stay in eval mode, so the randomly initialized decoder's first, large and noisy
# gradients cannot wreck the pretrained features, and the BatchNorm statistics learnt on ImageNet
# are not overwritten by a few small batches. (2) Fine-tuning: everything trains, the pretrained
# encoder with a 10x lower learning rate (it is already good; it only needs to adapt), the fresh
# decoder with the full rate. A randomly initialized encoder (every offline run) has nothing to
# protect: it skips the warm-up - freezing random features would only waste steps - and gets
# the full rate from the first step.
#
# Poly decay, lr * (1 - step/total)^0.9, is the DeepLab schedule: high rates early to move fast,
# a smooth fall to zero so the last steps settle into a minimum instead of bouncing around it.
# The schedule is counted in optimizer steps: on the synthetic set EPOCHS passes of its training
# split, on photos REAL_STEPS steps whatever the number of images, with a validation every pass
# (synthetic) or every REAL_VAL_EVERY steps (photos), and the best validation weights kept
# (training_plan, at the end of section 1, writes this schedule down for the data at hand).


def set_encoder_trainable(model: SegmentationModel, trainable: bool) -> None:
    """Freeze (no gradients) or unfreeze every encoder parameter."""
    for parameter in model.encoder.parameters():
        parameter.requires_grad_(trainable)


def make_optimizer(model: SegmentationModel, total_steps: int, lr: float | None = None):
    """AdamW with two parameter groups (encoder, decoder) and a per-step poly LR schedule."""
    lr = lr or LR
    encoder_lr = lr * (ENCODER_LR_FACTOR if model.pretrained_loaded else 1.0)
    optimizer = torch.optim.AdamW(
        [
            {"params": model.encoder.parameters(), "lr": encoder_lr},
            {"params": model.decoder.parameters(), "lr": lr},
        ],
        weight_decay=WEIGHT_DECAY,
        # fused: one kernel updates all weights instead of ~10 small operations per weight tensor
        # (same maths, fewer passes over memory). CPU and CUDA have it.
        fused=next(model.parameters()).device.type in ("cpu", "cuda"),
    )
    total_steps = max(1, total_steps)  # a 0-step schedule would divide by zero
    poly = lambda step: max(0.0, 1 - step / total_steps) ** POLY_POWER  # noqa: E731
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, poly)


def train_steps(
    net, model, loader, optimizer, scheduler, scaler, device, frozen: bool, weight=None
) -> float:
    """Train on every batch `loader` yields (the steps up to the next validation); mean loss.

    `net` may be the DDP wrapper of `model`; `weight`: optional loss weight per class.
    """
    model.train()
    if frozen:
        model.encoder.eval()  # Gotcha: frozen also means BatchNorm in eval mode (statistics kept)
    criterion = make_criterion(weight, device)
    total, steps = 0.0, 0
    for images, masks in tqdm(loader, desc="train", leave=False, disable=not is_main_process()):
        images, masks = images.to(device), masks.to(device)  # N x 3 x H x W float, N x H x W int64
        with autocast(device):
            loss = criterion(net(images), masks)  # logits N x K x H x W against class ids
        if not torch.isfinite(loss):
            raise SystemExit(f"error: the loss became {loss.item()}; lower the LR, check the masks")
        optimizer.zero_grad(set_to_none=True)  # set_to_none: frees memory, frozen params stay None
        scaler.scale(loss).backward()  # under DDP this also averages gradients across processes
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()  # poly decay is per step, not per epoch
        total, steps = total + loss.item(), steps + 1
    return total / max(steps, 1)


def take(iterator, count: int):
    """The next `count` items of an endless iterator (one validation interval of batches)."""
    for _ in range(count):
        yield next(iterator)


def start_phase(model: SegmentationModel, device, optimizer, frozen: bool) -> nn.Module:
    """Freeze or unfreeze the encoder for a new phase; return the network to train (DDP or not)."""
    set_encoder_trainable(model, not frozen)
    net = wrap_for_training(model, device)  # again: DDP hooks only the trainable parameters
    log(
        f"  phase: {'warm-up, encoder frozen' if frozen else 'training everything'}, "
        f"encoder lr {optimizer.param_groups[0]['lr']:.2g}, "
        f"decoder lr {optimizer.param_groups[1]['lr']:.2g}"
    )
    return net


def validate(model, loader, device, plan: dict, num_classes: int) -> dict:
    """Scores on the validation split (single scale): what the best weights are chosen on."""
    cm = evaluate(model, loader, device, num_classes, short_side=plan["short_side"])
    if cm.sum() == 0:  # mIoU would be NaN, and no weights could ever count as "best"
        raise SystemExit(
            "error: the validation masks hold no labelled pixel (all 255 = ignore): there is "
            "nothing to choose the model on; check the masks of the validation split"
        )
    return metrics_from_confusion(cm)


def record(history: list, round_: int, step: int, total: int, loss: float, val, start) -> None:
    """Append one validation to the history and print its line."""
    history.append({"epoch": round_, "step": step, "loss": loss, "val_miou": val["miou"]})
    log(
        f"  step {step:5d}/{total}  loss {loss:.3f}  val mIoU {val['miou']:.3f}  "
        f"pixel acc {val['pixel_accuracy']:.3f}  ({time.time() - start:.0f} s)"
    )


def checkpoint_state(model: SegmentationModel) -> dict:
    """A checkpoint's contents: the weights, and the config --predict rebuilds the model from."""
    return {"model": model.state_dict(), "config": model.config}


def keep_if_best(model: SegmentationModel, name: str, val_miou: float, best: dict) -> bool:
    """Keep (in memory and on disk) weights that beat the best validation mIoU so far.

    `best` holds "val_miou", "weights" and "stale" (validations without progress); returns
    False when PATIENCE validations in a row brought nothing better: time to stop early.
    """
    if val_miou > best["val_miou"]:
        best["val_miou"], best["stale"] = val_miou, 0
        best["weights"] = {k: value.detach().clone() for k, value in model.state_dict().items()}
        if is_main_process():
            save_checkpoint(checkpoint_state(model), OUTPUT_DIR / f"{name}.pt")
        return True
    best["stale"] += 1
    if best["stale"] >= PATIENCE:
        log(f"  early stop: no better validation mIoU for {PATIENCE} validations")
        return False
    return True


def fit(
    model: SegmentationModel,
    name: str,
    loaders: dict,
    device: torch.device,
    plan: dict | None = None,
    num_classes: int | None = None,
) -> dict:
    """Warm-up (pretrained only) + fine-tuning, validating every plan["val_every"] steps.

    Returns {"history", "train_seconds", "best_val_miou"}; the model ends with the best
    validation weights loaded (early stopping after PATIENCE validations without a better one).
    """
    plan = plan or training_plan(False, len(loaders["train"].dataset))
    num_classes = num_classes or NUM_CLASSES
    total, every = plan["steps"], plan["val_every"]
    rounds = math.ceil(total / every)
    optimizer, scheduler = make_optimizer(model, total, plan["lr"])
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")  # fp16 safety on CUDA
    # Gotcha: freezing only protects what is worth protecting - a pretrained encoder
    warmup = WARMUP_EPOCHS if model.pretrained_loaded else 0
    batches = iter(loaders["train"])  # endless: full batches, reshuffled on every pass
    history, best = [], {"val_miou": -1.0, "weights": None, "stale": 0}
    net, start = None, time.time()
    try:
        for round_ in range(1, rounds + 1):
            frozen = round_ <= warmup
            if round_ == 1 or round_ == warmup + 1:  # a phase starts
                net = start_phase(model, device, optimizer, frozen)
            steps = min(every, total - (round_ - 1) * every)
            loss = train_steps(
                net, model, take(batches, steps), optimizer, scheduler, scaler, device, frozen,
                plan.get("class_weights"))  # fmt: skip
            sync_buffers(model)  # every process now holds rank 0's BatchNorm statistics
            val = validate(model, loaders["val"], device, plan, num_classes)
            step = min(round_ * every, total)
            record(history, round_, step, total, loss, val, start)
            if round_ == 1 and plan["real"] and rounds > 1 and is_main_process():
                print_eta(time.time() - start, step, total)  # photos: how long will this take?
            if not keep_if_best(model, name, val["miou"], best):
                break
    except KeyboardInterrupt:
        log("  interrupted: continuing with the best checkpoint so far")
    if best["weights"] is None:
        raise SystemExit("error: training stopped before the first validation; nothing to evaluate")
    model.load_state_dict(best["weights"])
    set_encoder_trainable(model, True)
    seconds = time.time() - start
    return {"history": history, "train_seconds": seconds, "best_val_miou": best["val_miou"]}


# %% 5. Evaluation and multi-scale inference
# ===============================================================================================
# A network trained at one scale sees objects at one size. At test time we can show it the image at
# several scales (and mirrored), map every prediction back to the input's pixel grid and average.
# Three rules make this correct: undo each transform on the *prediction* (flip the logits back,
# resize them to the exact input H x W with size=, never scale_factor=, which does not commute
# with the flip), turn logits into probabilities before averaging (logits of different passes are
# not on a common scale), and average probabilities, never argmax maps.
#
# The report at the end of this section: best_run picks the run with the best *validation* mIoU
# (the test split never chooses), print_report prints its per-class test scores and compares all.


def multiscale_probs(
    model: nn.Module, images: torch.Tensor, scales=(1.0,), flip: bool = False
) -> torch.Tensor:
    """Softmax probabilities N x K x H x W averaged over `scales` (and horizontal flips)."""
    height, width = images.shape[-2:]
    total, passes = 0.0, 0
    for scale in scales:
        # Gotcha: round, not int() - truncated sizes drift off the grid at some scales
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        scaled = (
            images
            if size == (height, width)
            else F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        )
        for flipped in (False, True) if flip else (False,):
            logits = model(scaled.flip(-1) if flipped else scaled)  # N x K x h x w
            if flipped:
                logits = logits.flip(-1)  # undo the flip on the prediction
            if size != (height, width):
                # Gotcha: explicit size= back to the input grid
                logits = F.interpolate(
                    logits, size=(height, width), mode="bilinear", align_corners=False
                )
            total, passes = total + logits.float().softmax(dim=1), passes + 1
    return total / passes


def working_scales(images: torch.Tensor, short_side: int | None, scales) -> tuple[float, ...]:
    """Scales relative to the input so that 1.0 means "shorter side = short_side" (None: native)."""
    if short_side is None:
        return tuple(scales)
    base = short_side / min(images.shape[-2:])
    return tuple(base * scale for scale in scales)


@torch.inference_mode()  # no autograd bookkeeping at all: faster and lighter than no_grad
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    num_classes: int,
    scales=(1.0,),
    flip: bool = False,
    short_side: int | None = None,
) -> torch.Tensor:
    """Confusion matrix (K x K, CPU int64) over the loader's whole split, summed over processes.

    With short_side, the network sees each image resized so that its shorter side is short_side
    (the size it was trained at); the probabilities come back at the image's full size and are
    scored against the full-size mask.
    """
    model.eval()  # Gotcha: eval() - BatchNorm uses running statistics, dropout is off
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    for images, masks in batches_of(loader):
        images, masks = images.to(device), masks.to(device)
        with autocast(device):
            passes = working_scales(images, short_side, scales)
            probs = multiscale_probs(model, images, passes, flip)
        cm += confusion_matrix(probs.argmax(dim=1), masks, num_classes)  # at the masks' full size
    if dist.is_initialized():
        dist.all_reduce(cm)  # sum over processes: every rank now holds the whole split's counts
    return cm.cpu()


def score_on_test(model, loaders: dict, device, plan: dict, num_classes: int):
    """The test split, scored once: (confusion matrix, single-scale and multi-scale metrics)."""
    short_side, scales = plan["short_side"], plan["eval_scales"]
    cm = evaluate(model, loaders["test"], device, num_classes, short_side=short_side)  # one scale
    single = metrics_from_confusion(cm)
    multi = metrics_from_confusion(
        evaluate(model, loaders["test"], device, num_classes, scales, EVAL_FLIP, short_side)
    )
    return cm, single, multi


def best_run(runs: list[dict]) -> dict:
    """The run with the best *validation* mIoU: the test split never chooses anything."""
    return max(runs, key=lambda run: run["val_miou"])


def print_report(runs: list[dict], classes) -> None:
    """Per-class table of the best run (chosen on validation), then the comparison table."""
    best = best_run(runs)
    log(f"\nper-class test results of {best['model']} (best on validation; single scale; "
        "'-' = class absent):")
    log(f"  {'class':<17} {'IoU':>6} {'acc':>6}")
    for name, iou, acc in zip(classes, best["per_class_iou"], best["per_class_accuracy"]):
        iou_text, acc_text = ("-" if v is None else f"{v:.3f}" for v in (iou, acc))
        log(f"  {name:<17} {iou_text:>6} {acc_text:>6}")
    log(
        f"\n{'model':<28} {'params':>7} {'train s':>8} {'val mIoU':>9} {'test mIoU':>10} "
        f"{'MS+flip':>8} {'pix acc':>8} {'coarse':>8}"
    )
    for run in runs:
        coarse = run.get("coarse_labels_miou")
        log(
            f"{run['model']:<28} {run['params'] / 1e6:>6.1f}M {run['train_seconds']:>8.0f} "
            f"{run['val_miou']:>9.3f} {run['miou']:>10.3f} {run['miou_multiscale']:>8.3f} "
            f"{run['pixel_accuracy']:>8.3f} {'' if coarse is None else f'{coarse:.3f}':>8}"
        )
    log("(coarse: test mIoU of the true labels averaged over the model's prediction grid)")


# %% 6. Experiments: train every run, choose on validation, test once
# ===============================================================================================
# One experiment = one (decoder, encoder) pair: built and seeded (section 2), trained on its loss
# with the best validation weights kept (sections 3 and 4), then scored on the test split once,
# plain and with multi-scale + flip (section 5). After all runs, each row gets the coarse-label
# score of its prediction grid (section 3) and the report compares them. The run with the best
# *validation* mIoU becomes best_model.pt (section 9); the test split only reports.


def experiment_model(architecture, encoder, pretrained: bool, plan: dict, classes, device):
    """Build one decoder x encoder pair on `device` (seeded), announce it; return (model, name)."""
    seed_everything(SEED)  # every run starts from the same data order and seed
    model = build_model(architecture, encoder, len(classes), pretrained, crop=plan["crop"])
    model = model.to(device, memory_format=memory_format(device))
    # --predict reads these back: the size the model works at, its test scales, the class names
    # and their colours (the figures use them too)
    model.config.update(
        short_side=plan["short_side"],
        eval_scales=tuple(plan["eval_scales"]),
        class_names=tuple(classes),
        class_colours=plan.get("class_colours"),
    )
    name = f"{architecture}_{encoder}_{'pretrained' if model.pretrained_loaded else 'scratch'}"
    rates, stride = model.config["aspp_rates"], model.config["output_stride"]
    log(
        f"\n== {name}: {count_parameters(model) / 1e6:.1f} M parameters, encoder output stride "
        f"{stride}, logits at stride {prediction_stride(architecture, stride)}"
        + (f", ASPP rates {rates}" if rates else "")
    )
    return model, name


def result_row(name, model, training: dict, cm, single: dict, multi: dict) -> dict:
    """One run's line of metrics.json: what it is, how it trained, how it scored."""
    rates = model.config["aspp_rates"]
    return {
        "model": name,
        "architecture": model.config["architecture"],
        "encoder": model.config["encoder"],
        "pretrained": model.pretrained_loaded,
        "params": count_parameters(model),
        "output_stride": model.config["output_stride"],
        "aspp_rates": list(rates) if rates else None,
        "train_seconds": round(training["train_seconds"], 1),
        "steps": training["history"][-1]["step"],
        "validations": len(training["history"]),  # synthetic: one per pass over the data
        "val_miou": training["best_val_miou"],  # the weights kept; what the best run is chosen on
        "miou": single["miou"],  # test: reported, never used to choose
        "pixel_accuracy": single["pixel_accuracy"],
        "mean_class_accuracy": single["mean_class_accuracy"],
        "miou_multiscale": multi["miou"],
        "pixel_accuracy_multiscale": multi["pixel_accuracy"],
        # NaN (class absent from truth and prediction) -> None: "-" in the report, null in JSON
        "per_class_iou": [None if math.isnan(v) else v for v in single["per_class_iou"]],
        "per_class_accuracy": [None if math.isnan(v) else v for v in single["per_class_accuracy"]],
        "history": training["history"],
        "confusion_matrix": cm.tolist(),
    }


def run_experiment(
    architecture: str,
    encoder: str,
    pretrained: bool,
    loaders: dict,
    device,
    plan: dict | None = None,
    classes=None,
) -> tuple[dict, nn.Module]:
    """Build, train and test one decoder x encoder pair; return its result row and the model."""
    plan = plan or training_plan(False, len(loaders["train"].dataset))
    classes = classes or VOC_CLASSES
    model, name = experiment_model(architecture, encoder, pretrained, plan, classes, device)
    training = fit(model, name, loaders, device, plan, len(classes))
    cm, single, multi = score_on_test(model, loaders, device, plan, len(classes))
    log(
        f"  val mIoU {training['best_val_miou']:.3f}; test mIoU {single['miou']:.3f} "
        f"(multi-scale + flip {multi['miou']:.3f}), pixel acc {single['pixel_accuracy']:.3f}, "
        f"trained {training['train_seconds']:.0f} s"
    )
    if is_main_process():
        warn_if_collapsed(cm.sum(dim=0), training["best_val_miou"], classes)
    return result_row(name, model, training, cm, single, multi), model


def run_all_experiments(loaders: dict, device, plan: dict, classes) -> tuple[list, dict]:
    """Every (decoder, encoder) pair of the plan, and each again from scratch when pretrained;
    then each row's coarse-label score and the printed comparison."""
    runs, models = [], {}
    for architecture, encoder in plan["runs"]:
        row, model = run_experiment(
            architecture, encoder, PRETRAINED, loaders, device, plan, classes
        )
        runs.append(row)
        models[row["model"]] = model
        if row["pretrained"] and COMPARE_SCRATCH:  # the same model from random weights: the gain
            row, model = run_experiment(
                architecture, encoder, False, loaders, device, plan, classes
            )
            runs.append(row)
            models[row["model"]] = model
    add_coarse_label_scores(runs, loaders["test"], len(classes), plan["short_side"])
    print_report(runs, classes)  # the run chosen on validation, and the comparison
    return runs, models


def add_coarse_label_scores(
    runs: list[dict], test_loader, num_classes: int, short_side: int | None
) -> None:
    """Store in every row the coarse-label score of its prediction grid on the test split."""
    for row in runs:
        stride = prediction_stride(row["architecture"], row["output_stride"])
        row["coarse_labels_miou"] = coarse_labels_miou(test_loader, stride, num_classes, short_side)


# %% 7. Visualization
# ===============================================================================================
# Numbers say how good, pictures say where it fails: the confusion matrix shows which classes are
# mistaken for which (and how much leaks into background), the per-class IoU compares the models
# class by class, and palette-coloured predictions show boundaries and small objects.


def plot_confusion(cm: torch.Tensor, class_names, path: Path) -> None:
    """Row-normalized confusion matrix (each row: where the pixels of one true class went)."""
    rows = cm.double() / cm.sum(dim=1, keepdim=True).clamp(min=1)
    fig, ax = plt.subplots(figsize=(7, 6))
    image = ax.imshow(rows.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(class_names)), class_names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(class_names)), class_names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_per_class_iou(runs: list[dict], class_names, path: Path) -> None:
    """Grouped bars: test IoU per class for every run."""
    fig, ax = plt.subplots(figsize=(10, 3.5))
    width = 0.8 / len(runs)
    for offset, run in enumerate(runs):
        values = [0.0 if v is None else v for v in run["per_class_iou"]]
        ax.bar(
            np.arange(len(class_names)) + offset * width,
            values,
            width,
            label=f"{run['model']} ({run['miou']:.3f})",
        )
    ax.set_xticks(
        np.arange(len(class_names)) + 0.4 - width / 2,
        class_names,
        rotation=60,
        fontsize=8,
        ha="right",
    )
    ax.set_ylabel("IoU")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_predictions(
    images: torch.Tensor, label_maps: dict[str, torch.Tensor], path: Path, class_colours=None
) -> None:
    """Rows of: image | one N x H x W label map per entry (truth, predictions), in colour."""
    columns = 1 + len(label_maps)
    size = (2 * columns, 2 * len(images))
    fig, axes = plt.subplots(len(images), columns, figsize=size, squeeze=False)
    for row in range(len(images)):
        panels = [images[row].permute(1, 2, 0).numpy()]  # 3 x H x W -> H x W x 3
        panels += [colorize(labels[row].numpy(), class_colours) for labels in label_maps.values()]
        for col, (panel, title) in enumerate(zip(panels, ["image", *label_maps])):
            axes[row, col].imshow(panel)
            axes[row, col].axis("off")
            if row == 0:
                axes[row, col].set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_training_curves(runs: list[dict], path: Path) -> None:
    """Training loss and validation mIoU at every validation, for every run."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3))
    for run in runs:
        steps = [h["step"] for h in run["history"]]
        left.plot(steps, [h["loss"] for h in run["history"]], marker="o", label=run["model"])
        right.plot(steps, [h["val_miou"] for h in run["history"]], marker="o", label=run["model"])
    left.set(xlabel="optimizer step", ylabel="training loss")
    right.set(xlabel="optimizer step", ylabel="validation mIoU")
    left.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def predicted_label_maps(models: dict, samples: list, device) -> tuple[list, dict]:
    """Each model's prediction for a few (image, mask) samples, as it is tested (scales, flips).

    Returns (images, {"truth": masks, model name: predictions}), one tensor per sample; photos
    differ in size, so they go through the models one at a time.
    """
    images, label_maps = [], {"truth": []}
    with torch.inference_mode():
        for image, mask in samples:
            images.append(image)
            label_maps["truth"].append(mask)
            for name, model in models.items():
                config = model.config
                scales = config.get("eval_scales") or EVAL_SCALES
                scales = working_scales(image, config.get("short_side"), scales)
                probs = multiscale_probs(model.eval(), image[None].to(device), scales, EVAL_FLIP)
                label_maps.setdefault(name, []).append(probs.argmax(dim=1)[0].cpu())
    return images, label_maps


def plot_test_predictions(models: dict, test: Dataset, device, path: Path) -> None:
    """The first 4 test images, their truth and every model's prediction, in one figure."""
    samples = [test[i] for i in range(min(4, len(test)))]
    images, label_maps = predicted_label_maps(models, samples, device)
    # photos of different sizes: padded for the figure only (image black, labels 255)
    height = max(image.shape[1] for image in images)
    width = max(image.shape[2] for image in images)
    padded = [pad_to(im, mask, height, width) for im, mask in zip(images, label_maps["truth"])]
    figure_maps = {"truth": torch.stack([mask for _, mask in padded])}
    for name in models:
        figure_maps[name] = torch.stack(
            [pad_to(image, pred, height, width)[1] for image, pred in zip(images, label_maps[name])]
        )
    shown = torch.stack([image for image, _ in padded])
    colours = next(iter(models.values())).config.get("class_colours")  # one dataset, one colour set
    plot_predictions(shown, figure_maps, path, colours)


def save_figures(runs: list[dict], models: dict, loaders: dict, device, classes) -> None:
    """The four figures of a training run, in OUTPUT_DIR (the best run: chosen on validation)."""
    OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
    best = best_run(runs)  # chosen on validation, never on the test split
    cm = torch.tensor(best["confusion_matrix"])
    plot_confusion(cm, classes, OUTPUT_DIR / "confusion_matrix.png")
    plot_per_class_iou(runs, classes, OUTPUT_DIR / "per_class_iou.png")
    plot_training_curves(runs, OUTPUT_DIR / "training_curves.png")
    plot_test_predictions(models, loaders["test"].dataset, device, OUTPUT_DIR / "predictions.png")


# %% 8. Your own image: --predict
# ===============================================================================================
# The checkpoint stores the model's configuration (and, for photos, the size it works at and the
# class names), so --predict rebuilds exactly the network that was trained, even if you edited
# the constants since, and runs multi-scale + flip inference.


def load_image(path: Path) -> torch.Tensor:
    """An image file -> 1 x 3 x H x W float32 in [0, 1], longer side at most PREDICT_MAX_SIDE."""
    if not path.is_file():
        raise SystemExit(f"error: no such image file: {path}")
    try:
        image = Image.open(path).convert("RGB")
    except (UnidentifiedImageError, OSError):
        raise SystemExit(
            f"error: {path} is not an image PIL can read (try a .png or .jpg)"
        ) from None
    image.thumbnail((PREDICT_MAX_SIDE, PREDICT_MAX_SIDE))  # keeps the aspect ratio
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None].contiguous()  # H x W x 3 -> 1 x 3 x H x W


def predict_image(image_path: str) -> dict:
    """Segment one image with OUTPUT_DIR/best_model.pt; save its mask and a figure in OUTPUT_DIR."""
    checkpoint_path = OUTPUT_DIR / "best_model.pt"
    if not checkpoint_path.is_file():
        raise SystemExit(
            f"error: no trained model at {checkpoint_path}; run `python "
            "pretrained_segmentation.py` first (a --quick run's model: --quick --predict)"
        )
    image = load_image(Path(image_path))
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    config = checkpoint["config"]
    model = build_model(
        config["architecture"],
        config["encoder"],
        config["num_classes"],
        pretrained=False,
        output_stride=config["output_stride"],
        decoder_channels=config["decoder_channels"],
        aspp_rates=config.get("aspp_rates"),
    )
    model.load_state_dict(checkpoint["model"])
    device = pick_device(DEVICE)
    model.to(device, memory_format=memory_format(device)).eval()
    short_side = config.get("short_side")  # photos: the size the model was trained at
    class_names = config.get("class_names") or VOC_CLASSES
    with torch.inference_mode():
        scales = working_scales(image, short_side, config.get("eval_scales") or EVAL_SCALES)
        pred = multiscale_probs(model, image.to(device), scales, EVAL_FLIP).argmax(dim=1)[0].cpu()
    stem = Path(image_path).stem
    mask_path, figure_path = OUTPUT_DIR / f"{stem}_mask.png", OUTPUT_DIR / f"{stem}_prediction.png"
    # a palette PNG: the pixel values are the class ids, the palette the training masks' colours
    # (an export's labelmap.txt, else VOC's): converted to RGB, it is a colour mask of the export
    colours = config.get("class_colours")
    mask_image = Image.fromarray(pred.numpy().astype(np.uint8), mode="P")
    mask_image.putpalette(class_palette(colours).flatten().tolist())
    mask_image.save(mask_path)
    name = f"{config['architecture']}_{config['encoder']}"
    plot_predictions(image.cpu(), {name: pred[None]}, figure_path, colours)
    fractions = {
        class_names[c]: round((pred == c).float().mean().item(), 4) for c in pred.unique().tolist()
    }
    print(f"classes found (share of pixels): {fractions}")
    print(f"saved {mask_path} and {figure_path}")
    return {"image": str(image_path), "mask": str(mask_path), "classes": fractions}


# %% 9. Putting it together
# ===============================================================================================
# metrics.json and best_model.pt, the command line, and main() at the end: the chapter's table of
# contents, one call per section, in order.


def save_results(runs: list[dict], models: dict, source: dict, device, world: int, start: float):
    """metrics.json (every run; the best chosen on validation) and best_model.pt; returns them.

    Only the main process writes; every process returns the same metrics.
    """
    metrics = {
        "dataset": source["dataset"],
        "classes": list(source["classes"]),
        "pretrained": any(run["pretrained"] for run in runs),
        "device": str(device),
        "world_size": world,
        "runs": runs,
        "best_model": best_run(runs)["model"],  # chosen on validation mIoU
        "total_seconds": round(time.time() - start, 1),
    }
    if is_main_process():
        best = models[metrics["best_model"]]
        save_checkpoint(checkpoint_state(best), OUTPUT_DIR / "best_model.pt")
        write_json(metrics, OUTPUT_DIR / "metrics.json")
        log(
            f"\nsaved metrics.json, best_model.pt ({metrics['best_model']}, best on validation) "
            f"and figures in {OUTPUT_DIR}"
        )
    log(f"total time {metrics['total_seconds']:.0f} s")
    return metrics


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options; --quick swaps in the QUICK constants (and outputs/quick/)."""
    parser = argparse.ArgumentParser(description="Pretrained encoders + DeepLabV3 / FPN.")
    parser.add_argument("--quick", action="store_true", help="tiny configuration, set-up check")
    parser.add_argument("--predict", metavar="IMAGE", help="segment IMAGE with best_model.pt")
    # Cells run in a notebook have no __file__, and sys.argv holds the kernel's options, not ours
    # (`%run script.py --quick` sets __file__ and passes its own arguments: those are kept).
    if argv is None and "__file__" not in globals():
        argv = []
    args = parser.parse_args(argv)
    if args.quick:
        # Replace the constants above for this process (a notebook: restart the kernel after),
        # and keep its files in outputs/quick/
        # so that a set-up check never overwrites the model or metrics of a real run.
        globals().update(QUICK, OUTPUT_DIR=OUTPUT_DIR / "quick")
    return args


def main(argv: list[str] | None = None) -> dict:
    """The chapter in one screen: data, every run (train, choose on val, test), outputs."""
    args = parse_args(argv)
    if args.predict is not None:  # your own image (section 8); --quick --predict: the quick model
        return predict_image(args.predict)
    start = time.time()
    rank, world = setup_distributed()  # one process, or one of torchrun's (appendix)
    device = process_device()
    # cuDNN tries its convolution algorithms on the first batch of each shape and keeps the
    # fastest: training crops all have one shape (photos differ: one try per new test shape).
    torch.backends.cudnn.benchmark = True
    seed_everything(SEED)
    log(f"device: {device}, processes: {world}")

    # 1. Data: VOC, your own folders, or the synthetic stand-in -> source, plan, loaders
    source, plan, loaders = prepare_data(rank, world)
    classes = source["classes"]
    # 2. Model: pretrained (or random) encoder + decoder, built and seeded per experiment
    # 3. Loss and metrics: cross-entropy (class-weighted on photos), confusion-matrix scores
    # 4. Training: warm-up and fine-tuning, the best validation weights kept
    # 5. Evaluation: the test split scored once, plain and with multi-scale + flip
    # 6. Experiments: 2-5 for every (decoder, encoder) pair of the plan, then the comparison
    runs, models = run_all_experiments(loaders, device, plan, classes)
    # 7. Visualization: confusion matrix, per-class IoU, training curves, test predictions
    if is_main_process():
        save_figures(runs, models, loaders, device, classes)
    # 9. Putting it together: best_model.pt and metrics.json (8, --predict, is the branch above)
    metrics = save_results(runs, models, source, device, world, start)
    if dist.is_initialized():
        dist.destroy_process_group()
    return metrics


# %% Appendix: distributed training (torchrun)
# ===============================================================================================
# `torchrun --nproc_per_node=N script.py` starts N copies of this script and tells each one its
# RANK (0..N-1) and the WORLD_SIZE through environment variables. Every copy trains on its own
# slice of the data; DistributedDataParallel averages the gradients after each backward pass so
# all copies keep identical weights. Plain `python script.py` has no WORLD_SIZE: one process, and
# every helper below turns into a no-op.


def setup_distributed() -> tuple[int, int]:
    """Join the process group that torchrun describes; return (rank, world_size), (0, 1) alone."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1
    use_cuda = torch.cuda.is_available() and DEVICE in ("auto", "cuda")
    if use_cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # one GPU per process
    # gloo runs collectives on CPU tensors, nccl on CUDA tensors
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size()


def is_main_process() -> bool:
    """True on rank 0 (or without torchrun): only it prints, saves and plots."""
    return not dist.is_initialized() or dist.get_rank() == 0


def log(message: str) -> None:
    """Print on rank 0 only, so N processes do not print every line N times."""
    if is_main_process():
        print(message, flush=True)


def process_device() -> torch.device:
    """This process's device: pick_device(DEVICE), but the CPU for torchrun without CUDA.

    Under torchrun each process takes the GPU of its LOCAL_RANK (pick_device reads it); without
    CUDA the processes talk through gloo on CPU tensors, which Apple's MPS cannot join.
    """
    if dist.is_initialized() and DEVICE == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    return pick_device(DEVICE)


class ShardSampler(Sampler):
    """Evaluation sampler: process `rank` of `world` reads items rank, rank + world, ...

    Unlike DistributedSampler it never pads the split with repeated items, so the summed
    confusion matrices of all processes count every pixel exactly once.
    """

    def __init__(self, length: int, rank: int, world: int):
        self.indices = list(range(rank, length, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def wrap_for_training(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel under torchrun (averages gradients across processes), else the model.

    Built again whenever the set of trainable parameters changes: DDP registers its gradient hooks
    for the parameters that require gradients when it is constructed.
    """
    if not dist.is_initialized():
        return model
    device_ids = [device.index] if device.type == "cuda" else None  # one GPU, or CPU (gloo)
    return DistributedDataParallel(model, device_ids=device_ids)


def sync_buffers(model: nn.Module) -> None:
    """Copy rank 0's BatchNorm running statistics to all ranks (each rank updated its own)."""
    if dist.is_initialized():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


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
