"""Example 2: transfer learning for segmentation with pretrained encoders, DeepLabV3 and FPN.

What you will learn
-------------------
- How an ImageNet classifier (ResNet-18/34/50, VGG-16-BN from torchvision) becomes the *encoder* of
  a segmentation network: features taken at strides 4, 8, 16 and 32 with torchvision's
  feature-extraction utilities, normalization constants read from the weights' own metadata.
- Two decoders written from scratch: DeepLabV3 (atrous convolutions, ASPP, output stride) and a
  Feature Pyramid Network (lateral connections, top-down pathway, a semantic head); DeepLabV3+ too.
- Transfer learning made visible: a warm-up with the encoder frozen (BatchNorm in eval mode), then
  fine-tuning with a lower encoder learning rate, and poly learning-rate decay.
- Multi-scale + flip inference that averages softmax probabilities on the input's pixel grid.
- PASCAL VOC 2012 (21 classes, the official palette, 255 = "ignore"), the metrics the field
  reports (per-class IoU, mIoU, pixel accuracy, mean class accuracy) from one confusion matrix.
- Scaling out with `torchrun`: DistributedDataParallel, DistributedSampler, all-reduced metrics.

How to run (from this folder)
-----------------------------
    python pretrained_segmentation.py                      # DeepLabV3 vs FPN, about 6-7 min on a 2-core CPU
    python pretrained_segmentation.py --quick              # tiny set-up check, into outputs/quick/
    python pretrained_segmentation.py --predict my_image.png   # segment your own image with the best model
    torchrun --nproc_per_node=2 pretrained_segmentation.py # the same training in 2 processes (DDP)

Without PASCAL VOC in data/ (and DOWNLOAD_VOC = False) the script says so in one line and uses a
built-in synthetic VOC-like dataset; without internet it trains the encoders from random weights.

What you should see
-------------------
The default run (`python pretrained_segmentation.py`) on a 2-core CPU (offline: synthetic data,
encoders from random weights) took 391 s in total and ended with:

    model                              params  train s   mIoU  MS+flip  pix acc
    deeplabv3_resnet18_scratch          13.3M      181  0.479    0.491    0.902
    fpn_resnet18_scratch                12.5M      178  0.902    0.915    0.987

FPN, which predicts at stride 4, reaches test mIoU 0.902 (0.915 with multi-scale + flip);
DeepLabV3's stride-16 map of a 64-pixel image is only 4 x 4, and it reaches 0.479 (0.491).
On an NVIDIA H200 the same run took 59 s (FPN 0.907, DeepLabV3 0.515).
On a CPU that other programs keep busy, `OMP_NUM_THREADS=1 python ...` can be much faster.

References
----------
- Chen et al., "Rethinking Atrous Convolution for Semantic Image Segmentation" (DeepLabV3), 2017.
  https://arxiv.org/abs/1706.05587
- Chen et al., "Encoder-Decoder with Atrous Separable Convolution" (DeepLabV3+), 2018.
  https://arxiv.org/abs/1802.02611
- Lin et al., "Feature Pyramid Networks for Object Detection", 2017. https://arxiv.org/abs/1612.03144
- Kirillov et al., "Panoptic Feature Pyramid Networks" (the FPN semantic head), 2019.
  https://arxiv.org/abs/1901.02446
- Everingham et al., "The PASCAL Visual Object Classes Challenge", 2010. http://host.robots.ox.ac.uk/pascal/VOC/
- torchvision models and weights: https://pytorch.org/vision/stable/models.html
- torchvision feature extraction: https://pytorch.org/vision/stable/feature_extraction.html
- torchvision segmentation reference recipe: https://github.com/pytorch/vision/tree/main/references/segmentation
- PyTorch DDP tutorial: https://pytorch.org/tutorials/intermediate/ddp_tutorial.html
"""

import argparse
import colorsys
import json
import math
import os
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
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset
from torchvision.models.feature_extraction import create_feature_extractor
from tqdm import tqdm

# ----------------------------------------------------------------------------------------------
# data
DATA_ROOT = Path(__file__).resolve().parent / "data"  # holds VOCdevkit/VOC2012 when you use VOC
DATASET = "voc"  # "voc": PASCAL VOC 2012 if found (else synthetic, with a note); "synthetic": skip VOC
DOWNLOAD_VOC = False  # True: fetch VOC 2012 trainval (2 GB) into DATA_ROOT when it is missing
VAL_FRACTION = 0.1  # VOC: share of its train list held out for early stopping (VOC val = our test)
SYNTHETIC_SPLIT_SIZES = (1200, 100, 200)  # train, val, test images of the synthetic dataset
MAX_IMAGES_PER_SPLIT = None  # cap every split (--quick uses it); None = the whole split
IMAGE_SIZE = 64  # synthetic image and training crop size (px); VOC recipes use 321-513 on a GPU
SCALE_RANGE = (0.75, 1.25)  # random rescale before the crop: objects appear at several sizes
JITTER = 0.1  # photometric jitter strength (brightness, contrast, saturation); 0 turns it off
NUM_CLASSES = 21  # VOC: background + 20 object classes
IGNORE_INDEX = 255  # VOC's label for object outlines and padding: no loss, no metric

# model
RUNS = (("deeplabv3", "resnet18"), ("fpn", "resnet18"))  # (decoder, encoder) pairs to compare
PRETRAINED = True  # start the encoder from ImageNet weights (random init, with a note, if offline)
PRETRAINED_WEIGHTS = None  # or a path to a local state-dict file for the encoder (no download)
COMPARE_SCRATCH = True  # when ImageNet weights load, also train each run from scratch to compare
OUTPUT_STRIDE = 16  # DeepLab encoders: 16 or 8 (sharper, ~3x the compute of 16); FPN always uses 32
DECODER_CHANNELS = 128  # width of ASPP / FPN; the papers use 256, 128 is kinder to a CPU
DROPOUT = 0.1  # after the ASPP projection; torchvision uses 0.5 for long GPU runs

