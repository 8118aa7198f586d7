"""How much can a coarse logit grid draw? Example 2's coarse-label score next to fitted logits.

Example 2 reports, for every model, the test mIoU of the true labels averaged over the cells of
the model's prediction grid and resized back (its "coarse" column). That is one particular
coarse map, not the best one: bilinear interpolation of well-chosen logits can put a boundary
anywhere inside a cell. This script fits free logits on the grid to each test mask (Adam on the
cross-entropy of the resized logits, as the network's are resized), which gives a lower bound on
what any model with that grid could score, and prints both numbers for the synthetic test set.

    python benchmarks/stride_reference.py            # strides 16 and 4, 200 test images
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchmark  # noqa: E402  (the script loader)


def fitted_grid_miou(module, masks: torch.Tensor, stride: int, steps: int, num_classes=None):
    """mIoU of logits on a stride-`stride` grid fitted to `masks` (N x H x W), then resized."""
    num_classes = num_classes or module.NUM_CLASSES
    height, width = masks.shape[-2:]
    grid = (-(-height // stride), -(-width // stride))  # ceil: the encoder's padding-free grid
    logits = torch.zeros(len(masks), num_classes, *grid, requires_grad=True)
    optimizer = torch.optim.Adam([logits], lr=0.5)
    for _ in range(steps):
        fine = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
        loss = F.cross_entropy(fine, masks, ignore_index=module.IGNORE_INDEX)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        fine = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
        cm = module.confusion_matrix(fine.argmax(dim=1), masks, num_classes)
    return module.metrics_from_confusion(cm)["miou"]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200, help="synthetic test images")
    parser.add_argument("--steps", type=int, default=300, help="Adam steps of the fit")
    args = parser.parse_args(argv)
    module = benchmark.load_script("example_2_pretrained_encoders/pretrained_segmentation.py")
    test = module.SyntheticVOC(2, args.images)  # the chapter's synthetic test split
    masks = torch.stack([test[i][1] for i in range(len(test))])  # N x H x W
    loader = [(None, masks)]  # one batch, as batches_of reads a loader
    results = {}
    for stride in (16, 4):
        coarse = module.coarse_labels_miou(loader, stride, module.NUM_CLASSES)
        fitted = fitted_grid_miou(module, masks, stride, args.steps)
        results[stride] = {"coarse_labels": round(coarse, 3), "fitted": round(fitted, 3)}
        print(f"stride {stride:2d}: coarse labels {coarse:.3f}, fitted logits {fitted:.3f}")
    return results


if __name__ == "__main__":
    main()