# training
EPOCHS = 5  # passes over the training split (the first WARMUP_EPOCHS with a frozen encoder)
WARMUP_EPOCHS = 1  # decoder-only epochs: random decoder gradients never reach the encoder
BATCH_SIZE = 16  # images per step and per process
LR = 3e-3  # AdamW learning rate of the decoder (a few-minute run; SGD 0.01 is the long-run recipe)
ENCODER_LR_FACTOR = 0.1  # pretrained encoder learns 10x slower; from scratch it gets the full LR
WEIGHT_DECAY = 1e-4  # mild L2 regularization, as in the DeepLab recipes
POLY_POWER = 0.9  # poly decay: lr * (1 - step / total_steps) ** 0.9
PATIENCE = 3  # stop after this many epochs without a better validation mIoU
EVAL_SCALES = (0.75, 1.0, 1.25)  # multi-scale test-time inference (1.0 alone = plain inference)
EVAL_FLIP = True  # also average over horizontal flips at test time
PREDICT_MAX_SIDE = 512  # --predict shrinks larger photos to this longer side (memory)

# system
SEED = 0  # same seed, same data, same initial weights, same numbers
DEVICE = "auto"  # "auto" = CUDA, then Apple MPS, then CPU; or "cuda", "mps", "cpu"
NUM_WORKERS = 0  # DataLoader worker processes; 0 is fastest on a 2-core CPU, 4-8 on a GPU box
OUTPUT_DIR = Path(__file__).resolve().parent / "outputs"  # checkpoints, metrics.json, figures

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
)
# ----------------------------------------------------------------------------------------------

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip


# ==============================================================================================
# 0. Distributed helpers
# ==============================================================================================
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


def pick_device() -> torch.device:
    """Resolve DEVICE: "auto" = CUDA (this process's GPU under torchrun), then MPS, then CPU."""
    if DEVICE != "auto":
        return torch.device(DEVICE)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if torch.backends.mps.is_available() and not dist.is_initialized():
        return torch.device("mps")
    return torch.device("cpu")


def memory_format(device: torch.device) -> torch.memory_format:
    """How image-like tensors are laid out in memory: channels-last on CUDA, the default elsewhere.

    channels_last keeps the shape N x C x H x W but stores the numbers as N x H x W x C, the
    order in which NVIDIA's tensor cores convolve fastest, above all in mixed precision (on an
    H200 our training steps were 13-25% faster in it). On a 2-core CPU a ResNet-18 training step
    changed by -12% to +9% from run to run, so there we keep the default layout.
    benchmarks/benchmark.py measures both layouts.
    """
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


# ==============================================================================================
# 1. Data
# ==============================================================================================
# PASCAL VOC 2012 stores each label map as a *palette* PNG: pixel values are class indices 0..20,
# and a colour table (the official palette) only decides how they look. Reading such a PNG with
# PIL and np.array gives the indices directly - never convert it to RGB. Value 255 marks the
# thin outline around every object (where annotators were unsure) and, after our padding, pixels
# outside the image: both are ignored by the loss and the metrics.
#
# Augmentations must move image and mask together (same scale, same crop, same flip), resize
# masks with NEAREST (a blend of label 3 and label 15 is not label 9), pad masks with 255 (padding
# is not "background") and touch colours on the image only.
#
# Offline, a built-in synthetic dataset stands in for VOC: the same 21 classes, each object class
# with its own shape, colour and texture, drawn on cluttered greyish backgrounds, occluding each
# other, with 255 outlines like VOC's. It is generated from (SEED, split, index), so it needs no
# files and is identical on every machine and in every process.


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


def colorize(mask: np.ndarray) -> np.ndarray:
    """Class-index mask H x W -> RGB image H x W x 3 in the VOC palette (255 = cream outline)."""
    return voc_palette()[mask]


def random_scale(image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale image (3 x H x W) and mask (H x W) by one random factor from SCALE_RANGE."""
    low, high = SCALE_RANGE
    factor = low + (high - low) * torch.rand(()).item()
    size = (max(1, round(image.shape[1] * factor)), max(1, round(image.shape[2] * factor)))
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    # Gotcha: masks only with nearest neighbour - interpolated ids would invent classes at edges.
    # "nearest-exact" samples pixel centres like bilinear does; plain "nearest" shifts the mask by
    # up to half a pixel against the image.
    mask = F.interpolate(mask[None, None].float(), size=size, mode="nearest-exact")[0, 0].long()
    return image, mask


def pad_to(
    image: torch.Tensor, mask: torch.Tensor, height: int, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad right/bottom up to height x width: image (3 x h x w) with 0, mask (h x w) with 255."""
    pad = (0, width - image.shape[2], 0, height - image.shape[1])  # (left, right, top, bottom)
    return F.pad(image, pad, value=0.0), F.pad(mask, pad, value=IGNORE_INDEX)  # padding is not background


def random_crop(image: torch.Tensor, mask: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut the same random size x size window out of image and mask."""
    top = torch.randint(0, image.shape[1] - size + 1, ()).item()
    left = torch.randint(0, image.shape[2] - size + 1, ()).item()
    return image[:, top : top + size, left : left + size], mask[top : top + size, left : left + size]


def color_jitter(image: torch.Tensor) -> torch.Tensor:
    """Random brightness, contrast and saturation (image only: labels do not change colour)."""

    def factor() -> float:
        return 1.0 + JITTER * (2 * torch.rand(()).item() - 1)

    image = image * factor()  # brightness
    image = (image - image.mean()) * factor() + image.mean()  # contrast
    grey = image.mean(dim=0, keepdim=True)
    image = (image - grey) * factor() + grey  # saturation
    return image.clamp(0.0, 1.0)


def train_transform(image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Paired augmentation: scale -> pad -> crop to IMAGE_SIZE -> flip -> jitter (image only)."""
    image, mask = random_scale(image, mask)
    image, mask = pad_to(image, mask, max(IMAGE_SIZE, image.shape[1]), max(IMAGE_SIZE, image.shape[2]))
    image, mask = random_crop(image, mask, IMAGE_SIZE)
    if torch.rand(()).item() < 0.5:
        image, mask = image.flip(-1), mask.flip(-1)  # flip both, or the labels walk off the objects
    if JITTER > 0:
        image = color_jitter(image)
    return image.contiguous(), mask.contiguous()


def pil_to_tensors(image: Image.Image, mask: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
    """PIL RGB image + palette mask -> float32 3 x H x W in [0, 1] and int64 H x W class ids."""
    image_t = torch.from_numpy(np.array(image.convert("RGB"), dtype=np.float32) / 255.0)
    # Gotcha: np.array of a palette ("P") PNG gives the class ids; .convert("RGB") would give colours
    mask_t = torch.from_numpy(np.array(mask, dtype=np.int64))
    return image_t.permute(2, 0, 1).contiguous(), mask_t  # H x W x 3 -> 3 x H x W


class VOCDataset(Dataset):
    """torchvision's VOCSegmentation turned into tensors: (3 x H x W float32, H x W int64)."""

    def __init__(self, image_set: str, transform=None, download: bool = False):
        self.voc = torchvision.datasets.VOCSegmentation(
            DATA_ROOT, year="2012", image_set=image_set, download=download
        )
        self.transform = transform

    def __len__(self) -> int:
        return len(self.voc)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = pil_to_tensors(*self.voc[index])  # (PIL RGB, PIL "P") -> tensors
        return self.transform(image, mask) if self.transform else (image, mask)


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
        return ((np.abs(u) <= bar) & (np.abs(v) <= radius)) | ((np.abs(v) <= bar) & (np.abs(u) <= radius))
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


def load_voc() -> dict[str, Dataset] | None:
    """VOC 2012 as {train, val, test} (val = held-out train, test = VOC val), or None if absent."""
    voc_root = Path(DATA_ROOT) / "VOCdevkit" / "VOC2012"
    if not voc_root.is_dir():
        reason = "DOWNLOAD_VOC is False"
        if DOWNLOAD_VOC:
            if is_main_process():  # one process downloads, the others wait at the barrier
                try:
                    VOCDataset("train", download=True)
                    reason = ""
                except (urllib.error.URLError, OSError, RuntimeError) as error:
                    reason = f"download failed: {type(error).__name__}: {error}"
            if dist.is_initialized():
                dist.barrier()
            reason = reason if not voc_root.is_dir() else ""
        if reason:
            log(
                f"note: PASCAL VOC 2012 not found in {voc_root} ({reason}); put VOCdevkit/VOC2012 "
                f'there or set DOWNLOAD_VOC = True (2 GB), or DATASET = "synthetic" to skip '
                "this check - continuing with the built-in synthetic VOC-like dataset"
            )
            return None
    try:
        train_full, val_full = VOCDataset("train", train_transform), VOCDataset("train")
        test = VOCDataset("val")
    except (OSError, RuntimeError) as error:
        raise SystemExit(f"error: {voc_root} is not a complete VOC 2012 folder ({error})")
    order = torch.randperm(len(train_full), generator=torch.Generator().manual_seed(SEED)).tolist()
    n_val = max(1, round(VAL_FRACTION * len(order)))
    return {
        "train": cap(Subset(train_full, order[n_val:])),
        "val": cap(Subset(val_full, order[:n_val])),
        "test": cap(test),
    }


def load_datasets() -> tuple[dict[str, Dataset], str]:
    """({train, val, test} datasets, "voc" or "synthetic"): VOC when found, else synthetic."""
    if DATASET == "voc":
        voc = load_voc()
        if voc is not None:
            return voc, "voc"
    elif DATASET != "synthetic":
        raise SystemExit(f'error: DATASET must be "voc" or "synthetic", not {DATASET!r}')
    n_train, n_val, n_test = SYNTHETIC_SPLIT_SIZES
    datasets = {
        "train": SyntheticVOC(0, n_train, train_transform),
        "val": SyntheticVOC(1, n_val),
        "test": SyntheticVOC(2, n_test),
    }
    return {name: cap(data) for name, data in datasets.items()}, "synthetic"


def pad_collate(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack images of different sizes (VOC) by padding to the largest: image 0, mask 255."""
    height = max(image.shape[1] for image, _ in batch)
    width = max(image.shape[2] for image, _ in batch)
    images, masks = zip(*[pad_to(image, mask, height, width) for image, mask in batch])
    return torch.stack(images), torch.stack(masks)  # N x 3 x H x W, N x H x W


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


def make_loader(dataset: Dataset, train: bool, rank: int = 0, world: int = 1) -> DataLoader:
    """Training loader (shuffled, sharded by DistributedSampler) or evaluation loader (in order)."""
    if train:
        # Gotcha: drop_last - a last batch of one image breaks BatchNorm in ASPP's pooling branch
        sampler = DistributedSampler(dataset, world, rank, shuffle=True, seed=SEED, drop_last=True)
        return DataLoader(
            dataset,
            BATCH_SIZE,
            sampler=sampler,
            drop_last=True,
            num_workers=NUM_WORKERS,
            collate_fn=pad_collate,
        )
    sampler = ShardSampler(len(dataset), rank, world)
    return DataLoader(dataset, BATCH_SIZE, sampler=sampler, num_workers=NUM_WORKERS, collate_fn=pad_collate)


# ==============================================================================================
# 2. Model: pretrained encoder + DeepLabV3 / DeepLabV3+ / FPN decoder
# ==============================================================================================
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
            module.stride = (1, 1)  # the stage's first conv and its 1x1 shortcut no longer downsample
            if module.kernel_size == (3, 3):
                module.dilation, module.padding = (dilation, dilation), (dilation, dilation)


def dilate_vgg(features: nn.Sequential, output_stride: int) -> None:
    """DeepLab-v1 style: pools past output_stride keep the size (3x3, stride 1), later convs dilate."""
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
    """Load ImageNet (or PRETRAINED_WEIGHTS) weights into a torchvision classifier; True if loaded."""
    if PRETRAINED_WEIGHTS is not None:
        path = Path(PRETRAINED_WEIGHTS)
        if not path.is_file():
            raise SystemExit(f"error: PRETRAINED_WEIGHTS file not found: {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)  # accept {"state_dict": ...} wrappers too
        mine = model.state_dict()
        missing = [key for key in mine if key not in state and not key.startswith(("fc.", "classifier."))]
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
            "training the encoder from random initialization (set PRETRAINED_WEIGHTS to a local file)"
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
            model = torchvision.models.get_model(name, weights=None, replace_stride_with_dilation=dilate)
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
        raise SystemExit(f"error: unknown encoder {name!r} (resnet18, resnet34, resnet50, vgg16_bn)")
    loaded = pretrained and load_pretrained(model, name)
    extractor = create_feature_extractor(model, return_nodes=nodes)
    extractor.eval()
    with torch.no_grad():  # one small forward pass tells us each level's channel count
        channels = {key: value.shape[1] for key, value in extractor(torch.zeros(1, 3, 64, 64)).items()}
    transform = encoder_weights(name).transforms()  # ImageNet statistics from the weights' metadata
    return extractor, channels, transform.mean, transform.std, loaded


def conv_bn_relu(in_channels: int, out_channels: int, kernel: int = 3, dilation: int = 1) -> nn.Sequential:
    """Conv (no bias: BatchNorm has one) -> BatchNorm -> ReLU, spatial size kept."""
    padding = dilation * (kernel // 2)
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


# ASPP (Atrous Spatial Pyramid Pooling) looks at the deepest feature map with several receptive
# fields at once: a 1x1 branch (the pixel itself), three 3x3 branches with dilation rates 6/12/18
# (at output stride 16; doubled to 12/24/36 at 8, so they cover the same image area), and an
# image-pooling branch (the average of the whole map: global context, "this is an indoor scene").
# The five outputs are concatenated, projected back with a 1x1 convolution, and regularized with
# dropout. A rate larger than the map degenerates to a 1x1 (only the centre tap sees data): that is
# why the pooling branch exists.


class ASPP(nn.Module):
    """N x C_in x h x w -> N x C x h x w: five parallel branches, concatenated and projected."""

    def __init__(self, in_channels: int, channels: int, rates: tuple[int, int, int]):
        super().__init__()
        self.branches = nn.ModuleList(
            [conv_bn_relu(in_channels, channels, kernel=1)]
            + [conv_bn_relu(in_channels, channels, kernel=3, dilation=rate) for rate in rates]
        )
        # Gotcha: BatchNorm on a 1x1 map needs > 1 value per channel in training mode: batch >= 2
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), conv_bn_relu(in_channels, channels, kernel=1))
        self.project = nn.Sequential(conv_bn_relu(5 * channels, channels, kernel=1), nn.Dropout(DROPOUT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = [branch(x) for branch in self.branches]
        pooled = self.pool(x)  # N x C x 1 x 1
        outputs.append(F.interpolate(pooled, size=x.shape[-2:], mode="bilinear", align_corners=False))
        return self.project(torch.cat(outputs, dim=1))  # N x 5C x h x w -> N x C x h x w


def aspp_rates(output_stride: int) -> tuple[int, int, int]:
    """DeepLabV3's rates: (6, 12, 18) at output stride 16, doubled at 8 (same field of view)."""
    return (6, 12, 18) if output_stride >= 16 else (12, 24, 36)


class DeepLabV3Head(nn.Module):
    """DeepLabV3 decoder: ASPP on c5 -> 3x3 conv -> 1x1 classifier (logits at the output stride)."""

    def __init__(self, channels: dict[str, int], num_classes: int, output_stride: int, width: int):
        super().__init__()
        self.aspp = ASPP(channels["c5"], width, aspp_rates(output_stride))
        self.refine = conv_bn_relu(width, width)
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.classifier(self.refine(self.aspp(features["c5"])))


# DeepLabV3+ adds a light decoder: the ASPP output, upsampled to stride 4, is concatenated with
# the encoder's stride-4 features (squeezed to 48 channels so they do not drown the semantics),
# then two 3x3 convolutions sharpen the boundaries that ASPP alone leaves blurry.


class DeepLabV3PlusHead(DeepLabV3Head):
    """DeepLabV3+ decoder: ASPP(c5) upsampled, joined with a 48-channel projection of c2."""

    def __init__(self, channels: dict[str, int], num_classes: int, output_stride: int, width: int):
        super().__init__(channels, num_classes, output_stride, width)
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
# aliasing of the sum. The semantic head (Panoptic FPN) then processes each level, upsamples all
# of them to stride 4 and adds them up before the classifier.


class FPNHead(nn.Module):
    """FPN decoder: lateral 1x1 + top-down upsample-and-add + 3x3 smoothing + merged stride-4 head."""

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
            F.interpolate(self.semantic[key](pyramid[key]), size=size, mode="bilinear", align_corners=False)
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
) -> SegmentationModel:
    """Any decoder ("deeplabv3", "deeplabv3plus", "fpn") x encoder pair -> full-resolution logits.

    output_stride / decoder_channels default to OUTPUT_STRIDE / DECODER_CHANNELS; --predict passes
    the values stored in the checkpoint. `model.pretrained_loaded` says whether weights loaded.
    """
    if architecture not in ("deeplabv3", "deeplabv3plus", "fpn"):
        raise SystemExit(f"error: unknown architecture {architecture!r} (deeplabv3, deeplabv3plus, fpn)")
    output_stride = 32 if architecture == "fpn" else (output_stride or OUTPUT_STRIDE)
    width = decoder_channels or DECODER_CHANNELS
    extractor, channels, mean, std, loaded = build_encoder(encoder, output_stride, pretrained)
    if architecture == "fpn":
        decoder = FPNHead(channels, num_classes, width)
    else:
        head = DeepLabV3PlusHead if architecture == "deeplabv3plus" else DeepLabV3Head
        decoder = head(channels, num_classes, output_stride, width)
    config = dict(
        architecture=architecture,
        encoder=encoder,
        num_classes=num_classes,
        output_stride=output_stride,
        decoder_channels=width,
    )
    model = SegmentationModel(extractor, decoder, mean, std, config)
    model.pretrained_loaded = loaded
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of trainable-or-not parameters (weights and biases, not buffers)."""
    return sum(parameter.numel() for parameter in model.parameters())


# ==============================================================================================
# 3. Loss and metrics
# ==============================================================================================
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


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """num_classes x num_classes int64 counts (rows = truth, columns = prediction) of N x H x W maps."""
    keep = (target >= 0) & (target < num_classes)  # drops IGNORE_INDEX pixels
    index = num_classes * target[keep] + pred[keep]  # one bin per (truth, prediction) pair
    return torch.bincount(index, minlength=num_classes**2).reshape(num_classes, num_classes)


def metrics_from_confusion(cm: torch.Tensor) -> dict:
    """Per-class IoU (NaN = absent from truth and prediction), mIoU, pixel and mean class accuracy."""
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


# ==============================================================================================
# 4. Evaluation and multi-scale inference
# ==============================================================================================
# A network trained at one scale sees objects at one size. At test time we can show it the image at
# several scales (and mirrored), map every prediction back to the input's pixel grid and average.
# Three rules make this correct: undo each transform on the *prediction* (flip the logits back,
# resize them to the exact input H x W with size=, never scale_factor=, which does not commute
# with the flip), turn logits into probabilities before averaging (logits of different passes are
# not on a common scale), and average probabilities, never argmax maps.


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
                logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
            total, passes = total + logits.float().softmax(dim=1), passes + 1
    return total / passes


@torch.inference_mode()  # no autograd bookkeeping at all: faster and lighter than no_grad
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    num_classes: int,
    scales=(1.0,),
    flip: bool = False,
) -> torch.Tensor:
    """Confusion matrix (K x K, CPU int64) over the loader's whole split, summed over processes."""
    model.eval()  # Gotcha: eval() - BatchNorm uses running statistics, dropout is off
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    for images, masks in loader:
        images, masks = images.to(device), masks.to(device)
        with torch.autocast(device_type=device.type, enabled=device.type == "cuda"):
            probs = multiscale_probs(model, images, scales, flip)
        cm += confusion_matrix(probs.argmax(dim=1), masks, num_classes)
    if dist.is_initialized():
        dist.all_reduce(cm)  # sum over processes: every rank now holds the whole split's counts
    return cm.cpu()


# ==============================================================================================
# 5. Training: frozen warm-up, then fine-tuning
# ==============================================================================================
# Transfer learning in two phases. (1) Warm-up: the encoder is frozen and its BatchNorm layers stay
# in eval mode, so the randomly initialized decoder's first, large and noisy gradients cannot wreck
# the pretrained features, and the BatchNorm statistics learnt on ImageNet are not overwritten by
# a few small batches. It is also cheap: nothing is back-propagated through the encoder.
# (2) Fine-tuning: everything trains, the pretrained encoder with a 10x lower learning rate (it is
# already good; it only needs to adapt), the fresh decoder with the full rate. A randomly
# initialized encoder has nothing to protect, so then it gets the full rate too.
#
# Poly decay, lr * (1 - step/total)^0.9, is the DeepLab schedule: high rates early to move fast,
# a smooth fall to zero so the last steps settle into a minimum instead of bouncing around it.


def set_encoder_trainable(model: SegmentationModel, trainable: bool) -> None:
    """Freeze (no gradients) or unfreeze every encoder parameter."""
    for parameter in model.encoder.parameters():
        parameter.requires_grad_(trainable)


def make_optimizer(model: SegmentationModel, total_steps: int):
    """AdamW with two parameter groups (encoder, decoder) and a per-step poly LR schedule."""
    encoder_lr = LR * (ENCODER_LR_FACTOR if model.pretrained_loaded else 1.0)
    optimizer = torch.optim.AdamW(
        [
            {"params": model.encoder.parameters(), "lr": encoder_lr},
            {"params": model.decoder.parameters(), "lr": LR},
        ],
        weight_decay=WEIGHT_DECAY,
        # fused: one kernel updates all weights instead of ~10 small operations per weight tensor
        # (same maths; the optimizer was 10-16% of a CPU training step). CPU and CUDA have it.
        fused=next(model.parameters()).device.type in ("cpu", "cuda"),
    )
    poly = lambda step: max(0.0, 1 - step / total_steps) ** POLY_POWER  # noqa: E731
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, poly)


def wrap_for_training(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel under torchrun (averages gradients across processes), else the model.

    Built again whenever the set of trainable parameters changes: DDP registers its gradient hooks
    for the parameters that require gradients when it is constructed.
    """
    if not dist.is_initialized():
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def sync_buffers(model: nn.Module) -> None:
    """Copy rank 0's BatchNorm running statistics to all ranks (each rank updated its own)."""
    if dist.is_initialized():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def train_one_epoch(net, model, loader, optimizer, scheduler, scaler, device, frozen: bool) -> float:
    """One pass over the training loader; returns the mean loss. `net` may be the DDP wrapper."""
    model.train()
    if frozen:
        model.encoder.eval()  # Gotcha: frozen also means BatchNorm in eval mode (statistics kept)
    criterion = nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)  # Gotcha: 255 is not a class
    total, steps = 0.0, 0
    for images, masks in tqdm(loader, desc="train", leave=False, disable=not is_main_process()):
        images, masks = images.to(device), masks.to(device)  # N x 3 x H x W float, N x H x W int64
        with torch.autocast(device_type=device.type, enabled=device.type == "cuda"):
            loss = criterion(net(images), masks)  # logits N x K x H x W against class ids
        if not torch.isfinite(loss):
            raise SystemExit(f"error: the loss became {loss.item()}; lower LR (now {LR}) or check the masks")
        optimizer.zero_grad(set_to_none=True)  # set_to_none: frees memory, frozen params stay None
        scaler.scale(loss).backward()  # under DDP this also averages gradients across processes
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()  # poly decay is per step, not per epoch
        total, steps = total + loss.item(), steps + 1
    return total / max(steps, 1)


def save_checkpoint(model: SegmentationModel, path: Path) -> None:
    """Atomic save (temp file + os.replace): a crash mid-write never leaves a broken checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "config": model.config}, temporary)
    os.replace(temporary, path)


def train_model(model: SegmentationModel, name: str, loaders: dict, device: torch.device) -> dict:
    """Warm-up + fine-tuning with validation every epoch, early stopping, best checkpoint kept.

    Returns {"history": [...], "train_seconds": float, "best_val_miou": float}; the model ends with
    the best validation weights loaded.
    """
    train_loader = loaders["train"]
    optimizer, scheduler = make_optimizer(model, EPOCHS * len(train_loader))
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")  # fp16 safety on CUDA
    history, best_miou, best_state, stale = [], -1.0, None, 0
    start = time.time()
    try:
        for epoch in range(1, EPOCHS + 1):
            frozen = epoch <= WARMUP_EPOCHS
            if epoch == 1 or epoch == WARMUP_EPOCHS + 1:  # a phase starts
                set_encoder_trainable(model, not frozen)
                net = wrap_for_training(model, device)
                log(
                    f"  phase: {'warm-up, encoder frozen' if frozen else 'fine-tuning everything'}, "
                    f"encoder lr {optimizer.param_groups[0]['lr']:.2g}, "
                    f"decoder lr {optimizer.param_groups[1]['lr']:.2g}"
                )
            train_loader.sampler.set_epoch(epoch)  # a different shuffle every epoch, same on all ranks
            loss = train_one_epoch(net, model, train_loader, optimizer, scheduler, scaler, device, frozen)
            sync_buffers(model)
            val = metrics_from_confusion(evaluate(model, loaders["val"], device, NUM_CLASSES))
            history.append({"epoch": epoch, "loss": loss, "val_miou": val["miou"]})
            log(
                f"  epoch {epoch:2d}/{EPOCHS}  loss {loss:.3f}  val mIoU {val['miou']:.3f}  "
                f"pixel acc {val['pixel_accuracy']:.3f}  ({time.time() - start:.0f} s)"
            )
            if val["miou"] > best_miou:
                best_miou, stale = val["miou"], 0
                best_state = {key: value.detach().clone() for key, value in model.state_dict().items()}
                if is_main_process():
                    save_checkpoint(model, OUTPUT_DIR / f"{name}.pt")
            else:
                stale += 1
                if stale >= PATIENCE:
                    log(f"  early stop: no better validation mIoU for {PATIENCE} epochs")
                    break
    except KeyboardInterrupt:
        log("  interrupted: continuing with the best checkpoint so far")
    if best_state is None:
        raise SystemExit("error: training stopped before the first validation; nothing to evaluate")
    model.load_state_dict(best_state)
    set_encoder_trainable(model, True)
    return {"history": history, "train_seconds": time.time() - start, "best_val_miou": best_miou}


# ==============================================================================================
# 6. Visualization
# ==============================================================================================
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
        np.arange(len(class_names)) + 0.4 - width / 2, class_names, rotation=60, fontsize=8, ha="right"
    )
    ax.set_ylabel("IoU")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_predictions(images: torch.Tensor, label_maps: dict[str, torch.Tensor], path: Path) -> None:
    """Rows of: image | one palette-coloured N x H x W label map per entry (truth, predictions)."""
    columns = 1 + len(label_maps)
    fig, axes = plt.subplots(len(images), columns, figsize=(2 * columns, 2 * len(images)), squeeze=False)
    for row in range(len(images)):
        panels = [images[row].permute(1, 2, 0).numpy()]  # 3 x H x W -> H x W x 3
        panels += [colorize(labels[row].numpy()) for labels in label_maps.values()]
        for col, (panel, title) in enumerate(zip(panels, ["image", *label_maps])):
            axes[row, col].imshow(panel)
            axes[row, col].axis("off")
            if row == 0:
                axes[row, col].set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_curves(runs: list[dict], path: Path) -> None:
    """Training loss and validation mIoU per epoch for every run."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3))
    for run in runs:
        epochs = [h["epoch"] for h in run["history"]]
        left.plot(epochs, [h["loss"] for h in run["history"]], marker="o", label=run["model"])
        right.plot(epochs, [h["val_miou"] for h in run["history"]], marker="o", label=run["model"])
    left.set(xlabel="epoch", ylabel="training loss")
    right.set(xlabel="epoch", ylabel="validation mIoU")
    left.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ==============================================================================================
# 7. Prediction on your own image
# ==============================================================================================
# The checkpoint stores the model's configuration, so --predict rebuilds exactly the network that
# was trained (even if you edited the constants since) and runs multi-scale + flip inference.


def load_image(path: Path) -> torch.Tensor:
    """An image file -> 1 x 3 x H x W float32 in [0, 1], longer side at most PREDICT_MAX_SIDE."""
    if not path.is_file():
        raise SystemExit(f"error: no such image file: {path}")
    try:
        image = Image.open(path).convert("RGB")
    except (UnidentifiedImageError, OSError):
        raise SystemExit(f"error: {path} is not an image PIL can read (try a .png or .jpg)") from None
    image.thumbnail((PREDICT_MAX_SIDE, PREDICT_MAX_SIDE))  # keeps the aspect ratio
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None].contiguous()  # H x W x 3 -> 1 x 3 x H x W


def predict(image_path: str) -> dict:
    """Segment one image with OUTPUT_DIR/best_model.pt; save the mask and a figure beside outputs."""
    checkpoint_path = OUTPUT_DIR / "best_model.pt"
    if not checkpoint_path.is_file():
        raise SystemExit(
            f"error: no trained model at {checkpoint_path}; run `python {Path(__file__).name}` first "
            "(a --quick run's model: --quick --predict)"
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
    )
    model.load_state_dict(checkpoint["model"])
    device = pick_device()
    model.to(device, memory_format=memory_format(device)).eval()
    with torch.inference_mode():
        pred = multiscale_probs(model, image.to(device), EVAL_SCALES, EVAL_FLIP).argmax(dim=1)[0].cpu()
    stem = Path(image_path).stem
    mask_path, figure_path = OUTPUT_DIR / f"{stem}_mask.png", OUTPUT_DIR / f"{stem}_prediction.png"
    mask_image = Image.fromarray(pred.numpy().astype(np.uint8), mode="P")  # a VOC-style palette PNG
    mask_image.putpalette(voc_palette().flatten().tolist())
    mask_image.save(mask_path)
    plot_predictions(image.cpu(), {f"{config['architecture']}_{config['encoder']}": pred[None]}, figure_path)
    fractions = {VOC_CLASSES[c]: round((pred == c).float().mean().item(), 4) for c in pred.unique().tolist()}
    print(f"classes found (share of pixels): {fractions}")
    print(f"saved {mask_path} and {figure_path}")
    return {"image": str(image_path), "mask": str(mask_path), "classes": fractions}


# ==============================================================================================
# 8. Main: DeepLabV3 vs FPN (vs scratch), evaluated on the test split
# ==============================================================================================


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA) and numpy's legacy global generator."""
    torch.manual_seed(seed)
    np.random.seed(seed)


def run_experiment(
    architecture: str, encoder: str, pretrained: bool, loaders: dict, device
) -> tuple[dict, nn.Module]:
    """Build, train and test one decoder x encoder pair; return its result row and the model."""
    seed_everything(SEED)  # every run starts from the same data order and seed
    model = build_model(architecture, encoder, NUM_CLASSES, pretrained).to(device, memory_format=memory_format(device))
    name = f"{architecture}_{encoder}_{'pretrained' if model.pretrained_loaded else 'scratch'}"
    parameters, output_stride = count_parameters(model), model.config["output_stride"]
    log(f"\n== {name}: {parameters / 1e6:.1f} M parameters, output stride {output_stride}")
    training = train_model(model, name, loaders, device)
    cm = evaluate(model, loaders["test"], device, NUM_CLASSES)  # plain single-scale inference
    single = metrics_from_confusion(cm)
    multi = metrics_from_confusion(
        evaluate(model, loaders["test"], device, NUM_CLASSES, EVAL_SCALES, EVAL_FLIP)
    )
    log(
        f"  test mIoU {single['miou']:.3f} (multi-scale + flip {multi['miou']:.3f}), "
        f"pixel acc {single['pixel_accuracy']:.3f}, trained {training['train_seconds']:.0f} s"
    )
    row = {
        "model": name,
        "architecture": architecture,
        "encoder": encoder,
        "pretrained": model.pretrained_loaded,
        "params": parameters,
        "train_seconds": round(training["train_seconds"], 1),
        "epochs": len(training["history"]),
        "best_val_miou": training["best_val_miou"],
        "miou": single["miou"],
        "pixel_accuracy": single["pixel_accuracy"],
        "mean_class_accuracy": single["mean_class_accuracy"],
        "miou_multiscale": multi["miou"],
        "pixel_accuracy_multiscale": multi["pixel_accuracy"],
        # NaN (class absent from truth and prediction) is not valid JSON: stored as null
        "per_class_iou": [None if math.isnan(v) else v for v in single["per_class_iou"]],
        "per_class_accuracy": [None if math.isnan(v) else v for v in single["per_class_accuracy"]],
        "history": training["history"],
        "confusion_matrix": cm.tolist(),
    }
    return row, model


def print_report(runs: list[dict]) -> None:
    """Per-class table of the best run, then the comparison table of all runs."""
    best = max(runs, key=lambda run: run["miou"])
    log(f"\nper-class test results of {best['model']} (single scale; '-' = class absent):")
    log(f"  {'class':<13} {'IoU':>6} {'acc':>6}")
    for name, iou, acc in zip(VOC_CLASSES, best["per_class_iou"], best["per_class_accuracy"]):
        iou_text, acc_text = ("-" if v is None else f"{v:.3f}" for v in (iou, acc))
        log(f"  {name:<13} {iou_text:>6} {acc_text:>6}")
    log(f"\n{'model':<32} {'params':>8} {'train s':>8} {'mIoU':>6} {'MS+flip':>8} {'pix acc':>8}")
    for run in runs:
        log(
            f"{run['model']:<32} {run['params'] / 1e6:>7.1f}M {run['train_seconds']:>8.0f} "
            f"{run['miou']:>6.3f} {run['miou_multiscale']:>8.3f} {run['pixel_accuracy']:>8.3f}"
        )


def save_outputs(runs: list[dict], models: dict, loaders: dict, metrics: dict, device) -> None:
    """Figures, best_model.pt and metrics.json (atomic) in OUTPUT_DIR; rank 0 only."""
    best = max(runs, key=lambda run: run["miou"])
    save_checkpoint(models[best["model"]], OUTPUT_DIR / "best_model.pt")
    plot_confusion(torch.tensor(best["confusion_matrix"]), VOC_CLASSES, OUTPUT_DIR / "confusion_matrix.png")
    plot_per_class_iou(runs, VOC_CLASSES, OUTPUT_DIR / "per_class_iou.png")
    plot_curves(runs, OUTPUT_DIR / "training_curves.png")
    images, masks = next(iter(DataLoader(loaders["test"].dataset, batch_size=4, collate_fn=pad_collate)))
    label_maps = {"truth": masks}
    with torch.inference_mode():
        for name, model in models.items():
            probs = multiscale_probs(model.eval(), images.to(device), EVAL_SCALES, EVAL_FLIP)
            label_maps[name] = probs.argmax(dim=1).cpu()  # N x H x W class ids
    plot_predictions(images, label_maps, OUTPUT_DIR / "predictions.png")
    temporary = OUTPUT_DIR / "metrics.json.tmp"
    temporary.write_text(json.dumps(metrics, indent=2))
    os.replace(temporary, OUTPUT_DIR / "metrics.json")
    log(f"\nsaved metrics.json, best_model.pt ({best['model']}) and figures in {OUTPUT_DIR}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Pretrained encoders + DeepLabV3 / FPN segmentation.")
    parser.add_argument("--quick", action="store_true", help="tiny configuration to check the set-up")
    parser.add_argument("--predict", metavar="IMAGE", help="segment IMAGE with outputs/best_model.pt")
    args = parser.parse_args(argv)
    if args.quick:
        # Replace the constants above for this run only, and keep its files in outputs/quick/
        # so that a set-up check never overwrites the model or metrics of a real run.
        globals().update(QUICK, OUTPUT_DIR=OUTPUT_DIR / "quick")
    if args.predict:  # `--quick --predict IMAGE` uses the quick run's model
        return predict(args.predict)

    start = time.time()
    rank, world = setup_distributed()
    device = pick_device()
    # cuDNN tries its convolution algorithms on the first batch of each shape and keeps the
    # fastest: training crops all have one shape (VOC's test images vary: one try per new shape).
    torch.backends.cudnn.benchmark = True
    seed_everything(SEED)
    log(f"device: {device}, processes: {world}")
    datasets, dataset_name = load_datasets()
    loaders = {
        "train": make_loader(datasets["train"], train=True, rank=rank, world=world),
        "val": make_loader(datasets["val"], train=False, rank=rank, world=world),
        "test": make_loader(datasets["test"], train=False, rank=rank, world=world),
    }
    log(
        f"dataset: {dataset_name}, images train/val/test: "
        f"{len(datasets['train'])}/{len(datasets['val'])}/{len(datasets['test'])}"
    )

    runs, models = [], {}
    for architecture, encoder in RUNS:
        row, model = run_experiment(architecture, encoder, PRETRAINED, loaders, device)
        runs.append(row)
        models[row["model"]] = model
        if row["pretrained"] and COMPARE_SCRATCH:  # the same model from random weights: the gain
            row, model = run_experiment(architecture, encoder, False, loaders, device)
            runs.append(row)
            models[row["model"]] = model

    print_report(runs)
    metrics = {
        "dataset": dataset_name,
        "pretrained": any(run["pretrained"] for run in runs),
        "device": str(device),
        "world_size": world,
        "runs": runs,
        "best_model": max(runs, key=lambda run: run["miou"])["model"],
        "total_seconds": round(time.time() - start, 1),
    }
    if is_main_process():
        save_outputs(runs, models, loaders, metrics, device)
    log(f"total time {metrics['total_seconds']:.0f} s")
    if dist.is_initialized():
        dist.destroy_process_group()
    return metrics


if __name__ == "__main__":
    main()
